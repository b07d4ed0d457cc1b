"""The schemas of task data: one record (a dict of fields, from `readers.py`) to one `Example`.

Schemas (`DataFile.schema`; "auto" decides from the first record's fields: "messages" -> messages,
"conversations" -> sharegpt, "instruction" -> alpaca, "prompt" -> rlora; a record with fields of two of them is an
error, not a guess):

- rlora: rlora's own fields, one object per record:

      {"prompt": "...", "answer": "..."}                                  free-form
      {"prompt": "...", "choices": ["...", "..."], "gold": 1}             multiple choice, answered by letter
      {"prompt": "...", "choices": ["yes", "no"], "gold": 0, "labels": ["yes", "no"]}   answered by word

  and optionally "format" ("rc": cloze, the choice's text is scored after "<prompt>\\nAnswer:"; "mc": the options
  are listed and answered by label; default: the run's `data.format`). A field rlora does not know is an error, as
  a likely typo; so are a field given twice, too many choices for the letters and two equal choices.
- alpaca: instruction, optional input, output, optional system and history ([user, assistant] pairs of earlier
  turns). The user turn is the instruction, then "\\n" and the input when the input is not blank (as LLaMA-Factory
  joins them).
- messages: "messages", a list of {"role", "content"} turns with roles system, user and assistant.
- sharegpt: "conversations", a list of {"from", "value"} turns with roles human (user), gpt (assistant) and system
  (user, assistant are also accepted as themselves).

  In both a turn may use either pair of keys ({"role", "content"} or {"from", "value"}); the record may give the
  system prompt in a top-level "system" field instead of a first system turn. After the optional system turn, user
  and assistant turns alternate, starting with user and ending with the assistant reply, which becomes the
  example's `answer` (every earlier turn is in `turns`, the last user turn is `prompt`). Tool turns (function_call,
  observation, tool, ...) are not supported and are an error. A blank system prompt counts as none.

  The instruction schemas ignore fields they do not know (real datasets carry "source", "category", ... columns)
  and read a null optional field as missing.

Every schema also reads "task" (default: `DataFile.task`, else the file's stem, or the folder's name; a given
`DataFile.task` overrides the records') and "id" (a string or integer; default "<task>/<line, record or row number>").

Every problem is a `DataError` naming the file, the line (record, row), the field and, in a conversation, the turn;
values in messages are cut to 60 characters. Nothing is skipped silently.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from ..errors import DataError
from ..names import name_problem, rule
from .example import MIN_CHOICES, Example, format_problem, gold_problem, labelling_problem, labels_problem
from .readers import DECODER, FieldTwice, quoted, shown

if TYPE_CHECKING:
    from .files import DataFile

SCHEMAS = ("auto", "rlora", "alpaca", "sharegpt", "messages")
RLORA_FIELDS = ("task", "id", "prompt", "answer", "choices", "gold", "labels", "format")
FIELDS = {
    "rlora": RLORA_FIELDS,
    "alpaca": ("task", "id", "instruction", "input", "output", "system", "history"),
    "messages": ("task", "id", "messages", "system"),
    "sharegpt": ("task", "id", "conversations", "system"),
}
ALL_FIELDS = tuple(sorted({field for fields in FIELDS.values() for field in fields}))
KNOWN_FIELDS = set(RLORA_FIELDS)
LIST_FIELDS = ("choices", "labels", "history", "messages", "conversations")  # JSON text in a CSV cell
TOOL_ROLES = ("function_call", "observation", "tool", "function", "tool_call", "tool_response", "ipython")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
MESSAGES_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_DETECT = (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"), ("prompt", "rlora"))


class Reader:
    """Per-file settings the schema parsers read."""

    __slots__ = ("default_task", "fixed_task", "rename", "labels")

    def __init__(self, spec: DataFile) -> None:
        path = spec.path
        self.fixed_task = spec.task
        self.default_task = spec.task or (path.name if path.is_dir() else path.stem)
        problem = name_problem(self.default_task)
        if problem is not None:  # a given task was checked with the settings: this is the file's own name
            raise DataError(f"{path}: the task's name, from the file's name: {problem}; {rule()}; or give task:")
        self.rename = {column: field for field, column in spec.columns if column != field}
        self.labels = {field: f"{field!r} (column {column!r})" for field, column in spec.columns if column != field}

    def label(self, field: str) -> str:
        """How messages name a field: 'output', or 'output' (column 'response') when renamed."""
        return self.labels.get(field) or repr(field)


def renamed(record: dict, rename: dict[str, str]) -> tuple[dict, list[str]]:
    """The record with the file's columns renamed to rlora's fields, and the columns it drops: those that have
    the name of a field that is read from another column."""
    out = {}
    shadowed = []
    targets = rename.values()
    for key, value in record.items():
        field = rename.get(key)
        if field is not None:
            out[field] = value
        elif key in targets:
            shadowed.append(key)
        else:
            out[key] = value
    return out, shadowed


def check_one_schema(record: dict, where: str) -> None:
    """Under `schema: auto`, a record whose fields fit two schemas is an error: which one it meant is a guess."""
    fits = [(field, schema) for field, schema in _DETECT if field in record]
    if len(fits) > 1:
        both = " and ".join(f"{schema} ({field!r})" for field, schema in fits[:2])
        raise DataError(f"{where}: the fields fit two schemas, {both}; set schema: to the one to read")


def detect(record: dict, where: str) -> str:
    for field, schema in _DETECT:
        if field in record:
            return schema
    found = ", ".join(map(repr, sorted(record))) or "none"
    needs = "; ".join(f"{schema} needs {field!r}" for field, schema in _DETECT)
    raise DataError(
        f"{where}: cannot tell the schema from the fields ({found}): {needs}; "
        f"give the schema, or map a column to one of these fields with columns"
    )


def decode_cells(record: dict, where: str, reader: Reader) -> None:
    """A CSV row's list fields from their JSON text, and "gold" from its integer text (in place)."""
    for field in LIST_FIELDS:
        text = record.get(field)
        if text is None:
            continue
        try:
            record[field] = DECODER.decode(text)
        except (json.JSONDecodeError, RecursionError):
            raise DataError(
                f"{where}: field {reader.label(field)}: expected a JSON list in the cell, got {shown(text)}"
            ) from None
        except FieldTwice as error:
            raise DataError(f"{where}: field {reader.label(field)}: key {error.args[0]!r} is given twice") from None
    gold = record.get("gold")
    if gold is not None and re.fullmatch(r"\s*[+-]?\d+\s*", gold):
        record["gold"] = int(gold)


