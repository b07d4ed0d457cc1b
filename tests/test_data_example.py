import dataclasses

import pytest

from rlora.data import Example, choice_labels, gold_pair, render_pairs, render_prompt


def test_lettered_choices_are_listed_and_the_answer_is_the_gold_letter():
    ex = Example.multiple_choice("arc", "Which is a colour?", ["sky", "red", "two"], 1, "arc/0")
    assert ex.answer == "B"
    assert choice_labels(ex) == ("A", "B", "C")
    assert render_prompt(ex) == "Which is a colour?\nA. sky\nB. red\nC. two\nAnswer format: A/B/C. Answer:"


def test_word_labels_are_not_listed():
    ex = Example.multiple_choice("boolq", "Is the sky blue?", ["yes", "no"], 0, "boolq/0", labels=["yes", "no"])
    assert ex.answer == "yes"
    assert choice_labels(ex) == ("yes", "no")
    assert render_prompt(ex) == "Is the sky blue?\nAnswer format: yes/no. Answer:"


def test_free_form_prompt_and_no_labels():
    ex = Example("qa", "What is two plus two?", "four", uid="qa/0")
    assert render_prompt(ex) == "What is two plus two?\nAnswer:"
    assert choice_labels(ex) == ()
    assert not ex.is_multiple_choice


def test_example_is_frozen_and_replace_revalidates():
    ex = Example.multiple_choice("t", "p", ["x", "y"], 0, "t/0")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ex.answer = "B"
    assert dataclasses.replace(ex, answer="B", gold=1).labels == ("A", "B")
    with pytest.raises(ValueError, match="answer 'B' is not the gold label 'A'"):
        dataclasses.replace(ex, answer="B")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"choices": ("x", "y"), "gold": 2, "answer": "A"}, "gold 2 is not an index into 2 choices"),
        ({"choices": ("x",), "gold": 0, "answer": "A"}, "at least 2 choices"),
        ({"choices": ("x", "y"), "gold": None, "answer": "A"}, "go together"),
        ({"choices": ("x", "y"), "gold": 0, "answer": "a", "labels": ("a", "a")}, "must be distinct"),
    ],
)
def test_invalid_multiple_choice_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Example(task="t", prompt="p", uid="t/0", **kwargs)


def test_cloze_pairs_default_to_the_prompt_then_each_choice_text():
    ex = Example.multiple_choice("t", "Which is a colour?", ["sky", "red"], 1, "t/0", format="rc")
    assert render_pairs(ex) == [("Which is a colour?\nAnswer:", "sky"), ("Which is a colour?\nAnswer:", "red")]
    assert gold_pair(ex) == ("Which is a colour?\nAnswer:", "red")
    assert ex.answer == "B"  # the MC label: what the split's hash reads, whatever the format


def test_mc_pairs_are_the_listed_prompt_and_each_label_and_free_form_has_one_pair():
    ex = Example.multiple_choice("t", "Which is a colour?", ["sky", "red"], 1, "t/0")
    prompt = "Which is a colour?\nA. sky\nB. red\nAnswer format: A/B. Answer:"
    assert render_pairs(ex) == [(prompt, "A"), (prompt, "B")]
    assert gold_pair(Example("t", "What is two plus two?", "4")) == ("What is two plus two?\nAnswer:", "4")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "cloze"}, "t/0: format 'cloze' is not one of rc, mc"),
        ({"cloze": (("a", "b"),)}, r"t/0: cloze must hold one \(context, continuation\) pair per choice"),
        ({"cloze": (("a", "b", "c"), ("d", "e", "f"))}, r"t/0: cloze must hold one \(context, continuation\) pair"),
    ],
)
def test_invalid_formulations_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        Example.multiple_choice("t", "p", ["x", "y"], 0, "t/0", **kwargs)


def test_more_choices_than_letters_says_so():
    with pytest.raises(ValueError, match="^t/0: 27 choices but only 26 letters to label them; give labels"):
        Example.multiple_choice("t", "p", [str(i) for i in range(27)], 0, "t/0")
    many = Example.multiple_choice("t", "p", [str(i) for i in range(27)], 3, "t/0", labels=[f"L{i}" for i in range(27)])
    assert many.answer == "L3"
