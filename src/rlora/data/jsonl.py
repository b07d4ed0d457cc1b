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
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import DataError
from .example import FORMATS, Example, labelling_problem

KNOWN_FIELDS = {"task", "id", "prompt", "answer", "choices", "gold", "labels", "format"}


def read_jsonl_tasks(paths: Iterable[str | os.PathLike], reserved: Iterable[str] = ()) -> dict[str, list[Example]]:
    """The tasks in the files, by name; a name used twice, or in `reserved` (built-in names), is an error."""
    reserved = set(reserved)
    tasks: dict[str, list[Example]] = {}
    for path in paths:
        path = Path(path)
        found = _read_file(path)
        if not found:
            raise DataError(f"{path}: no examples (an empty task)")
        for name, examples in found.items():
            if name in reserved:
                raise DataError(f"{path}: task {name!r} has the name of a built-in task; rename it")
            if name in tasks:
                raise DataError(f"{path}: task {name!r} is defined twice (also in an earlier file)")
            tasks[name] = examples
    return tasks


def _read_file(path: Path) -> dict[str, list[Example]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text: {error}") from error
    tasks: dict[str, list[Example]] = {}
    for number, line in enumerate(lines, start=1):
        if line.strip():
            example = _parse_line(line, f"{path}:{number}", path.stem, number)
            tasks.setdefault(example.task, []).append(example)
    return tasks


def _shown(value: object, limit: int = 60) -> str:
    """A field's value as JSON, cut to `limit` characters for the message."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (RecursionError, ValueError):
        text = f"a deeply nested {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _FieldTwice(Exception):
    pass


def _unique_fields(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's fields; one given twice is an error (json keeps the last one silently)."""
    record = {}
    for key, value in pairs:
        if key in record:
            raise _FieldTwice(key)
        record[key] = value
    return record


def _parse_line(line: str, where: str, default_task: str, number: int) -> Example:
    try:
        record = json.loads(line, object_pairs_hook=_unique_fields)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: invalid JSON: {error.msg} (column {error.colno})") from error
    except _FieldTwice as error:
        raise DataError(f"{where}: field {error.args[0]!r} is given twice") from None
    except RecursionError:
        raise DataError(f"{where}: invalid JSON: nested too deeply") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - KNOWN_FIELDS)
    if unknown:
        raise DataError(f"{where}: unknown field {unknown[0]!r}; known fields: {', '.join(sorted(KNOWN_FIELDS))}")

    def text(field: str, default: str | None = None) -> str:
        value = record.get(field, default)
        if value is None:
            raise DataError(f"{where}: field {field!r}: missing")
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field {field!r}: expected a non-empty string, got {_shown(value)}")
        return unicode(field, value)

    def texts(field: str) -> tuple[str, ...]:
        value = record[field]
        if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) and v.strip() for v in value):
            raise DataError(f"{where}: field {field!r}: expected a list of at least 2 non-empty strings")
        twice = next((v for i, v in enumerate(value) if v in value[:i]), None)
        if twice is not None:
            raise DataError(f"{where}: field {field!r}: {_shown(twice)} is given twice; each must be distinct")
        return tuple(unicode(field, v) for v in value)

    def unicode(field: str, value: str) -> str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:  # a lone surrogate escape such as "\ud800"
            bad = value[error.start : error.end].encode("unicode_escape").decode()
            raise DataError(f"{where}: field {field!r}: not valid Unicode text ({bad})") from None
        return value

    task = text("task", default_task)
    uid = record.get("id", f"{task}/{number}")
    if isinstance(uid, bool) or not isinstance(uid, (str, int)):
        raise DataError(f"{where}: field 'id': expected a string or an integer, got {_shown(uid)}")
    uid = str(uid)
    prompt = text("prompt")
    if "choices" not in record:
        for field in ("gold", "labels", "format"):
            if field in record:
                raise DataError(f"{where}: field {field!r}: only allowed with 'choices'")
        return Example(task, prompt, text("answer"), uid=uid)
    choices = texts("choices")
    if "answer" in record:
        raise DataError(f"{where}: field 'answer': not allowed with 'choices' (give 'gold', the index)")
    gold = record.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise DataError(
            f"{where}: field 'gold': expected an integer index into 'choices' (0..{len(choices) - 1}), "
            f"got {_shown(gold)}"
        )
    labels = texts("labels") if "labels" in record else None
    if labels is not None and len(labels) != len(choices):
        raise DataError(f"{where}: field 'labels': expected {len(choices)} distinct labels, one per choice")
    problem = labelling_problem(len(choices), labels)
    if problem is not None:
        raise DataError(f"{where}: field 'choices': {problem}")
    fmt = record.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"{where}: field 'format': expected one of {', '.join(map(repr, FORMATS))}, got {_shown(fmt)}")
    return Example.multiple_choice(task, prompt, choices, gold, uid, labels, format=fmt)
