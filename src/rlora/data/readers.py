"""The containers rlora reads data from, each as records: (where, number, record) with `where` what a message
names (the file and its line, record or row), `number` counting from 1 and `record` a dict of fields.

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

A record's fields are checked and made an `Example` by `schemas.py`; `files.py` joins the two.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
KINDS = ".jsonl, .ndjson, .json, .csv, .parquet, or a folder written by datasets' save_to_disk"
BATCH_ROWS = 1024


def container(path: Path) -> str:
    if path.is_dir():
        return "folder"
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported kind of data file ({path.suffix or 'no suffix'}); expected {KINDS}")
    return kind


def kind_problem(path: Path) -> str | None:
    """None if `path` is a kind of data file rlora reads, else what is wrong (path included)."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            return dataset_dict_problem(path)
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


def dataset_dict_problem(path: Path) -> str:
    try:
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        names = ", ".join(map(str, splits))
    except (OSError, ValueError, KeyError, TypeError):
        names = "unknown"
    return (
        f"{path}: a DatasetDict (splits: {names}), not one dataset; save the split to read, "
        f"e.g. dataset[{'train'!r}].save_to_disk(...)"
    )


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
    except FieldTwice as error:
        raise DataError(f"{where}: field {error.args[0]!r} is given twice") from None
    except RecursionError:
        raise DataError(f"{where}: invalid JSON: nested too deeply") from None
    record = result[0] if pair else result
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return result


def _jsonl_records(path: Path, note: str = "") -> Iterator[tuple[str, int, dict]]:
    """JSON Lines; `note` follows the message of a line that is not valid JSON."""
    decode = DECODER.decode
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
        got = shown(start[:20].decode(errors="replace"))
        raise DataError(f"{path}: expected a JSON array of objects (or JSON Lines), got {got}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text: {error}") from None
    yield from _array_records(path, text)


def _array_records(path: Path, text: str) -> Iterator[tuple[str, int, dict]]:
    """The objects of the JSON array `text` (after whitespace), each parsed when it is asked for."""

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
            record, index = _decoded(where, locate, DECODER.raw_decode, text, index, pair=True)
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
            nul = next((i for i, cell in enumerate(row) if "\0" in cell), None)
            if nul is not None:  # the csv module keeps it; no text holds one (a binary or damaged file)
                name = f" ({header[nul]!r})" if header is not None and nul < len(header) else ""
                raise DataError(f"{path}:{number}: column {nul + 1}{name}: a NUL byte in the cell; not text")
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
    problem = kind_problem(path)
    if problem is not None:
        raise DataError(problem)
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise DataError(f"{path}: cannot load the saved dataset: {' '.join(str(error).split())}") from None
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(dataset_dict_problem(path))
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


CONTAINERS = {
    "jsonl": _jsonl_records,
    "json": _json_records,
    "csv": _csv_records,
    "parquet": _parquet_records,
    "folder": _folder_records,
}


def shown(value: object, limit: int = 60) -> str:
    """A field's value as JSON, cut to `limit` characters for the message."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (RecursionError, ValueError, TypeError):
        text = f"a deeply nested {type(value).__name__}" if isinstance(value, (list, dict)) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quoted(value: object, limit: int = 60) -> str:
    """A name as Python writes it ('tool'), cut to `limit` characters; other values as `_shown`."""
    if not isinstance(value, str):
        return shown(value, limit)
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class FieldTwice(Exception):
    pass


def _unique_fields(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's fields; one given twice is an error (json keeps the last one silently)."""
    record = dict(pairs)
    if len(record) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise FieldTwice(key)
            seen.add(key)
    return record


DECODER = json.JSONDecoder(object_pairs_hook=_unique_fields)
