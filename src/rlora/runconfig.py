"""The run configuration: one YAML file (model, data, method, adapter, training, eval), typed and validated.

Every key is a field of a dataclass below, with its default and help text. Unknown keys, wrong types, values out
of their range, paths that do not exist, a key given twice and an empty file are rejected with the file, the key
path and what was expected, before any model is loaded. Any key can be overridden on the command line as
`section.key=value` (the value is parsed as YAML: `data.tasks=[boolq,piqa]`).

Over 400 lines on purpose: every key with its default, help and range is defined here, where it is checked; the
YAML reading itself is `_yaml.py`'s.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ._yaml import KeyTwice, StrictLoader, TooLarge, safe_load
from .config_fields import FINITE_POSITIVE, POSITIVE, Range
from .config_fields import at_least as _at_least
from .config_fields import key as _key
from .config_fields import one_of as _one_of
from .data.files import DataFile
from .data.settings import DEFAULT_TASKS, DataSettings
from .errors import ConfigError
from .methods import METHODS
from .models import DEFAULT_MODEL, BaseLoading, check_loading, has_cpp_compiler, model_problem
from .tuner.config import FIELD_RULES, field_default, field_help

TRACKERS = ("tensorboard", "mlflow", "trackio", "wandb")  # `training.report_to`: the Trainer's integrations offered


def _trackers_valid(value: list[str]) -> bool:
    return value == ["none"] or all(name in TRACKERS for name in value)


def _targets_valid(value: Any) -> bool:
    names = [] if value is None else [value] if isinstance(value, str) else value
    return value is None or (bool(value) and all(name.strip() for name in names))


def _rlora_field(name: str, optional: bool = False) -> Any:
    """A field of the adapter section that `RLoraConfig` also has: its default, help text and rule are `RLoraConfig`'s
    (`optional`: None, the method's own choice, is allowed too)."""
    valid, expected = FIELD_RULES[name]
    rule: Range = ((lambda v: v is None or valid(v)) if optional else valid, expected)
    return _key(None if optional else field_default(name), field_help(name), rule)


@dataclass
class AdapterSettings:
    """The adapter's settings; each field that `RLoraConfig` also has takes its default, help text and rule from
    there (`FIELD_RULES`)."""

    r: int = _rlora_field("r")
    lora_alpha: float = _rlora_field("lora_alpha")
    num_heads: int = _rlora_field("num_heads")
    lora_dropout: float = _rlora_field("lora_dropout")
    target_modules: list[str] | str | None = _key(
        None,
        "names or name suffixes, a regex, 'all-linear', or null: the architecture's defaults (PEFT's LoRA table, see "
        "model.py); the GPT-2 family's Conv1D layers (c_attn, c_fc, c_proj) adapt like linear ones",
        (_targets_valid, "a non-empty list of module names, a regex, 'all-linear' or null"),
        factory=lambda: ["gate_proj", "up_proj", "down_proj"],
    )
    init_gamma: float = _rlora_field("init_gamma")
    use_rslora: bool = _rlora_field("use_rslora")
    lora_r: int | None = _key(
        None, "rank of plain LoRA; null: matched to the multi-head methods' parameter count", _at_least(1, True)
    )
    router_init: str | None = _rlora_field("router_init", optional=True)  # null: the method's own (methods.py)
    # the router options (multi-head methods; docs/routing.md): task routing takes the run's tasks as its task ids
    routing: str = _rlora_field("routing")
    balance_loss_coef: float = _rlora_field("balance_loss_coef")
    router_z_loss_coef: float = _rlora_field("router_z_loss_coef")
    heads_pattern: dict | None = _rlora_field("heads_pattern")


@dataclass
class TrainingSettings:
    epochs: float = _key(1.0, "passes over the training mixture (unless max_steps is set)", FINITE_POSITIVE)
    max_steps: int = _key(
        -1,
        "optimizer steps; -1: train for epochs",
        (lambda v: v == -1 or v >= 1, "an integer >= 1, or -1 to train for training.epochs"),
    )
    batch_size: int = _key(8, "sequences per device per step", POSITIVE)
    grad_accum: int = _key(1, "gradient accumulation steps", POSITIVE)
    lr: float = _key(2e-4, "peak learning rate", FINITE_POSITIVE)
    router_lr_scale: float = _key(
        1.0, "the routers train at lr x this (1: like every other adapter weight)", FINITE_POSITIVE
    )
    scheduler: str = _key(
        "cosine", "learning-rate schedule", _one_of(("linear", "cosine", "constant", "constant_with_warmup"))
    )
    warmup_ratio: float = _key(
        0.03, "the share of the steps spent warming up", (lambda v: 0 <= v < 1, "a number in [0, 1)")
    )
    weight_decay: float = _key(
        0.0, "AdamW's weight decay (never on the routers)", (lambda v: 0 <= v < math.inf, "a finite number >= 0")
    )
    max_grad_norm: float = _key(1.0, "gradients are clipped to this norm", FINITE_POSITIVE)
    logging_steps: int = _key(5, "log the loss every this many steps", POSITIVE)
    save_steps: int = _key(50, "write a checkpoint every this many steps", POSITIVE)
    save_total_limit: int = _key(2, "checkpoints kept", POSITIVE)
    precision: str = _key(
        "auto",
        "auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA devices that support it, else fp32). bf16 runs on any CPU too "
        "(torch's CPU autocast; fast where the CPU has AVX-512 BF16 or AMX); fp16 needs a GPU",
        _one_of(("auto", "fp32", "bf16", "fp16")),
    )
    group_by_length: bool = _key(True, "batches of similar length (less padding)")
    deepspeed: str | None = _key(None, "path of a DeepSpeed JSON config, passed to the Trainer")
    fsdp: str | None = _key(None, 'FSDP options string, passed to the Trainer (e.g. "full_shard auto_wrap")')
    dataloader_workers: int = _key(0, "data loader worker processes", _at_least(0))
    gradient_checkpointing: bool = _key(
        False, "recompute each layer's activations in the backward pass (less memory, ~1/3 more time)"
    )
    gradient_checkpointing_reentrant: bool = _key(False, "torch's older reentrant checkpoint instead of the default")
    torch_compile: bool = _key(False, "compile the model with torch.compile (on a CPU it needs a C++ compiler)")
    report_to: list[str] = _key(
        None,
        f"trackers the Trainer reports to, from {', '.join(TRACKERS)} ([] or [none]: none); offline or local by "
        "default, under RUN_DIR/tracking/ (docs/training-watch.md); train_log.jsonl is written whatever they are",
        (_trackers_valid, f"a list of {', '.join(TRACKERS)}, or [none]"),
        factory=list,
    )
    router_telemetry_steps: int | None = _key(
        None,
        "measure the routers' health (gate entropy, largest head's share, tasks' divergence, head cosine, status) on a "
        "probe of each task's validation examples every this many steps (null: every logging_steps; 0: never)",
        _at_least(0, True),
    )
    router_probe_examples: int = _key(
        1,
        "validation examples per task in the router telemetry's probe (each one a forward pass: 1 keeps the demo's "
        "telemetry under 3% of its training time; more give a steadier tasks' divergence)",
        POSITIVE,
    )
    router_warn_intervals: int = _key(
        3, "warn when the router is inert or collapsed for this many telemetry intervals in a row", POSITIVE
    )
    router_stop: bool = _key(False, "stop training when that warning is given (the adapter so far is the run's)")
    eval_steps: int | None = _key(
        None,
        "score each task's validation split every this many steps (null: never); the validation split is carved from "
        "the training examples (data.validation_fraction), the test split is never read",
        _at_least(1, True),
    )
    eval_examples: int | None = _key(
        None,
        "with eval_steps: the first this many validation examples of each task are scored (null: all of them, up to "
        "data.max_eval_per_task); each costs about 1/20 of a training step of the demo",
        _at_least(1, True),
    )
    eval_accuracy: bool = _key(
        False, "with eval_steps: each multiple-choice task's accuracy too (every choice scored: a few times the cost)"
    )
    keep_best: bool = _key(
        False,
        "with eval_steps: the run's adapter is the checkpoint of lowest mean validation loss (save_steps a multiple of "
        "eval_steps), recorded in RUN_DIR/watch.json",
    )


@dataclass
class EvalSettings:
    batch_size: int = _key(16, "examples per scoring batch", POSITIVE)
    generate: bool = _key(True, "also generate answers (exact match) for MC and free-form tasks")
    max_new_tokens: int = _key(8, "tokens generated per answer", POSITIVE)


@dataclass
class RunConfig:
    model: str = _key(DEFAULT_MODEL, "an embedded model's name, a model folder or a Hub id")
    output_dir: str = _key("runs/run", "the run folder")
    seed: int = _key(
        0,
        "seeds the adapter's init, the mixture and the data order",
        (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32 - 1]"),
    )
    method: str = _key("rlora", " | ".join(METHODS), _one_of(METHODS))
    base: BaseLoading = _key(None, "how the base model loads: quantization, attention", factory=BaseLoading)
    data: DataSettings = _key(None, "the tasks, their split and mixture, and their encoding", factory=DataSettings)
    adapter: AdapterSettings = _key(None, "the adapter's settings", factory=AdapterSettings)
    training: TrainingSettings = _key(None, "the Trainer's settings", factory=TrainingSettings)
    eval: EvalSettings = _key(None, "evaluation's settings", factory=EvalSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS_DIR = Path(__file__).parent / "configs"


def presets() -> list[str]:
    """Names of the shipped presets (`rlora train demo` is `rlora train <package>/configs/demo.yaml`)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """`path` itself, or the shipped preset of that name when no such file exists."""
    path = Path(path)
    if not path.exists() and path.suffix == "" and (PRESETS_DIR / f"{path}.yaml").is_file():
        return PRESETS_DIR / f"{path}.yaml"
    return path


def load_run_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Reads a YAML run config or preset name (the defaults when `path` is None) and applies `key=value` overrides."""
    raw: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        path = resolve_config_path(path)
        source = str(path)
        raw = _read_yaml(path)
    _apply_overrides(raw, overrides)
    return validate_run_config(_build(RunConfig, raw, source, ""), source)


def with_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...], source: str) -> RunConfig:
    """A copy of `cfg` with `key=value` overrides applied and checked as `load_run_config` does; errors name
    `source` (e.g. the command-line option that gave them)."""
    raw = cfg.to_dict()
    _apply_overrides(raw, overrides)
    return validate_run_config(_build(RunConfig, raw, source, ""), source)


