"""The served runs: one base model, loaded as the runs were trained on it (their config's `base` section:
quantization, attention kernel, compute dtype), each run's adapter on it under the run's name, and the base model
itself under its own id. Each run is opened as every verb opens one (`rlora.run.Run`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import models
from ..adapters import load_adapter
from ..errors import ConfigError
from ..run import Run
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
    runs = _open_runs(run_dirs, cache_dir)
    ids = [run.folder.root.resolve().name for run in runs]
    base = base_id(runs[0].cfg.model)
    if base in ids:
        raise ConfigError(f"a run is named {base!r}, the id of the base model; rename the run folder")
    # the base and tokenizer as the runs' `base` section loads them; one run asking for the chat template is enough
    loader = next((run for run in runs if run.cfg.data.chat_template), runs[0])
    model, tokenizer = loader.base_model, loader.tokenizer
    for run, model_id in zip(runs, ids, strict=True):
        model = load_adapter(model, run.folder.adapter, adapter_name=model_id, peft_type=run.peft_type)
    model.eval()
    limit = models.context_length(model)
    if limit is None and max_model_len is None:
        raise ConfigError(f"model {runs[0].cfg.model!r}: its config gives no context length; pass --max-model-len")
    limit = min(x for x in (limit, max_model_len) if x is not None)
    chat = {model_id: run.cfg.data.chat_template for model_id, run in zip(ids, runs, strict=True)} | {base: False}
    return Served(model, tokenizer, chat, base, limit, int(time.time()))


def _open_runs(run_dirs: Sequence[str | Path], cache_dir: str | None) -> list[Run]:
    """Each run opened (`Run.open`: finished, its adapter its own), and refused in one line unless they can share one
    server: distinct names, one base model loaded alike, one PEFT type."""
    if not run_dirs:
        raise ConfigError("no run: give one or more run folders")
    ids = [Path(d).resolve().name for d in run_dirs]
    duplicate = next((i for i in ids if ids.count(i) > 1), None)
    if duplicate:
        raise ConfigError(f"two runs are named {duplicate!r}: every served run folder needs its own name")
    runs = [Run.open(d, cache_dir) for d in run_dirs]
    first = runs[0]
    for run in runs[1:]:
        root, cfg, first_cfg = run.folder.root, run.cfg, first.cfg
        if base_id(cfg.model) != base_id(first_cfg.model):
            raise ConfigError(
                f"{root}: base model {cfg.model!r}, but {first.folder.root} has {first_cfg.model!r}; the runs "
                "served together share one base model"
            )
        if cfg.base != first_cfg.base:
            differ = next(k for k, v in dataclasses.asdict(cfg.base).items() if getattr(first_cfg.base, k) != v)
            raise ConfigError(
                f"{root}: base.{differ} is {getattr(cfg.base, differ)!r}, but {first.folder.root} has "
                f"{getattr(first_cfg.base, differ)!r}; the runs served together load their base model alike"
            )
        if run.peft_type != first.peft_type:
            raise ConfigError(
                f"{root}: a {cfg.method} run cannot be served with the {first_cfg.method} run {first.folder.root} "
                "(PEFT holds adapters of one type on a model); serve them separately"
            )
    return runs


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