def _rlora(record: dict, where: str, number: int, reader: Reader) -> Example:
    """rlora's own schema (see the module docstring). The rules on choices, gold, labels and format are
    `example.py`'s; here they are phrased with the file's field names."""
    unknown = sorted(set(record) - KNOWN_FIELDS)
    if unknown:
        raise DataError(f"{where}: unknown field {unknown[0]!r}; known fields: {', '.join(sorted(KNOWN_FIELDS))}")
    task = reader.fixed_task or _task_name(_text(record, "task", where, reader, reader.default_task), where, reader)
    uid = _uid(record.get("id", f"{task}/{number}"), where, reader)
    prompt = _text(record, "prompt", where, reader)
    if "choices" not in record:
        for field in ("gold", "labels", "format"):
            if field in record:
                raise DataError(f"{where}: field {reader.label(field)}: only allowed with 'choices'")
        return Example(task, prompt, _text(record, "answer", where, reader), uid=uid)
    label = reader.label
    choices = _distinct_texts(record, "choices", where, reader)
    if "answer" in record:
        raise DataError(f"{where}: field {label('answer')}: not allowed with 'choices' (give 'gold', the index)")
    gold = record.get("gold")
    expected = gold_problem(gold, len(choices))
    if expected is not None:
        raise DataError(f"{where}: field {label('gold')}: expected {expected}, got {shown(gold)}")
    labels = _distinct_texts(record, "labels", where, reader) if "labels" in record else None
    expected = None if labels is None else labels_problem(labels, len(choices))
    if expected is not None:
        raise DataError(f"{where}: field {label('labels')}: expected {expected}")
    problem = labelling_problem(len(choices), labels)
    if problem is not None:
        raise DataError(f"{where}: field {label('choices')}: {problem}")
    fmt = record.get("format")
    expected = format_problem(fmt)
    if expected is not None:
        raise DataError(f"{where}: field {label('format')}: expected {expected}, got {shown(fmt)}")
    return Example.multiple_choice(task, prompt, choices, gold, uid, labels, format=fmt)


