"""`rlora plan`: from a finished comparison (a pilot), how many seeds and test examples per task would resolve a given
effect: for each paired difference (method − reference) of a metric, per task and on average, the fewest test
examples per task that give a minimum detectable difference at most the effect, for each number of seeds
(`power.plan`; its model and formula: `power`'s docstring, docs/planning.md)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..errors import ConfigError, RunFolderError
from ..metrics import METRIC_INFO
from ..power import Noise, plan
from ..reports import markdown_cell, markdown_table

COMPARISON_FILE = "comparison.json"
PLANNED_SEEDS = (2, 3, 4, 5, 6, 8, 10, 15, 20)


def read_comparison(path: str | Path) -> dict:
    """A comparison folder's (or file's) summary, checked for what planning reads."""
    path = Path(path)
    file = path / COMPARISON_FILE if path.is_dir() else path
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise RunFolderError(f"{file}: not a readable comparison ({error}); run `rlora compare` first") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
        raise RunFolderError(f"{file}: not a comparison summary (no metrics)")
    return summary


def _noise(d: object, where: str) -> Noise | None:
    if d is None:
        return None
    try:
        noise = Noise(**d)
    except TypeError:
        raise RunFolderError(f"{where}: not a noise record of `rlora compare`") from None
    numbers = (noise.var_seed, noise.var_example, noise.var_residual)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in numbers) or noise.seeds < 2:
        raise RunFolderError(f"{where}: variances must be finite numbers >= 0 and seeds >= 2")
    return noise


def plan_markdown(summary: dict, metric: str, effect: float, file: str) -> str:
    """The plan of every paired difference of `metric` for `effect` (in the metric's shown unit: points, nats)."""
    data = summary["metrics"].get(metric)
    if not isinstance(data, dict) or not data.get("differences"):
        have = ", ".join(m for m, d in summary["metrics"].items() if isinstance(d, dict) and d.get("differences"))
        raise ConfigError(f"--metric {metric}: {file} has no paired differences of it; it has: {have or 'none'}")
    info = METRIC_INFO[metric]
    stored = effect / info.scale
    parts = [
        f"### Test examples per task needed to resolve {effect:g} {info.difference_unit} of {info.title} "
        f"(95%, power 80%), by number of seeds; from the pilot's {len(summary['seeds'])} seeds",
        "",
        "never: the seeds' noise alone exceeds the effect at that many seeds. any: the metric has no per-example "
        "outcomes (the held-out loss), so the test set is held fixed and only the seeds are planned. MDE now: with "
        "the pilot's seeds and examples.",
        "",
    ]
    ref = data["difference_to"]
    for method, d in data["differences"].items():
        noise = d.get("noise") or {}
        items = [*(noise.get("tasks") or {}).items(), ("average", noise.get("average"))]
        rows = []
        for task, record in items:
            n = _noise(record, f"{file}: {metric}.{method}.{task}")
            name = "**average**" if task == "average" else markdown_cell(task)
            if n is None:
                continue
            if n.mde is None:  # identical outcomes everywhere: nothing to plan from
                rows.append([name, "not estimable", *("–" for _ in PLANNED_SEEDS)])
                continue
            planned = plan(n, stored, PLANNED_SEEDS)
            mde_now = f"{info.scale * n.mde:.{info.digits}f}"
            fixed = n.example_sd is None  # no per-example outcomes: the examples are not in the model
            cells = ["never" if p["examples"] is None else "any" if fixed else str(p["examples"]) for p in planned]
            rows.append([name, mde_now, *cells])
        if not rows:
            why = (
                "under 2 seeds"
                if len(summary.get("seeds") or []) < 2
                else "this comparison.json predates the noise record; rerun the same `rlora compare` (it reuses "
                "every finished run) to add it"
            )
            parts += [f"{method} − {ref}: no noise measured ({why})", ""]
            continue
        parts += [
            f"{method} − {ref}:",
            "",
            markdown_table(["task", "MDE now", *(f"{s} seeds" for s in PLANNED_SEEDS)], rows),
        ]
        parts.append("")
    return "\n".join(parts)


def run(args: argparse.Namespace) -> int:
    if not (args.effect > 0 and math.isfinite(args.effect)):
        raise ConfigError(f"--effect: expected a finite number > 0, got {args.effect}")
    summary = read_comparison(args.comparison)
    print(plan_markdown(summary, args.metric, args.effect, str(args.comparison)))
    return 0
