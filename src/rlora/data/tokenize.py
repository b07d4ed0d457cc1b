"""Tokenizing examples for causal LMs (loss on the answer only) and collating with dynamic padding.

Plain mode: `render_prompt(example)` then " " + answer + EOS. Chat mode: the tokenizer's chat template
with the rendered prompt as the user turn and the answer as the assistant turn; the answer span is what
the full conversation adds after the prompt rendered with `add_generation_prompt=True`, up to and
including the end-of-turn token. Too-long examples lose the start of the prompt, never the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .example import Example, render_prompt

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and HF models) skip


def encode_prompt(tokenizer, example: Example, use_chat_template: bool) -> list[int]:
    """The token ids the model sees before its answer (also the input for generation)."""
    text = render_prompt(example)
    if not use_chat_template:
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def encode_answer(tokenizer, example: Example, answer: str, use_chat_template: bool) -> list[int]:
    """The answer's token ids as they follow `encode_prompt`, ending with EOS / the end-of-turn token."""
    if not use_chat_template:
        return tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt = encode_prompt(tokenizer, example, True)
    messages = [{"role": "user", "content": render_prompt(example)}, {"role": "assistant", "content": answer}]
    full = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    if full[: len(prompt)] != prompt:
        raise ValueError(
            f"{example.uid}: the chat template renders the prompt differently with and without the answer, "
            "so the answer tokens cannot be found; use plain mode (no chat template)"
        )
    span = full[len(prompt) :]
    if tokenizer.eos_token_id in span:  # drop what the template adds after the end of turn (a newline)
        span = span[: span.index(tokenizer.eos_token_id) + 1]
    return span


def encode_pair(tokenizer, example: Example, answer: str, use_chat_template: bool, max_length: int) -> dict:
    """`input_ids`, `attention_mask`, `labels` (IGNORE_INDEX on the prompt) and `length` for one answer.

    Evaluators score each choice label by calling this with that label as `answer`.
    """
    prompt = encode_prompt(tokenizer, example, use_chat_template)
    target = encode_answer(tokenizer, example, answer, use_chat_template)
    room = max_length - len(target)
    if room < 1:
        raise ValueError(f"{example.uid}: the answer alone is {len(target)} tokens, max_length is {max_length}")
    if len(prompt) > room:  # cut the start of the prompt, but keep a leading BOS token
        keep = 1 if tokenizer.bos_token_id is not None and prompt[0] == tokenizer.bos_token_id and room > 1 else 0
        prompt = prompt[:keep] + prompt[len(prompt) - (room - keep) :]
    input_ids = prompt + target
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt) + target,
        "length": len(input_ids),  # read by Trainer's group_by_length (length_column_name="length")
    }


def encode_example(tokenizer, example: Example, use_chat_template: bool, max_length: int) -> dict:
    """`encode_pair` with the example's gold answer: a training feature."""
    return encode_pair(tokenizer, example, example.answer, use_chat_template, max_length)


def encode_examples(tokenizer, examples: Sequence[Example], use_chat_template: bool, max_length: int) -> list[dict]:
    return [encode_example(tokenizer, e, use_chat_template, max_length) for e in examples]


def pad_ids(seqs: Sequence[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token id lists padded to the longest, on the right or (to generate) the left."""
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
    """Pads a batch on the right to its longest sequence (rounded up to `pad_to_multiple_of`)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            key: torch.tensor([list(f[key]) + [pad] * (longest - len(f[key])) for f in features], dtype=torch.long)
            for key, pad in pads.items()
        }
