import dataclasses

import pytest

from rlora.data import COMMONSENSE_8, choice_labels, expand_task_names, list_tasks, load_task, render_pairs

pytestmark = pytest.mark.slow  # every test here reads the built-in data

SIZES = {
    "arc_challenge": 299,
    "arc_easy": 570,
    "boolq": 3270,
    "hellaswag": 10042,
    "openbookqa": 500,
    "piqa": 1838,
    "social_iqa": 1954,
    "winogrande": 1267,
    "commonsense_qa": 1221,
    "sciq": 1000,
    "copa": 100,
    "cb": 56,
    "rte": 277,
    "mrpc": 408,
    "sst2": 872,
}


def test_builtin_tasks_have_their_sizes_and_consistent_answers():
    assert set(COMMONSENSE_8) <= set(SIZES) <= set(list_tasks())
    for name, size in SIZES.items():
        examples = load_task(name)
        assert len(examples) == size, name
        assert len({e.uid for e in examples}) == size
        assert all(e.task == name and e.answer == choice_labels(e)[e.gold] for e in examples)


def test_the_right_answer_is_not_always_in_the_same_place():
    for name in ("sciq", "piqa", "social_iqa", "winogrande"):
        assert len({e.gold for e in load_task(name)}) > 1, name


def test_mmlu_subjects_are_tasks():
    mmlu = [name for name in list_tasks() if name.startswith("mmlu_")]
    assert len(mmlu) == 57
    examples = load_task("mmlu_abstract_algebra")
    assert len(examples) == 116 and examples[0].choices == ("0", "1", "2", "3")


def test_unknown_task_suggests_close_names():
    with pytest.raises(ValueError, match="unknown task 'hellaswg'; did you mean hellaswag\\?"):
        load_task("hellaswg")


def test_suites_expand():
    assert expand_task_names(["commonsense8", "boolq", "sst2"]) == [*COMMONSENSE_8, "sst2"]


@pytest.mark.parametrize("name", sorted(SIZES))
def test_every_builtin_task_has_a_cloze_rendering_ending_in_the_choice_text(name):
    for e in load_task(name)[:50]:
        rc = render_pairs(dataclasses.replace(e, format="rc"))
        assert len(rc) == len(e.choices) and all(context and continuation for context, continuation in rc)
        if name == "winogrande":  # the option fills the blank in the context; the rest of the sentence follows
            before, _, after = e.prompt.removeprefix("Fill in the blank: ").partition("_")
            assert rc == [(f"{before}{c}".strip(), after.strip()) for c in e.choices]
        elif name == "copa":
            assert rc[0][0].endswith((" because", " therefore"))
            assert [c.lower() for _, c in rc] == [c.lower() for c in e.choices]
        else:
            assert [continuation for _, continuation in rc] == list(e.choices)
            assert len({context for context, _ in rc}) == 1


def test_cloze_contexts_follow_the_olmes_style():
    arc = load_task("arc_easy")[0]
    assert render_pairs(dataclasses.replace(arc, format="rc"))[0][0] == f"Question: {arc.prompt}\nAnswer:"
    piqa = load_task("piqa")[0]
    assert render_pairs(dataclasses.replace(piqa, format="rc"))[0][0] == f"{piqa.prompt}\nAnswer:"
    assert piqa.prompt.startswith("Goal: ")
    hella = render_pairs(dataclasses.replace(load_task("hellaswag")[0], format="rc"))
    assert not hella[0][0].endswith(("Answer:", "...")) and ": " in hella[0][0]
