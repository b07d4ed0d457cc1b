"""rlora: R-LoRA, HydraLoRA and LoRA for multi-task fine-tuning, the PEFT way.

`import rlora` registers the method with PEFT, after which `get_peft_model`, `PeftModel.from_pretrained`,
`PeftConfig.from_pretrained` and `save_pretrained` work with `RLoraConfig` as with `LoraConfig`. It does so without
loading PEFT and torch when they are not loaded yet (`_peft_hook.py`), and the classes below (the method's package,
`rlora.tuner`) load on first use, so that the `rlora` command starts fast. `load_adapter` is
`PeftModel.from_pretrained` that first checks that the adapter folder is what it says (`adapters.py`).
"""

import importlib

from . import _peft_hook

__version__ = "0.1.0"
__all__ = ["RLoraConfig", "RLoraLayer", "RLoraLinear", "RLoraModel", "__version__", "load_adapter"]
_HOMES = {
    "RLoraConfig": "tuner",
    "RLoraLayer": "tuner",
    "RLoraLinear": "tuner",
    "RLoraModel": "tuner",
    "load_adapter": "adapters",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


_peft_hook.install()
