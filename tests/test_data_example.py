import dataclasses

import pytest

from rlora.data import Example, choice_labels, render_prompt


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
