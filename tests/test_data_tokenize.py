import dataclasses

import pytest
import torch

from rlora.data import (
    IGNORE_INDEX,
    CausalLMCollator,
    Example,
    Spans,
    encode_example,
    encode_prompt,
    encode_spans,
    pad_ids,
    render_pairs,
)

# tiny_tokenizer ids: <pad> 0, <eos> 1, What 3, is 4, two 5, plus 6, four 7, ? 8, Answer 9, : 10, A 11, B 12,
# . 15, format 18, / 19, user 20, assistant 21, red 22, blue 23, sky 24
FREE = Example("qa", "What is two plus two ?", "four", uid="qa/0")
PROMPT_IDS = [3, 4, 5, 6, 5, 8, 9, 10]  # What is two plus two ? Answer :


def test_plain_mode_masks_the_prompt_and_ends_with_eos(tiny_tokenizer):
    feature = encode_example(tiny_tokenizer, FREE, use_chat_template=False, max_length=64)
    assert feature["input_ids"] == PROMPT_IDS + [7, 1]
    assert feature["labels"] == [IGNORE_INDEX] * 8 + [7, 1]
    assert feature["attention_mask"] == [1] * 10
    assert len(feature["input_ids"]) == 10


def test_chat_mode_finds_the_assistant_span(tiny_tokenizer):
    feature = encode_example(tiny_tokenizer, FREE, use_chat_template=True, max_length=64)
    prompt = [20, 10, *PROMPT_IDS, 1, 21, 10]  # user : <prompt> <eos> assistant :
    assert feature["input_ids"] == prompt + [7, 1]
    assert feature["labels"] == [IGNORE_INDEX] * len(prompt) + [7, 1]
    assert encode_prompt(tiny_tokenizer, FREE, use_chat_template=True) == prompt


def test_multiple_choice_target_is_the_label_and_any_label_can_be_scored(tiny_tokenizer):
    ex = Example.multiple_choice("mc", "What is blue ?", ["sky", "red"], 0, "mc/0")
    feature = encode_example(tiny_tokenizer, ex, use_chat_template=False, max_length=64)
    # What is blue ? A . sky B . red Answer format : A / B . Answer :
    prompt = [3, 4, 23, 8, 11, 15, 24, 12, 15, 22, 9, 18, 10, 11, 19, 12, 15, 9, 10]
    assert feature["input_ids"] == prompt + [11, 1]
    context, label = render_pairs(ex)[1]
    assert encode_spans(tiny_tokenizer, context, label, False, 64) == Spans(prompt, [12], [1])


def test_cloze_target_is_the_gold_choice_text_after_answer(tiny_tokenizer):
    ex = Example.multiple_choice("rc", "What is blue ?", ["red", "sky"], 1, "rc/0", format="rc")
    feature = encode_example(tiny_tokenizer, ex, use_chat_template=False, max_length=64)
    prompt = [3, 4, 23, 8, 9, 10]  # What is blue ? Answer :   (the options are not listed)
    assert feature["input_ids"] == prompt + [24, 1]
    assert feature["labels"] == [IGNORE_INDEX] * len(prompt) + [24, 1]
    assert encode_spans(tiny_tokenizer, *render_pairs(ex)[0], False, 64) == Spans(prompt, [22], [1])


def test_chat_mode_spans_split_the_answer_from_the_end_of_turn(tiny_tokenizer):
    ex = Example.multiple_choice("rc", "What is blue ?", ["red", "the sky"], 1, "rc/0", format="rc")
    spans = encode_spans(tiny_tokenizer, *render_pairs(ex)[1], True, 64)
    assert spans.prompt == [20, 10, 3, 4, 23, 8, 9, 10, 1, 21, 10]  # user : ... Answer : <eos> assistant :
    assert spans.answer == [25, 24] and spans.end == [1]  # "the sky", then the end of turn
    assert encode_example(tiny_tokenizer, ex, True, 64)["input_ids"] == spans.input_ids


def test_per_choice_contexts_are_used_as_given(tiny_tokenizer):
    cloze = (("the sky is red", "?"), ("the sky is blue", "?"))
    ex = Example.multiple_choice("wino", "the sky is _ ?", ["red", "blue"], 1, "w/0", cloze=cloze, format="rc")
    assert render_pairs(ex) == list(cloze)
    assert encode_example(tiny_tokenizer, ex, False, 64)["input_ids"] == [25, 24, 4, 23, 8, 1]
    assert render_pairs(dataclasses.replace(ex, format="mc"))[1][1] == "B"  # MC ignores the cloze pairs


def test_truncation_drops_the_start_of_the_prompt_never_the_answer(tiny_tokenizer):
    feature = encode_example(tiny_tokenizer, FREE, use_chat_template=False, max_length=5)
    assert feature["input_ids"] == [8, 9, 10, 7, 1]
    assert feature["labels"] == [IGNORE_INDEX] * 3 + [7, 1]


def test_an_answer_that_fills_max_length_keeps_half_a_window_of_prompt_and_loses_its_end(tiny_tokenizer, caplog):
    long = Example("qa", "What is two plus two ?", "four four four four four four", uid="qa/1")  # 6 + EOS
    feature = encode_example(tiny_tokenizer, long, use_chat_template=False, max_length=6)
    assert feature["input_ids"] == [8, 9, 10, 7, 7, 7]  # "? Answer :" (half of 6) then the answer's start
    assert feature["labels"] == [IGNORE_INDEX] * 3 + [7, 7, 7]  # no EOS: the answer does not end here
    assert "qa/1: the answer alone is 7 tokens, max_length is 6: its last 4 tokens are cut" in caplog.text
    with pytest.raises(ValueError, match="qa/0: the answer alone is 2 tokens, max_length is 1"):
        encode_example(tiny_tokenizer, FREE, use_chat_template=False, max_length=1)


def test_collator_pads_right_to_the_longest():
    features = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    batch = CausalLMCollator(pad_token_id=0)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    torch.testing.assert_close(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    torch.testing.assert_close(batch["labels"], torch.tensor([[-100, 6, 7], [8, -100, -100]]))


def test_collator_rounds_up_to_a_multiple():
    batch = CausalLMCollator(pad_token_id=9, pad_to_multiple_of=4)(
        [{"input_ids": [1, 2, 3, 4, 5], "attention_mask": [1] * 5, "labels": [1, 2, 3, 4, 5]}]
    )
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[1, 2, 3, 4, 5, 9, 9, 9]]))
    torch.testing.assert_close(batch["labels"], torch.tensor([[1, 2, 3, 4, 5, -100, -100, -100]]))


class _CharTokenizer:
    """One id per character, BOS = 1 added in front of every text with special tokens, EOS = 2."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


def test_truncation_cuts_the_start_of_the_prompt_but_keeps_bos_and_the_whole_answer():
    example = Example(task="t", prompt="x" * 50, answer="yes")
    enc = encode_example(_CharTokenizer(), example, use_chat_template=False, max_length=20)
    answer = [ord(c) for c in " yes"] + [2]
    assert len(enc["input_ids"]) == 20
    assert enc["input_ids"][0] == 1 and enc["input_ids"][-5:] == answer
    assert enc["labels"] == [-100] * 15 + answer
    assert enc["input_ids"][1:15] == [ord(c) for c in ("x" * 50 + "\nAnswer:")[-14:]]


def test_pad_ids_pads_right_for_scoring_and_left_for_generation():
    ids, mask = pad_ids([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_ids([[5, 6, 7], [8]], pad_id=0, left=True)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
