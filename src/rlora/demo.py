"""`rlora demo`: the embedded default end to end (train R-LoRA on real tasks, evaluate base and tuned)."""

from __future__ import annotations

import json
from pathlib import Path

from ._io import atomic_write_text
from .evaluate import METRIC_TITLES, METRICS, evaluate_run, results_table
from .runconfig import check_same_config, load_run_config
from .train import ensure_trained


def run_demo(overrides: list[str] | tuple[str, ...] = (), cache_dir: str | None = None) -> str:
    """Trains the `demo` preset (reusing a finished run, resuming an interrupted one), evaluates the base
    model and the tuned one on the held-out split, writes RUN_DIR/demo.md and returns its table."""
    cfg = load_run_config("demo", overrides)
    run_dir = Path(cfg.output_dir)
    check_same_config(cfg, run_dir)  # results of a run made with other settings are never reused
    ensure_trained(cfg, cache_dir)
    results = {}
    for column, base, stem in (("base", True, "eval_base"), (cfg.method, False, "eval")):
        saved = run_dir / f"{stem}.json"
        fresh = not saved.is_file()
        results[column] = evaluate_run(run_dir, cache_dir, base=base) if fresh else json.loads(saved.read_text())
    table = results_table(results) + "\n\n" + gain_line(results["base"], results[cfg.method], cfg.method)
    atomic_write_text(run_dir / "demo.md", table + "\n")
    return table


def gain_line(base: dict, tuned: dict, name: str) -> str:
    """One sentence: the tuned model's average against the base model's, per metric both have."""
    parts = [
        f"{METRIC_TITLES[metric]} {100 * base['average'][metric]:.1f} -> {100 * tuned['average'][metric]:.1f} "
        f"({100 * (tuned['average'][metric] - base['average'][metric]):+.1f} points)"
        for metric in METRICS
        if base["average"].get(metric) is not None and tuned["average"].get(metric) is not None
    ]
    return f"Average over the tasks, base -> {name}: " + "; ".join(parts) + "."
