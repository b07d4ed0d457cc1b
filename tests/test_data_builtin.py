import pytest

from rlora.data import COMMONSENSE_8, choice_labels, expand_task_names, list_tasks, load_task

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
