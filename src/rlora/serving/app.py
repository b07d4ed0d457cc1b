"""The HTTP front end: an async FastAPI app that checks each request (protocol.py), encodes it (runs.py), queues it
for the generation worker (engine.py) and sends back what the worker emits, as one JSON body or as server-sent
events. A client that disconnects cancels its job: a queued job is dropped, a running row leaves the batch before the
next decoding step.

Errors are OpenAI's JSON body (`{"error": {"message", "type", "param", "code"}}`): 400 for a bad request, 401 without
the API key, 404 for an unknown model or path, 413 for a body over the limit, 503 (with Retry-After) when the queue is
full, 504 past the request timeout, 500 for anything unexpected (logged once with its traceback, never sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .engine import Delta, Done, Engine, Job, QueueFull
from .protocol import ChatRequest, CompletionRequest, GenerationRequest, Limits, RequestError, parse_request
from .runs import Served, chat_ids, check_model, completion_ids

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256  # when a request gives no max_tokens (and the context leaves room)
DISCONNECT_POLL = 0.1  # seconds between two checks that a non-streaming client is still there


@dataclass(frozen=True)
class Settings:
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    request_timeout: float = 600.0  # seconds from arrival to the last token
    retry_after: int = 1  # seconds, in a 503's Retry-After


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class CatchAll:
    """ASGI middleware: an unexpected exception becomes one logged traceback and a 500 with OpenAI's error body (not
    re-raised to the server, which would log it again and reset the connection)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        started = False

        async def tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:  # the client left while its body was read: nobody to answer
            return
        except Exception as error:
            logger.error("request %s failed", scope.get("path"), exc_info=error)
            if scope["type"] == "http" and not started:
                await JSONResponse(error_body("internal server error", "server_error"), status_code=500)(
                    scope, receive, send
                )


class Api:
    """What the routes do, on the served runs through the engine."""

    def __init__(self, served: Served, engine: Engine, settings: Settings) -> None:
        self.served, self.engine, self.settings = served, engine, settings

    def authorize(self, request) -> None:
        if self.settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.settings.api_key}".encode()):
            raise RequestError(401, "Missing or wrong API key (Authorization: Bearer KEY)", None, "invalid_api_key")

    def model_card(self, model_id: str) -> dict:
        check_model(self.served, model_id)
        return {"id": model_id, "object": "model", "created": self.served.created, "owned_by": "rlora"}

    async def accept(self, request, kind: type[GenerationRequest]):
        """The checked request and its queued job, with the queue its events arrive on."""
        self.authorize(request)
        raw = await read_body(request, self.settings.limits.body_bytes)
        body = parse_request(raw, kind, self.settings.limits)
        check_model(self.served, body.model)
        encode = chat_ids if kind is ChatRequest else completion_ids
        ids = await run_in_threadpool(encode, self.served, body)
        events: asyncio.Queue = asyncio.Queue()
        job = make_job(self.served, body, ids, emitter(events), self.settings.request_timeout)
        try:
            self.engine.submit(job)
        except QueueFull:
            raise RequestError(
                503, f"The server is busy ({self.engine.max_queue} requests queued); retry later", None, "server_busy",
                {"Retry-After": str(self.settings.retry_after)},
            ) from None  # fmt: skip
        return body, job, events

    async def respond(self, request, kind: type[GenerationRequest]):
        body, job, events = await self.accept(request, kind)
        shape = ChatShape(self.served, body) if kind is ChatRequest else CompletionShape(self.served, body, job.ids)
        if body.stream:
            return StreamingResponse(stream(shape, job, events), media_type="text/event-stream")
        result = await collect(request, job, events)
        if result is None:  # the client left: nobody reads this
            return JSONResponse({}, status_code=499)
        deltas, done = result
        if done.status is not None:
            raise RequestError(done.status, done.message, None, "timeout" if done.status == 504 else None)
        return shape.whole(deltas, done)


