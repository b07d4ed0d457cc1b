import pytest
from _reference import split_examples

from rlora.data import Example

PINNED_TEST = ["qa/7", "qa/19"]  # test side of _fixture() at test_fraction=0.2, salt rlora-split-v1


def _fixture() -> list[Example]:
    return [Example("qa", f"question {i}", f"answer {i}", uid=f"qa/{i}") for i in range(20)]


def test_split_membership_is_pinned():
    """Changing the hashing (or its salt) changes every user's split: this must fail when it happens."""
    train, test = split_examples(_fixture(), 0.2)
    assert [e.uid for e in test] == PINNED_TEST


def test_split_is_disjoint_complete_and_in_input_order():
    examples = _fixture()
    train, test = split_examples(examples, 0.5)
    assert not {e.uid for e in train} & {e.uid for e in test}
    assert sorted(train + test, key=examples.index) == examples
    assert train == [e for e in examples if e in train]


def test_duplicates_land_on_the_same_side_whatever_their_uid_or_position():
    base = _fixture()
    copies = [Example(e.task, e.prompt, e.answer, uid=e.uid + "-copy") for e in reversed(base)]
    train, test = split_examples(base + copies, 0.3)
    test_prompts = {e.prompt for e in test}
    assert not test_prompts & {e.prompt for e in train}
    assert len(test) == 2 * len(test_prompts)


def test_a_larger_test_fraction_only_adds_to_the_test_side():
    small = {e.uid for e in split_examples(_fixture(), 0.2)[1]}
    large = {e.uid for e in split_examples(_fixture(), 0.6)[1]}
    assert small <= large
    assert split_examples(_fixture(), 0.0)[1] == [] and split_examples(_fixture(), 1.0)[0] == []


def test_test_fraction_outside_unit_interval_is_rejected():
    with pytest.raises(ValueError, match="test_fraction must be in"):
        split_examples(_fixture(), 1.5)
