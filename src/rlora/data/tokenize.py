"""Tokenizing examples for causal LMs (loss on the answer only) and collating with dynamic padding.

Every example is a (context, continuation) pair (`render_pairs` / `gold_pair` in `example.py`). Plain mode:
the context with the tokenizer's special tokens, then " " + continuation + EOS. Chat mode: the tokenizer's chat
template with the context as the user turn and the continuation as the assistant turn; the answer span is what
the full conversation adds after the context rendered with `add_generation_prompt=True`, up to and including
the end-of-turn token. Too-long examples lose the start of the prompt; only an answer that alone fills
`max_length` is cut too (its end, after half a window of prompt), with a warning naming the example.

The encoder returns the three spans it knows (`Spans`): the prompt, the answer's own tokens (what evaluation
scores) and the end tokens (EOS / end of turn: trained, not scored), so nothing downstream has to guess them.

A conversation (`Example.turns`) is encoded the same way with its earlier turns in the prompt; the earlier
assistant turns are trained too (`Spans.prompt_labels`). Plain mode tokenizes each piece of `turn_pieces` on its
own; with a chat template, each assistant turn is what the conversation up to and including it adds after the
conversation before it rendered with `add_generation_prompt=True`, up to and including its end-of-turn token.
`example_spans` is the one entry point for an example, `encode_example` for its training feature.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DataError
from .example import Example, gold_pair, render_pairs, render_prompt, turn_pieces

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch loads when a batch is made, so listing and showing tasks does not wait for it
    import torch

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and HF models) skip


@dataclass(frozen=True)
class Spans:
    prompt: list[int]  # what the model reads before the answer (cut from the start to fit max_length)
    answer: list[int]  # the continuation's own tokens: what evaluation scores
    end: list[int]  # EOS / end-of-turn after the answer: trained, not scored
    # per prompt token, its training label: None = none trained; a conversation's earlier assistant turns are
    prompt_labels: list[int] | None = None

    @property
    def input_ids(self) -> list[int]:
        return self.prompt + self.answer + self.end


def encode_context(tokenizer, context: str, use_chat_template: bool) -> list[int]:
    """The token ids the model sees before its answer (also the input for generation)."""
    if not use_chat_template:
        return tokenizer(context, add_special_tokens=True)["input_ids"]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": context}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, example: Example, use_chat_template: bool) -> list[int]:
    """The MC / free-form prompt's ids (a conversation's turns): the input for generating an answer."""
    if example.turns is not None:
        return encode_conversation(tokenizer, example, use_chat_template, max_length=None).prompt
    return encode_context(tokenizer, render_prompt(example), use_chat_template)


def _answer_and_end(
    tokenizer, context: str, continuation: str, prompt: list[int], use_chat_template: bool, uid: str
) -> tuple[list[int], list[int]]:
    if not use_chat_template:
        return tokenizer(" " + continuation, add_special_tokens=False)["input_ids"], [tokenizer.eos_token_id]
    messages = [{"role": "user", "content": context}, {"role": "assistant", "content": continuation}]
    full = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    if full[: len(prompt)] != prompt:
        raise DataError(
            f"{uid}: the chat template renders the prompt differently with and without the answer, "
            "so the answer tokens cannot be found; use plain mode (no chat template)"
        )
    span = full[len(prompt) :]
    if tokenizer.eos_token_id not in span:
        return span, []
    cut = span.index(tokenizer.eos_token_id)  # what the template adds after the end of turn (a newline) is dropped
    return span[:cut], [tokenizer.eos_token_id]


def encode_spans(
    tokenizer, context: str, continuation: str, use_chat_template: bool, max_length: int, uid: str = ""
) -> Spans:
    """The prompt, answer and end token spans of one (context, continuation) pair, at most `max_length` in all."""
    prompt = encode_context(tokenizer, context, use_chat_template)
    answer, end = _answer_and_end(tokenizer, context, continuation, prompt, use_chat_template, uid)
    return _fit(tokenizer, Spans(prompt, answer, end), max_length, uid)


def encode_conversation(tokenizer, example: Example, use_chat_template: bool, max_length: int | None) -> Spans:
    """A conversation's spans: every turn before the final reply in the prompt (earlier assistant turns labelled
    in `prompt_labels`), the final reply as the answer. `max_length=None`: not cut."""
    if use_chat_template:
        spans = _chat_conversation(tokenizer, example)
    else:
        prompt: list[int] = []
        labels: list[int] = []
        for text, trained in turn_pieces(example.turns):
            ids = tokenizer(text, add_special_tokens=not prompt)["input_ids"]
            prompt += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        answer = tokenizer(" " + example.answer, add_special_tokens=False)["input_ids"]
        spans = Spans(prompt, answer, [tokenizer.eos_token_id], labels)
    return spans if max_length is None else _fit(tokenizer, spans, max_length, example.uid)


def _chat_conversation(tokenizer, example: Example) -> Spans:
    messages = [{"role": role, "content": content} for role, content in example.turns]
    messages.append({"role": "assistant", "content": example.answer})

    def ids(upto: int, generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    full = ids(len(messages), False)
    labels = [IGNORE_INDEX] * len(full)
    spans: list[tuple[int, int]] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, upto = ids(k, True), ids(k + 1, False)
        if full[: len(before)] != before or full[: len(upto)] != upto:
            raise DataError(
                f"{example.uid}: the chat template renders turn {k + 1} differently within the whole conversation, "
                "so the assistant's tokens cannot be found; use plain mode (no chat template)"
            )
        stop = len(upto)
        # the turn ends at its end-of-turn token: what the template adds after it (a newline) is not trained
        if tokenizer.eos_token_id in full[len(before) : stop]:
            stop = full.index(tokenizer.eos_token_id, len(before)) + 1
        spans.append((len(before), stop))
        labels[len(before) : stop] = full[len(before) : stop]
    start, stop = spans[-1]
    has_end = stop > start and full[stop - 1] == tokenizer.eos_token_id
    answer_stop = stop - 1 if has_end else stop
    return Spans(full[:start], full[start:answer_stop], full[answer_stop:stop], labels[:start])


def _fit(tokenizer, spans: Spans, max_length: int, uid: str) -> Spans:
    """`spans` cut to at most `max_length` tokens: the start of the prompt first (keeping a leading BOS); only an
    answer that alone fills the window is cut too (its end, after up to half a window of prompt), with a warning."""
    prompt, answer, end, labels = spans.prompt, spans.answer, spans.end, spans.prompt_labels
    room = max_length - len(answer) - len(end)
    if room < 1:  # the answer alone fills the window: keep its start after (up to) half a window of prompt
        if max_length < 2:
            raise DataError(f"{uid}: the answer alone is {len(answer) + len(end)} tokens, max_length is {max_length}")
        room = min(len(prompt), max_length // 2)
        logger.warning(
            "%s: the answer alone is %d tokens, max_length is %d: its last %d tokens are cut",
            uid, len(answer) + len(end), max_length, len(answer) + len(end) - (max_length - room),
        )  # fmt: skip
        answer, end = answer[: max_length - room], []
    if len(prompt) > room:  # cut the start of the prompt, but keep a leading BOS token
        keep = 1 if tokenizer.bos_token_id is not None and prompt[0] == tokenizer.bos_token_id and room > 1 else 0
        cut = len(prompt) - (room - keep)
        prompt = prompt[:keep] + prompt[cut:]
        labels = None if labels is None else [IGNORE_INDEX] * keep + labels[cut:]
    return Spans(prompt, answer, end, labels)


def example_spans(tokenizer, example: Example, use_chat_template: bool, max_length: int) -> list[Spans]:
    """The spans of each of the example's (context, continuation) pairs: one per choice, or one."""
    if example.turns is not None:
        return [encode_conversation(tokenizer, example, use_chat_template, max_length)]
    return [
        encode_spans(tokenizer, context, continuation, use_chat_template, max_length, example.uid)
        for context, continuation in render_pairs(example)
    ]