def build_app(served: Served, engine: Engine, settings: Settings | None = None):
    """The FastAPI app serving `served` through `engine`."""
    api = Api(served, engine, settings or Settings())
    app = FastAPI(title="rlora", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(CatchAll)

    @app.exception_handler(RequestError)
    async def refused(_request: Request, error: RequestError):
        kind = "invalid_request_error" if error.status < 500 else "server_error"
        body = error_body(error.message, kind, error.param, error.code)
        return JSONResponse(body, status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException):
        return JSONResponse(error_body(str(error.detail)), status_code=error.status_code)

    @app.get("/health")
    async def health():
        if not engine.thread.is_alive():
            return JSONResponse({"status": "stopped"}, status_code=503)
        return {"status": "ok"} | engine.load()

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        api.authorize(request)
        return {"object": "list", "data": [api.model_card(i) for i in served.ids]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(request: Request, model_id: str) -> dict:
        api.authorize(request)
        return api.model_card(model_id)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await api.respond(request, ChatRequest)

    @app.post("/v1/completions")
    async def complete(request: Request):
        return await api.respond(request, CompletionRequest)

    return app


async def read_body(request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to pass `limit` bytes: by its Content-Length, or while read."""
    length = request.headers.get("content-length", "")
    too_big = RequestError(413, f"The body is over this server's limit of {limit} bytes", None, "body_too_large")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def emitter(events: asyncio.Queue):
    """The job's `emit`: hands an event from the worker thread to the request's event loop."""
    loop = asyncio.get_running_loop()

    def emit(event: Delta | Done) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server is stopping
            loop.call_soon_threadsafe(events.put_nowait, event)

    return emit


def make_job(served: Served, body, ids: list[int], emit, timeout: float) -> Job:
    """The job of a checked request: refused if the prompt and `max_tokens` do not fit in the context; without
    `max_tokens`, up to DEFAULT_MAX_TOKENS that fit."""
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    room = served.context_limit - len(ids)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = f" and {max_tokens} tokens to generate" if max_tokens is not None else ""
        raise RequestError(
            400,
            f"This model's maximum context length is {served.context_limit} tokens; the request has a prompt of "
            f"{len(ids)} tokens{asked}. Shorten the prompt or lower max_tokens.",
            "messages" if isinstance(body, ChatRequest) else "prompt",
            "context_length_exceeded",
        )
    logprobs = body.logprobs
    if isinstance(body, ChatRequest):  # a bool there, with the number of alternatives in top_logprobs
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return Job(
        adapter=served.adapter(body.model),
        ids=ids,
        max_new_tokens=max_tokens or min(DEFAULT_MAX_TOKENS, room),
        emit=emit,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stops(),
        logprobs=logprobs,
        deadline=time.monotonic() + timeout,
    )


async def collect(request, job: Job, events: asyncio.Queue) -> tuple[list[Delta], Done] | None:
    """Every event of the job until its `Done`; None (and the job cancelled) if the client disconnects first (checked
    every DISCONNECT_POLL seconds, however often events arrive)."""
    deltas: list[Delta] = []
    loop = asyncio.get_running_loop()
    check = loop.time() + DISCONNECT_POLL
    while True:
        try:
            event = await asyncio.wait_for(events.get(), max(0.0, check - loop.time()))
        except TimeoutError:
            event = None
        if isinstance(event, Done):
            return deltas, event
        if event is not None:
            deltas.append(event)
        if loop.time() >= check:
            if await request.is_disconnected():
                job.cancel()
                return None
            check = loop.time() + DISCONNECT_POLL


async def stream(shape, job: Job, events: asyncio.Queue) -> AsyncIterator[str]:
    """Server-sent events: the pieces as they come, the finish (and usage), then [DONE]. When the client leaves,
    the response's task is cancelled here and the job with it."""
    try:
        for chunk in shape.opening():
            yield f"data: {json.dumps(chunk)}\n\n"
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                chunk = shape.piece(event)
                if chunk is not None:
                    yield f"data: {json.dumps(chunk)}\n\n"
                continue
            if event.status is not None:
                kind = "server_error" if event.status >= 500 else "invalid_request_error"
                yield f"data: {json.dumps(error_body(event.message, kind))}\n\n"
            else:
                for chunk in shape.closing(event):
                    yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
            return
    finally:
        job.cancel()  # a no-op once the job has ended


def usage(done: Done) -> dict:
    total = done.prompt_tokens + done.completion_tokens
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens, "total_tokens": total}


class Shape:
    """How one endpoint writes its responses; the subclasses fill in the OpenAI objects."""

    object_whole = object_chunk = prefix = ""

    def __init__(self, served: Served, body) -> None:
        self.tokenizer = served.tokenizer
        self.body = body
        self.head = {"id": f"{self.prefix}{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        self.include_usage = body.stream_options is not None and body.stream_options.include_usage

    def chunk(self, choice: dict) -> dict:
        return self.head | {"object": self.object_chunk, "choices": [choice]}

    def token(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def opening(self) -> list[dict]:
        return []

    def closing(self, done: Done) -> list[dict]:
        final = self.chunk(self.finish_choice(done.reason))
        if not self.include_usage:
            return [final | {"usage": usage(done)}]
        return [final, self.head | {"object": self.object_chunk, "choices": [], "usage": usage(done)}]


class ChatShape(Shape):
    object_whole, object_chunk, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def logprobs(self, entries: list[dict] | None) -> dict | None:
        if entries is None:
            return None

        def item(token: int, logprob: float) -> dict:
            text = self.token(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = [item(e["token"], e["logprob"]) | {"top_logprobs": [item(*t) for t in e["top"]]} for e in entries]
        return {"content": content, "refusal": None}

    def opening(self) -> list[dict]:
        delta = {"role": "assistant", "content": ""}
        return [self.chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": None})]

    def piece(self, delta: Delta) -> dict | None:
        if not delta.text and delta.logprobs is None:
            return None
        choice = {"index": 0, "delta": {"content": delta.text}, "finish_reason": None}
        return self.chunk(choice | {"logprobs": self.logprobs(delta.logprobs)})

    def finish_choice(self, reason: str) -> dict:
        return {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}

    def whole(self, deltas: list[Delta], done: Done) -> dict:
        text = "".join(d.text for d in deltas)
        entries = None if self.body.logprobs is False else [e for d in deltas for e in d.logprobs or ()]
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": self.logprobs(entries), "finish_reason": done.reason}
        return self.head | {"object": self.object_whole, "choices": [choice], "usage": usage(done)}


class CompletionShape(Shape):
    object_whole = object_chunk = "text_completion"
    prefix = "cmpl-"

    def __init__(self, served: Served, body, ids: list[int]) -> None:
        super().__init__(served, body)
        prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
        self.echo = "" if not body.echo else prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)
        self.offset = 0  # characters of completion text before the next token, for `text_offset`

    def logprobs(self, entries: list[dict] | None) -> dict | None:
        if entries is None:
            return None
        tokens = [self.token(e["token"]) for e in entries]
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        top = [{self.token(t): lp for t, lp in e["top"]} for e in entries] if self.body.logprobs else None
        return {
            "tokens": tokens,
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def opening(self) -> list[dict]:
        if not self.echo:
            return []
        return [self.chunk({"index": 0, "text": self.echo, "logprobs": None, "finish_reason": None})]

    def piece(self, delta: Delta) -> dict | None:
        if not delta.text and delta.logprobs is None:
            return None
        return self.chunk(
            {"index": 0, "text": delta.text, "logprobs": self.logprobs(delta.logprobs), "finish_reason": None}
        )

    def finish_choice(self, reason: str) -> dict:
        return {"index": 0, "text": "", "logprobs": None, "finish_reason": reason}

    def whole(self, deltas: list[Delta], done: Done) -> dict:
        text = self.echo + "".join(d.text for d in deltas)
        entries = None if self.body.logprobs is None else [e for d in deltas for e in d.logprobs or ()]
        choice = {"index": 0, "text": text, "logprobs": self.logprobs(entries), "finish_reason": done.reason}
        return self.head | {"object": self.object_whole, "choices": [choice], "usage": usage(done)}
