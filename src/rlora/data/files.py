"""Task data as users have it: instruction data in JSON Lines, JSON, CSV, Parquet or a saved `datasets` folder.

A `DataFile` names one file (or folder) and how to read it; `iter_examples` streams its examples in file order.

The containers (how a file is read into records) are `readers.py`'s, the schemas (how a record becomes an
`Example`) are `schemas.py`'s; this module holds what names a file and how to read it, and joins the two.

`DataFile.columns` renames the file's columns to rlora's field names before anything else (auto-detection
included), e.g. (("instruction", "question"), ("output", "response")); a message about such a field names both
("field 'output' (column 'response')"). A column that has the name of a renamed field is then not read (an error
in the rlora schema, ignored in the others). A column that no record has (a typo) is an error, optional fields too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DataError
from ..names import name_problem
from ..names import rule as names_rule
from .example import Example
from .readers import CONTAINERS, container, kind_problem, quoted, shown
from .schemas import ALL_FIELDS, FIELDS, PARSERS, SCHEMAS, Reader, check_one_schema, decode_cells, detect, renamed

READER_VERSION = "1"  # bump when the same file and settings may read as other examples
CONFIG_KEYS = ("path", "schema", "task", "columns")


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
                f"{self.path}: columns: expected (field, column) pairs, got {shown(self.columns)}"
            ) from None
        object.__setattr__(self, "columns", columns)
        problem = _settings_problem(self.schema, self.task, columns)
        if problem is None and self.kind is not None and self.kind not in CONTAINERS:
            problem = f"kind: expected one of {', '.join(CONTAINERS)}, got {shown(self.kind)}"
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
                f"{where}: expected a file path or a mapping with keys {', '.join(CONFIG_KEYS)}, got {shown(value)}"
            )
        unknown = [key for key in value if key not in CONFIG_KEYS]
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(CONFIG_KEYS)}")
        if "path" not in value:
            raise ConfigError(f"{where}: path: missing (the data file or folder)")
        raw = value["path"]
        if not isinstance(raw, str) or not raw.strip():
            raise ConfigError(f"{where}: path: expected a file path, got {shown(raw)}")
        schema = value.get("schema", "auto")
        task = value.get("task")
        columns = value.get("columns") or {}
        if not isinstance(columns, Mapping):
            raise ConfigError(
                f"{where}: columns: expected a mapping of rlora's field name to the file's column name, "
                f"got {shown(columns)}"
            )
        columns = tuple(columns.items())
        problem = _settings_problem(schema, task, columns)
        if problem is not None:
            raise ConfigError(f"{where}: {problem}")
        path = Path(raw).expanduser()
        if not path.exists():
            raise ConfigError(f"{where}: no such file: {path}")
        problem = kind_problem(path)
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
    return _examples(spec, spec.kind or container(spec.path))  # an unsupported file fails here, not when read


def _examples(spec: DataFile, kind: str) -> Iterator[Example]:
    path = spec.path
    records = CONTAINERS[kind](path)
    reader = Reader(spec)
    parse = PARSERS.get(spec.schema)
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
            record, shadowed = renamed(record, rename)
        if auto:
            check_one_schema(record, where)
        if parse is None:
            parse = PARSERS[detect(record, where)]
        if rename and shadowed and parse is PARSERS["rlora"]:
            field = shadowed[0]
            raise DataError(
                f"{where}: field {reader.label(field)}: the file also has a column {field!r}; "
                f"rename or drop one of them"
            )
        if cells:
            decode_cells(record, where, reader)
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


def _settings_problem(schema: object, task: object, columns: tuple) -> str | None:
    """None if the reading settings are usable, else "<key>: what is wrong"."""
    if not isinstance(schema, str) or schema not in SCHEMAS:
        return f"schema: expected one of {', '.join(SCHEMAS)}, got {quoted(schema)}"
    if task is not None and (not isinstance(task, str) or not task.strip()):
        return f"task: expected a non-empty string (the task's name), got {shown(task)}"
    if task is not None and name_problem(task) is not None:
        return f"task: {name_problem(task)}; {names_rule()}"
    fields = ALL_FIELDS if schema == "auto" else FIELDS[schema]
    seen: dict[str, str] = {}
    for field, column in columns:
        if not isinstance(field, str) or field not in fields:
            which = "rlora's fields" if schema == "auto" else f"the {schema} schema's fields"
            return f"columns: unknown field {quoted(field)}; {which}: {', '.join(sorted(fields))}"
        if not isinstance(column, str) or not column:
            return f"columns: {field}: expected the file's column name (a non-empty string), got {shown(column)}"
        if field in seen.values():
            return f"columns: field {field!r} is given twice"
        if column in seen:
            return f"columns: column {column!r} is given for both {seen[column]!r} and {field!r}"
        seen[column] = field
    return None