def training_feature(spans: Spans) -> dict:
    """`input_ids`, `attention_mask` and `labels` (IGNORE_INDEX on the prompt)."""
    input_ids = spans.input_ids
    prompt_labels = spans.prompt_labels if spans.prompt_labels is not None else [IGNORE_INDEX] * len(spans.prompt)
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": prompt_labels + spans.answer + spans.end,
    }


def gold_spans(tokenizer, example: Example, use_chat_template: bool, max_length: int) -> Spans:
    """The spans the model is trained on: the gold choice's (or the free-form answer's, or the conversation's)."""
    if example.turns is not None:
        return encode_conversation(tokenizer, example, use_chat_template, max_length)
    context, continuation = gold_pair(example)
    return encode_spans(tokenizer, context, continuation, use_chat_template, max_length, example.uid)


def encode_example(tokenizer, example: Example, use_chat_template: bool, max_length: int) -> dict:
    """The training feature of an example (`gold_spans`)."""
    return training_feature(gold_spans(tokenizer, example, use_chat_template, max_length))


def token_lengths(tokenizer, examples: Sequence[Example], use_chat_template: bool, max_length: int) -> np.ndarray:
    """`len(encode_example(tokenizer, e, use_chat_template, max_length)["input_ids"])` of each example.

    In plain mode a pair's length is min(context + answer + 1 (EOS), max_length) tokens (`_fit` cuts exactly the
    excess while the context keeps a token), so the contexts and answers are tokenized in two batched calls of the
    fast tokenizer's backend, without building the sequences; everything else is encoded one by one."""
    lengths = np.zeros(len(examples), dtype=np.int64)
    plain = [] if use_chat_template else [i for i, e in enumerate(examples) if e.turns is None]
    if plain:
        pairs = [gold_pair(examples[i]) for i in plain]
        contexts = _batch_lengths(tokenizer, [context for context, _ in pairs], special=True)
        answers = _batch_lengths(tokenizer, [" " + answer for _, answer in pairs], special=False)
        lengths[plain] = np.minimum(contexts + answers + 1, max_length)
        plain = [i for i, n in zip(plain, contexts, strict=True) if n > 0]  # an empty context: encoded below
    done = set(plain)
    for i, example in enumerate(examples):
        if i not in done:
            lengths[i] = len(encode_example(tokenizer, example, use_chat_template, max_length)["input_ids"])
    return lengths


def _batch_lengths(tokenizer, texts: list[str], special: bool) -> np.ndarray:
    """The token count of each text as `tokenizer(text, add_special_tokens=special)` gives it."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        encodings = backend.encode_batch_fast(texts, add_special_tokens=special)
        return np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(texts))
    return np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]], dtype=np.int64)


def encode_examples(tokenizer, examples: Sequence[Example], use_chat_template: bool, max_length: int) -> list[dict]:
    return [encode_example(tokenizer, e, use_chat_template, max_length) for e in examples]


def pad_ids(seqs: Sequence[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token id lists padded to the longest, on the right or (to generate) the left."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


@dataclass
class CausalLMCollator:
    """Pads a batch on the right to its longest sequence (rounded up to `pad_to_multiple_of`); features with a
    `task_id` (the index of their task) give the batch a `task_ids` tensor (B,), for task routing."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {
            key: torch.tensor([list(f[key]) + [pad] * (longest - len(f[key])) for f in features], dtype=torch.long)
            for key, pad in pads.items()
        }
        if all("task_id" in f for f in features):
            batch["task_ids"] = torch.tensor([f["task_id"] for f in features], dtype=torch.long)
        return batch
