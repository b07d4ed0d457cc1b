"""rlora: R-LoRA, HydraLoRA and LoRA for multi-task fine-tuning, the PEFT way.

`import rlora` registers the method with PEFT, after which `get_peft_model`, `PeftModel.from_pretrained`,
`PeftConfig.from_pretrained` and `save_pretrained` work with `RLoraConfig` as with `LoraConfig`.
"""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from ._registry import RLORA_PEFT_TYPE
from .config import RLoraConfig
from .layer import RLoraLayer, RLoraLinear
from .model import RLoraModel

if RLORA_PEFT_TYPE not in PEFT_TYPE_TO_TUNER_MAPPING:
    register_peft_method(name="rlora", config_cls=RLoraConfig, model_cls=RLoraModel)

__version__ = "0.1.0"
__all__ = ["RLoraConfig", "RLoraLayer", "RLoraLinear", "RLoraModel", "__version__"]
