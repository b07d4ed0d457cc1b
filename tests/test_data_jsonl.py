import json
import re

import pytest
from _reference import read_jsonl_tasks

from rlora.data import DataError, Example, render_pairs


def _write(tmp_path, name: str, lines: list) -> str:
    path = tmp_path / name
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def test_reads_free_form_and_multiple_choice_with_defaults(tmp_path):
    path = _write(
        tmp_path,
        "capitals.jsonl",
        [
            {"prompt": "Capital of France?", "answer": "Paris"},
            "",
            {"prompt": "Capital of Peru?", "choices": ["Lima", "Quito"], "gold": 0, "id": "peru"},
            {"prompt": "Is Rome a capital?", "choices": ["yes", "no"], "gold": 0, "labels": ["yes", "no"]},
        ],
    )
    assert read_jsonl_tasks([path]) == {
        "capitals": [
            Example("capitals", "Capital of France?", "Paris", uid="capitals/1"),
            Example.multiple_choice("capitals", "Capital of Peru?", ["Lima", "Quito"], 0, "peru"),
            Example.multiple_choice("capitals", "Is Rome a capital?", ["yes", "no"], 0, "capitals/4", ["yes", "no"]),
        ]
    }


def test_a_line_may_choose_its_formulation(tmp_path):
    path = _write(
        tmp_path, "f.jsonl", [{"prompt": "Capital of Peru?", "choices": ["Lima", "Quito"], "gold": 0, "format": "rc"}]
    )
    (example,) = read_jsonl_tasks([path])["f"]
    assert example.format == "rc" and render_pairs(example)[0] == ("Capital of Peru?\nAnswer:", "Lima")


def test_a_task_field_splits_one_file_into_tasks(tmp_path):
    path = _write(
        tmp_path, "mixed.jsonl", [{"task": "x", "prompt": "p", "answer": "a"}, {"prompt": "q", "answer": "b"}]
    )
    assert sorted(read_jsonl_tasks([path])) == ["mixed", "x"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "p", "answer": ', "data.jsonl:2: invalid JSON"),
        ("[1, 2]", "data.jsonl:2: expected a JSON object, got list"),
        ({"prompt": "p"}, "data.jsonl:2: field 'answer': missing"),
        ({"prompt": "", "answer": "a"}, "data.jsonl:2: field 'prompt': expected a non-empty string, got \"\""),
        ({"prompt": "p", "answer": 3}, "data.jsonl:2: field 'answer': expected a non-empty string, got 3"),
        (
            {"prompt": "p", "choices": ["a", "b", "c"], "gold": 5},
            "data.jsonl:2: field 'gold': expected an integer index into 'choices' (0..2), got 5",
        ),
        ({"prompt": "p", "choices": ["a", "b"], "gold": "0"}, "data.jsonl:2: field 'gold': expected an integer"),
        ({"prompt": "p", "choices": ["a", "b"]}, "data.jsonl:2: field 'gold': expected an integer .* got null"),
        ({"prompt": "p", "choices": ["a"], "gold": 0}, "data.jsonl:2: field 'choices': expected a list of at least 2"),
        ({"prompt": "p", "choices": ["a", "b"], "gold": 0, "answer": "a"}, "data.jsonl:2: field 'answer': not allowed"),
        ({"prompt": "p", "answer": "a", "gold": 0}, "data.jsonl:2: field 'gold': only allowed with 'choices'"),
        (
            {"prompt": "p", "choices": ["a", "b"], "gold": 0, "labels": ["x"]},
            "data.jsonl:2: field 'labels': expected a list of at least 2",
        ),
        ({"prompt": "p", "answer": "a", "label": 1}, "data.jsonl:2: unknown field 'label'"),
        (
            {"prompt": "p", "choices": ["a", "b"], "gold": 0, "format": "cloze"},
            "data.jsonl:2: field 'format': expected one of 'rc', 'mc', got \"cloze\"",
        ),
        ({"prompt": "p", "answer": "a", "format": "rc"}, "data.jsonl:2: field 'format': only allowed with 'choices'"),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path, line, message):
    path = _write(tmp_path, "data.jsonl", [{"prompt": "ok", "answer": "ok"}, line])
    with pytest.raises(DataError, match=re.escape(message).replace(r"\.\*", ".*")):
        read_jsonl_tasks([path])


def test_empty_file_is_an_error(tmp_path):
    path = _write(tmp_path, "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match=r"empty\.jsonl: no examples \(an empty task\)"):
        read_jsonl_tasks([path])


def test_duplicate_and_builtin_task_names_are_errors(tmp_path):
    one = _write(tmp_path, "one.jsonl", [{"task": "shared", "prompt": "p", "answer": "a"}])
    two = _write(tmp_path, "two.jsonl", [{"task": "shared", "prompt": "q", "answer": "b"}])
    with pytest.raises(DataError, match=r"two\.jsonl: task 'shared' is defined twice"):
        read_jsonl_tasks([one, two])
    boolq = _write(tmp_path, "boolq.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(DataError, match=r"boolq\.jsonl: task 'boolq' has the name of a built-in task"):
        read_jsonl_tasks([boolq], reserved=["boolq"])


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: cannot read"):
        read_jsonl_tasks([tmp_path / "nope.jsonl"])
