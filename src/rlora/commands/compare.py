"""Comparing methods fairly: every method trained and evaluated on the same data, split and budget, per seed, each
(with a sweep) at its own best settings, chosen without the test split.

    OUT/<method>/seed<k>/      a normal run folder (train + eval); reused when its eval.json exists
    OUT/comparison.json        every run's per-task results, the means and 95% CIs, paired differences, the routers'
                               health, and with a sweep the whole sweep and each method's choice
    OUT/comparison.md          the same as Markdown tables
    OUT/comparison.png         mean accuracy (and held-out loss) per task and method with 95% CI error bars

Compared: the accuracies (higher is better) and the held-out loss (nats per token, lower is better; the paired
difference is method − reference either way, so a better method has a negative loss difference). Perplexity is
left out: it is exp(loss), and its mean over seeds says nothing the loss's does not. A metric some run lacks (one
evaluated before the loss was measured) is left out for that method.

A sweep (`Sweep`: `rlora compare --lr 3e-4,1e-3,3e-3`, or `--sweep KEY=V1,V2,...` for any training or adapter
setting; several keys make a grid) chooses each method's value first:

    OUT/sweep/<method>/<key>=<value>/   one run per value at the first seed, trained on the training split minus a
                                        validation split carved from it by hash (`data.holdout: validation`,
                                        `data/split.py`), evaluated on that validation split (held-out loss only)
    OUT/selection.json                  each method's validation losses and choice, written before the seeds run
    OUT/<method>/<key>=<value>/seed<k>/ every seed at the chosen value, on the whole training split, evaluated on the
                                        test split

The value with the lowest validation loss (the mean over tasks) is the method's; a tie goes to the value given
first. Nothing in the choice reads the test split: its examples are neither trained on nor evaluated there.

Methods are `methods.METHODS` or plain LoRA at another rank (`methods.parse_method`: `lora@r=60`, `lora@x4`).

An interrupted comparison continues where it stopped: finished runs are reused, a run with checkpoints
resumes from its last complete one.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .._io import atomic_write_json, atomic_write_text, check_writable
from ..errors import ConfigError, TrainingError
from ..methods import MethodSpec, is_multi_head, parse_method
from ..metrics import ACCURACY_METRICS
from ..names import check_name
from ..plots import plot_comparison
from ..reports import comparison_markdown
from ..run import RunFolder
from ..runconfig import RunConfig, load_run_config, override_parts, validate_run_config, with_overrides
from ..stats import mean_ci, paired_difference
from .eval import evaluate_run

logger = logging.getLogger(__name__)

COMPARED_METRICS = (*ACCURACY_METRICS, "loss")
SWEEPABLE = ("training.", "adapter.")  # how a method trains; what it is compared on (data, eval, seed) is fixed
SELECTION_METRIC = "loss"  # the validation measure a sweep minimises (its mean over tasks)
FAILED_FILE = "sweep_failed.txt"  # in a sweep's run folder whose training stopped: why
ROUTER_MEASURES = ("entropy", "normalized_entropy", "task_divergence", "largest_share")


def parse_methods(text: str) -> list[str]:
    """The comma-separated method labels of `--methods`, each checked (`methods.parse_method`)."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods: none given; name one or more, comma-separated")
    for method in methods:
        try:
            parse_method(method)
        except ConfigError as error:
            raise ConfigError(f"--methods: {error}") from None
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods: {text!r} names a method twice")
    return methods


@dataclass(frozen=True)
class Sweep:
    """The settings a comparison chooses per method: each swept key with its candidate values, as given."""

    keys: tuple[str, ...]
    values: tuple[tuple[str, ...], ...]

    def points(self) -> list[tuple[str, ...]]:
        """Every combination of values (one for each key), as `key=value` overrides, in the order given."""
        per_key = [[f"{key}={v}" for v in values] for key, values in zip(self.keys, self.values, strict=True)]
        return list(itertools.product(*per_key))


def parse_sweep(items: list[str]) -> Sweep:
    """`KEY=V1,V2,...` items (`--sweep`; `--lr V1,...` is `training.lr=V1,...`) as a `Sweep`. Values are split at the
    commas outside brackets (`adapter.target_modules=[q_proj,v_proj],all-linear` has two) and parsed as YAML when
    applied; a key outside `SWEEPABLE`, given twice, or with fewer than one value is refused here, a key that does
    not exist or a bad value when the comparison starts."""
    keys, values = [], []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--sweep {item!r}: expected KEY=V1,V2,..., e.g. training.lr=3e-4,1e-3,3e-3")
        if not key.startswith(SWEEPABLE):
            raise ConfigError(
                f"--sweep {item!r}: only training.* and adapter.* settings can be swept (what the methods are "
                f"compared on stays the same); {key} is not one"
            )
        if key in keys:
            raise ConfigError(f"--sweep {item!r}: {key} is swept twice; give all its values in one list")
        given = _split_top_level(text)
        if not given or any(not v for v in given):
            raise ConfigError(f"--sweep {item!r}: expected one or more comma-separated values")
        if len(set(given)) != len(given):
            raise ConfigError(f"--sweep {item!r}: a value is given twice")
        keys.append(key)
        values.append(tuple(given))
    return Sweep(tuple(keys), tuple(values))


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += c in "[{"
        depth -= c in "]}"
        if c == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return [*parts, text[start:].strip()]


