"""The generation worker: one thread that decodes every admitted request together, step by step.

Each request is a `Job`: its prompt ids, the adapter its row uses (`adapter_names`, "__base__" for the base model)
and its sampling settings. The worker keeps one batch of rows with one key/value cache (transformers' `DynamicCache`,
rows left-padded to a common length, the attention mask marking the padding). Between two decoding steps:

- rows that finished (end-of-sequence, a stop string, max_tokens), were cancelled (the client left) or ran past their
  deadline leave: the cache keeps the other rows (`batch_select_indices`) and loses the columns that are padding in
  every row left;
- queued jobs join, up to `max_batch` rows: they are prefilled together (one forward over their left-padded prompts)
  and their caches are padded and concatenated onto the batch's. A queued job whose client left is dropped unstarted.

One decoding step is one forward of the whole batch with its adapter names; each row then picks its token with its
own settings and its own `torch.Generator` (seeded from the request's `seed`, so a seed gives the same draws whatever
else is in the batch; the logits the draws read can differ by rounding with the batch's padding and its other rows).
Results go back through each job's `emit` callback (thread-safe, given by the front end).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..tuner.layer import reuse_fused_weights

logger = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch
GREEDY_BELOW = 1e-5  # a temperature under this is greedy (as vLLM does): dividing by it would overflow the logits


class QueueFull(Exception):
    """The queue holds `max_queue` jobs already."""


@dataclass
class Delta:
    """New text of a job, and the tokens generated since the last delta with their log-probabilities (when asked)."""

    text: str
    tokens: list[int]
    logprobs: list[dict] | None = None  # one {"token", "logprob", "top": [(token, logprob), ...]} per token


@dataclass
class Done:
    """A job's end: its finish reason ("stop" or "length"), or an error (`status`, `message`) instead."""

    reason: str | None
    prompt_tokens: int
    completion_tokens: int
    status: int | None = None
    message: str | None = None


@dataclass(eq=False)
class Job:
    """One request: what to generate, and where its results go (`emit` is called from the worker thread)."""

    adapter: str
    ids: list[int]
    max_new_tokens: int
    emit: Callable[[Delta | Done], None]
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: no log-probabilities; n: each token's and the n most likely alternatives'
    deadline: float = float("inf")  # time.monotonic() after which the job ends with a timeout
    cancelled: bool = field(default=False, init=False)

    def cancel(self) -> None:
        """The client left: the worker drops the job before it starts, or its row before the next step."""
        self.cancelled = True


class Row:
    """A job being decoded: its generated ids, the text already sent and its random generator."""

    def __init__(self, job: Job, device: torch.device) -> None:
        self.job = job
        self.new: list[int] = []
        self.sent = 0  # characters of the text already emitted
        self.pending: list[int] = []  # tokens generated since the last delta
        self.pending_logprobs: list[dict] = []
        self.done = False
        self.generator = None
        if job.temperature >= GREEDY_BELOW:
            self.generator = torch.Generator(device=device)
            if job.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(job.seed)


