"""Task data as users have it: instruction data in JSON Lines, JSON, CSV, Parquet or a saved `datasets` folder.

A `DataFile` names one file (or folder) and how to read it; `iter_examples` streams its examples in file order.

Containers, by the path's suffix (any case), and how messages locate a record:

- .jsonl, .ndjson: one JSON object per line, blank lines skipped; "<path>:<line>".
- .json: one JSON array of objects (LLaMA-Factory's format), which json must read whole (its records are then
  parsed one at a time); "<path>: record <n>". A .json file that starts with "{" is read as JSON Lines.
- .csv: a header row, then one row per example (the csv module's dialect: commas, double quotes, strict quoting);
  "<path>:<line>". An empty cell is a missing field; the list fields (choices, labels, history, messages,
  conversations) hold JSON text, "gold" an integer.
- .parquet: read a batch of rows at a time; "<path>: row <n>".
- a folder written by `datasets.Dataset.save_to_disk`: memory-mapped, read a batch of rows at a time;
  "<path>: row <n>". It must hold one dataset: a DatasetDict is an error that names its splits (save one split).

Line numbers are physical lines (a CSV row's is the line it starts on; the header is line 1); record, row and
turn numbers count from 1. In CSV, Parquet and saved datasets a null (or empty) cell is a missing field.

Schemas (`DataFile.schema`; "auto" decides from the first record's fields: "messages" -> messages,
"conversations" -> sharegpt, "instruction" -> alpaca, "prompt" -> rlora; a record with fields of two of them is an
error, not a guess):

- rlora: rlora's own fields, one object per record:

      {"prompt": "...", "answer": "..."}                                  free-form
      {"prompt": "...", "choices": ["...", "..."], "gold": 1}             multiple choice, answered by letter
      {"prompt": "...", "choices": ["yes", "no"], "gold": 0, "labels": ["yes", "no"]}   answered by word

  and optionally "format" ("rc": cloze, the choice's text is scored after "<prompt>\nAnswer:"; "mc": the options
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

`DataFile.columns` renames the file's columns to rlora's field names before anything else (auto-detection
included), e.g. (("instruction", "question"), ("output", "response")); a message about such a field names both
("field 'output' (column 'response')"). A column that has the name of a renamed field is then not read (an error
in the rlora schema, ignored in the others). A column that no record has (a typo) is an error, optional fields too.

Every problem is a `DataError` naming the file, the line (record, row), the field and, in a conversation, the turn;
values in messages are cut to 60 characters. Nothing is skipped silently.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .example import MIN_CHOICES, Example, format_problem, gold_problem, labelling_problem, labels_problem

READER_VERSION = "1"  # bump when the same file and settings may read as other examples
SCHEMAS = ("auto", "rlora", "alpaca", "sharegpt", "messages")
CONFIG_KEYS = ("path", "schema", "task", "columns")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
KINDS = ".jsonl, .ndjson, .json, .csv, .parquet, or a folder written by datasets' save_to_disk"

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
BATCH_ROWS = 1024


@dataclass(frozen=True)
class DataFile:
    """One data file (or saved dataset folder) and how to read it; see the module docstring.

    `columns` holds (rlora's field name, the file's column name) pairs; a mapping is accepted and made a tuple."""

    path: Path
    schema: str = "auto"
    task: str | None = None
    columns: tuple[tuple[str, str], ...] = ()
    kind: str | None = None  # "jsonl", "json", "csv", "parquet" or "folder"; None: by the suffix (data.jsonl: "jsonl")

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        columns = self.columns.items() if isinstance(self.columns, Mapping) else self.columns
        try:
            columns = tuple((field, column) for field, column in columns)
        except (TypeError, ValueError):
            raise DataError(
                f"{self.path}: columns: expected (field, column) pairs, got {_shown(self.columns)}"
            ) from None
        object.__setattr__(self, "columns", columns)
        problem = _settings_problem(self.schema, self.task, columns)
        if problem is None and self.kind is not None and self.kind not in _CONTAINERS:
            problem = f"kind: expected one of {', '.join(_CONTAINERS)}, got {_shown(self.kind)}"
        if problem is not None:
            raise DataError(f"{self.path}: {problem}")

    @classmethod
    def from_config(cls, value: str | dict, where: str) -> DataFile:
        """From a run config entry: a path string, or a mapping with keys path (required), schema, task and
        columns (a mapping of rlora's field name to the file's column name). A bad entry is a `ConfigError` whose
        message starts with `where` and names the key. The path comes back absolute (expanduser().resolve())."""
        if isinstance(value, str):
            value = {"path": value}
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{where}: expected a file path or a mapping with keys {', '.join(CONFIG_KEYS)}, got {_shown(value)}"
            )
        unknown = [key for key in value if key not in CONFIG_KEYS]
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(CONFIG_KEYS)}")
        if "path" not in value:
            raise ConfigError(f"{where}: path: missing (the data file or folder)")
        raw = value["path"]
        if not isinstance(raw, str) or not raw.strip():
            raise ConfigError(f"{where}: path: expected a file path, got {_shown(raw)}")
        schema = value.get("schema", "auto")
        task = value.get("task")
        columns = value.get("columns") or {}
        if not isinstance(columns, Mapping):
            raise ConfigError(
                f"{where}: columns: expected a mapping of rlora's field name to the file's column name, "
                f"got {_shown(columns)}"
            )
        columns = tuple(columns.items())
        problem = _settings_problem(schema, task, columns)
        if problem is not None:
            raise ConfigError(f"{where}: {problem}")
        path = Path(raw).expanduser()
        if not path.exists():
            raise ConfigError(f"{where}: no such file: {path}")
        problem = _kind_problem(path)
        if problem is not None:
            raise ConfigError(f"{where}: {problem}")
        return cls(path.resolve(), schema, task, columns)

    def fingerprint(self) -> str:
        """A hex digest that changes when the file's content may have changed (its size or modification time; for a
        folder, of every file in it) or the reading settings change."""
        path = self.path.expanduser().resolve()
        parts: list = [READER_VERSION, str(path)]
        try:
            if path.is_dir():
                for file in sorted(p for p in path.rglob("*") if p.is_file()):
                    stat = file.stat()
                    parts.append([file.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns])
            else:
                stat = path.stat()
                parts.append([stat.st_size, stat.st_mtime_ns])
        except OSError as error:
            raise DataError(f"{self.path}: cannot read: {error.strerror or error}") from None
        parts += [self.schema, self.task, [list(pair) for pair in self.columns], self.kind]
        return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()


def iter_examples(spec: DataFile) -> Iterator[Example]:
    """The file's examples in file order, streamed: a record is read, checked and turned into an `Example` only
    when the caller asks for the next one, so a large file is never held in memory whole, except a .json file
    holding one JSON array, which json must read whole (its records are still parsed one at a time). Every problem
    raises `DataError` naming the file, the line (record, row) and the field; a file with no examples is one."""
    return _examples(spec, spec.kind or _container(spec.path))


# --- settings -----------------------------------------------------------------------------------------------------


def _settings_problem(schema: object, task: object, columns: tuple) -> str | None:
    """None if the reading settings are usable, else "<key>: what is wrong"."""
    if not isinstance(schema, str) or schema not in SCHEMAS:
        return f"schema: expected one of {', '.join(SCHEMAS)}, got {_quoted(schema)}"
    if task is not None and (not isinstance(task, str) or not task.strip()):
        return f"task: expected a non-empty string (the task's name), got {_shown(task)}"
    fields = ALL_FIELDS if schema == "auto" else FIELDS[schema]
    seen: dict[str, str] = {}
    for field, column in columns:
        if not isinstance(field, str) or field not in fields:
            which = "rlora's fields" if schema == "auto" else f"the {schema} schema's fields"
            return f"columns: unknown field {_quoted(field)}; {which}: {', '.join(sorted(fields))}"
        if not isinstance(column, str) or not column:
            return f"columns: {field}: expected the file's column name (a non-empty string), got {_shown(column)}"
        if field in seen.values():
            return f"columns: field {field!r} is given twice"
        if column in seen:
            return f"columns: column {column!r} is given for both {seen[column]!r} and {field!r}"
        seen[column] = field
    return None


def _kind_problem(path: Path) -> str | None:
    """None if `path` is a kind of data file rlora reads, else what is wrong (path included)."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            return _dataset_dict_problem(path)
        state = path / "state.json"
        if not state.is_file():
            return f"{path} is a folder, but not one written by datasets' save_to_disk (it has no state.json)"
        try:
            value = json.loads(state.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            return f"{state}: not readable JSON ({' '.join(str(error).split())}); save the dataset again"
        if not isinstance(value, dict) or not isinstance(value.get("_data_files"), list):
            return f"{state}: not the state datasets' save_to_disk writes (a JSON object with _data_files)"
        return None
    if path.exists() and not path.is_file():
        return f"{path}: not a regular file (a FIFO, a device or a socket); give a data file"
    if path.suffix.lower() not in SUFFIXES:
        return f"{path}: unsupported kind of data file ({path.suffix or 'no suffix'}); expected {KINDS}"
    return None


def _dataset_dict_problem(path: Path) -> str:
    try:
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        names = ", ".join(map(str, splits))
    except (OSError, ValueError, KeyError, TypeError):
        names = "unknown"
    return (
        f"{path}: a DatasetDict (splits: {names}), not one dataset; save the split to read, "
        f"e.g. dataset[{'train'!r}].save_to_disk(...)"
    )


# --- reading ------------------------------------------------------------------------------------------------------


def _container(path: Path) -> str:
    if path.is_dir():
        return "folder"
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported kind of data file ({path.suffix or 'no suffix'}); expected {KINDS}")
    return kind


class _Reader:
    """Per-file settings the schema parsers read."""

    __slots__ = ("default_task", "fixed_task", "rename", "labels")

    def __init__(self, spec: DataFile) -> None:
        path = spec.path
        self.fixed_task = spec.task
        self.default_task = spec.task or (path.name if path.is_dir() else path.stem)
        self.rename = {column: field for field, column in spec.columns if column != field}
        self.labels = {field: f"{field!r} (column {column!r})" for field, column in spec.columns if column != field}

    def label(self, field: str) -> str:
        """How messages name a field: 'output', or 'output' (column 'response') when renamed."""
        return self.labels.get(field) or repr(field)


def _examples(spec: DataFile, kind: str) -> Iterator[Example]:
    """`iter_examples`, with the container given (read_jsonl_tasks reads any file as JSON Lines)."""
    path = spec.path
    records = _CONTAINERS[kind](path)
    reader = _Reader(spec)
    parse = _PARSERS.get(spec.schema)
    rename = reader.rename
    cells = kind == "csv"
    auto = spec.schema == "auto"
    unseen = {column: field for field, column in spec.columns}  # mapped columns no record has shown yet
    count = 0
    for where, number, record in records:
        if unseen:
            for column in unseen.keys() & record.keys():
                del unseen[column]
        if rename:
            record, shadowed = _renamed(record, rename)
        if auto:
            _check_one_schema(record, where)
        if parse is None:
            parse = _PARSERS[_detect(record, where, reader)]
        if rename and shadowed and parse is _rlora:
            field = shadowed[0]
            raise DataError(
                f"{where}: field {reader.label(field)}: the file also has a column {field!r}; "
                f"rename or drop one of them"
            )
        if cells:
            _decode_cells(record, where, reader)
        count += 1
        yield parse(record, where, number, reader)
    if not count:
        raise DataError(f"{path}: no examples (an empty task)")
    if unseen:
        column, field = next(iter(unseen.items()))
        raise DataError(
            f"{path}: columns: {field}: the file has no column {column!r} (none of its {count} records has a value "
            "there); fix the column's name or drop the entry"
        )


def _renamed(record: dict, rename: dict[str, str]) -> tuple[dict, list[str]]:
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


def _check_one_schema(record: dict, where: str) -> None:
    """Under `schema: auto`, a record whose fields fit two schemas is an error: which one it meant is a guess."""
    fits = [(field, schema) for field, schema in _DETECT if field in record]
    if len(fits) > 1:
        both = " and ".join(f"{schema} ({field!r})" for field, schema in fits[:2])
        raise DataError(f"{where}: the fields fit two schemas, {both}; set schema: to the one to read")


def _detect(record: dict, where: str, reader: _Reader) -> str:
    for field, schema in _DETECT:
        if field in record:
            return schema
    found = ", ".join(map(repr, sorted(record))) or "none"
    needs = "; ".join(f"{schema} needs {field!r}" for field, schema in _DETECT)
    raise DataError(
        f"{where}: cannot tell the schema from the fields ({found}): {needs}; "
        f"give the schema, or map a column to one of these fields with columns"
    )


def _decode_cells(record: dict, where: str, reader: _Reader) -> None:
    """A CSV row's list fields from their JSON text, and "gold" from its integer text (in place)."""
    for field in LIST_FIELDS:
        text = record.get(field)
        if text is None:
            continue
        try:
            record[field] = _DECODER.decode(text)
        except (json.JSONDecodeError, RecursionError):
            raise DataError(
                f"{where}: field {reader.label(field)}: expected a JSON list in the cell, got {_shown(text)}"
            ) from None
        except _FieldTwice as error:
            raise DataError(f"{where}: field {reader.label(field)}: key {error.args[0]!r} is given twice") from None
    gold = record.get("gold")
    if gold is not None and re.fullmatch(r"\s*[+-]?\d+\s*", gold):
        record["gold"] = int(gold)


# --- containers: (where, number, record) per record ---------------------------------------------------------------


def _lines(path: Path, file) -> Iterator[str]:
    """The file's lines as text, numbered from 1, with a leading byte-order mark dropped."""
    for number, raw in enumerate(file, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{path}:{number}: not UTF-8 text: {error}") from None
        if number == 1 and line.startswith("\ufeff"):
            line = line[1:]
        yield line


def _open(path: Path):
    try:
        return open(path, "rb")  # noqa: SIM115 (closed by the reading generator)
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error}") from error


def _decoded(where: str, locate: Callable[[json.JSONDecodeError], str], decode: Callable, *args, pair=False) -> Any:
    """`decode(*args)`'s JSON object (with `pair`: its (object, end) pair), or a DataError naming `where`; `locate`
    says where in the record a syntax error is."""
    try:
        result = decode(*args)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: invalid JSON: {error.msg} {locate(error)}") from None
    except _FieldTwice as error:
        raise DataError(f"{where}: field {error.args[0]!r} is given twice") from None
    except RecursionError:
        raise DataError(f"{where}: invalid JSON: nested too deeply") from None
    record = result[0] if pair else result
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return result


def _jsonl_records(path: Path, note: str = "") -> Iterator[tuple[str, int, dict]]:
    """JSON Lines; `note` follows the message of a line that is not valid JSON."""
    decode = _DECODER.decode
    with _open(path) as file:
        for number, line in enumerate(_lines(path, file), start=1):
            if not line.strip():
                continue
            line = line.rstrip("\r\n")  # as str.splitlines: a JSON error's column counts in the line alone
            where = f"{path}:{number}"
            record = _decoded(where, lambda error: f"(column {error.colno}){note}", decode, line)
            yield where, number, record


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _json_records(path: Path) -> Iterator[tuple[str, int, dict]]:
    """A JSON array of objects (read whole), or JSON Lines when the file starts with "{"."""
    with _open(path) as file:
        start = file.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\n\r")
        while not start:
            chunk = file.read(1 << 16)
            if not chunk:
                return
            start = chunk.lstrip(b" \t\n\r")
    if start.startswith(b"{"):
        yield from _jsonl_records(
            path,
            "; read as JSON Lines, as the file does not start with '[' (a .json file "
            "holds one JSON array of objects, or one object per line)",
        )
        return
    if not start.startswith(b"["):
        got = _shown(start[:20].decode(errors="replace"))
        raise DataError(f"{path}: expected a JSON array of objects (or JSON Lines), got {got}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text: {error}") from None

    def position(index: int) -> str:
        line = text.count("\n", 0, index) + 1
        return f"line {line}, column {index - text.rfind(chr(10), 0, index)}"

    index = _WHITESPACE.match(text, _WHITESPACE.match(text).end() + 1).end()  # after "["
    if text.startswith("]", index):
        index += 1
    else:
        for number in range(1, sys.maxsize):
            where = f"{path}: record {number}"
            locate = lambda error: f"({position(error.pos)})"  # noqa: E731
            record, index = _decoded(where, locate, _DECODER.raw_decode, text, index, pair=True)
            yield where, number, record
            index = _WHITESPACE.match(text, index).end()
            if text.startswith(",", index):
                index = _WHITESPACE.match(text, index + 1).end()
            elif text.startswith("]", index):
                index += 1
                break
            else:
                raise DataError(f"{path}: after record {number}: invalid JSON: expected ',' or ']' ({position(index)})")
    index = _WHITESPACE.match(text, index).end()
    if index < len(text):
        raise DataError(f"{path}: invalid JSON: extra data after the array ({position(index)})")


def _csv_records(path: Path) -> Iterator[tuple[str, int, dict]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long texts: the default limit is 128 KiB a cell
    with _open(path) as file:
        rows = csv.reader(_lines(path, file), strict=True)  # strict: an unclosed quote is an error, not the rest
        end = 0  # the line the last row ended on
        header = None
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as error:
                hint = " (a quoted cell is not closed)" if "unexpected end of data" in str(error) else ""
                raise DataError(f"{path}:{end + 1}: not valid CSV: {error}{hint}") from None
            number, end = end + 1, rows.line_num
            if header is None:
                header, width = row, len(row)
                twice = next((name for i, name in enumerate(header) if name in header[:i]), None)
                if twice is not None:
                    raise DataError(f"{path}:{number}: column {twice!r} appears twice in the header")
                continue
            if not any(row):
                continue
            where = f"{path}:{number}"
            if len(row) > width:
                raise DataError(f"{where}: {len(row)} cells, but the header has {width} columns")
            yield where, number, {name: cell for name, cell in zip(header, row, strict=False) if cell}


def _parquet_records(path: Path) -> Iterator[tuple[str, int, dict]]:
    import pyarrow
    import pyarrow.parquet

    try:
        parquet = pyarrow.parquet.ParquetFile(path)
        yield from _table_rows(path, parquet.schema_arrow.names, parquet.iter_batches(batch_size=BATCH_ROWS))
    except (OSError, pyarrow.ArrowException) as error:
        raise DataError(f"{path}: not a readable Parquet file: {error}") from None


def _folder_records(path: Path) -> Iterator[tuple[str, int, dict]]:
    problem = _kind_problem(path)
    if problem is not None:
        raise DataError(problem)
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise DataError(f"{path}: cannot load the saved dataset: {' '.join(str(error).split())}") from None
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(_dataset_dict_problem(path))
    yield from _table_rows(path, dataset.column_names, dataset.with_format("arrow").iter(batch_size=BATCH_ROWS))


def _table_rows(path: Path, names: list[str], batches) -> Iterator[tuple[str, int, dict]]:
    """Rows of Arrow record batches (or tables) as dicts without their null fields, numbered from 1."""
    twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if twice is not None:
        raise DataError(f"{path}: column {twice!r} appears twice")
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            yield f"{path}: row {number}", number, {key: value for key, value in row.items() if value is not None}


_CONTAINERS = {
    "jsonl": _jsonl_records,
    "json": _json_records,
    "csv": _csv_records,
    "parquet": _parquet_records,
    "folder": _folder_records,
}


# --- schemas: one record to one Example ---------------------------------------------------------------------------


def _rlora(record: dict, where: str, number: int, reader: _Reader) -> Example:
    """rlora's own schema (see the module docstring). The rules on choices, gold, labels and format are
    `example.py`'s; here they are phrased with the file's field names."""
    unknown = sorted(set(record) - KNOWN_FIELDS)
    if unknown:
        raise DataError(f"{where}: unknown field {unknown[0]!r}; known fields: {', '.join(sorted(KNOWN_FIELDS))}")
    label = reader.label

    def text(field: str, default: str | None = None) -> str:
        value = record.get(field, default)
        if value is None:
            raise DataError(f"{where}: field {label(field)}: missing")
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field {label(field)}: expected a non-empty string, got {_shown(value)}")
        return _unicode(value, where, field, reader)

    def texts(field: str) -> tuple[str, ...]:
        value = record[field]
        if (
            not isinstance(value, list)
            or len(value) < MIN_CHOICES
            or not all(isinstance(v, str) and v.strip() for v in value)
        ):
            raise DataError(
                f"{where}: field {label(field)}: expected a list of at least {MIN_CHOICES} non-empty strings"
            )
        twice = next((v for i, v in enumerate(value) if v in value[:i]), None)
        if twice is not None:
            raise DataError(f"{where}: field {label(field)}: {_shown(twice)} is given twice; each must be distinct")
        return tuple(_unicode(v, where, field, reader) for v in value)

    task = reader.fixed_task or text("task", reader.default_task)
    uid = _uid(record.get("id", f"{task}/{number}"), where, reader)
    prompt = text("prompt")
    if "choices" not in record:
        for field in ("gold", "labels", "format"):
            if field in record:
                raise DataError(f"{where}: field {label(field)}: only allowed with 'choices'")
        return Example(task, prompt, text("answer"), uid=uid)
    choices = texts("choices")
    if "answer" in record:
        raise DataError(f"{where}: field {label('answer')}: not allowed with 'choices' (give 'gold', the index)")
    gold = record.get("gold")
    expected = gold_problem(gold, len(choices))
    if expected is not None:
        raise DataError(f"{where}: field {label('gold')}: expected {expected}, got {_shown(gold)}")
    labels = texts("labels") if "labels" in record else None
    expected = None if labels is None else labels_problem(labels, len(choices))
    if expected is not None:
        raise DataError(f"{where}: field {label('labels')}: expected {expected}")
    problem = labelling_problem(len(choices), labels)
    if problem is not None:
        raise DataError(f"{where}: field {label('choices')}: {problem}")
    fmt = record.get("format")
    expected = format_problem(fmt)
    if expected is not None:
        raise DataError(f"{where}: field {label('format')}: expected {expected}, got {_shown(fmt)}")
    return Example.multiple_choice(task, prompt, choices, gold, uid, labels, format=fmt)


def _alpaca(record: dict, where: str, number: int, reader: _Reader) -> Example:
    task = _task(record, where, reader)
    uid = _optional_uid(record, where, task, number, reader)
    user = _required_text(record, "instruction", where, reader)
    extra = record.get("input")
    if extra is not None:
        if not isinstance(extra, str):
            raise DataError(f"{where}: field {reader.label('input')}: expected a string, got {_shown(extra)}")
        if extra.strip():
            user = f"{user}\n{_unicode(extra, where, 'input', reader)}"
    answer = _required_text(record, "output", where, reader)
    turns = _system_turn(record, where, reader)
    history = record.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise DataError(
                f"{where}: field {reader.label('history')}: expected a list of [user, assistant] pairs, "
                f"got {_shown(history)}"
            )
        for n, pair in enumerate(history, start=1):
            if (
                not isinstance(pair, (list, tuple))
                or len(pair) != 2
                or not all(isinstance(text, str) and text.strip() for text in pair)
            ):
                raise DataError(
                    f"{where}: field {reader.label('history')}: pair {n}: expected [user, assistant], "
                    f"two non-empty strings, got {_shown(pair)}"
                )
            turns.append(("user", _unicode(pair[0], where, "history", reader)))
            turns.append(("assistant", _unicode(pair[1], where, "history", reader)))
    turns.append(("user", user))
    return Example(task, user, answer, uid=uid, turns=tuple(turns))


def _messages(record: dict, where: str, number: int, reader: _Reader) -> Example:
    return _conversation(record, where, number, reader, "messages", MESSAGES_ROLES)


def _sharegpt(record: dict, where: str, number: int, reader: _Reader) -> Example:
    return _conversation(record, where, number, reader, "conversations", SHAREGPT_ROLES)


def _conversation(
    record: dict, where: str, number: int, reader: _Reader, field: str, role_names: dict[str, str]
) -> Example:
    task = _task(record, where, reader)
    uid = _optional_uid(record, where, task, number, reader)
    turns = _system_turn(record, where, reader)
    value = record.get(field)
    at = f"{where}: field {reader.label(field)}"
    if value is None:
        raise DataError(f"{at}: missing")
    if not isinstance(value, list) or not value:
        raise DataError(f"{at}: expected a non-empty list of turns, got {_shown(value)}")
    body = 0  # user and assistant turns so far
    last = None
    for n, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            raise DataError(f"{at}: turn {n}: expected an object with 'role' and 'content', got {_shown(turn)}")
        role_key, content_key = ("from", "value") if "from" in turn else ("role", "content")
        name = turn.get(role_key)
        if name is None:
            keys = "'from' and 'value'" if field == "conversations" else "'role' and 'content'"
            raise DataError(f"{at}: turn {n}: expected an object with {keys}, got {_shown(turn)}")
        role = role_names.get(name) if isinstance(name, str) else None
        if role is None:
            if name in TOOL_ROLES:
                raise DataError(
                    f"{at}: turn {n}: role {_quoted(name)} is not supported (tool turns are not supported; "
                    f"only {', '.join(role_names)})"
                )
            raise DataError(f"{at}: turn {n}: role {_quoted(name)} is not one of {', '.join(role_names)}")
        content = turn.get(content_key)
        if not isinstance(content, str) or (role != "system" and not content.strip()):
            raise DataError(f"{at}: turn {n}: {content_key!r}: expected a non-empty string, got {_shown(content)}")
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
                f"{at}: turn {n}: expected {article} turn, got {_quoted(name)} (after an optional system turn, "
                f"user and assistant turns alternate, starting with user)"
            )
        turns.append((role, content))
        body += 1
        last = (n, name)
    if not body:
        raise DataError(f"{at}: no user and assistant turns")
    if body % 2:
        raise DataError(
            f"{at}: turn {last[0]}: the last turn must be an assistant reply, got {_quoted(last[1])} "
            f"(the reply to train on and evaluate)"
        )
    answer = turns.pop()[1]
    return Example(task, turns[-1][1], answer, uid=uid, turns=tuple(turns))


# --- field checks ---------------------------------------------------------------------------------------------


def _task(record: dict, where: str, reader: _Reader) -> str:
    if reader.fixed_task is not None:
        return reader.fixed_task
    task = record.get("task")
    if task is None:
        return reader.default_task
    if not isinstance(task, str) or not task.strip():
        raise DataError(f"{where}: field {reader.label('task')}: expected a non-empty string, got {_shown(task)}")
    return _unicode(task, where, "task", reader)


def _uid(uid: object, where: str, reader: _Reader) -> str:
    if isinstance(uid, bool) or not isinstance(uid, (str, int)):
        raise DataError(f"{where}: field {reader.label('id')}: expected a string or an integer, got {_shown(uid)}")
    return str(uid)


def _optional_uid(record: dict, where: str, task: str, number: int, reader: _Reader) -> str:
    uid = record.get("id")
    return f"{task}/{number}" if uid is None else _uid(uid, where, reader)


def _required_text(record: dict, field: str, where: str, reader: _Reader) -> str:
    value = record.get(field)
    if value is None:
        raise DataError(f"{where}: field {reader.label(field)}: missing")
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {reader.label(field)}: expected a non-empty string, got {_shown(value)}")
    return _unicode(value, where, field, reader)


def _system_turn(record: dict, where: str, reader: _Reader) -> list[tuple[str, str]]:
    """[("system", text)] from the record's "system" field, [] when it has none or a blank one."""
    system = record.get("system")
    if system is None:
        return []
    if not isinstance(system, str):
        raise DataError(f"{where}: field {reader.label('system')}: expected a string, got {_shown(system)}")
    return [("system", _unicode(system, where, "system", reader))] if system.strip() else []


def _unicode(value: str, where: str, field: str, reader: _Reader, turn: int = 0) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate escape such as "\ud800"
        bad = value[error.start : error.end].encode("unicode_escape").decode()
        at = f"{where}: field {reader.label(field)}" + (f": turn {turn}" if turn else "")
        raise DataError(f"{at}: not valid Unicode text ({bad})") from None
    return value


def _shown(value: object, limit: int = 60) -> str:
    """A field's value as JSON, cut to `limit` characters for the message."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (RecursionError, ValueError, TypeError):
        text = f"a deeply nested {type(value).__name__}" if isinstance(value, (list, dict)) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quoted(value: object, limit: int = 60) -> str:
    """A name as Python writes it ('tool'), cut to `limit` characters; other values as `_shown`."""
    if not isinstance(value, str):
        return _shown(value, limit)
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _FieldTwice(Exception):
    pass


def _unique_fields(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's fields; one given twice is an error (json keeps the last one silently)."""
    record = dict(pairs)
    if len(record) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _FieldTwice(key)
            seen.add(key)
    return record


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_fields)
_PARSERS = {"rlora": _rlora, "alpaca": _alpaca, "messages": _messages, "sharegpt": _sharegpt}
