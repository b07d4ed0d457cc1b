"""`rlora serve`: trained runs behind an OpenAI-compatible HTTP API, with their per-token routing intact.

    POST /v1/chat/completions   messages -> the run's chat template -> generated reply (streamed with "stream": true)
    POST /v1/completions        a prompt, encoded as `rlora generate` encodes it -> generated text (streamed or not)
    GET  /v1/models             the served runs; a request picks one by its "model" (the run folder's name)

Built on FastAPI and uvicorn, the stack of transformers' own server (`transformers serve`). That server cannot host a
run itself: it loads whole models by Hub id or folder (an adapter folder has no config.json, the embedded model needs
rlora's conversion) and one model per id, so several runs would each load their base. Here the base model loads once
and every run is an adapter on it (all of one PEFT type: R-LoRA/HydraLoRA runs, or plain LoRA runs).

Requests are generated one at a time (a lock), each with its own run's adapter passed as `adapter_names=[run]`, so no
request depends on which adapter another one made active. Errors are OpenAI's JSON (`{"error": {"message", "type",
"param", "code"}}`): an unknown model is a 404, a malformed body or a prompt over the context limit a 400; anything
unexpected is logged with its traceback and answered with a 500 that carries none.

Over 400 lines because the OpenAI request and response shapes, their checks and the server live together.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError, MissingPackage, RunFolderError

logger = logging.getLogger(__name__)

SERVE_HINT = 'pip install "rlora[serve]"'
DEFAULT_MAX_TOKENS = 256  # when a request gives no max_tokens (and the context leaves room)


class RequestError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass
class Served:
    """One base model with every served run's adapter on it, named by the run's model id."""

    model: Any  # a PeftModel
    tokenizer: Any
    chat_template: dict[str, bool]  # per model id: whether its run was trained with the chat template
    context_limit: int
    created: int
    lock: threading.Lock

    @property
    def ids(self) -> list[str]:
        return list(self.chat_template)


def load_served(
    run_dirs: Sequence[str | Path], cache_dir: str | None = None, max_model_len: int | None = None
) -> Served:
    """Loads the runs' common base model once and each run's adapter on it, checked (`run.check_adapter`). The runs'
    folder names are their model ids; runs with different base models or PEFT types are refused before loading."""
    from .. import models
    from ..adapters import load_adapter
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
    for folder, cfg in zip(folders, cfgs, strict=True):
        if not folder.is_finished():
            raise RunFolderError(
                f"{folder.root}: the run has no adapter yet; finish it with `rlora train ... --resume`"
            )
        check_adapter(folder.adapter, cfg)
        if cfg.model != cfgs[0].model:
            raise ConfigError(
                f"{folder.root}: base model {cfg.model!r}, but {folders[0].root} has {cfgs[0].model!r}; the runs "
                "served together share one base model"
            )
        if PEFT_TYPES[cfg.method] != PEFT_TYPES[cfgs[0].method]:
            raise ConfigError(
                f"{folder.root}: a {cfg.method} run cannot be served with the {cfgs[0].method} run {folders[0].root} "
                "(PEFT holds adapters of one type on a model); serve them separately"
            )
    chat_template = any(cfg.data.chat_template for cfg in cfgs)  # a run trained with it needs it
    model, tokenizer = models.load_model_and_tokenizer(cfgs[0].model, cache_dir=cache_dir, chat_template=chat_template)
    for folder, cfg, model_id in zip(folders, cfgs, ids, strict=True):
        model = load_adapter(model, folder.adapter, adapter_name=model_id, peft_type=PEFT_TYPES[cfg.method])
    model.eval()
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    if max_model_len is not None:
        limit = min(limit, max_model_len)
    chat = {model_id: cfg.data.chat_template for model_id, cfg in zip(ids, cfgs, strict=True)}
    return Served(model, tokenizer, chat, limit, int(time.time()), threading.Lock())


# ---- requests ----------------------------------------------------------------------------------------------------


class GenerationRequest(BaseModel):
    """The settings both endpoints take; fields of OpenAI's API that do not apply here are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)  # OpenAI's default; 0 is greedy
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]


