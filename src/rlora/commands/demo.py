"""`rlora demo`: the embedded default end to end (train R-LoRA on real tasks, evaluate base and tuned)."""

from __future__ import annotations

import argparse

from .._io import atomic_write_text
from ..reports import gain_line, results_table
from ..run import RunFolder
from ..runconfig import load_run_config
from ..train import ensure_trained
from .eval import evaluate_run


def run_demo(overrides: list[str] | tuple[str, ...] = (), cache_dir: str | None = None) -> str:
    """Trains the `demo` preset (reusing a finished run, resuming an interrupted one), evaluates the base
    model and the tuned one on the held-out split, writes RUN_DIR/demo.md and returns its table."""
    cfg = load_run_config("demo", overrides)
    folder = RunFolder(cfg.output_dir)
    folder.check_config(cfg)  # results of a run made with other settings are never reused
    ensure_trained(cfg, cache_dir)
    results = {}
    for column, base in (("base", True), (cfg.method, False)):
        results[column] = folder.read_results(base) or evaluate_run(folder.root, cache_dir, base=base)
    table = results_table(results) + "\n\n" + gain_line(results["base"], results[cfg.method], cfg.method)
    atomic_write_text(folder.demo_table, table + "\n")
    return table


def run(args: argparse.Namespace) -> int:
    print(run_demo(args.overrides, args.cache_dir))
    return 0
