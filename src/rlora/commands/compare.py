"""Comparing methods fairly: every method trained and evaluated on the same data, split and budget, per seed.

    OUT/<method>/seed<k>/      a normal run folder (train + eval); reused when its eval.json exists
    OUT/comparison.json        every run's per-task results, the means and 95% CIs, paired differences
    OUT/comparison.md          the same as Markdown tables
    OUT/comparison.png         mean accuracy (and held-out loss) per task and method with 95% CI error bars

Compared: the accuracies (higher is better) and the held-out loss (nats per token, lower is better; the paired
difference is method − reference either way, so a better method has a negative loss difference). Perplexity is
left out: it is exp(loss), and its mean over seeds says nothing the loss's does not. A metric some run lacks (one
evaluated before the loss was measured) is left out for that method.

An interrupted comparison continues where it stopped: finished runs are reused, a run with checkpoints
resumes from its last complete one.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
from pathlib import Path

from .._io import atomic_write_json, atomic_write_text
from ..errors import ConfigError
from ..evaluate import ACCURACY_METRICS
from ..methods import METHODS
from ..plots import plot_comparison
from ..reports import comparison_markdown
from ..run import RunFolder
from ..runconfig import RunConfig, load_run_config, validate_run_config
from ..stats import mean_ci, paired_difference
from .eval import evaluate_run

logger = logging.getLogger(__name__)

COMPARED_METRICS = (*ACCURACY_METRICS, "loss")


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        given = ", ".join(unknown) or "(none given)"
        raise ConfigError(f"--methods: unknown {given}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods: {text!r} names a method twice")
    return methods


def run_config_for(base: RunConfig, out: Path, method: str, seed: int) -> RunConfig:
    cfg = copy.deepcopy(base)
    cfg.method, cfg.seed, cfg.output_dir = method, seed, str(out / method / f"seed{seed}")
    return cfg


def compare(
    base: RunConfig, methods: list[str], seeds: list[int], out: str | Path, cache_dir: str | None = None
) -> dict:
    """Trains and evaluates every (method, seed) not finished yet, then writes the comparison files."""
    from ..train import ensure_trained

    out = Path(out).expanduser()
    configs = {(method, seed): run_config_for(base, out, method, seed) for seed in seeds for method in methods}
    for cfg in configs.values():  # the seeds and folders that the comparison makes, before anything trains
        validate_run_config(cfg, "compare")
    runs: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        for method in methods:
            cfg = configs[method, seed]
            folder = RunFolder(cfg.output_dir)
            folder.check_config(cfg)
            results = folder.read_results()
            if results is None:
                results = evaluate_run(ensure_trained(cfg, cache_dir), cache_dir=cache_dir)
            else:
                logger.info("reusing %s", folder.results())
            runs.setdefault(method, {})[seed] = results
    summary = summarize(runs, methods, seeds)
    atomic_write_json(out / "comparison.json", summary)
    atomic_write_text(out / "comparison.md", comparison_markdown(summary))
    plot_comparison(summary, out / "comparison.png")
    return summary


def summarize(runs: dict[str, dict[int, dict]], methods: list[str], seeds: list[int]) -> dict:
    """Means and 95% CIs over seeds per method and task; paired differences of each method against the first."""
    tasks = list(next(iter(runs[methods[0]].values()))["tasks"])
    summary: dict = {"methods": methods, "seeds": seeds, "tasks": tasks, "metrics": {}, "runs": runs}
    for metric in COMPARED_METRICS:
        per_method = {}
        for method in methods:
            values = {task: [runs[method][s]["tasks"][task].get(metric) for s in seeds] for task in tasks}
            average = [runs[method][s]["average"].get(metric) for s in seeds]
            if any(v is None for vs in [*values.values(), average] for v in vs):
                continue
            per_method[method] = {  # the overall mean apart from the tasks: a task may be called "average"
                "tasks": {task: {"values": v, **_ci(mean_ci(v))} for task, v in values.items()},
                "average": {"values": average, **_ci(mean_ci(average))},
            }
        if not per_method:
            continue
        reference = methods[0]
        diffs = {}
        for method in per_method:
            if method != reference and reference in per_method:
                ours, theirs = per_method[method], per_method[reference]
                diffs[method] = {
                    "tasks": {
                        task: _ci(paired_difference(ours["tasks"][task]["values"], theirs["tasks"][task]["values"]))
                        for task in tasks
                    },
                    "average": _ci(paired_difference(ours["average"]["values"], theirs["average"]["values"])),
                }
        summary["metrics"][metric] = {"per_method": per_method, "difference_to": reference, "differences": diffs}
    return summary


def _ci(pair: tuple[float, float]) -> dict[str, float | None]:
    """JSON-safe: the half-width is None (not NaN) with a single seed."""
    return {"mean": pair[0], "ci95": None if math.isnan(pair[1]) else pair[1]}


def run(args: argparse.Namespace) -> int:
    methods = parse_methods(args.methods)
    base = load_run_config(args.config, args.overrides)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    summary = compare(base, methods, seeds, args.output or base.output_dir, cache_dir=args.cache_dir)
    print(comparison_markdown(summary))
    return 0
