"""`RLoraModel`: the PEFT tuner that finds the target linear layers and swaps in `RLoraLinear`.

What this relies on from PEFT 0.21 beyond its public functions, and what a PEFT upgrade could break:
- `BaseTuner`'s tuner contract (`prefix`, `tuner_layer_cls`, `target_module_mapping`, `_create_and_replace`), as
  every PEFT method uses it; a change there breaks `get_peft_model` outright (every test of
  tests/test_peft_integration.py fails).
- `inject_adapter` raising `peft.NoMatchingPeftModuleError` when no module matches `target_modules`; if PEFT raised
  something else, users would get PEFT's own message instead of ours naming the model's linear modules
  (test_target_modules_matching_nothing_lists_the_linear_modules fails).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator, Mapping

import torch
from peft import NoMatchingPeftModuleError
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ..errors import ConfigError
from .config import RLoraConfig
from .layer import MERGE_ERROR, RLoraLayer, RLoraLinear, is_adaptable

logger = logging.getLogger(__name__)


# The modules adapted when `target_modules` is None: PEFT's LoRA defaults, and those of architectures it lacks.
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING | {
    "phi3": ["qkv_proj"],  # attention's q, k and v fused in one linear layer, as for bloom's query_key_value
}


def default_target_modules(model: nn.Module) -> list[str] | str:
    """The modules adapted in `model` when `target_modules` is None (`DEFAULT_TARGET_MODULES` by its model type)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ConfigError(
            f"target_modules: no default for model type {model_type!r}; give target_modules (its linear modules are "
            f"named: {', '.join(adaptable_names(model))}, or 'all-linear')"
        )
    return DEFAULT_TARGET_MODULES[model_type]


def adaptable_names(model: nn.Module) -> list[str]:
    """The last name part of every layer R-LoRA can adapt, sorted, for error messages."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_adaptable(m)})


class RLoraModel(BaseTuner):
    """Adds R-LoRA/HydraLoRA adapters to a model; used through `peft.get_peft_model(model, RLoraConfig(...))`."""

    prefix: str = "rlora_"
    tuner_layer_cls = RLoraLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def _prepare_adapter_config(self, peft_config: RLoraConfig, model_config: dict) -> RLoraConfig:
        """`target_modules` None: the architecture's defaults (`DEFAULT_TARGET_MODULES`), or a ConfigError naming the
        model type and its linear modules where there are none (PEFT says only "Please specify")."""
        if peft_config.target_modules is None:
            try:
                default_target_modules(self.model)
            except ConfigError as error:
                raise ConfigError(f"RLoraConfig.{error}") from None
        return super()._prepare_adapter_config(peft_config, model_config)

    def _create_and_replace(
        self, config: RLoraConfig, adapter_name, target, target_name, parent, current_key, **kwargs
    ) -> None:
        if isinstance(target, RLoraLinear):
            target.update_layer(adapter_name, config, inference_mode=config.inference_mode)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not is_adaptable(base):
            raise ConfigError(
                f"target module {current_key!r} is a {type(base).__name__}; R-LoRA adapts torch.nn.Linear layers "
                "(bitsandbytes' 4/8-bit ones too) and transformers' Conv1D layers only"
            )
        new_module = RLoraLinear(target, adapter_name, config)
        if adapter_name != self.active_adapter:
            new_module.requires_grad_(False)
        self._swap_in(parent, target_name, new_module)

    def _swap_in(self, parent: nn.Module, child_name: str, new_module: RLoraLinear) -> None:
        """Puts `new_module` in place and its adapter on the base layer's device, except adapter parts whose
        tensors (the offset buffers too) are still on the meta device: `low_cpu_mem_usage=True` loading fills
        those later. (PEFT's own `BaseTuner._replace_module` looks at parameters only; it still unloads.)"""
        setattr(parent, child_name, new_module)
        device = new_module.get_base_layer().weight.device
        for name, module in new_module.named_modules():
            tensors = itertools.chain(module.parameters(), module.buffers())
            if self.prefix in name and not any(t.is_meta for t in tensors):
                module.to(device)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError:
            config = self.peft_config[adapter_name]
            if config.exclude_modules or not config.target_modules:  # PEFT's message says what happened
                raise
            names = adaptable_names(model)
            targets = config.target_modules
            targets = sorted(targets) if isinstance(targets, set) else targets
            raise ConfigError(
                f"RLoraConfig.target_modules: {targets!r} matches no linear layer of "
                f"{type(model).__name__}; its linear modules are named: {', '.join(names)}"
            ) from None

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs) -> Iterator[None]:
        """`adapter_names=[...]` in `PeftModel.forward`/`generate` (a mixed-adapter batch, as with PEFT's LoRA): every
        adapted layer (and `modules_to_save` wrapper) gets the list through a forward pre-hook while the call runs.
        PeftModel calls this and drops `adapter_names` from what it passes on to the base model."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("adapter_names: mixed-adapter batches are for inference; call model.eval() first")
        if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names: expected a list of adapter names, one per row, got {adapter_names!r}")
        known = set(self.peft_config) | {"__base__"}
        unknown = sorted(set(adapter_names) - known)
        if unknown:
            raise ValueError(
                f"adapter_names: no adapter named {', '.join(map(repr, unknown))}; the model has "
                f"{', '.join(map(repr, sorted(self.peft_config)))} (or '__base__' for none)"
            )
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:  # generate repeats each row once per beam
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        adapter_names = list(adapter_names)

        def inject(_module, args, kwargs):
            return args, kwargs | {"adapter_names": adapter_names}

        handles = [
            module.register_forward_pre_hook(inject, with_kwargs=True)
            for module in self.model.modules()
            if isinstance(module, (RLoraLayer, AuxiliaryTrainingWrapper))
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        raise ValueError(MERGE_ERROR)

    @torch.no_grad()
    def merge_with_fixed_gates(
        self, gates: torch.Tensor | Mapping[str, torch.Tensor] | None = None, adapter_name: str | None = None
    ) -> nn.Module:
        """Merge one adapter with FIXED head weights and return the plain base model: `gates` (K,) for every layer,
        or a mapping of each adapted module's name in the base model ("model.layers.0.mlp.up_proj") to its K gates;
        default uniform. Each layer adds its update in its own layout (`RLoraLinear.add_to_base_weight`).

        This is an approximation, not the trained model: the trained router mixes heads per token, a merged
        matrix cannot. Use it only where a plain model is required and measure what is lost.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        modules = self.model.named_modules()
        layers = {n: m for n, m in modules if isinstance(m, RLoraLinear) and adapter_name in m.rlora_A}
        if isinstance(gates, Mapping) and set(gates) != set(layers):
            missing, unknown = sorted(set(layers) - set(gates)), sorted(set(gates) - set(layers))
            what = f"layer {missing[0]!r} has no gates" if missing else f"{unknown[0]!r} is not an adapted layer"
            raise ValueError(f"gates: {what}")
        error = 0.0
        for name, module in layers.items():
            g = gates[name] if isinstance(gates, Mapping) else gates
            B, A = module.fixed_gate_lora(adapter_name, g, torch.float64)  # float64, one rounding into the weight
            error = max(error, module.add_to_base_weight(B @ A))
        if error > 0:
            logger.warning(
                "merge_with_fixed_gates: the base is quantized; the merged weights were quantized again, which moved "
                "them by up to %.3g from the float merge",
                error,
            )
        return self.unload()