def override_parts(item: str) -> tuple[list[str], Any]:
    """The key path and the value (parsed as YAML, else the text itself) of a `key=value` override."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. training.lr=1e-4")
    try:
        parsed = safe_load(value) if value else None
    except (yaml.YAMLError, RecursionError):
        parsed = value
    except TooLarge as err:
        raise ConfigError(f"override {key.strip()}: refused: a YAML value with {err}") from None
    return key.strip().split("."), parsed


def _apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    given: list[list[str]] = []
    for item in overrides:
        keys, parsed = override_parts(item)
        twice = next((g for g in given if g[: len(keys)] == keys[: len(g)]), None)
        if twice is not None:
            raise ConfigError(f"override {item!r}: {'.'.join(twice)} is already set on the command line")
        given.append(keys)
        _set_path(raw, keys, parsed, item)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(
            f"{path}: cannot read the run config ({err.strerror}); presets: {', '.join(presets())}"
        ) from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        raw = yaml.load(text, Loader=StrictLoader)  # a SafeLoader
    except KeyTwice as err:
        key, first, line = err.args
        raise ConfigError(
            f"{path}: line {line}: key {key!r} is given twice in one section (first on line {first}); merge them"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    except TooLarge as err:
        raise ConfigError(f"{path}: refused: a YAML document with {err}") from None
    if raw is None or raw == {}:
        raise ConfigError(
            f"{path}: no settings (the file is empty or only comments); start from a preset "
            f"({', '.join(presets())}): name it, or copy it from {PRESETS_DIR}"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(raw).__name__}")
    return raw


def _set_path(raw: dict, keys: list[str], value: Any, item: str) -> None:
    for k in keys[:-1]:
        raw = raw.setdefault(k, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"override {item!r}: {k!r} is not a section")
    raw[keys[-1]] = value


def _build(cls: type, raw: Any, source: str, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {prefix + str(key)!r}{hint}; valid keys here: {', '.join(names)}")
        expected = hints[key]
        if dataclasses.is_dataclass(expected):
            kwargs[key] = _build(expected, value, source, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(value, expected, f"{source}: {prefix}{key}")
    return cls(**kwargs)


def _check_type(value: Any, expected: Any, where: str) -> Any:
    options = typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)
    for option in options:
        origin = typing.get_origin(option)
        if option is type(None) and value is None:
            return None
        if origin is list and isinstance(value, list):
            (item_type,) = typing.get_args(option)
            return [_check_type(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if option in (int, str, bool, dict) and type(value) is option:
            return value
    names = " or ".join(_type_name(o) for o in options)
    raise ConfigError(f"{where}: expected {names}, got {value!r}")


def _type_name(t: Any) -> str:
    if t is type(None):
        return "null"
    if typing.get_origin(t) is list:
        item = typing.get_args(t)[0]
        names = {int: "integers", float: "numbers", str: "strings", str | dict: "paths or mappings"}
        return "a list of " + names.get(item, str(item))
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping"}.get(t, str(t))


def validate_run_config(cfg: RunConfig, source: str) -> RunConfig:
    """Checks every key's range (and that its paths exist), naming `source` and the key; paths come back absolute
    (`data.jsonl`, `training.deepspeed`) or with `~` expanded (`output_dir`)."""
    _check_ranges(cfg, source)
    problem = model_problem(cfg.model)
    if problem is not None:
        raise ConfigError(f"{source}: model: {problem}")
    if cfg.data.tasks is None:
        cfg.data.tasks = [] if cfg.data.jsonl or cfg.data.files else list(DEFAULT_TASKS)
    if not cfg.data.tasks and not cfg.data.jsonl and not cfg.data.files:
        raise ConfigError(
            f"{source}: data: no tasks: give data.tasks (built-in names), data.files or data.jsonl (your files)"
        )
    for i, file in enumerate(cfg.data.jsonl):
        _check_file(Path(file).expanduser(), f"{source}: data.jsonl[{i}]")
    files = [DataFile.from_config(f, f"{source}: data.files[{i}]") for i, f in enumerate(cfg.data.files)]
    if cfg.training.deepspeed is not None and cfg.training.fsdp:
        raise ConfigError(f"{source}: training.fsdp: not together with training.deepspeed; give one of them")
    _check_engines(cfg, source)
    _check_watch(cfg.training, source)
    if cfg.training.deepspeed is not None:
        _check_deepspeed(Path(cfg.training.deepspeed).expanduser(), f"{source}: training.deepspeed")
    _check_output_dir(cfg.output_dir, f"{source}: output_dir")
    # absolute paths, so that the saved config works from any folder (eval, analyze, --resume)
    cfg.data.jsonl = [str(Path(f).expanduser().resolve()) for f in cfg.data.jsonl]
    cfg.data.files = [
        str(spec.path) if isinstance(entry, str) else entry | {"path": str(spec.path)}
        for entry, spec in zip(cfg.data.files, files, strict=True)
    ]
    if cfg.training.deepspeed is not None:
        cfg.training.deepspeed = str(Path(cfg.training.deepspeed).expanduser().resolve())
    if Path(cfg.model).expanduser().is_dir():  # a local model folder, named so that it works from anywhere
        cfg.model = str(Path(cfg.model).expanduser().resolve())
    if cfg.output_dir.startswith("~"):
        cfg.output_dir = str(Path(cfg.output_dir).expanduser())
    return cfg


def _check_ranges(settings: Any, source: str, prefix: str = "") -> None:
    """Every field's range (its metadata's "range"), section by section."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            _check_ranges(value, source, f"{prefix}{f.name}.")
        elif "range" in f.metadata and not f.metadata["range"][0](value):
            raise ConfigError(f"{source}: {prefix}{f.name}: expected {f.metadata['range'][1]}, got {value!r}")


