"""Loading a saved adapter folder, checked to be what it says.

PEFT's `PeftModel.from_pretrained` trusts the folder: an `adapter_config.json` of another type than its weights loads
that type with none of them (a warning, and the model is the base model), an unknown `peft_type` is a bare KeyError,
a truncated weights file a SafetensorError, a tensor of another shape a RuntimeError. `load_adapter` checks first and
raises an `AdapterError` that names the file and the field or tensor:

- `adapter_config.json` is a JSON object whose `peft_type` is a PEFT method (the one expected, when the caller says
  which) and whose settings that method's config accepts;
- `adapter_model.safetensors` is a whole safetensors file, its weights finite numbers;
- its tensors are exactly the adapter's on this model: every one the adapter has, with its shape, and none that it
  would leave unused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AdapterError

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from torch import nn

CONFIG_FILE = "adapter_config.json"  # PEFT's names (peft.utils.CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)
WEIGHTS_FILE = "adapter_model.safetensors"


def read_adapter(folder: str | Path, peft_type: str | None = None) -> tuple[PeftConfig, dict[str, tuple[int, ...]]]:
    """The adapter's config and the shape of each tensor in its weights file, both checked as far as they can be
    without the model (see the module docstring); `peft_type` (e.g. "RLORA", "LORA") is the type it must have."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such adapter folder")
    return _read_config(folder / CONFIG_FILE, peft_type), _read_shapes(folder / WEIGHTS_FILE)


def load_adapter(
    model: nn.Module, folder: str | Path, adapter_name: str = "default", peft_type: str | None = None
) -> PeftModel:
    """`PeftModel.from_pretrained(model, folder)` for inference, once the folder is checked (`read_adapter`) and its
    tensors are found to be exactly the adapter's; on a `PeftModel`, adds the adapter as `adapter_name` instead, as
    `PeftModel.load_adapter` does. Anything else is an `AdapterError`, and `model` is left as it was."""
    from peft import PeftModel, get_peft_model
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    config, shapes = read_adapter(folder, peft_type)
    config.inference_mode = True
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        peft_model = model
    else:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    try:
        adapter = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
        _check_tensors(folder / WEIGHTS_FILE, shapes, _shapes(adapter), _shapes(peft_model.state_dict()), config)
    except AdapterError:
        if peft_model is model:
            model.delete_adapter(adapter_name)
        else:
            peft_model.base_model.unload()  # the base model's own layers back in place
        raise
    peft_model.load_adapter(str(folder), adapter_name=adapter_name)  # the adapter exists: only its weights load
    return peft_model


def _read_config(file: Path, peft_type: str | None) -> PeftConfig:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import PeftType

    from . import tuner  # noqa: F401  (importing the method's package registers it with PEFT)

    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{file}: missing; an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise AdapterError(f"{file}: not a readable JSON file ({error})") from None
    if not isinstance(settings, dict):
        raise AdapterError(f"{file}: expected a JSON object of adapter settings, got {type(settings).__name__}")
    found = settings.get("peft_type")
    if found not in PeftType._value2member_map_ or PeftType(found) not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise AdapterError(f"{file}: peft_type {found!r} is not a PEFT method (R-LoRA's is 'RLORA', LoRA's 'LORA')")
    if peft_type is not None and found != peft_type:
        raise AdapterError(f"{file}: peft_type is {found!r}; expected a {peft_type!r} adapter")
    try:
        return PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(found)].from_pretrained(str(file.parent))
    except (TypeError, ValueError) as error:  # rlora's ConfigError is a ValueError
        raise AdapterError(f"{file}: {' '.join(str(error).split())}") from None


def _read_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise AdapterError(f"{file}: missing; an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        with safe_open(str(file), framework="pt") as weights:
            shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}  # noqa: SIM118 (not a dict)
            for key in shapes:
                tensor = weights.get_tensor(key)
                if tensor.is_floating_point() and not tensor.isfinite().all():
                    raise AdapterError(f"{file}: tensor {key!r} holds NaN or infinite values")
    except (SafetensorError, OSError) as error:
        raise AdapterError(f"{file}: not a whole safetensors file, truncated or damaged ({error})") from None
    return shapes


def _shapes(state_dict: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in state_dict.items()}


def _check_tensors(
    file: Path,
    found: dict[str, tuple[int, ...]],
    adapter: dict[str, tuple[int, ...]],
    model: dict[str, tuple[int, ...]],
    config: PeftConfig,
) -> None:
    """`found` must hold every tensor of `adapter` and nothing else but weights of the model itself (PEFT saves resized
    embeddings with an adapter), each with its shape."""
    what = f"this {config.peft_type.value} adapter (r={getattr(config, 'r', '?')})"
    missing = [key for key in adapter if key not in found]
    if missing:
        raise AdapterError(
            f"{file}: tensor {missing[0]!r} is missing (missing: {len(missing)} of the {len(adapter)} tensors of "
            f"{what})"
        )
    for key, shape in found.items():
        expected = adapter.get(key, model.get(key))
        if expected is None:
            raise AdapterError(f"{file}: tensor {key!r} is not part of {what} on this model; it would be left unused")
        if shape != expected:
            raise AdapterError(f"{file}: tensor {key!r} has shape {list(shape)}; {what} needs {list(expected)}")
