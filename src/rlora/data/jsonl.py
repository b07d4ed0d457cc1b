"""User tasks from JSONL files.

One JSON object per line (blank lines are ignored):

    {"prompt": "...", "answer": "..."}                                  free-form
    {"prompt": "...", "choices": ["...", "..."], "gold": 1}             multiple choice, answered by letter
    {"prompt": "...", "choices": ["yes", "no"], "gold": 0, "labels": ["yes", "no"]}   answered by word

Optional fields: "format" ("rc": cloze, the choice's text is scored after "<prompt>\nAnswer:"; "mc": the
options are listed and answered by label; default: the run's `data.format`),
"task" (default: the file name without its extension, so one file is one task; a file
may hold several tasks by naming them per line) and "id" (a string or integer; default: "<task>/<line number>").
Every problem is an error naming the file, the line and the field, never a silent skip: a field given twice on a
line, too many choices for the letters, two equal choices, text that is not valid Unicode.

The reading itself (streamed, one line at a time) is `files.py`'s, which also reads instruction data (Alpaca,
ShareGPT, chat messages) from JSON, CSV, Parquet and saved datasets.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import DataError
from .example import Example
from .files import KNOWN_FIELDS, DataFile, _examples

__all__ = ["KNOWN_FIELDS", "read_jsonl_tasks"]


def read_jsonl_tasks(paths: Iterable[str | os.PathLike], reserved: Iterable[str] = ()) -> dict[str, list[Example]]:
    """The tasks in the files, by name; a name used twice, or in `reserved` (built-in names), is an error.

    Each file is read as JSON Lines in rlora's schema, whatever its suffix."""
    reserved = set(reserved)
    tasks: dict[str, list[Example]] = {}
    for path in paths:
        path = Path(path)
        found: dict[str, list[Example]] = {}
        for example in _examples(DataFile(path, schema="rlora"), "jsonl"):
            found.setdefault(example.task, []).append(example)
        for name, examples in found.items():
            if name in reserved:
                raise DataError(f"{path}: task {name!r} has the name of a built-in task; rename it")
            if name in tasks:
                raise DataError(f"{path}: task {name!r} is defined twice (also in an earlier file)")
            tasks[name] = examples
    return tasks