def _check_engines(cfg: RunConfig, source: str) -> None:
    """The base's loading and the training engines, together and on this machine (packages, compiler)."""
    check_loading(cfg.base, source)
    t = cfg.training
    if t.gradient_checkpointing_reentrant and not t.gradient_checkpointing:
        raise ConfigError(
            f"{source}: training.gradient_checkpointing_reentrant: only with training.gradient_checkpointing: true"
        )
    a = cfg.adapter
    if t.gradient_checkpointing_reentrant and (a.balance_loss_coef > 0 or a.router_z_loss_coef > 0):
        raise ConfigError(
            f"{source}: adapter.balance_loss_coef: the router losses need gradients from the forward pass, which the "
            "reentrant checkpoint runs without; set training.gradient_checkpointing_reentrant: false"
        )
    if cfg.base.quantization != "none" and (t.deepspeed is not None or t.fsdp):
        engine = "training.deepspeed" if t.deepspeed is not None else "training.fsdp"
        raise ConfigError(
            f"{source}: base.quantization: a {cfg.base.quantization} base is not sharded by rlora ({engine}); "
            "train it data-parallel (torchrun) or unquantized"
        )
    if t.torch_compile and not has_cpp_compiler() and not _has_gpu():
        raise ConfigError(
            f"{source}: training.torch_compile: on a CPU torch.compile builds C++ code and no C++ compiler (c++, g++, "
            "clang++) is on PATH; install one or set training.torch_compile: false"
        )


