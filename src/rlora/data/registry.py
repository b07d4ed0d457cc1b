"""The task registry: built-in task names, suites, loading by name (cached per process)."""

from __future__ import annotations

import difflib
import functools

from ..errors import DataError
from .builtin import BUILTIN_TASKS, load_mmlu, mmlu_subjects
from .example import Example

COMMONSENSE_8 = (
    "boolq",
    "piqa",
    "social_iqa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)
SUITES: dict[str, tuple[str, ...]] = {
    "commonsense8": COMMONSENSE_8,
    "glue": ("sst2", "rte", "mrpc", "cb", "copa"),
}
MMLU_PREFIX = "mmlu_"


def list_tasks(include_mmlu: bool = True) -> list[str]:
    """Every built-in task name (MMLU subjects as `mmlu_<subject>`)."""
    names = sorted(BUILTIN_TASKS)
    if include_mmlu:
        names += [MMLU_PREFIX + s for s in mmlu_subjects()]
    return names


def load_task(name: str) -> list[Example]:
    """The examples of one built-in task; unknown names raise DataError listing the close matches."""
    return list(_load_cached(check_task_name(name)))


def check_task_name(name: str) -> str:
    """`name` if it is a built-in task, else a DataError with suggestions."""
    valid = list_tasks()
    if name in valid:
        return name
    close = difflib.get_close_matches(name, valid + list(SUITES), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    builtin = ", ".join(sorted(BUILTIN_TASKS))
    raise DataError(
        f"unknown task {name!r}; {hint}built-in tasks: {builtin}, mmlu_<subject> "
        f"({len(valid) - len(BUILTIN_TASKS)} subjects; `rlora tasks` lists them); suites: {', '.join(SUITES)}"
    )


def expand_task_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """Task names with suites (`commonsense8`, `glue`) replaced by their tasks, duplicates dropped."""
    expanded: list[str] = []
    for name in names:
        for task in SUITES.get(name, (name,)):
            if task not in expanded:
                expanded.append(task)
    return expanded


@functools.cache
def _load_cached(name: str) -> tuple[Example, ...]:
    if name.startswith(MMLU_PREFIX) and name not in BUILTIN_TASKS:
        return tuple(load_mmlu(name[len(MMLU_PREFIX) :]))
    return tuple(BUILTIN_TASKS[name]())
