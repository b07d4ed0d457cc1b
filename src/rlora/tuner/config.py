"""`RLoraConfig`: the configuration of an R-LoRA / HydraLoRA adapter, a PEFT config like `LoraConfig`."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from peft import PeftConfig

from ..errors import ConfigError
from .peft_type import RLORA_PEFT_TYPE

HEAD_INITS = ("random", "zeros")
ROUTER_INITS = ("zeros", "random")
ROUTINGS = ("token", "task", "token+task")
SHARES = ("down", "up")
RANDOM_START_WARNING = (
    "RLoraConfig: head_init='random' with router_init='random' (the R-LoRA authors' code): the offset that cancels "
    "the random heads assumes uniform gates, so the adapted model does NOT start at the pretrained function"
)


@dataclass
class RLoraConfig(PeftConfig):
    """Configuration of a multi-head LoRA adapter (R-LoRA by default, HydraLoRA with two fields changed).

    Every variant of the R-LoRA paper's ablation is one config away:

    | variant             | `head_init` | `head_dropout` | `router_init` |
    |---------------------|-------------|----------------|---------------|
    | HydraLoRA           | `"zeros"`   | `False`        | `"random"`    |
    | + Multi-Head Dropout| `"zeros"`   | `True`         | `"random"`    |
    | + Random Init       | `"random"`  | `False`        | `"zeros"`     |
    | R-LoRA (default)    | `"random"`  | `True`         | `"zeros"`     |

    Plain LoRA is PEFT's own `LoraConfig`. Zero heads with a zero router are a saddle: every head gets the same
    gradient and the router none, so the K heads stay one head; HydraLoRA's code starts its router random.
    """

    r: int = field(default=4, metadata={"help": "Rank of the shared down-projection A and of every head B_k."})
    lora_alpha: float = field(
        default=32, metadata={"help": "Scaling numerator: alpha/r, or alpha/sqrt(r) with rsLoRA."}
    )
    num_heads: int = field(default=5, metadata={"help": "Number of head matrices B_k mixed by the router (K)."})
    lora_dropout: float = field(
        default=0.1,
        metadata={"help": "Dropout probability: per head on A·x (head_dropout=True) or on the layer input x."},
    )
    head_init: Literal["random", "zeros"] = field(
        default="random",
        metadata={
            "help": "'random': R-LoRA's scaled Gaussian init of A and every head, with the initial update kept as a "
            "frozen rank-r offset so the model starts at the pretrained function. 'zeros': B_k = 0 (HydraLoRA/LoRA)."
        },
    )
    head_dropout: bool = field(
        default=True,
        metadata={
            "help": "True: an independent dropout mask per head on the r-dim A·x (R-LoRA). "
            "False: one mask on the layer input x shared by all heads (the paper's HydraLoRA baseline)."
        },
    )
    router_init: Literal["zeros", "random"] = field(
        default="zeros",
        metadata={
            "help": "'zeros': uniform gates at the start (needed for R-LoRA's exact start with random heads). "
            "'random': kaiming-uniform, as a default nn.Linear (HydraLoRA's code). With zero heads the start is "
            "exact either way; with random heads AND a random router the start is NOT the pretrained function "
            "(the offset assumes uniform gates), as in the R-LoRA authors' code. Never use zero heads with a zero "
            "router: the heads then receive identical gradients and stay identical forever."
        },
    )
    init_gamma: float = field(
        default=64.0,
        metadata={"help": "gamma of the 'stable' random init: scale f = d_out**0.25 / sqrt(gamma)."},
    )
    use_rslora: bool = field(
        default=True,
        metadata={"help": "Scale the update by alpha/sqrt(r) (rsLoRA, as R-LoRA) instead of alpha/r."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Names of the linear modules to adapt: a list (exact name or name suffix), a regex, or "
            "'all-linear'. None uses PEFT's LoRA defaults for known architectures."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules not to adapt: a list of names/suffixes or a regex."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the nn.ModuleList of layers, with layers_to_transform."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules besides the adapter layers to train fully and save."}
    )
    # Router options (docs/routing.md): what the gates read, extra losses on them, and the head count per layer.
    share: Literal["down", "up"] = field(
        default="down",
        metadata={
            "help": "'down': one shared down-projection A and K up-projections B_k (HydraLoRA, R-LoRA). 'up': K "
            "down-projections A_k and one shared up-projection B (the ALoRA counter-hypothesis), h = W0 x + "
            "s * B sum_k g_k A_k x."
        },
    )
    routing: Literal["token", "task", "token+task"] = field(
        default="token",
        metadata={
            "help": "What the gates read. 'token': softmax(W_r x) per token. 'task': softmax(t_task), a learned logit "
            "vector per task (`task_names`), the same for every token of an example. 'token+task': softmax(W_r x + "
            "t_task). The task table starts as the router does (router_init: zeros, or U(-1, 1): zero heads with a "
            "zero table would be the saddle of a zero router). A row without a task, or with a task not in "
            "`task_names` (task id -1), gets zero task logits: uniform gates under 'task', the token router alone "
            "under 'token+task'."
        },
    )
    task_names: list[str] | None = field(
        default=None,
        metadata={"help": "The tasks of task routing, in task-id order (the data layer's order); needed with it."},
    )
    balance_loss_coef: float = field(
        default=0.0,
        metadata={
            "help": "Coefficient of the auxiliary load-balancing loss (Switch Transformer form) K * sum_k f_k P_k "
            "over the real tokens of a batch, f_k the share of tokens whose largest gate is head k, P_k the mean "
            "gate of head k; averaged over the adapted layers. 1 at perfect balance, K when one head takes all. "
            "0: off."
        },
    )
    router_z_loss_coef: float = field(
        default=0.0,
        metadata={
            "help": "Coefficient of the router z-loss (ST-MoE): the mean over real tokens of logsumexp(logits)^2, "
            "averaged over the adapted layers; keeps the router's logits small. 0: off."
        },
    )
    heads_pattern: dict[str, int] | None = field(
        default=None,
        metadata={
            "help": "Per-layer head counts, like PEFT's rank_pattern: {regex: K}, the regex matched against the end "
            "of a module's name (e.g. {'layers\\.0\\.mlp\\.up_proj': 2}); other layers get num_heads."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = RLORA_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _validate(self) -> None:
        for name in FIELD_RULES:
            expected = field_error(name, getattr(self, name))
            if expected is not None:
                raise ConfigError(f"RLoraConfig.{name}: expected {expected}, got {getattr(self, name)!r}")
        if self.head_init == "random" and self.router_init == "random":
            warnings.warn(RANDOM_START_WARNING, stacklevel=3)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("RLoraConfig.layers_pattern: only meaningful together with layers_to_transform")
        for pattern in self.heads_pattern or {}:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ConfigError(f"RLoraConfig.heads_pattern: {pattern!r} is not a valid regex ({error})") from None
        if self.routing != "token" and not self.task_names:
            raise ConfigError(
                f"RLoraConfig.task_names: routing {self.routing!r} needs the list of task names (the training tasks)"
            )

    def heads_of(self, module_name: str) -> int:
        """The head count of the module `module_name`: `heads_pattern`'s, matched as PEFT matches `rank_pattern`."""
        from peft.utils.other import get_pattern_key

        pattern = self.heads_pattern or {}
        key = get_pattern_key(pattern.keys(), module_name)
        return pattern.get(key, self.num_heads)

    def task_id(self, task: str | None) -> int:
        """The task id of `task` under task routing: its index in `task_names`, -1 (zero task logits) otherwise."""
        names = self.task_names or []
        return names.index(task) if task in names else -1

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# The rule of each checked field: (test, what is expected). The run config checks its adapter section with these.
FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "r": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "num_heads": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "lora_alpha": (lambda v: _is_number(v) and 0 < v < math.inf, "a finite number > 0"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "head_init": (lambda v: v in HEAD_INITS, f"one of {', '.join(map(repr, HEAD_INITS))}"),
    "router_init": (lambda v: v in ROUTER_INITS, f"one of {', '.join(map(repr, ROUTER_INITS))}"),
    "head_dropout": (lambda v: isinstance(v, bool), "True or False"),
    "init_gamma": (lambda v: _is_number(v) and 0 < v < math.inf, "a finite number > 0"),
    "use_rslora": (lambda v: isinstance(v, bool), "True or False"),
    "share": (lambda v: v in SHARES, f"one of {', '.join(map(repr, SHARES))}"),
    "routing": (lambda v: v in ROUTINGS, f"one of {', '.join(map(repr, ROUTINGS))}"),
    "task_names": (
        lambda v: v is None or (isinstance(v, list) and all(isinstance(t, str) for t in v) and len(set(v)) == len(v)),
        "null or a list of distinct task names",
    ),
    "balance_loss_coef": (lambda v: _is_number(v) and 0 <= v < math.inf, "a finite number >= 0"),
    "router_z_loss_coef": (lambda v: _is_number(v) and 0 <= v < math.inf, "a finite number >= 0"),
    "heads_pattern": (
        lambda v: (
            v is None
            or (isinstance(v, dict) and all(isinstance(k, str) and _is_int(n) and n >= 1 for k, n in v.items()))
        ),
        "null or a mapping of module-name regex to an integer >= 1",
    ),
}


def field_error(name: str, value: Any) -> str | None:
    """None if `value` is valid for the field `name` of `FIELD_RULES`, else what the field expects."""
    ok, expected = FIELD_RULES[name]
    return None if ok(value) else expected


def field_default(name: str) -> Any:
    """`RLoraConfig`'s default of the field `name` (the run config's adapter section and `methods.adapter_config`
    take their defaults from here)."""
    return RLoraConfig.__dataclass_fields__[name].default


def field_help(name: str) -> str:
    """`RLoraConfig`'s help text of the field `name`."""
    return RLoraConfig.__dataclass_fields__[name].metadata["help"]