@dataclass
class Generation:
    """One request, ready to generate: its run, prompt ids and sampling settings."""

    model_id: str
    ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float

    def kwargs(self) -> dict:
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }


def _plan(served: Served, model_id: str, ids: list[int], max_tokens: int | None, body) -> Generation:
    """The generation of a request whose model is checked (`chat_ids`, `completion_ids`): refused if the prompt and
    `max_tokens` do not fit in the context; without `max_tokens`, up to DEFAULT_MAX_TOKENS that fit."""
    room = served.context_limit - len(ids)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = f" and {max_tokens} tokens to generate" if max_tokens is not None else ""
        raise RequestError(
            400,
            f"This model's maximum context length is {served.context_limit} tokens; the request has a prompt of "
            f"{len(ids)} tokens{asked}. Shorten the prompt or lower max_tokens.",
            "messages" if hasattr(body, "messages") else "prompt",
            "context_length_exceeded",
        )
    return Generation(model_id, ids, max_tokens or min(DEFAULT_MAX_TOKENS, room), body.temperature, body.top_p)


def _check_model(served: Served, model_id: str) -> None:
    if model_id not in served.chat_template:
        raise RequestError(
            404, f"The model {model_id!r} does not exist; served: {', '.join(served.ids)}", "model", "model_not_found"
        )


def chat_ids(served: Served, body) -> list[int]:
    """The messages in the tokenizer's chat template, with the assistant's turn opened (as `rlora generate` with the
    chat template encodes one user message)."""
    _check_model(served, body.model)
    tokenizer = served.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError(
            400, f"The model {body.model!r} has no chat template; use /v1/completions", "messages", "no_chat_template"
        )
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def completion_ids(served: Served, body) -> list[int]:
    """The prompt as `rlora generate` encodes it for this run (in the chat template if the run was trained so)."""
    from ..data.tokenize import encode_context

    _check_model(served, body.model)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise RequestError(400, f"prompt: expected one prompt, got {len(prompt)}", "prompt", "invalid_value")
        prompt = prompt[0]
    return encode_context(served.tokenizer, prompt, served.chat_template[body.model])


# ---- generation --------------------------------------------------------------------------------------------------


def generate(served: Served, job: Generation, streamer=None) -> tuple[list[int], str]:
    """The new token ids and OpenAI's finish reason ("stop" at the end-of-sequence token, else "length"); one request
    at a time, with its own run's adapter for its one row (`adapter_names`)."""
    import torch

    tokenizer, model = served.tokenizer, served.model
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id  # `models.load_tokenizer` gives every tokenizer one
    with served.lock, torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([job.ids], device=device),
            attention_mask=torch.ones(1, len(job.ids), dtype=torch.long, device=device),
            adapter_names=[job.model_id],
            pad_token_id=pad,
            streamer=streamer,
            **job.kwargs(),
        )[0].tolist()
    new = out[len(job.ids) :]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    if new and new[-1] in eos:
        return new, "stop"
    return new, "length"


def _usage(job: Generation, new: list[int]) -> dict:
    return {"prompt_tokens": len(job.ids), "completion_tokens": len(new), "total_tokens": len(job.ids) + len(new)}


