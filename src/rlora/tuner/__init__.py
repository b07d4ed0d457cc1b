"""R-LoRA as a PEFT method, in the shape of PEFT's own `peft/tuners/<method>/`: the PEFT type (`peft_type.py`, a
leaf), the config (`config.py`), the layer (`layer.py`), the tuner (`model.py`), and here the registration that
imports them.

Importing this package registers R-LoRA with PEFT (config class, tuner class, state-dict prefix); `import rlora`
imports it as soon as PEFT is loaded (`rlora._peft_hook`). It imports nothing from rlora's data, training or command
line (a test pins it), so the adapter alone can go into any training loop. If a PEFT upgrade changed how
registration works, this is the one place to change; tests/test_peft_integration.py runs every import order
through it.
"""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import RLoraConfig
from .layer import RLoraLayer, RLoraLinear
from .model import RLoraModel, task_routing
from .peft_type import RLORA_PEFT_TYPE

__all__ = ["RLORA_PEFT_TYPE", "RLoraConfig", "RLoraLayer", "RLoraLinear", "RLoraModel", "task_routing"]

if RLORA_PEFT_TYPE not in PEFT_TYPE_TO_TUNER_MAPPING:
    register_peft_method(name="rlora", config_cls=RLoraConfig, model_cls=RLoraModel)
