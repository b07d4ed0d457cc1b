r"""`rlora export`: a multi-head run as plain PEFT LoRA adapters (or full merged models) that any LoRA server loads.

With FIXED gates an adapted layer's update is a plain LoRA update of rank r, or 2r with R-LoRA's offset
(`rlora.tuner.convert`, which also merges it into a copy of the base model through each layer's own layout). It is
exact for those gates, and an approximation of the trained model, whose router mixes the heads per token: `rlora
eval` on the export against the run says what the fixed gates cost.

Gates (`--gates`):
- `uniform`: 1/K for every head of every layer;
- `task:NAME`: the run's task NAME's mean gates, layer by layer, over the real tokens of its training examples (gold
  context and answer, as trained); for an adapter with `routing: task`, the task's own gates softmax(t_task), which
  every token of the task gets: the export is then EXACT for that task (tests/test_routing.py), and says so;
- `per-task`: one export per trained task, each with its own mean gates, in OUT/<task>/;
- a JSON file: a list of K weights for every layer, or an object mapping each adapted module's name (as in the
  export's gates.json, e.g. "model.layers.0.mlp.up_proj") to its K weights.

Every export folder also holds `gates.json`, the gates it was made with (a valid `--gates` file) and their measured
fidelity to the routed model, and a README.md with the commands that serve it; `--format gguf` adds a llama.cpp
adapter, `--as-scales` exports the heads instead (see `export_deploy` and `export_heads`).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import atomic_dir, atomic_write_json
from ..errors import ConfigError, RunFolderError
from ..names import inside
from ..tuner.convert import PEFT_PREFIX, lora_config, lora_tensors, merged_copy

if TYPE_CHECKING:
    import torch

    from ..run import Run
    from .export_deploy import DeployOptions

GATES_FILE = "gates.json"  # also what marks a folder as an earlier export, which an export may replace
DEFAULT_MAX_EXAMPLES = 256


def parse_gates(spec: str) -> str:
    """`spec` as given on the command line, checked for its form (`uniform`, `per-task`, `task:NAME`, or a file)."""
    if spec in ("uniform", "per-task") or (spec.startswith("task:") and spec[5:]):
        return spec
    if Path(spec).is_file():
        return spec
    raise ConfigError(f"--gates {spec!r}: expected uniform, per-task, task:NAME or a JSON file of gates (no such file)")


def export_run(
    run_dir: str | Path,
    gates: str,
    out: str | Path,
    *,
    merged: bool = False,
    max_examples: int | None = None,
    cache_dir: str | None = None,
    deploy: DeployOptions | None = None,
    as_scales: bool = False,
) -> list[Path]:
    """Writes the run's adapter with fixed `gates` (see the module docstring) as a plain PEFT LoRA adapter folder, or
    with `merged` as a full model folder (safetensors, with the tokenizer); `per-task` writes one per task under
    `out`; `deploy` says what else each adapter folder gets (`export_deploy`), `as_scales` writes the heads as
    adapters with per-task scales instead (`export_heads`). Returns the folders written."""
    from ..run import Run
    from .export_deploy import Deployer, DeployOptions

    gates = parse_gates(gates)
    max_examples = max_examples or DEFAULT_MAX_EXAMPLES
    run = Run.open(run_dir, cache_dir)
    if not run.multi_head:
        raise RunFolderError(
            f"{run.folder.root}: a plain LoRA run's adapter is already a PEFT LoRA adapter ({run.folder.adapter}); "
            "export is for multi-head runs"
        )
    deploy = deploy or DeployOptions()
    deploy.check()
    if merged and (as_scales or deploy.format != "peft"):
        raise ConfigError("--merged writes a full model; --as-scales and --format gguf write adapters: choose one")
    _check_out(Path(out), per_task=gates == "per-task" and not as_scales)
    run.load().model.eval()
    layers = adapted_modules(run.model)
    if gates == "uniform":
        plans = {None: uniform_gates(layers)}
    elif gates == "per-task":
        for task in run.plan.tasks:  # every target checked before any is computed
            inside(out, task)
        plans = {task: task_gates(run, task, max_examples) for task in run.plan.tasks}
    elif gates.startswith("task:"):
        plans = {None: task_gates(run, gates[5:], max_examples)}
    else:
        plans = {None: read_gates_file(gates, layers)}
    if as_scales:
        from .export_heads import export_heads

        return [export_heads(run, layers, plans, Path(out), Deployer(run, layers, deploy, gates))]
    deployer = Deployer(run, layers, deploy, gates)
    written = []
    for task, layer_gates in plans.items():
        target = inside(out, task) if task is not None else Path(out)
        if merged:
            write_merged(run.model, run.tokenizer, layer_gates, target, deployer.gates_record(task, layer_gates))
        else:
            extras = deployer.extras(task, target.name)
            write_lora(run.model, layers, layer_gates, target, base_model=_base_model_path(run), extras=extras)
        written.append(target)
    return written


def _check_out(out: Path, per_task: bool) -> None:
    """An export replaces an earlier export (a folder with gates.json) or fills an empty or new folder, nothing else."""
    folders = [p for p in out.iterdir() if p.is_dir()] if per_task and out.is_dir() else [out]
    for folder in folders:
        if folder.is_file() or (folder.is_dir() and any(folder.iterdir()) and not (folder / GATES_FILE).is_file()):
            raise ConfigError(f"--out {folder}: exists and is not an earlier export (no {GATES_FILE}); choose another")


def adapted_modules(model) -> dict[str, Any]:
    """The R-LoRA layers of the "default" adapter, by their name in the base model ("model.layers.0.mlp.up_proj")."""
    from ..analysis import adapted_layers

    return {name.removeprefix(PEFT_PREFIX): layer for name, layer in adapted_layers(model)}


def uniform_gates(layers: dict[str, Any]) -> dict[str, torch.Tensor]:
    import torch

    return {
        name: torch.full((layer.num_heads["default"],), 1 / layer.num_heads["default"], dtype=torch.float64)
        for name, layer in layers.items()
    }


def task_gates(run: Run, task: str, max_examples: int) -> dict[str, torch.Tensor]:
    """The task's mean gates per layer over the real tokens of (up to `max_examples` of) its training examples."""
    import torch

    from ..analysis import router_usage
    from ..data import gold_spans

    d = run.cfg.data
    names = list(run.plan.tasks)
    if task not in names:
        raise ConfigError(f"--gates task:{task}: the run trained on {', '.join(names)}")
    config = run.model.peft_config["default"]
    if getattr(config, "routing", "token") == "task":  # fixed by construction: no tokens needed
        layers = adapted_modules(run.model)
        return {name: layer.task_gates("default", config.task_id(task)) for name, layer in layers.items()}
    task_rows, example_rows = run.plan.mixture
    positions = sorted(set(example_rows[task_rows == names.index(task)].tolist()))[:max_examples]
    spans = [
        gold_spans(run.tokenizer, run.plan.train_example(names.index(task), i), d.chat_template, d.max_length)
        for i in positions
    ]
    usage = router_usage(run.model, {task: [s.prompt + s.answer for s in spans]}, batch_size=run.cfg.eval.batch_size)
    per_layer = usage[task]["mean_gate_per_layer"]
    return {name.removeprefix(PEFT_PREFIX): torch.tensor(g, dtype=torch.float64) for name, g in per_layer.items()}