class Engine:
    """The queue and the worker thread that serves it (`start`); `submit` is called from the front end."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = next(model.parameters()).device
        eos = model.generation_config.eos_token_id
        self.eos = {i for i in (eos if isinstance(eos, list) else [eos]) if i is not None} | {tokenizer.eos_token_id}
        self.pad = tokenizer.pad_token_id
        base_forward = inspect.signature(model.get_base_model().forward).parameters
        self.cache_arg = "cache" if "cache" in base_forward else "past_key_values"  # renamed in transformers 5.x
        self.queue: deque[Job] = deque()
        self.wake = threading.Condition()
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # (rows, columns) 1 where the cache holds a real token
        self.last: torch.Tensor | None = None  # (rows, 1) the token each row feeds next
        self.stopping = False
        self.steps = 0  # decoding steps run, and jobs dropped unstarted (their client left): for /health
        self.dropped = 0
        self.thread = threading.Thread(target=self._loop, name="rlora-generation", daemon=True)

    # ---- front end side --------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self.wake:
            if len(self.queue) >= self.max_queue:
                raise QueueFull
            self.queue.append(job)
            self.wake.notify()

    def load(self) -> dict[str, int]:
        return {"queued": len(self.queue), "running": len(self.rows), "steps": self.steps, "dropped": self.dropped}

    # ---- worker side -----------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        with reuse_fused_weights(self.model):  # the served weights do not change while the worker runs
            self._serve()

    def _serve(self) -> None:
        while True:
            with self.wake:
                while not self.queue and not self.rows and not self.stopping:
                    self.wake.wait()
                if self.stopping:
                    return
                joining = self._take()
            try:
                with torch.inference_mode():
                    if joining:
                        self._join(joining)
                    if self.rows:
                        self._step()
            except Exception as error:  # a failed forward fails the batch's jobs, and the worker goes on
                logger.error("generation failed", exc_info=error)
                jobs = {id(row.job): row.job for row in self.rows} | {id(job): job for job in joining}
                for job in jobs.values():
                    job.emit(Done(None, len(job.ids), 0, 500, "generation failed"))
                self._reset()

    def _take(self) -> list[Job]:
        """The queued jobs that join now (under `wake`): at most enough to fill the batch; those whose client left
        or whose deadline passed are dropped here, before any work."""
        joining: list[Job] = []
        now = time.monotonic()
        while self.queue and len(self.rows) + len(joining) < self.max_batch:
            job = self.queue.popleft()
            if job.cancelled:
                self.dropped += 1
                continue
            if now > job.deadline:
                job.emit(Done(None, len(job.ids), 0, 504, "the request timed out in the queue"))
                continue
            joining.append(job)
        return joining

    def _join(self, jobs: list[Job]) -> None:
        """Prefills the joining jobs together and adds their rows (and cache) to the batch; each gets its first
        token from the prefill's last logits."""
        from transformers import DynamicCache

        width = max(len(job.ids) for job in jobs)
        ids = torch.full((len(jobs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, job in enumerate(jobs):  # left padding: every row's last token is in the last column
            ids[i, width - len(job.ids) :] = torch.tensor(job.ids)
            mask[i, width - len(job.ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache()
        logits = self._forward(ids, mask, cache, [job.adapter for job in jobs])
        rows = [Row(job, self.device) for job in jobs]
        self._merge(rows, cache, mask)
        self._advance(rows, logits)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache, adapters: list[str]) -> torch.Tensor:
        """Last-position logits (rows, vocab) in float32 of `ids` (rows, new columns) read after `cache`."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]  # left padding: a row's positions from 0
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            **{self.cache_arg: cache},
            use_cache=True,
            logits_to_keep=1,
            adapter_names=adapters,
        )
        return out.logits[:, -1].float()

    def _merge(self, rows: list[Row], cache, mask: torch.Tensor) -> None:
        """Adds prefilled rows to the batch: both caches left-padded to one length, then concatenated."""
        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            for name in ("keys", "values"):
                a, b = getattr(old, name), getattr(new, name)  # (rows, heads, columns, head_dim)
                a = F.pad(a, (0, 0, width - a.shape[2], 0))
                b = F.pad(b, (0, 0, width - b.shape[2], 0))
                setattr(old, name, torch.cat([a, b]))
        self.mask = torch.cat(
            [F.pad(self.mask, (width - self.mask.shape[1], 0)), F.pad(mask, (width - mask.shape[1], 0))]
        )
        self.rows = self.rows + rows

    def _step(self) -> None:
        """One decoding step of every row, then the rows that ended leave."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        logits = self._forward(self.last, self.mask, self.cache, [row.job.adapter for row in self.rows])
        self.steps += 1
        self._advance(self.rows, logits)

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Each of `rows` (the batch, or the rows that just joined its end) gets its next token from its logits; ended
        rows leave the batch."""
        tokens = [self._pick(row, logits[i]) for i, row in enumerate(rows)]
        last = torch.tensor(tokens, device=self.device).unsqueeze(-1)  # (rows, 1)
        self.last = last if rows is self.rows else torch.cat([self.last, last])
        for row in rows:
            self._emit(row)
        keep = [i for i, row in enumerate(self.rows) if not self._ended(row)]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.cache.batch_select_indices(index)
        self.mask, self.last = self.mask[index], self.last[index]
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns that are padding in every row
        if unused:
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]

    def _reset(self) -> None:
        self.rows, self.cache, self.mask, self.last = [], None, None, None

    def _pick(self, row: Row, logits: torch.Tensor) -> int:
        """The row's next token (`choose`), recorded with its log-probabilities when the job asks for them."""
        job = row.job
        token = choose(job, row.generator, logits)
        row.new.append(token)
        if token not in self.eos:
            row.pending.append(token)
            if job.logprobs is not None:
                row.pending_logprobs.append(_logprob_entry(logits, token, job.logprobs))
        return token

    def _ended(self, row: Row) -> bool:
        return row.job.cancelled or row.done

    def _emit(self, row: Row) -> None:
        """Sends the row's new text (held back while it could still be the start of a stop string, or ends in an
        incomplete character) and, when the row ends, its `Done`."""
        job = row.job
        if job.cancelled:
            return
        text = self.tokenizer.decode(row.new, skip_special_tokens=True)
        reason = None
        cut = _find_stop(text, job.stop, start=max(0, row.sent - max((len(s) for s in job.stop), default=0)))
        if cut is not None:
            text, reason = text[:cut], "stop"
        elif row.new[-1] in self.eos:
            reason = "stop"
        elif len(row.new) >= job.max_new_tokens:
            reason = "length"
        elif time.monotonic() > job.deadline:
            self._end(row, None, status=504, message="the request timed out while generating")
            return
        end = len(text) if reason else _safe_end(text, job.stop)
        if end > row.sent or row.pending:
            piece = text[row.sent : end] if end > row.sent else ""
            row.sent = max(row.sent, end)
            job.emit(Delta(piece, row.pending, row.pending_logprobs if job.logprobs is not None else None))
            row.pending, row.pending_logprobs = [], []
        if reason:
            self._end(row, reason)

    def _end(self, row: Row, reason: str | None, status: int | None = None, message: str | None = None) -> None:
        row.done = True
        generated = len(row.new) - (1 if row.new and row.new[-1] in self.eos else 0)
        row.job.emit(Done(reason, len(row.job.ids), generated, status, message))


def choose(job: Job, generator: torch.Generator | None, logits: torch.Tensor) -> int:
    """The next token from `logits` (vocab,): greedy at temperature 0 (below GREEDY_BELOW), else drawn with
    `generator` after the job's temperature, its top-k (only when it asks: none by default, unlike transformers'
    generation config) and top-p. Log-probabilities reported (`_logprob_entry`) are the model's own distribution,
    before these."""
    if job.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    scores = logits / job.temperature
    if job.top_k is not None and job.top_k < scores.shape[-1]:
        kth = scores.topk(job.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = scores.softmax(-1)
    if job.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= job.top_p  # the nucleus keeps the top token
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0))
    return int(torch.multinomial(probs, 1, generator=generator))


def _logprob_entry(logits: torch.Tensor, token: int, top: int) -> dict:
    logprobs = logits.log_softmax(-1)
    entry: dict[str, Any] = {"token": token, "logprob": float(logprobs[token]), "top": []}
    if top:
        values, ids = logprobs.topk(top)
        entry["top"] = list(zip(ids.tolist(), values.tolist(), strict=True))
    return entry


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Where the first stop string found in `text` (from `start`) begins, or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be sent: not a trailing incomplete character (U+FFFD while a multi-byte character is
    half decoded), nor a tail that could be the start of a stop string."""
    end = len(text.rstrip("\ufffd"))
    hold = 0
    for stop in stops:
        hold = max([hold] + [n for n in range(1, min(len(stop) - 1, end) + 1) if text[end - n : end] == stop[:n]])
    return end - hold
