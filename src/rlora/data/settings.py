"""The run config's `data` section: which tasks, their split and mixture, and how examples are encoded. It lives with
the data (the plan reads it, `data/plan.py`); the run config (`runconfig.py`) holds it as its `data` section."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_fields import POSITIVE, UNIT_OPEN, at_least, key, one_of
from .example import DEFAULT_FORMAT, FORMATS
from .mixture import MIXTURE_RULES
from .split import DEFAULT_TEST_FRACTION, DEFAULT_VALIDATION_FRACTION, HOLDOUTS, bad_test_fraction

# The tasks a run config without any data source trains on; a config naming its own files gets only those.
DEFAULT_TASKS = ("boolq", "piqa", "arc_easy", "winogrande")


@dataclass
class DataSettings:
    # None until `validate_run_config` resolves it: the default tasks only where no data source is given
    tasks: list[str] = key(
        None,
        "built-in task names or suites (`rlora tasks`); when not given: " + ", ".join(DEFAULT_TASKS) + " if neither "
        "data.jsonl nor data.files is given either, else none (your files alone)",
    )
    jsonl: list[str] = key(None, "files in rlora's own JSONL schema (docs/data.md)", factory=list)
    files: list[str | dict] = key(
        None, "instruction data and other files: a path, or {path, schema, task, columns}", factory=list
    )
    mixture: str = key(
        "temperature", "how tasks are mixed: proportional | equal | temperature", MIXTURE_RULES["mixture"]
    )
    temperature: float = key(
        2.0, "with mixture temperature: a task's share is proportional to size^(1/T)", MIXTURE_RULES["temperature"]
    )
    max_train_per_task: int | None = key(
        None, "at most this many training examples of a task (null: all)", MIXTURE_RULES["max_train_per_task"]
    )
    total_train: int | None = key(
        None, "the training mixture's size (null: the largest that keeps the shares)", MIXTURE_RULES["total_train"]
    )
    max_eval_per_task: int | None = key(200, "held-out examples evaluated per task (null: all)", at_least(1, True))
    test_fraction: float = key(
        DEFAULT_TEST_FRACTION,
        "the share of each task's examples in the test split (by a hash of their content)",
        (lambda v: bad_test_fraction(v, both_sides=True) is None, "a number in (0, 1)"),
    )
    holdout: str = key(
        "test",
        "what a run evaluates: the test split, or a validation split carved from the training examples (for "
        "choosing settings without the test set: `rlora compare --sweep`); the run then trains on those left",
        one_of(HOLDOUTS),
    )
    validation_fraction: float = key(
        DEFAULT_VALIDATION_FRACTION,
        "with holdout validation or training.eval_steps: the share of the training examples held out for validation",
        UNIT_OPEN,
    )
    max_length: int = key(384, "tokens per sequence; a longer prompt loses its start, never its answer", POSITIVE)
    chat_template: bool = key(False, "wrap prompts in the model's chat template")
    format: str = key(
        DEFAULT_FORMAT,
        "multiple choice as rc (cloze: each choice's text scored after the prompt) or mc (lettered or word labels)",
        one_of(FORMATS),
    )
