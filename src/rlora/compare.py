"""Comparing methods fairly: every method trained and evaluated on the same data, split and budget, per seed.

    OUT/<method>/seed<k>/      a normal run folder (train + eval); reused when its eval.json exists
    OUT/comparison.json        every run's per-task accuracies, the means and 95% CIs, paired differences
    OUT/comparison.md          the same as Markdown tables
    OUT/comparison.png         mean accuracy per task and method with 95% CI error bars

An interrupted comparison continues where it stopped: finished runs are reused, a run with checkpoints
resumes from its last complete one.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

from ._io import atomic_write_json, atomic_write_text
from ._plot import pyplot, save_png
from .methods import METHODS
from .runconfig import RunConfig, check_same_config
from .stats import format_ci, mean_ci, paired_difference

logger = logging.getLogger(__name__)
METRIC_TITLES = {
    "acc_ll": "accuracy by log-likelihood (%)",
    "acc_norm": "accuracy by log-likelihood per character (%)",
    "acc_gen": "accuracy by generated exact match (%)",
}


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods: {text!r} names a method twice")
    return methods


def run_config_for(base: RunConfig, out: Path, method: str, seed: int) -> RunConfig:
    cfg = copy.deepcopy(base)
    cfg.method, cfg.seed, cfg.output_dir = method, seed, str(out / method / f"seed{seed}")
    return cfg


def compare(
    base: RunConfig, methods: list[str], seeds: list[int], out: str | Path, cache_dir: str | None = None
) -> dict:
    """Trains and evaluates every (method, seed) not finished yet, then writes the comparison files."""
    from .evaluate import evaluate_run
    from .train import ensure_trained

    out = Path(out)
    runs: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        for method in methods:
            cfg = run_config_for(base, out, method, seed)
            run_dir = Path(cfg.output_dir)
            eval_file = run_dir / "eval.json"
            check_same_config(cfg, run_dir)
            if eval_file.is_file():
                logger.info("reusing %s", eval_file)
            else:
                evaluate_run(ensure_trained(cfg, cache_dir), cache_dir=cache_dir)
            runs.setdefault(method, {})[seed] = json.loads(eval_file.read_text())
    summary = summarize(runs, methods, seeds)
    atomic_write_json(out / "comparison.json", summary)
    atomic_write_text(out / "comparison.md", comparison_markdown(summary))
    plot_comparison(summary, out / "comparison.png")
    return summary


def summarize(runs: dict[str, dict[int, dict]], methods: list[str], seeds: list[int]) -> dict:
    """Means and 95% CIs over seeds per method and task; paired differences of each method against the first."""
    tasks = list(next(iter(runs[methods[0]].values()))["tasks"])
    summary: dict = {"methods": methods, "seeds": seeds, "tasks": tasks, "metrics": {}, "runs": runs}
    for metric in METRIC_TITLES:
        per_method = {}
        for method in methods:
            values = {task: [runs[method][s]["tasks"][task][metric] for s in seeds] for task in tasks}
            if any(v is None for vs in values.values() for v in vs):
                continue
            values["average"] = [runs[method][s]["average"][metric] for s in seeds]
            per_method[method] = {task: {"values": v, **_ci(mean_ci(v))} for task, v in values.items()}
        if not per_method:
            continue
        reference = methods[0]
        diffs = {}
        for method in per_method:
            if method != reference and reference in per_method:
                diffs[method] = {
                    task: _ci(
                        paired_difference(per_method[method][task]["values"], per_method[reference][task]["values"])
                    )
                    for task in [*tasks, "average"]
                }
        summary["metrics"][metric] = {"per_method": per_method, "difference_to": reference, "differences": diffs}
    return summary


def _ci(pair: tuple[float, float]) -> dict[str, float | None]:
    """JSON-safe: the half-width is None (not NaN) with a single seed."""
    return {"mean": pair[0], "ci95": None if math.isnan(pair[1]) else pair[1]}


def comparison_markdown(summary: dict) -> str:
    seeds, tasks = summary["seeds"], [*summary["tasks"], "average"]
    parts = []
    for metric, data in summary["metrics"].items():
        methods = list(data["per_method"])
        parts.append(
            f"### {METRIC_TITLES[metric]}: mean ± 95% CI over {len(seeds)} seeds ({', '.join(map(str, seeds))})"
        )
        parts.append("")
        parts.append("| task | " + " | ".join(methods) + " |")
        parts.append("|---|" + "---|" * len(methods))
        for task in tasks:
            cells = [
                format_ci(data["per_method"][m][task]["mean"], data["per_method"][m][task]["ci95"]) for m in methods
            ]
            parts.append(f"| {'**average**' if task == 'average' else task} | " + " | ".join(cells) + " |")
        if data["differences"]:
            ref = data["difference_to"]
            others = list(data["differences"])
            parts += ["", f"Paired difference to {ref} (same seed), points, mean ± 95% CI:", ""]
            parts.append("| task | " + " | ".join(f"{m} − {ref}" for m in others) + " |")
            parts.append("|---|" + "---|" * len(others))
            for task in tasks:
                cells = [
                    format_ci(data["differences"][m][task]["mean"], data["differences"][m][task]["ci95"])
                    for m in others
                ]
                parts.append(f"| {'**average**' if task == 'average' else task} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def plot_comparison(summary: dict, path: Path) -> None:
    plt = pyplot()
    metrics = list(summary["metrics"])
    tasks = [*summary["tasks"], "average"]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(1.6 + 1.3 * len(tasks), 3.2 * len(metrics)), squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        per_method = summary["metrics"][metric]["per_method"]
        width = 0.8 / len(per_method)
        for j, (method, data) in enumerate(per_method.items()):
            means = [100 * data[t]["mean"] for t in tasks]
            errs = [0 if data[t]["ci95"] is None else 100 * data[t]["ci95"] for t in tasks]
            xs = [i + (j - (len(per_method) - 1) / 2) * width for i in range(len(tasks))]
            ax.bar(xs, means, width, yerr=errs, capsize=2, label=method)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_ylabel(METRIC_TITLES[metric])
        ax.set_title(f"mean ± 95% CI over {len(summary['seeds'])} seeds")
        ax.legend(fontsize=7, ncol=min(5, len(per_method)))
    save_png(fig, path)
