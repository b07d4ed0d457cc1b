"""The methods compared in the R-LoRA paper's ablation, each as a PEFT config.

| method              | heads | head init            | router init          | dropout               |
|---------------------|-------|----------------------|----------------------|-----------------------|
| `lora`              | 1     | B = 0                | (none)               | on x (PEFT's LoRA)    |
| `hydralora`         | K     | B_k = 0              | random (kaiming)     | one mask on x         |
| `hydralora+dropout` | K     | B_k = 0              | random (kaiming)     | per head, on A x      |
| `hydralora+init`    | K     | random, compensated  | zero (exact start)   | one mask on x         |
| `rlora`             | K     | random, compensated  | zero (exact start)   | per head, on A x      |

The router inits are what the papers' code does for HydraLoRA (a default nn.Linear) and what R-LoRA's exact
start needs (uniform gates). Zero heads with a zero router would be a saddle: the heads never differentiate.

Plain LoRA's rank is matched to the multi-head methods' trainable parameter count unless given: per adapted
linear layer the multi-head adapter trains r*d_in + K*r*d_out + K*d_in parameters and LoRA r'*(d_in + d_out),
so r' = round(sum over layers of the former / sum of (d_in + d_out)), at least 1.

A comparison may also name plain LoRA at another rank (`parse_method`): `lora@r=60` (rank 60) or `lora@x4` (four
times the matched rank): the baseline a multi-head method must beat is not only LoRA of its own size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:  # PEFT and torch load when a config is built, not when the method names are read
    from peft import PeftConfig
    from torch import nn

MULTI_HEAD = {
    "rlora": {"head_init": "random", "head_dropout": True, "router_init": "zeros"},
    "hydralora": {"head_init": "zeros", "head_dropout": False, "router_init": "random"},
    "hydralora+dropout": {"head_init": "zeros", "head_dropout": True, "router_init": "random"},
    "hydralora+init": {"head_init": "random", "head_dropout": False, "router_init": "zeros"},
}
METHODS = (*MULTI_HEAD, "lora")
PEFT_TYPES = {**dict.fromkeys(MULTI_HEAD, "RLORA"), "lora": "LORA"}  # the `peft_type` each method's adapters have


def is_multi_head(method: str) -> bool:
    """Whether the method's adapter has heads and a router (every method but plain LoRA): the one place that says."""
    return method in MULTI_HEAD


_LORA_VARIANT = re.compile(r"lora@(?:r=(\d+)|x(\d+))")
METHOD_SPELLINGS = "lora@r=N (plain LoRA of rank N), lora@xK (K times the matched rank)"


@dataclass(frozen=True)
class MethodSpec:
    """A method as a comparison names it: one of `METHODS`, or plain LoRA at a given rank or multiple of the matched
    rank (the run's `method` is then `lora` and its `adapter.lora_r` that rank)."""

    label: str
    method: str
    lora_r: int | None = None
    rank_factor: int | None = None

    def rank(self, matched: int | None) -> int | None:
        """The `adapter.lora_r` of this method's runs (None: the config's own); `matched` is the matched rank."""
        if self.rank_factor is None:
            return self.lora_r
        if matched is None:
            raise ValueError(f"{self.label}: the matched LoRA rank is needed")
        return self.rank_factor * matched


def parse_method(label: str) -> MethodSpec:
    """`label` as a `MethodSpec`; a ConfigError naming the label and the choices for anything else."""
    if label in METHODS:
        return MethodSpec(label, label)
    found = _LORA_VARIANT.fullmatch(label)
    if found is None or int(found[1] or found[2]) < 1:
        raise ConfigError(f"unknown method {label!r}; choose from {', '.join(METHODS)} or {METHOD_SPELLINGS}")
    rank, factor = found[1], found[2]
    return MethodSpec(label, "lora", lora_r=int(rank) if rank else None, rank_factor=int(factor) if factor else None)


def adapter_config(
    method: str,
    *,
    r: int,
    lora_alpha: float,
    num_heads: int,
    lora_dropout: float,
    target_modules: list[str] | str | None,
    init_gamma: float | None = None,
    use_rslora: bool | None = None,
    lora_r: int | None = None,
    router_init: str | None = None,
    model: nn.Module | None = None,
) -> PeftConfig:
    """The PEFT config of `method`; for `lora` without `lora_r`, `model` is needed to match parameter counts.

    `router_init` overrides the method's own router init (for experiments; the methods' defaults are above);
    `init_gamma` and `use_rslora` left None are `RLoraConfig`'s defaults (for plain LoRA too)."""
    from peft import LoraConfig

    from .tuner import RLoraConfig
    from .tuner.config import field_default

    init_gamma = field_default("init_gamma") if init_gamma is None else init_gamma
    use_rslora = field_default("use_rslora") if use_rslora is None else use_rslora

    shared = {  # the settings plain LoRA takes too
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": target_modules,
        "use_rslora": use_rslora,
    }
    if is_multi_head(method):
        settings = MULTI_HEAD[method] | ({"router_init": router_init} if router_init is not None else {})
        return RLoraConfig(r=r, num_heads=num_heads, init_gamma=init_gamma, **shared, **settings)
    if method != "lora":
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if target_modules is None and model is not None:  # the same layers as the multi-head methods (model.py's table)
        from .tuner.model import default_target_modules

        shared["target_modules"] = target_modules = default_target_modules(model)
    if lora_r is None:
        if model is None:
            raise ValueError("method 'lora': give lora_r, or the model to match the multi-head parameter count")
        lora_r = matched_lora_rank(model, target_modules, r, num_heads)
    return LoraConfig(r=lora_r, **shared)


def matched_lora_rank(model: nn.Module, target_modules: list[str] | str, r: int, num_heads: int) -> int:
    multi_head, per_rank = adapter_sizes(model, target_modules, r, num_heads)
    return max(1, round(multi_head / per_rank))


def adapter_sizes(model: nn.Module, target_modules: list[str] | str, r: int, num_heads: int) -> tuple[int, int]:
    """(weights of a multi-head adapter of rank `r` and `num_heads` heads on the targeted linear layers, weights of a
    plain LoRA adapter per unit of rank on them), counted from the layers' shapes, before anything is allocated."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from .tuner.layer import base_shape, is_adaptable

    probe = LoraConfig(target_modules=target_modules)
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    multi_head, per_rank = 0, 0
    for name, module in model.named_modules():
        if not is_adaptable(module):
            continue
        if (target_modules == "all-linear" and module is not output_layer) or check_target_module_exists(probe, name):
            d_in, d_out = base_shape(module)
            multi_head += r * d_in + num_heads * r * d_out + num_heads * d_in
            per_rank += d_in + d_out
    if per_rank == 0:
        raise ConfigError(f"target_modules {target_modules!r} match no linear layer of {type(model).__name__}")
    return multi_head, per_rank