def point_name(overrides: tuple[str, ...] | list[str]) -> str:
    """A sweep point's folder name: its `key=value` overrides joined by commas, unsafe characters %-escaped."""
    return check_name(quote(",".join(overrides), safe="=,.+-_@[]"), f"--sweep point {','.join(overrides)[:60]!r}")


def run_config_for(
    base: RunConfig, folder: Path, spec: MethodSpec, seed: int, matched_rank: int | None = None
) -> RunConfig:
    """`base` as a run of `spec` (its method, and a plain LoRA's rank) with `seed`, written into `folder`."""
    cfg = copy.deepcopy(base)
    cfg.method, cfg.seed, cfg.output_dir = spec.method, seed, str(folder)
    if not is_multi_head(spec.method) and spec.rank(matched_rank) is not None:
        cfg.adapter.lora_r = spec.rank(matched_rank)
    return cfg


def matched_rank(cfg: RunConfig, cache_dir: str | None = None) -> int:
    """The plain LoRA rank matched to the multi-head methods' trainable parameter count for `cfg`'s model and adapter
    settings (`methods.matched_lora_rank`), from the model's shapes alone: no weight is loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..methods import matched_lora_rank
    from ..models import resolve_model

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(cfg.model, cache_dir)))
    a = cfg.adapter
    return matched_lora_rank(model, a.target_modules, a.r, a.num_heads)


def _run(cfg: RunConfig, cache_dir: str | None, accuracy: bool = True) -> dict:
    """The results of the run `cfg` describes: reused when its folder has them, else trained and evaluated."""
    from ..train import ensure_trained

    folder = RunFolder(cfg.output_dir)
    folder.check_config(cfg)
    results = folder.read_results()
    if results is None:
        return evaluate_run(ensure_trained(cfg, cache_dir), cache_dir=cache_dir, accuracy=accuracy)
    logger.info("reusing %s", folder.results())
    return results


def _selection_run(cfg: RunConfig, cache_dir: str | None) -> dict:
    """`_run` with the loss only; training that stops (a diverging value) is recorded in the run folder (its config
    and `FAILED_FILE`), so that a resumed comparison with the same config does not train it again, and raised."""
    folder = RunFolder(cfg.output_dir)
    failed = folder.root / FAILED_FILE
    if failed.is_file():
        folder.check_config(cfg)
        raise TrainingError(failed.read_text(encoding="utf-8").strip())
    try:
        return _run(cfg, cache_dir, accuracy=False)
    except TrainingError as error:
        if not folder.config.is_file():  # it stopped before writing the run's config
            folder.write_config(cfg)
        atomic_write_text(failed, f"{error}\n")
        raise


def select_settings(
    base: RunConfig,
    specs: list[MethodSpec],
    sweep: Sweep,
    seed: int,
    out: Path,
    matched: int | None = None,
    cache_dir: str | None = None,
) -> dict:
    """Per method, every sweep point trained at `seed` on the training split minus the validation split and scored by
    its validation loss (`SELECTION_METRIC`, mean over tasks); the lowest is chosen (ties: the first point)."""
    points = sweep.points()
    configs = {}
    for spec in specs:  # every config checked before anything trains
        for point in points:
            tuned = with_overrides(base, [*point, "data.holdout=validation"], "--sweep " + ",".join(point))
            folder = out / "sweep" / spec.label / point_name(point)
            configs[spec.label, point] = run_config_for(tuned, folder, spec, seed, matched)
    for cfg in configs.values():
        validate_run_config(cfg, "compare")
    per_method = {}
    for spec in specs:
        rows = []
        for point in points:
            row = {"point": list(point), "name": ",".join(point), "validation": None, "per_task": {}, "failed": None}
            try:
                results = _selection_run(configs[spec.label, point], cache_dir)
            except TrainingError as error:  # a value that diverges loses; the others still compete
                row["failed"] = str(error)
            else:
                value = results["average"].get(SELECTION_METRIC)
                row["validation"] = value if value is not None and math.isfinite(value) else None
                row["per_task"] = {t: r.get(SELECTION_METRIC) for t, r in results["tasks"].items()}
            rows.append(row)
        scored = [i for i, row in enumerate(rows) if row["validation"] is not None]
        if not scored:
            raise TrainingError(
                f"{spec.label}: no value of the sweep trained to a finite validation {SELECTION_METRIC} "
                f"({'; '.join(row['failed'] or 'no loss' for row in rows)})"
            )
        best = min(scored, key=lambda i: rows[i]["validation"])  # the first of equal minima
        per_method[spec.label] = {"points": rows, "chosen": rows[best]["point"], "chosen_name": rows[best]["name"]}
    return {
        "keys": list(sweep.keys),
        "values": [list(v) for v in sweep.values],
        "seed": seed,
        "metric": SELECTION_METRIC,
        "holdout": "validation",
        "validation_fraction": base.data.validation_fraction,
        "per_method": per_method,
    }


def compare(
    base: RunConfig,
    methods: list[str],
    seeds: list[int],
    out: str | Path,
    cache_dir: str | None = None,
    sweep: Sweep | None = None,
) -> dict:
    """Trains and evaluates every (method, seed) not finished yet, then writes the comparison files. With `sweep`,
    each method's settings are chosen first (`select_settings`, at the first seed) and its seeds run at them."""
    out = Path(out).expanduser()
    specs = [parse_method(m) for m in methods]
    check_writable(out, "nothing was trained (the comparison's runs and results go there)")
    matched = matched_rank(base, cache_dir) if any(s.rank_factor for s in specs) else None
    selection = None
    chosen: dict[str, tuple[str, ...]] = {spec.label: () for spec in specs}
    if sweep is not None:
        selection = select_settings(base, specs, sweep, seeds[0], out, matched, cache_dir)
        atomic_write_json(out / "selection.json", selection)  # the choices, before the seeds run
        chosen = {label: tuple(s["chosen"]) for label, s in selection["per_method"].items()}
        for label, values in chosen.items():
            logger.info("%s: chose %s on the validation split", label, ",".join(values))
    configs = {}
    for spec in specs:
        tuned = with_overrides(base, list(chosen[spec.label]), "--sweep") if chosen[spec.label] else base
        root = out / spec.label / point_name(chosen[spec.label]) if chosen[spec.label] else out / spec.label
        for seed in seeds:
            configs[spec.label, seed] = run_config_for(tuned, root / f"seed{seed}", spec, seed, matched)
    for cfg in configs.values():  # the seeds and folders that the comparison makes, before anything trains
        validate_run_config(cfg, "compare")
    runs: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        for spec in specs:
            runs.setdefault(spec.label, {})[seed] = _run(configs[spec.label, seed], cache_dir)
    summary = summarize(runs, methods, seeds)
    if matched is not None:
        summary["matched_lora_rank"] = matched
    if selection is not None:
        summary["selection"] = selection
    atomic_write_json(out / "comparison.json", summary)
    atomic_write_text(out / "comparison.md", comparison_markdown(summary))
    plot_comparison(summary, out / "comparison.png")
    return summary


