"""The command line itself: what it loads to start, and which errors it turns into one line."""

import subprocess
import sys

import pytest

import rlora.commands.tasks
from rlora.cli import main
from rlora.errors import ConfigError, DataError, RloraError, RunFolderError, TrainingError

HEAVY = ("torch", "peft", "transformers")


@pytest.mark.parametrize("argv", [["--help"], ["tasks"], ["show", "rte", "-n", "1"]])
def test_help_and_the_data_commands_start_without_torch_peft_or_transformers(argv):
    script = (
        "import sys\nfrom rlora.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print('loaded:', *[m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stderr.strip().splitlines()[-1] == "loaded:", result.stderr[-2000:]


@pytest.mark.parametrize(
    ("error", "code", "prefix"),
    [
        (ConfigError("bad key"), 2, "rlora: error: bad key"),
        (DataError("bad line"), 2, "rlora: error: bad line"),
        (RunFolderError("not a run"), 2, "rlora: error: not a run"),
        (TrainingError("nan loss"), 1, "rlora: training stopped: nan loss"),
    ],
)
def test_errors_the_user_can_fix_are_one_line_and_an_exit_code(monkeypatch, capsys, error, code, prefix):
    assert isinstance(error, RloraError)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(rlora.commands.tasks, "list_tasks", fail)
    assert main(["tasks"]) == code
    assert capsys.readouterr().err == prefix + "\n"


@pytest.mark.parametrize("bug", [ValueError("a bug"), OSError("a bug"), ImportError("a bug"), KeyError("a bug")])
def test_any_other_exception_is_a_bug_and_keeps_its_traceback(monkeypatch, bug):
    def fail(*args, **kwargs):
        raise bug

    monkeypatch.setattr(rlora.commands.tasks, "list_tasks", fail)
    with pytest.raises(type(bug), match="a bug"):
        main(["tasks"])


@pytest.mark.parametrize("value", ["1.5", "-0.1", "half"])
def test_a_test_fraction_outside_the_split_rule_is_a_usage_error(capsys, value):
    with pytest.raises(SystemExit) as exit_:
        main(["tasks", "--test-fraction", value])
    assert exit_.value.code == 2
    assert "argument --test-fraction: expected a number" in capsys.readouterr().err
