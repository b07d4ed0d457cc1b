"""The served runs: one base model, loaded as the runs were trained on it (their config's `base` section:
quantization, attention kernel, compute dtype), each run's adapter on it under the run's name, and the base model
itself under its own id. Every call into the run-loading functions (`rlora.run`) is in `_load_base` and
`_load_runs`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RunFolderError
from .engine import BASE
from .protocol import ChatRequest, CompletionRequest, RequestError


@dataclass
class Served:
    """The model with every run's adapter, and per model id what its requests need."""

    model: Any  # a PeftModel
    tokenizer: Any
    chat_template: dict[str, bool]  # per model id: whether its completions are wrapped in the chat template
    base_id: str
    context_limit: int
    created: int

    @property
    def ids(self) -> list[str]:
        return list(self.chat_template)

    def adapter(self, model_id: str) -> str:
        """The name a row of `model_id` has in `adapter_names`."""
        return BASE if model_id == self.base_id else model_id


def base_id(model: str) -> str:
    """The base model's id in the API: its Hub id, or a local folder's name."""
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


def load_served(
    run_dirs: Sequence[str | Path], cache_dir: str | None = None, max_model_len: int | None = None
) -> Served:
    """Loads the runs' common base model once and each run's adapter on it, checked. The runs' folder names are their
    model ids; runs on different bases (model or `base` section), of different PEFT types, or named alike are refused
    in one line before anything loads."""
    folders, cfgs = _read_runs(run_dirs)
    ids = [folder.root.resolve().name for folder in folders]
    base = base_id(cfgs[0].model)
    if base in ids:
        raise ConfigError(f"a run is named {base!r}, the id of the base model; rename the run folder")
    model, tokenizer = _load_base(cfgs, cache_dir)
    model = _load_runs(model, folders, cfgs, ids)
    model.eval()
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    if max_model_len is not None:
        limit = min(limit, max_model_len)
    chat = {model_id: cfg.data.chat_template for model_id, cfg in zip(ids, cfgs, strict=True)} | {base: False}
    return Served(model, tokenizer, chat, base, limit, int(time.time()))


def _read_runs(run_dirs: Sequence[str | Path]) -> tuple[list, list]:
    from ..methods import PEFT_TYPES
    from ..run import RunFolder, check_adapter

    if not run_dirs:
        raise ConfigError("no run: give one or more run folders")
    folders = [RunFolder(d) for d in run_dirs]
    ids = [folder.root.resolve().name for folder in folders]
    duplicate = next((i for i in ids if ids.count(i) > 1), None)
    if duplicate:
        raise ConfigError(f"two runs are named {duplicate!r}: every served run folder needs its own name")
    cfgs = [folder.read_config() for folder in folders]
    first, first_cfg = folders[0], cfgs[0]
    for folder, cfg in zip(folders, cfgs, strict=True):
        if not folder.is_finished():
            raise RunFolderError(
                f"{folder.root}: the run has no adapter yet; finish it with `rlora train ... --resume`"
            )
        check_adapter(folder.adapter, cfg)
        if base_id(cfg.model) != base_id(first_cfg.model):
            raise ConfigError(
                f"{folder.root}: base model {cfg.model!r}, but {first.root} has {first_cfg.model!r}; the runs "
                "served together share one base model"
            )
        if cfg.base != first_cfg.base:
            differ = next(k for k, v in dataclasses.asdict(cfg.base).items() if getattr(first_cfg.base, k) != v)
            raise ConfigError(
                f"{folder.root}: base.{differ} is {getattr(cfg.base, differ)!r}, but {first.root} has "
                f"{getattr(first_cfg.base, differ)!r}; the runs served together load their base model alike"
            )
        if PEFT_TYPES[cfg.method] != PEFT_TYPES[first_cfg.method]:
            raise ConfigError(
                f"{folder.root}: a {cfg.method} run cannot be served with the {first_cfg.method} run {first.root} "
                "(PEFT holds adapters of one type on a model); serve them separately"
            )
    return folders, cfgs


def _load_base(cfgs: list, cache_dir: str | None) -> tuple[Any, Any]:
    """The base model and tokenizer as the runs' `base` section loads them (one run asking for the chat template is
    enough: it is needed)."""
    from ..run import load_base_model

    with_template = next((cfg for cfg in cfgs if cfg.data.chat_template), cfgs[0])
    return load_base_model(with_template, cache_dir)


def _load_runs(model, folders: list, cfgs: list, ids: list[str]):
    from ..adapters import load_adapter
    from ..methods import PEFT_TYPES

    for folder, cfg, model_id in zip(folders, cfgs, ids, strict=True):
        model = load_adapter(model, folder.adapter, adapter_name=model_id, peft_type=PEFT_TYPES[cfg.method])
    return model


# ---- prompts to token ids ------------------------------------------------------------------------------------------


def check_model(served: Served, model_id: str) -> None:
    if model_id not in served.chat_template:
        raise RequestError(
            404, f"The model {model_id!r} does not exist; served: {', '.join(served.ids)}", "model", "model_not_found"
        )


def chat_ids(served: Served, request: ChatRequest) -> list[int]:
    """The messages in the tokenizer's chat template, with the assistant's turn opened (as `rlora generate` with the
    chat template encodes one user message); a template that refuses the messages is a 400 with its message."""
    from jinja2 import TemplateError

    tokenizer = served.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError(
            400,
            f"The model {request.model!r} has no chat template; use /v1/completions",
            "messages",
            "no_chat_template",
        )
    messages = [{"role": m.role, "content": m.text()} for m in request.messages]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except (TemplateError, ValueError) as error:
        message = f"messages: the chat template refused them: {error}"
        raise RequestError(400, message, "messages", "invalid_value") from None
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def completion_ids(served: Served, request: CompletionRequest) -> list[int]:
    """The prompt as `rlora generate` encodes it for this run (in the chat template if the run was trained so), or
    the token ids it gives, checked against the vocabulary."""
    from ..data.tokenize import encode_context

    prompt = request.prompt
    prompt = prompt[0] if isinstance(prompt, list) and not isinstance(prompt[0], int) else prompt
    if isinstance(prompt, str):
        return encode_context(served.tokenizer, prompt, served.chat_template[request.model])
    vocab = len(served.tokenizer)
    bad = next((i for i in prompt if not 0 <= i < vocab), None)
    if bad is not None:
        raise RequestError(400, f"prompt: token id {bad} is outside the vocabulary (0..{vocab - 1})", "prompt")
    return list(prompt)
