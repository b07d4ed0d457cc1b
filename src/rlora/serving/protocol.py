"""OpenAI's request bodies, read strictly: every field is honoured, or refused with a 400 that names it.

A body is parsed by `parse_request`: JSON (no NaN or Infinity), then the fields this server does not implement
(`UNSUPPORTED`: tools, response_format, penalties, best_of, n > 1, ...) are refused by name unless they hold their
no-op default, then the request model validates the rest with strict types (`max_tokens: true` and `stream: "yes"` are
errors, not 1 and true) and unknown fields refused (`extra="forbid"`), then the size limits and the text itself are
checked (no lone surrogate, no empty prompt): all before any tokenizing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class RequestError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI's error fields."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


@dataclass(frozen=True)
class Limits:
    """What a request may hold, checked before any tokenizing (the command's --max-* flags)."""

    body_bytes: int = 1_000_000
    prompt_chars: int = 200_000  # the prompt, or all messages' contents together
    messages: int = 256


# Fields of OpenAI's API that this server does not implement, with the value that means "not used": present with any
# other value, the request is refused naming the field.
UNSUPPORTED: dict[str, object] = {
    "n": 1,
    "best_of": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "repetition_penalty": 1,
    "logit_bias": None,
    "suffix": None,
    "tools": None,
    "tool_choice": None,
    "parallel_tool_calls": None,
    "functions": None,
    "function_call": None,
    "response_format": None,
    "audio": None,
    "modalities": None,
    "prediction": None,
    "reasoning_effort": None,
    "web_search_options": None,
    "metadata": None,
    "store": None,
    "service_tier": None,
    "min_p": None,
}
NO_OP = (None, {}, [])  # "not used" for the fields whose default is None
NESTED = ("role", "content", "type", "text", "include_usage")  # field names inside a request's nested objects

Stop = Annotated[str, Field(min_length=1, max_length=100)]  # checked at every step: kept short, as few as OpenAI's 4


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """The settings both endpoints take. `top_k` is not OpenAI's (vLLM's extension): without it there is none."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)  # OpenAI's default; 0 is greedy
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI's end-user label: accepted, and used for nothing

    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False


def parse_request(raw: bytes, kind: type[GenerationRequest], limits: Limits) -> GenerationRequest:
    """The request in `raw`, checked (see the module docstring); a `RequestError` (400) naming the field otherwise."""
    body = _json(raw)
    for name, default in UNSUPPORTED.items():
        if name in body:
            value = body.pop(name)
            if not (value == default or (default is None and value in NO_OP)):
                raise RequestError(400, f"{name}: not supported by this server", name, "unsupported_parameter")
    try:
        request = kind.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        loc = first["loc"]
        where = ".".join(str(p) for p in loc[:1] + tuple(p for p in loc[1:] if isinstance(p, int) or p in NESTED))
        where = where or None
        message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise RequestError(400, f"{where}: {message}" if where else message, where, "invalid_value") from None
    _check(request, limits)
    return request


def _json(raw: bytes) -> dict:
    def refuse_constant(name: str):
        raise ValueError(f"{name} is not JSON")

    try:
        body = json.loads(raw, parse_constant=refuse_constant)
    except (ValueError, RecursionError):
        raise RequestError(400, "The body is not valid JSON", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(400, "The body must be a JSON object", None, "invalid_json")
    return body


def _check(request: GenerationRequest, limits: Limits) -> None:
    """Options that go together, the size limits and the text, before anything is tokenized."""
    if request.stream_options is not None and not request.stream:
        raise RequestError(400, "stream_options: only with stream: true", "stream_options", "invalid_value")
    if isinstance(request, ChatRequest):
        if request.top_logprobs is not None and not request.logprobs:
            raise RequestError(400, "top_logprobs: only with logprobs: true", "top_logprobs", "invalid_value")
        if len(request.messages) > limits.messages:
            raise RequestError(
                400, f"messages: {len(request.messages)} messages, over this server's limit of {limits.messages}",
                "messages", "too_many_messages",
            )  # fmt: skip
        texts = {f"messages.{i}.content": m.text() for i, m in enumerate(request.messages)}
        where = "messages"
    else:
        if request.echo and request.logprobs is not None:
            raise RequestError(
                400, "echo: not supported together with logprobs (the prompt's log-probabilities are not computed)",
                "echo", "unsupported_parameter",
            )  # fmt: skip
        prompt = request.prompt
        if isinstance(prompt, list) and len(prompt) != 1 and not all(isinstance(p, int) for p in prompt):
            raise RequestError(400, f"prompt: expected one prompt, got {len(prompt)}", "prompt", "invalid_value")
        prompt = prompt[0] if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else prompt
        texts = {"prompt": prompt} if isinstance(prompt, str) else {}
        if not prompt:
            raise RequestError(400, "prompt: empty; give the text to continue", "prompt", "invalid_value")
        where = "prompt"
    chars = sum(len(t) for t in texts.values())
    if chars > limits.prompt_chars:
        raise RequestError(
            400, f"{where}: {chars} characters, over this server's limit of {limits.prompt_chars}", where,
            "prompt_too_long",
        )  # fmt: skip
    for name, text in texts.items() | {f"stop.{i}": s for i, s in enumerate(request.stops())}.items():
        _check_text(name, text)
    if where == "messages" and not any(t.strip() for t in texts.values()):
        raise RequestError(400, "messages: every message is empty", "messages", "invalid_value")
    if isinstance(request.temperature, float) and not math.isfinite(request.temperature):
        raise RequestError(400, "temperature: not a finite number", "temperature", "invalid_value")


def _check_text(name: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(
            400, f"{name}: invalid text at character {error.start} (a lone UTF-16 surrogate)", name, "invalid_text"
        ) from None