def summarize(runs: dict[str, dict[int, dict]], methods: list[str], seeds: list[int]) -> dict:
    """Means and 95% CIs over seeds per method and task; paired differences of each method against the first; the
    routers' health (`analysis.router_health`) per multi-head method: its measures' means and CIs over seeds, each
    seed's status, the mean gate per task and head averaged over seeds."""
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
    health = {}
    for method in methods:
        per_seed = {s: runs[method][s].get("router") for s in seeds}
        if any(h is None for h in per_seed.values()):
            continue  # plain LoRA has no router; a run evaluated before router health was measured lacks it
        health[method] = {m: _ci(mean_ci([h[m] for h in per_seed.values()])) for m in ROUTER_MEASURES}
        health[method]["status"] = [per_seed[s]["status"] for s in seeds]
        health[method]["num_heads"] = per_seed[seeds[0]]["num_heads"]
        health[method]["thresholds"] = per_seed[seeds[0]]["thresholds"]
        health[method]["mean_gate"] = {
            task: [sum(h["mean_gate"][task][k] for h in per_seed.values()) / len(seeds) for k in range(len(gates))]
            for task, gates in per_seed[seeds[0]]["mean_gate"].items()
        }
    if health:
        summary["router_health"] = health
    return summary


def _ci(pair: tuple[float, float]) -> dict[str, float | None]:
    """JSON-safe: the half-width is None (not NaN) with a single seed."""
    return {"mean": pair[0], "ci95": None if math.isnan(pair[1]) else pair[1]}


def run(args: argparse.Namespace) -> int:
    methods = parse_methods(args.methods)
    if args.lr is not None and not args.lr.strip():
        raise ConfigError(f"--lr {args.lr!r}: expected comma-separated learning rates to choose from, e.g. 3e-4,1e-3")
    sweep_items = [*([f"training.lr={args.lr}"] if args.lr is not None else []), *args.sweep]
    sweep = parse_sweep(sweep_items) if sweep_items else None
    if sweep is not None:
        fixed = {".".join(override_parts(o)[0]) for o in args.overrides}
        both = [key for key in sweep.keys if key in fixed]
        if both:
            raise ConfigError(f"{both[0]} is both swept and set with {both[0]}=...; give it one way")
    base = load_run_config(args.config, args.overrides)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    summary = compare(base, methods, seeds, args.output or base.output_dir, cache_dir=args.cache_dir, sweep=sweep)
    print(comparison_markdown(summary))
    return 0
