"""`rlora eval`: per-task accuracy and held-out loss of a trained run, or of a base model alone, written into the
run folder (`RunFolder.results`); or of another adapter folder (an export) on the run's held-out data, written into
the run folder too (or where `--out` says), never into the adapter folder: that would change what it evaluates."""

from __future__ import annotations

import argparse
from pathlib import Path

from .._io import atomic_write_json_and_view, check_writable, writing
from ..adapters import load_adapter
from ..analysis import router_health, router_usage
from ..errors import ConfigError
from ..evaluate import evaluate_plan
from ..names import inside
from ..reports import results_table
from ..run import Run, RunFolder, gold_sequences
from ..runconfig import RunConfig, load_run_config, validate_run_config

NOT_EVALUATED = "nothing was evaluated (its results go there): make it writable, or evaluate a copy"


def _evaluate(run: Run, base: bool, accuracy: bool = True) -> dict:
    """The run's results on its held-out split; for a multi-head adapter, unless only the loss is asked for
    (`accuracy` False), its router's health there too (`router`: `analysis.router_health` of the gates on every
    evaluated example's gold context and answer)."""
    adapter = None if base else str(run.folder.adapter)
    run.check_lengths()
    results = {"model": run.cfg.model, "adapter": adapter, "method": run.cfg.method}
    results |= evaluate_plan(run.model, run.tokenizer, run.cfg, run.plan, accuracy=accuracy)
    if accuracy and not base and run.multi_head:
        usage = router_usage(run.model, gold_sequences(run), batch_size=run.cfg.eval.batch_size)
        results["router"] = router_health(usage)
    return results


def evaluate_run(run_dir: str | Path, cache_dir: str | None = None, base: bool = False, accuracy: bool = True) -> dict:
    """Evaluates a trained run (or, with `base`, its base model alone) on its held-out split, writes the results
    into the run folder (`RunFolder.results`) and returns them; without `accuracy`, the held-out loss only, as
    choosing settings on a validation split needs."""
    check_writable(RunFolder(run_dir).root, NOT_EVALUATED)
    run = Run.open(run_dir, cache_dir, adapter=not base).load()
    results = _evaluate(run, base, accuracy)
    run.folder.write_results(results, base)
    return results


def evaluate_config(cfg: RunConfig, cache_dir: str | None = None) -> dict:
    """Evaluates the base model of a run config on its held-out split (`rlora eval CONFIG`), into `cfg.output_dir`:
    its config and base results, written once the model has loaded. A folder made with another config, or that
    another process is writing, is refused first."""
    validate_run_config(cfg, "run config")  # for a RunConfig made in Python: the file's checks
    folder = RunFolder(cfg.output_dir)
    folder.check_free()
    folder.check_config(cfg)
    run = Run(folder, cfg, cache_dir, adapter=False)
    _ = run.plan  # the data is checked before the folder is taken and the model loads
    with folder.writer():
        check_writable(folder.root, NOT_EVALUATED)
        run.load()
        folder.check_config(cfg)  # again: it may have been written while the model loaded
        folder.write_config(cfg)
        results = _evaluate(run, base=True)
        folder.write_results(results, base=True)
    return results


def adapter_results_path(run_dir: str | Path, adapter_dir: str | Path, out: str | Path | None = None) -> Path:
    """Where `evaluate_adapter` writes: `out` (a .json file), else RUN_DIR/eval_adapter_<the adapter folder's
    name>.json; a path inside the adapter folder is refused (writing there would change what it evaluates)."""
    adapter = Path(adapter_dir).resolve()
    if out is None:
        return inside(run_dir, f"eval_adapter_{adapter.name}.json")
    path = Path(out)
    if path.suffix != ".json":
        raise ConfigError(f"--out {out}: expected a file name ending in .json (a .md table is written beside it)")
    if path.resolve().is_relative_to(adapter):
        raise ConfigError(f"--out {path}: inside the adapter folder {adapter_dir}; write the results elsewhere")
    return path


def evaluate_adapter(
    run_dir: str | Path, adapter_dir: str | Path, cache_dir: str | None = None, out: str | Path | None = None
) -> dict:
    """Scores the adapter folder `adapter_dir` (an export, or any PEFT adapter for the run's base model) on the run's
    held-out split with the run's settings, exactly as `rlora eval RUN_DIR` scores the run's own adapter; writes the
    results to `adapter_results_path` (a .json file and a .md table beside it) and returns them."""
    adapter_dir = Path(adapter_dir)
    path = adapter_results_path(run_dir, adapter_dir, out)
    check_writable(path.parent, NOT_EVALUATED)
    run = Run.open(run_dir, cache_dir, adapter=False).load()
    model = load_adapter(run.base_model, adapter_dir).eval()
    results = {"model": run.cfg.model, "adapter": str(adapter_dir), "method": f"adapter {adapter_dir.name}"}
    results |= evaluate_plan(model, run.tokenizer, run.cfg, run.plan)
    table = results_table({results["method"]: results}) + "\n"
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json_and_view(path, results, path.with_suffix(".md"), table)
    return results


def run(args: argparse.Namespace) -> int:
    if args.adapter and (args.base or not Path(args.target).is_dir()):
        raise ConfigError(
            "--adapter: evaluates an adapter on a run folder's held-out data; give a run folder, no --base"
        )
    if args.out and not args.adapter:
        raise ConfigError("--out: only with --adapter (a run's own results go into its folder)")
    if args.adapter:
        results = evaluate_adapter(args.target, args.adapter, args.cache_dir, args.out)
        path = adapter_results_path(args.target, args.adapter, args.out)
        print(results_table({results["method"]: results}))
        print(f"written to {path} and {path.with_suffix('.md')}")
        return 0
    if not Path(args.target).is_dir():  # a config: evaluate its base model alone, into its output_dir
        cfg = load_run_config(args.target, args.overrides)
        folder, args.base = RunFolder(cfg.output_dir), True
        results = evaluate_config(cfg, args.cache_dir)
    elif args.overrides:
        raise ConfigError("overrides apply to a config file; a run folder is evaluated with its own config")
    else:
        folder = RunFolder(args.target)
        results = evaluate_run(folder.root, args.cache_dir, base=args.base)
    print(results_table({"base" if args.base else results["method"]: results}))
    print(f"written to {folder.results(args.base)} and {folder.results(args.base, '.md')}")
    return 0