def _text(record: dict, field: str, where: str, reader: Reader, default: str | None = None) -> str:
    """A non-empty string field of the rlora schema (`default` when missing, an error if that is None)."""
    value = record.get(field, default)
    if value is None:
        raise DataError(f"{where}: field {reader.label(field)}: missing")
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {reader.label(field)}: expected a non-empty string, got {shown(value)}")
    return _unicode(value, where, field, reader)


def _distinct_texts(record: dict, field: str, where: str, reader: Reader) -> tuple[str, ...]:
    """A list field of the rlora schema (choices, labels): at least MIN_CHOICES distinct non-empty strings."""
    value = record[field]
    strings = isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value)
    if not strings or len(value) < MIN_CHOICES:
        raise DataError(
            f"{where}: field {reader.label(field)}: expected a list of at least {MIN_CHOICES} non-empty strings"
        )
    twice = next((v for i, v in enumerate(value) if v in value[:i]), None)
    if twice is not None:
        raise DataError(f"{where}: field {reader.label(field)}: {shown(twice)} is given twice; each must be distinct")
    return tuple(_unicode(v, where, field, reader) for v in value)


def _alpaca(record: dict, where: str, number: int, reader: Reader) -> Example:
    task = _task(record, where, reader)
    uid = _optional_uid(record, where, task, number, reader)
    user = _text(record, "instruction", where, reader)
    extra = record.get("input")
    if extra is not None:
        if not isinstance(extra, str):
            raise DataError(f"{where}: field {reader.label('input')}: expected a string, got {shown(extra)}")
        if extra.strip():
            user = f"{user}\n{_unicode(extra, where, 'input', reader)}"
    answer = _text(record, "output", where, reader)
    turns = _system_turn(record, where, reader)
    history = record.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise DataError(
                f"{where}: field {reader.label('history')}: expected a list of [user, assistant] pairs, "
                f"got {shown(history)}"
            )
        for n, pair in enumerate(history, start=1):
            if (
                not isinstance(pair, (list, tuple))
                or len(pair) != 2
                or not all(isinstance(text, str) and text.strip() for text in pair)
            ):
                raise DataError(
                    f"{where}: field {reader.label('history')}: pair {n}: expected [user, assistant], "
                    f"two non-empty strings, got {shown(pair)}"
                )
            turns.append(("user", _unicode(pair[0], where, "history", reader)))
            turns.append(("assistant", _unicode(pair[1], where, "history", reader)))
    turns.append(("user", user))
    return Example(task, user, answer, uid=uid, turns=tuple(turns))


def _messages(record: dict, where: str, number: int, reader: Reader) -> Example:
    return _conversation(record, where, number, reader, "messages", MESSAGES_ROLES)


def _sharegpt(record: dict, where: str, number: int, reader: Reader) -> Example:
    return _conversation(record, where, number, reader, "conversations", SHAREGPT_ROLES)


def _conversation(
    record: dict, where: str, number: int, reader: Reader, field: str, role_names: dict[str, str]
) -> Example:
    task = _task(record, where, reader)
    uid = _optional_uid(record, where, task, number, reader)
    turns = _system_turn(record, where, reader)
    value = record.get(field)
    at = f"{where}: field {reader.label(field)}"
    if value is None:
        raise DataError(f"{at}: missing")
    if not isinstance(value, list) or not value:
        raise DataError(f"{at}: expected a non-empty list of turns, got {shown(value)}")
    body = 0  # user and assistant turns so far
    last = None
    for n, turn in enumerate(value, start=1):
        name, role, content = _turn(turn, n, at, field, role_names)
        content = _unicode(content, where, field, reader, n)
        if role == "system":
            if n != 1:
                raise DataError(f"{at}: turn {n}: a system turn must be the first turn")
            if turns:
                raise DataError(f"{at}: turn 1: a system turn, and a 'system' field too; give one of them")
            if content.strip():
                turns.append(("system", content))
            continue
        expected = "assistant" if body % 2 else "user"
        if role != expected:
            article = "an assistant" if body % 2 else "a user"
            raise DataError(
                f"{at}: turn {n}: expected {article} turn, got {quoted(name)} (after an optional system turn, "
                f"user and assistant turns alternate, starting with user)"
            )
        turns.append((role, content))
        body += 1
        last = (n, name)
    if not body:
        raise DataError(f"{at}: no user and assistant turns")
    if body % 2:
        raise DataError(
            f"{at}: turn {last[0]}: the last turn must be an assistant reply, got {quoted(last[1])} "
            f"(the reply to train on and evaluate)"
        )
    answer = turns.pop()[1]
    return Example(task, turns[-1][1], answer, uid=uid, turns=tuple(turns))


