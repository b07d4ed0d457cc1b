r"""R-LoRA with FIXED gates as what other tools load: a plain LoRA adapter, or a base model with the update merged.

With fixed gates g (K,) an adapted layer's update is a plain LoRA update of rank r, or 2r with R-LoRA's offset:

    s * (sum_k g_k B_k) A  -  offset_B offset_A  =  [s * sum_k g_k B_k, -offset_B] @ [A; offset_A]

(`RLoraLinear.fixed_gate_lora`). The LoRA's `LoraConfig` has `lora_alpha = r` and no rsLoRA, so PEFT's scaling is 1, and
no dropout. The merge adds the same update to each base weight through the layer's own `add_to_base_weight`, which
knows its layout (transposed for a Conv1D; dequantized and quantized again for a bitsandbytes weight), on a copy of
the model. Both are exact for those gates and an approximation of the trained model, whose router mixes the heads per
token. These live with the tuner, as PEFT keeps a method's conversions beside its layers.

`gates` below map a base-model module name ("model.layers.0.mlp.up_proj") to its K gates.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from .layer import RLoraLinear, is_adaptable

PEFT_PREFIX = "base_model.model."  # what PEFT puts before a module's name in the saved keys (and vLLM strips)


def lora_tensors(
    layers: Mapping[str, RLoraLinear], gates: Mapping[str, torch.Tensor], adapter_name: str = "default"
) -> tuple[dict[str, torch.Tensor], int]:
    """The plain LoRA tensors under PEFT's saved names (`base_model.model.<module>.lora_A.weight`, ...) in the
    adapter's own dtype (computed in float64: one rounding), and their rank."""
    tensors, ranks = {}, set()
    for name, layer in layers.items():
        B, A = layer.fixed_gate_lora(adapter_name, gates[name], torch.float64)
        dtype = layer.rlora_A[adapter_name].dtype
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.to(dtype).contiguous()
        ranks.add(A.shape[0])
    if len(ranks) != 1:
        raise ValueError(f"adapted layers of different ranks {sorted(ranks)}")  # one RLoraConfig: never
    return tensors, ranks.pop()


def lora_config(layers: Mapping[str, RLoraLinear], rank: int, base_model: str | None, model: nn.Module):
    """PEFT's `LoraConfig` of the LoRA: scaling lora_alpha / r = 1, no dropout, and target modules that match exactly
    the adapted layers (their leaf names when those match nothing else, else the full names)."""
    from peft import LoraConfig

    leaves = sorted({name.rsplit(".", 1)[-1] for name in layers})
    adaptable = {  # every layer of the base model LoRA could adapt, by its own name (an adapted one's is its wrapper's)
        n.removeprefix(PEFT_PREFIX).removesuffix(".base_layer") for n, m in model.named_modules() if is_adaptable(m)
    }
    matched = {n for n in adaptable if n.rsplit(".", 1)[-1] in leaves}
    targets = leaves if matched == set(layers) else sorted(layers)
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        lora_dropout=0.0,
        bias="none",
        target_modules=targets,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def merged_copy(model: nn.Module, gates: Mapping[str, torch.Tensor], adapter_name: str = "default") -> nn.Module:
    """A copy of the base model of the PEFT `model` with every adapted layer's fixed-gate update merged into its
    weight (`RLoraModel.merge_with_fixed_gates`); `model` itself is left as it was. Weights held in bf16 or fp16 are
    merged in float32: rounding W + update to half precision would lose what of the update is under half a step of W
    (quantized weights are left to their layer's own merge)."""
    merged = copy.deepcopy(model)
    for tensor in [*merged.parameters(), *merged.buffers()]:
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor.data = tensor.data.float()
    return merged.base_model.merge_with_fixed_gates(dict(gates), adapter_name)
