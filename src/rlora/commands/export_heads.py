r"""`rlora export --as-scales`: the K heads as K plain LoRA adapters on one shared A, plus R-LoRA's offset as one
more, so that a server that scales adapters per request (llama.cpp's `lora: [{id, scale}]`) serves any gate vector.

For a layer with shared A (r, d_in), heads B_k (d_out, r), scaling s and offset (offset_B, offset_A):

    head_k = (s B_k) A          (rank r, PEFT scaling 1)
    offset = (-offset_B) offset_A

and for any gates g (K,), the same in every layer, sum_k g_k head_k + offset is exactly the fixed-gate update
(`RLoraLinear.fixed_gate_lora`). A request's scales are one number per adapter for the whole model, so the per-task
table gives each task its mean gates averaged over the layers (`layer_mean`); its fidelity is measured for exactly
those scales, which differ from the per-layer gates of `--gates per-task`.

OUT/head_0 .. OUT/head_{K-1}, OUT/offset (PEFT folders, each with its GGUF adapter with `--format gguf`), and
OUT/gates.json: {"adapters": [...], "scales": {row: K scales}, "fidelity": {row: ...}}, OUT/README.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import atomic_dir, atomic_write_json, atomic_write_text
from ..adapters import README_FILE
from ..export_readme import heads_readme
from ..tuner.convert import PEFT_PREFIX, lora_config
from .export import GATES_FILE
from .export_deploy import Deployer, factors

if TYPE_CHECKING:
    import torch

    from ..run import Run

OFFSET = "offset"


def head_name(k: int) -> str:
    return f"head_{k}"


def head_tensors(layers: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """{adapter name: its PEFT-named tensors} for the K heads and (R-LoRA) the offset, in the adapter's dtype; each
    product s * B_k is computed in float64 and rounded once."""
    import torch

    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, layer in layers.items():
        A = layer.rlora_A["default"].detach()
        dtype = A.dtype
        heads = layer.head_weights("default").detach().to(torch.float64)  # (K, d_out, r)
        for k in range(heads.shape[0]):
            tensors = out.setdefault(head_name(k), {})
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.contiguous()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (layer.scaling["default"] * heads[k]).to(dtype).contiguous()
        if "default" in layer.rlora_offset_A:
            tensors = out.setdefault(OFFSET, {})
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.rlora_offset_A["default"].to(dtype).contiguous()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (-layer.rlora_offset_B["default"]).to(dtype).contiguous()
    return out


def layer_mean(gates: dict[str, torch.Tensor]) -> list[float]:
    """One gate vector for every layer: the mean over the layers of their gates (still non-negative, summing to 1)."""
    import torch

    return torch.stack(list(gates.values())).mean(0).tolist()


def scale_rows(plans: dict[str | None, dict[str, torch.Tensor]], spec: str) -> dict[str, list[float]]:
    """The table's rows: per task (per-task, task:NAME) or one row named for the gates (uniform, a file)."""
    label = "uniform" if spec == "uniform" else spec[5:] if spec.startswith("task:") else "gates"
    return {task if task is not None else label: layer_mean(gates) for task, gates in plans.items()}


def export_heads(
    run: Run,
    layers: dict[str, Any],
    plans: dict[str | None, dict[str, torch.Tensor]],
    out: Path,
    deployer: Deployer,
) -> Path:
    """Writes the per-head export into `out` (see the module docstring), whole or not at all; returns `out`."""
    import torch

    scales = scale_rows(plans, deployer.spec)
    adapters = head_tensors(layers)
    names = list(adapters)
    rank = next(iter(layers.values())).r["default"]
    config = lora_config(layers, rank, deployer.base_model, run.model)
    fidelity = {}
    if deployer.fidelity is not None:
        for row, g in scales.items():
            fixed = {
                name: layer.fixed_gate_lora("default", torch.tensor(g, dtype=torch.float64), torch.float64)
                for name, layer in layers.items()
            }
            dtype = next(iter(layers.values())).rlora_A["default"].dtype
            fixed = {name: (B.to(dtype), A.to(dtype)) for name, (B, A) in fixed.items()}
            tasks = [row] if row in run.plan.tasks else list(run.plan.tasks)
            fidelity[row] = deployer.fidelity.measure(fixed, tasks)
    from safetensors.torch import save_file

    with atomic_dir(out) as tmp:
        for name, tensors in adapters.items():
            (tmp / name).mkdir()
            config.save_pretrained(str(tmp / name))
            save_file(tensors, str(tmp / name / "adapter_model.safetensors"), metadata={"format": "pt"})
            deployer.write_gguf(tmp / name, factors(tensors, layers), rank)
        atomic_write_json(tmp / GATES_FILE, {"adapters": names, "scales": scales, "fidelity": fidelity or None})
        facts = deployer.facts(rank, sorted(config.target_modules), "per request", _merged(fidelity))
        atomic_write_text(tmp / README_FILE, heads_readme(facts, names, scales))
    return out


def _merged(fidelity: dict[str, dict]) -> dict | None:
    """The rows' fidelity as one table: each task measured with its own row's scales (else the first row's)."""
    if not fidelity:
        return None
    tasks, warnings = {}, []
    for measured in fidelity.values():
        for task, scores in measured["tasks"].items():
            tasks.setdefault(task, scores)
        warnings += [w for w in measured["warnings"] if w not in warnings]
    first = next(iter(fidelity.values()))
    return {"tasks": tasks, "max_loss_rise": first["max_loss_rise"], "warnings": warnings}