def _turn(turn: object, n: int, at: str, field: str, role_names: dict[str, str]) -> tuple[str, str, str]:
    """The n-th turn of a conversation as (its role's name in the file, rlora's role, its content)."""
    if not isinstance(turn, dict):
        raise DataError(f"{at}: turn {n}: expected an object with 'role' and 'content', got {shown(turn)}")
    role_key, content_key = ("from", "value") if "from" in turn else ("role", "content")
    name = turn.get(role_key)
    if name is None:
        keys = "'from' and 'value'" if field == "conversations" else "'role' and 'content'"
        raise DataError(f"{at}: turn {n}: expected an object with {keys}, got {shown(turn)}")
    role = role_names.get(name) if isinstance(name, str) else None
    if role is None:
        if name in TOOL_ROLES:
            raise DataError(
                f"{at}: turn {n}: role {quoted(name)} is not supported (tool turns are not supported; "
                f"only {', '.join(role_names)})"
            )
        raise DataError(f"{at}: turn {n}: role {quoted(name)} is not one of {', '.join(role_names)}")
    content = turn.get(content_key)
    if not isinstance(content, str) or (role != "system" and not content.strip()):
        raise DataError(f"{at}: turn {n}: {content_key!r}: expected a non-empty string, got {shown(content)}")
    return name, role, content


# --- field checks ---------------------------------------------------------------------------------------------


def _task(record: dict, where: str, reader: Reader) -> str:
    if reader.fixed_task is not None:
        return reader.fixed_task
    task = record.get("task")
    if task is None:
        return reader.default_task
    if not isinstance(task, str) or not task.strip():
        raise DataError(f"{where}: field {reader.label('task')}: expected a non-empty string, got {shown(task)}")
    return _task_name(_unicode(task, where, "task", reader), where, reader)


def _task_name(task: str, where: str, reader: Reader) -> str:
    """A task's name becomes part of paths (an export per task): `names.name_problem` refuses it where it is read."""
    problem = name_problem(task)
    if problem is not None:
        raise DataError(f"{where}: field {reader.label('task')}: {problem}; {rule()}")
    return task


def _uid(uid: object, where: str, reader: Reader) -> str:
    if isinstance(uid, bool) or not isinstance(uid, (str, int)):
        raise DataError(f"{where}: field {reader.label('id')}: expected a string or an integer, got {shown(uid)}")
    return str(uid)


def _optional_uid(record: dict, where: str, task: str, number: int, reader: Reader) -> str:
    uid = record.get("id")
    return f"{task}/{number}" if uid is None else _uid(uid, where, reader)


def _system_turn(record: dict, where: str, reader: Reader) -> list[tuple[str, str]]:
    """[("system", text)] from the record's "system" field, [] when it has none or a blank one."""
    system = record.get("system")
    if system is None:
        return []
    if not isinstance(system, str):
        raise DataError(f"{where}: field {reader.label('system')}: expected a string, got {shown(system)}")
    return [("system", _unicode(system, where, "system", reader))] if system.strip() else []


def _unicode(value: str, where: str, field: str, reader: Reader, turn: int = 0) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate escape such as "\ud800"
        bad = value[error.start : error.end].encode("unicode_escape").decode()
        at = f"{where}: field {reader.label(field)}" + (f": turn {turn}" if turn else "")
        raise DataError(f"{at}: not valid Unicode text ({bad})") from None
    return value


PARSERS = {"rlora": _rlora, "alpaca": _alpaca, "messages": _messages, "sharegpt": _sharegpt}
