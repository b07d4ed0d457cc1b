import json

import pytest

from rlora.cli import main


@pytest.mark.slow  # reads the built-in data
def test_tasks_lists_sizes(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "task" in out.splitlines()[0]
    assert any(line.split()[:2] == ["cb", "56"] for line in out.splitlines())


@pytest.mark.slow  # reads the built-in data
def test_show_prints_rendered_examples_in_either_format(capsys):
    assert main(["show", "rte", "-n", "1", "--split", "test", "--format", "mc"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("=== rte/") and "Answer format: yes/no. Answer: [[" in out
    assert main(["show", "arc_easy", "-n", "1"]) == 0  # rc by default: the gold choice's text is the target
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("Question: ") and out[2].startswith("Answer: [[") and out[2].endswith("]]")
    assert "A. " not in "\n".join(out)


def test_show_a_user_task(tmp_path, capsys):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"prompt": "Two plus two?", "answer": "four"}) + "\n")
    assert main(["show", "mine", "--data", str(path), "--test-fraction", "0"]) == 0
    assert capsys.readouterr().out == "=== mine/1 (train) ===\nTwo plus two?\nAnswer: [[four]]\n\n"


def test_unknown_task_exits_2_with_a_message(capsys):
    assert main(["show", "hellaswg"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("rlora: error: unknown task 'hellaswg'; did you mean hellaswag?")
    assert "Traceback" not in captured.err


@pytest.mark.slow  # reads the built-in data
def test_bad_jsonl_exits_2_naming_the_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "answer": "a"}\n{"prompt": "p", "choices": ["a", "b"], "gold": 2}\n')
    assert main(["tasks", "--data", str(path)]) == 2
    assert (
        "bad.jsonl:2: field 'gold': expected an integer index into 'choices' (0..1), got 2" in capsys.readouterr().err
    )