def _check_watch(t: TrainingSettings, source: str) -> None:
    """The settings of what is measured during training, together."""
    if len(set(t.report_to)) < len(t.report_to):
        raise ConfigError(f"{source}: training.report_to: a tracker is named twice in {t.report_to}")
    for name in ("eval_examples", "eval_accuracy", "keep_best"):
        if getattr(t, name) and t.eval_steps is None:
            raise ConfigError(f"{source}: training.{name}: only with training.eval_steps (the validation scoring)")
    if t.keep_best and t.save_steps % t.eval_steps:
        raise ConfigError(
            f"{source}: training.keep_best: save_steps ({t.save_steps}) must be a multiple of eval_steps "
            f"({t.eval_steps}), so that each scored step's checkpoint can be kept"
        )
    if t.eval_steps is not None and (t.deepspeed is not None or t.fsdp):
        engine = "training.deepspeed" if t.deepspeed is not None else "training.fsdp"
        raise ConfigError(
            f"{source}: training.eval_steps: not with {engine} (the scoring runs the whole model on each process); "
            "score the checkpoints after training with `rlora eval`"
        )


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_file(path: Path, where: str) -> None:
    if not path.exists():
        raise ConfigError(f"{where}: no such file: {path}")
    if not path.is_file():
        raise ConfigError(f"{where}: {path} is not a file")


def _check_deepspeed(path: Path, where: str) -> None:
    _check_file(path, where)
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ConfigError(f"{where}: {path}: not a readable JSON file ({err})") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: {path}: expected a JSON object of DeepSpeed settings")


def _check_output_dir(output_dir: str, where: str) -> None:
    """A folder that exists or can be made, and written in."""
    if not output_dir.strip():
        raise ConfigError(f"{where}: expected a folder path, got {output_dir!r}")
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{where}: {output_dir} exists and is not a folder")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{where}: {existing} is a file, so {output_dir} cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: cannot write in {existing} (permission denied)")


def dump_run_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
