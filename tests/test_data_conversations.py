"""Conversations (instruction data): rendering, the trained tokens of every assistant turn, truncation, and the
batched token lengths the training set groups by."""

import hashlib
import random

import pytest

from rlora.data import IGNORE_INDEX, DataError, Example, encode_example, example_spans, load_task, token_lengths
from rlora.data.example import render_pairs
from rlora.data.split import split_key

# tiny_tokenizer (conftest) ids: <pad> 0, <eos> 1, What 3, is 4, two 5, plus 6, four 7, ? 8, Answer 9, : 10,
# A 11, B 12, . 15, yes 16, no 17, user 20, assistant 21, red 22, blue 23, sky 24, the 25; unknown words: 2
CONVERSATION = Example(
    "chat",
    "What is red ?",
    "blue",
    uid="chat/1",
    turns=(("user", "What is two ?"), ("assistant", "four"), ("user", "What is red ?")),
)


def test_conversation_rules_name_what_is_wrong():
    with pytest.raises(DataError, match=r"^x: after an optional system turn, user and assistant turns must alternate"):
        Example("t", "q", "a", uid="x", turns=(("user", "p"), ("user", "q")))
    with pytest.raises(DataError, match=r"^x: turn role 'tool' is not one of system, user, assistant$"):
        Example("t", "q", "a", uid="x", turns=(("tool", "q"),))
    with pytest.raises(DataError, match=r"^x: prompt must be the last user turn$"):
        Example("t", "other", "a", uid="x", turns=(("user", "q"),))
    with pytest.raises(DataError, match=r"^x: a conversation has no choices$"):
        Example("t", "q", "A", ("a", "b"), 0, "x", turns=(("user", "q"),))


def test_plain_rendering_of_a_conversation():
    example = Example(
        "t", "q2", "a2", uid="x", turns=(("system", "s"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"))
    )
    assert render_pairs(example) == [("System: s\n\nUser: q1\n\nAssistant: a1\n\nUser: q2\n\nAssistant:", "a2")]


def test_turns_enter_the_split_key_and_leave_other_keys_alone():
    single = Example("t", "What is red ?", "blue", uid="x", turns=(("user", "What is red ?"),))
    assert split_key(CONVERSATION) != split_key(single)
    # the key of an example without turns is what it was before conversations existed
    digest = hashlib.sha256("\x1f".join(["rlora-split-v1", "t", "p", "a"]).encode()).digest()
    assert split_key(Example("t", "p", "a", uid="x")) == int.from_bytes(digest[:8], "big") / 2**64


def test_plain_mode_trains_every_assistant_turn(tiny_tokenizer):
    feature = encode_example(tiny_tokenizer, CONVERSATION, use_chat_template=False, max_length=64)
    # pieces tokenized on their own: "User: What is two ?\n\nAssistant:" | " four" | "\n\n" | "User: ... Assistant:"
    user1 = [2, 10, 3, 4, 5, 8, 2, 10]  # "User" and "Assistant" are unknown words (2)
    user2 = [2, 10, 3, 4, 22, 8, 2, 10]
    assert feature["input_ids"] == user1 + [7] + user2 + [23, 1]
    assert feature["labels"] == [IGNORE_INDEX] * 8 + [7] + [IGNORE_INDEX] * 8 + [23, 1]
    (spans,) = example_spans(tiny_tokenizer, CONVERSATION, False, 64)
    assert (spans.prompt, spans.answer, spans.end) == (user1 + [7] + user2, [23], [1])


def test_chat_mode_trains_every_assistant_turn_with_its_end_of_turn(tiny_tokenizer):
    feature = encode_example(tiny_tokenizer, CONVERSATION, use_chat_template=True, max_length=64)
    # template: "{role} : {content} <eos> " per message, then "assistant : " as the generation prompt
    user1 = [20, 10, 3, 4, 5, 8, 1]
    user2 = [20, 10, 3, 4, 22, 8, 1]
    assert feature["input_ids"] == user1 + [21, 10, 7, 1] + user2 + [21, 10, 23, 1]
    ignored = [IGNORE_INDEX] * 9
    assert feature["labels"] == ignored + [7, 1] + ignored + [23, 1]


def test_a_long_conversation_loses_its_start_with_its_labels(tiny_tokenizer):
    full = encode_example(tiny_tokenizer, CONVERSATION, use_chat_template=True, max_length=64)
    cut = encode_example(tiny_tokenizer, CONVERSATION, use_chat_template=True, max_length=12)
    assert cut["input_ids"] == full["input_ids"][-12:]
    assert cut["labels"] == full["labels"][-12:]


def _naive_length(tokenizer, example, chat, max_length):
    return len(encode_example(tokenizer, example, chat, max_length)["input_ids"])


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("max_length", [6, 12, 384])
def test_token_lengths_equal_the_encoded_lengths_on_the_tiny_tokenizer(tiny_tokenizer, chat, max_length):
    rc = Example.multiple_choice("rc", "What is blue ?", ["red", "the sky"], 1, "rc/0", format="rc")
    mc = Example.multiple_choice("mc", "What is blue ?", ["red", "sky"], 0, "mc/0", format="mc")
    free = Example("qa", "What is two plus two ? " * 3, "four " * 9, uid="qa/0")
    examples = [rc, mc, free, CONVERSATION]
    expected = [_naive_length(tiny_tokenizer, e, chat, max_length) for e in examples]
    assert token_lengths(tiny_tokenizer, examples, chat, max_length).tolist() == expected


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["rc", "mc"])
def test_token_lengths_equal_the_encoded_lengths_on_real_data(embedded_tokenizer, fmt):
    """The batched backend path against one-by-one encoding, on every example of real tasks (incl. cut ones)."""
    rng = random.Random(0)
    examples = []
    for name in ("arc_easy", "piqa", "winogrande", "boolq", "hellaswag"):
        examples += rng.sample(load_task(name), 150)
    examples = [
        e if e.format else Example.multiple_choice(e.task, e.prompt, e.choices, e.gold, e.uid, e.labels, e.cloze, fmt)
        for e in examples
    ]
    for max_length in (48, 384):
        expected = [_naive_length(embedded_tokenizer, e, False, max_length) for e in examples]
        assert token_lengths(embedded_tokenizer, examples, False, max_length).tolist() == expected