def _stream(served: Served, job: Generation, chunk, finish) -> Iterator[str]:
    """Server-sent events: one `chunk(text)` per decoded piece, then `finish(reason, usage)`, then [DONE]."""
    import json

    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(served.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["out"] = generate(served, job, streamer)
        except BaseException as error:  # reported in the stream below; the streamer must still end
            result["error"] = error
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    for piece in streamer:
        if piece:
            yield f"data: {json.dumps(chunk(piece))}\n\n"
    thread.join()
    if "error" in result:
        logger.error("generation failed", exc_info=result["error"])
        yield f"data: {json.dumps(_error_body('generation failed', 'server_error'))}\n\n"
    else:
        new, reason = result["out"]
        yield f"data: {json.dumps(finish(reason, _usage(job, new)))}\n\n"
    yield "data: [DONE]\n\n"


# ---- the app -----------------------------------------------------------------------------------------------------


def _error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _add_error_handlers(app) -> None:
    """Every error as OpenAI's error body: a refused request, a malformed one, an HTTP error, anything unexpected."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestError)
    async def refused(_request: Request, error: RequestError):
        kind = "invalid_request_error" if error.status < 500 else "server_error"
        return JSONResponse(_error_body(error.message, kind, error.param, error.code), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def malformed(_request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = first.get("msg", "malformed request")
        if first.get("type") == "json_invalid":
            message, where = "The body is not valid JSON", None
        text = f"{where}: {message}" if where else message
        return JSONResponse(_error_body(text, param=where, code="invalid_value"), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException):
        return JSONResponse(_error_body(str(error.detail), code=None), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        logger.error("request %s failed", request.url.path, exc_info=error)
        return JSONResponse(_error_body("internal server error", "server_error"), status_code=500)


def build_app(served: Served):
    """The FastAPI app serving `served`."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI(title="rlora", docs_url=None, redoc_url=None)
    _add_error_handlers(app)

    @app.get("/v1/models")
    def list_models() -> dict:
        data = [{"id": i, "object": "model", "created": served.created, "owned_by": "rlora"} for i in served.ids]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    def chat(body: ChatRequest):
        job = _plan(served, body.model, chat_ids(served, body), body.max_completion_tokens or body.max_tokens, body)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:

            def chunk(text: str) -> dict:
                delta = {"role": "assistant", "content": text}
                return head | {
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                }

            def finish(reason: str, usage: dict) -> dict:
                choice = {"index": 0, "delta": {}, "finish_reason": reason}
                return head | {"object": "chat.completion.chunk", "choices": [choice], "usage": usage}

            return StreamingResponse(_stream(served, job, chunk, finish), media_type="text/event-stream")
        new, reason = generate(served, job)
        text = served.tokenizer.decode(new, skip_special_tokens=True)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
        return head | {"object": "chat.completion", "choices": [choice], "usage": _usage(job, new)}

    @app.post("/v1/completions")
    def complete(body: CompletionRequest):
        job = _plan(served, body.model, completion_ids(served, body), body.max_tokens, body)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
        head["model"] = body.model
        if body.stream:

            def chunk(text: str) -> dict:
                return head | {"choices": [{"index": 0, "text": text, "finish_reason": None, "logprobs": None}]}

            def finish(reason: str, usage: dict) -> dict:
                return head | {
                    "choices": [{"index": 0, "text": "", "finish_reason": reason, "logprobs": None}],
                    "usage": usage,
                }

            return StreamingResponse(_stream(served, job, chunk, finish), media_type="text/event-stream")
        new, reason = generate(served, job)
        text = served.tokenizer.decode(new, skip_special_tokens=True)
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        return head | {"choices": [choice], "usage": _usage(job, new)}

    return app


def serve(
    run_dirs: Sequence[str | Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    cache_dir: str | None = None,
    max_model_len: int | None = None,
) -> None:
    """Loads the runs and serves them until stopped (Ctrl-C or SIGTERM: uvicorn finishes open requests, then exits)."""
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingPackage(f"rlora serve needs {' and '.join(missing)}; install them with: {SERVE_HINT}")
    import uvicorn

    served = load_served(run_dirs, cache_dir, max_model_len)
    logger.info(
        "serving %s on http://%s:%d/v1 (context %d tokens)", ", ".join(served.ids), host, port, served.context_limit
    )
    app = build_app(served)
    # uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again for the handler it found: ours marks a
    # SIGTERM as handled (the server has stopped), so the command ends normally instead of being killed.
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    finally:
        signal.signal(signal.SIGTERM, previous)
    logger.info("stopped")


def _stopped(signum: int, frame: Any) -> None:
    """SIGTERM once uvicorn has shut down (see `serve`): nothing left to do."""


def run(args: argparse.Namespace) -> int:
    serve(args.run_dirs, host=args.host, port=args.port, cache_dir=args.cache_dir, max_model_len=args.max_model_len)
    return 0