def read_gates_file(path: str | Path, layers: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A --gates file: a list of K weights (every layer), or {module name: K weights} naming every adapted layer."""
    import torch

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"{path}: not a readable JSON file ({error})") from None
    if isinstance(data, dict) and isinstance(data.get("gates"), dict):  # an export's gates.json: gates and fidelity
        data = data["gates"]
    if isinstance(data, list):
        data = dict.fromkeys(layers, data)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a list of K gates or an object of module name -> gates")
    unknown = sorted(set(data) - set(layers))
    missing = sorted(set(layers) - set(data))
    if unknown or missing:
        what = f"{unknown[0]!r} is not an adapted layer" if unknown else f"layer {missing[0]!r} has no gates"
        raise ConfigError(f"{path}: {what}; the adapted layers are {', '.join(list(layers)[:3])}, ...")
    out = {}
    for name, layer in layers.items():
        g, k = data[name], layer.num_heads["default"]
        ok = (
            isinstance(g, list)
            and len(g) == k
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in g)
        )
        if not ok or any(v < 0 or not math.isfinite(v) for v in g) or abs(sum(g) - 1) > 1e-6:
            raise ConfigError(f"{path}: layer {name!r}: expected {k} non-negative gates summing to 1, got {g!r}")
        out[name] = torch.tensor(g, dtype=torch.float64)
    return out


def write_lora(
    model,
    layers: dict[str, Any],
    gates: dict[str, torch.Tensor],
    out: Path,
    base_model: str | None,
    extras: Callable[..., None] | None = None,
) -> None:
    """One adapter folder of `model`'s `layers`: adapter_config.json, adapter_model.safetensors and gates.json, and
    what `extras(folder, tensors, rank, config, gates)` adds, written whole or not at all."""
    from safetensors.torch import save_file

    tensors, rank = lora_tensors(layers, gates)
    config = lora_config(layers, rank, base_model, model)
    with atomic_dir(out, owned=GATES_FILE) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / GATES_FILE, {name: g.tolist() for name, g in gates.items()})
        if extras is not None:
            extras(tmp, tensors, rank, config, {name: g.tolist() for name, g in gates.items()})


def write_merged(model, tokenizer, gates: dict[str, torch.Tensor], out: Path, record: dict | None = None) -> None:
    """A full model folder: the base of the PEFT `model` with every adapted layer's fixed-gate update merged, on a
    copy (`tuner.convert.merged_copy`), saved with the tokenizer and gates.json (`record`: the gates and their
    fidelity, as a LoRA export's), whole or not at all."""
    merged = merged_copy(model, gates)
    with atomic_dir(out, owned=GATES_FILE) as tmp:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / GATES_FILE, record or {"gates": {name: g.tolist() for name, g in gates.items()}})


def _base_model_path(run: Run) -> str:
    """The base model's portable name (never this machine's cache path): what adapter_config.json records."""
    from .. import models

    return models.portable_name(run.cfg.model)


def export_note(gates: str, routing: str) -> str:
    """What the export is of the trained model: exact (routing by task, a task's gates), or an approximation."""
    if routing == "task" and (gates == "per-task" or gates.startswith("task:")):
        return (
            "exact: the adapter routes by task, so every token of a task gets that task's gates; each export is "
            "the trained model on its task (up to one rounding to the adapter's dtype)"
        )
    return (
        "approximation: the trained router mixes the heads per token, the export with fixed gates; "
        "`rlora eval RUN --adapter EXPORT` says what that costs"
    )


def run(args: argparse.Namespace) -> int:
    from ..adapters import read_adapter
    from ..run import RunFolder
    from .export_deploy import DeployOptions

    deploy = DeployOptions(args.format, args.outtype, not args.no_fidelity, args.max_loss_rise)
    written = export_run(
        args.run_dir,
        args.gates,
        args.out,
        merged=args.merged,
        max_examples=args.max_examples,
        cache_dir=args.cache_dir,
        deploy=deploy,
        as_scales=args.as_scales,
    )
    what = "merged model" if args.merged else "per-head LoRA adapters" if args.as_scales else "PEFT LoRA adapter"
    for folder in written:
        print(f"{what} written to {folder}")
    config, _ = read_adapter(RunFolder(args.run_dir).adapter)  # the run's adapter, checked by the export above
    print(export_note(args.gates, getattr(config, "routing", "token")))
    return 0
