"""Tasks as memory-mapped Arrow tables: user files are read once, then every run maps them instead of loading them.

A user file (`files.DataFile`) is streamed through its reader, which checks every record and names the file, row
and field of any problem; the examples are written in batches to an Arrow IPC file in the cache,
`$RLORA_CACHE_DIR/data/<fingerprint>/examples.arrow` (or under `$RLORA_DATA_CACHE`), published whole or not at
all. The fingerprint covers the
file's path, size and modification time and the reading settings, so an edited file is read again. A later run
memory-maps the table: its pages are read from disk when touched and belong to the page cache, not the process.

A task (`TaskData`) is then a table and the row numbers of its examples (a file may hold several tasks), or a
built-in task's list. The split, the mixture and the test sets are index arrays over tasks; an `Example` is made
only when one is read. Beside the table, per-row arrays hold each example's split key (`split.split_key`), task
and length in characters, so splitting a million examples is a comparison of a float64 array.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from .._io import atomic_dir, is_complete
from ..errors import DataError
from .example import Example
from .files import DataFile, iter_examples
from .mixture import index_dtype
from .split import split_key, split_keys

logger = logging.getLogger(__name__)

STORE_VERSION = "2"  # bump when the table layout below changes: every cached table is then read again
BATCH_ROWS = 8192  # rows per Arrow record batch while a file is read
TABLE_FILE = "examples.arrow"
SOURCE_FILE = "source.json"  # what the table was read from, for `rlora cache`

_STRINGS = pa.list_(pa.string())
SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("uid", pa.string()),
        ("prompt", pa.string()),
        ("answer", pa.string()),
        ("choices", _STRINGS),
        ("gold", pa.int32()),
        ("labels", _STRINGS),
        ("format", pa.string()),
        ("turn_roles", _STRINGS),
        ("turn_texts", _STRINGS),
    ]
)


DATA_CACHE_ENV_VAR = "RLORA_DATA_CACHE"


def data_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """$RLORA_DATA_CACHE, else the `data` folder of the rlora cache (`cache_dir`, else $RLORA_CACHE_DIR, ...)."""
    from ..models import cache_root

    if os.environ.get(DATA_CACHE_ENV_VAR):
        return Path(os.environ[DATA_CACHE_ENV_VAR]).expanduser()
    return cache_root(cache_dir) / "data"


def _row(example: Example) -> dict:
    turns = example.turns
    return {
        "task": example.task,
        "uid": example.uid,
        "prompt": example.prompt,
        "answer": example.answer,
        "choices": None if example.choices is None else list(example.choices),
        "gold": example.gold,
        "labels": None if example.labels is None else list(example.labels),
        "format": example.format,
        "turn_roles": None if turns is None else [r for r, _ in turns],
        "turn_texts": None if turns is None else [c for _, c in turns],
    }


def _example(row: dict) -> Example:
    turns = None
    if row["turn_roles"] is not None:
        turns = tuple(zip(row["turn_roles"], row["turn_texts"], strict=True))
    choices = row["choices"]
    return Example(
        row["task"],
        row["prompt"],
        row["answer"],
        None if choices is None else tuple(choices),
        row["gold"],
        row["uid"],
        None if row["labels"] is None else tuple(row["labels"]),
        None,
        row["format"],
        turns,
    )


class FileTable:
    """A user file's examples in a memory-mapped Arrow table, in the file's order, and three per-row arrays kept
    beside it (split key, task, length in characters), read whole only while the plan is made: a pass over a
    column of the mapped table would keep its pages in the process's resident memory for the whole run."""

    def __init__(self, spec: DataFile, folder: Path) -> None:
        self.spec = spec
        self.folder = folder
        reader = pa.ipc.open_file(pa.memory_map(str(folder / TABLE_FILE)))
        self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]  # mapped, not read
        self.starts = np.cumsum([0, *(b.num_rows for b in self.batches)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def example(self, row: int) -> Example:
        return self.examples(np.array([row]))[0]

    def examples(self, rows: np.ndarray) -> list[Example]:
        """The examples at `rows` (any order), each record batch's rows read in one `take` (a take over the whole
        table would first concatenate it, copying every row into memory)."""
        rows = np.asarray(rows, dtype=np.int64)
        batch_of = np.searchsorted(self.starts, rows, side="right") - 1
        out: list = [None] * len(rows)
        for b in np.unique(batch_of):
            where = np.flatnonzero(batch_of == b)
            records = self.batches[b].take(pa.array(rows[where] - self.starts[b])).to_pylist()
            for i, record in zip(where.tolist(), records, strict=True):
                out[i] = _example(record)
        return out

    def column(self, name: str) -> np.ndarray:
        """A per-row array, mapped: "keys" (split keys), "tasks" (task codes), "chars" (characters). Index it for a
        task's rows; the map goes with the returned array, so a file of many tasks is not read whole per task."""
        return np.load(self.folder / f"{name}.npy", mmap_mode="r")

    def tasks(self) -> dict[str, np.ndarray]:
        """The rows of each task in the file, tasks in order of first appearance."""
        names = json.loads((self.folder / "tasks.json").read_text(encoding="utf-8"))
        codes = self.column("tasks")
        if len(names) == 1:
            return {names[0]: np.arange(len(codes), dtype=index_dtype(len(codes)))}
        order = np.argsort(codes, kind="stable").astype(index_dtype(len(codes)))
        bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
        return {name: order[bounds[i] : bounds[i + 1]] for i, name in enumerate(names)}


def _table_key(spec: DataFile) -> str:
    return hashlib.sha256(f"{STORE_VERSION}:{spec.fingerprint()}".encode()).hexdigest()[:32]


def load_file(spec: DataFile, cache_dir: str | os.PathLike | None = None) -> FileTable:
    """The file's table: mapped from the cache, or read (and checked) once and cached first."""
    folder = data_cache(cache_dir) / _table_key(spec)
    if not is_complete(folder):
        logger.info("reading %s into %s", spec.path, folder)
        with atomic_dir(folder, shared=True) as tmp:
            _write_table(spec, tmp)
    return FileTable(spec, folder)


def _write_table(spec: DataFile, folder: Path) -> None:
    keys, chars, codes = array("d"), array("l"), array("l")
    names: dict[str, int] = {}
    with pa.OSFile(str(folder / TABLE_FILE), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        examples = tqdm(iter_examples(spec), desc=f"reading {spec.path.name}", unit=" examples", delay=2, leave=False)
        for batch in _batches(examples):
            writer.write_batch(pa.RecordBatch.from_pylist([_row(e) for e in batch], schema=SCHEMA))
            keys.extend(split_key(e) for e in batch)
            chars.extend(_chars(e) for e in batch)
            codes.extend(names.setdefault(e.task, len(names)) for e in batch)
    if not keys:
        raise DataError(f"{spec.path}: no examples (an empty task)")
    np.save(folder / "keys.npy", np.frombuffer(keys, dtype=np.float64))
    np.save(folder / "chars.npy", np.asarray(chars, dtype=np.int32))
    np.save(folder / "tasks.npy", np.asarray(codes, dtype=np.int32))
    (folder / "tasks.json").write_text(json.dumps(list(names), ensure_ascii=False), encoding="utf-8")
    source = {"path": str(spec.path), "schema": spec.schema, "task": spec.task, "columns": spec.columns}
    source |= {"kind": spec.kind, "examples": len(keys)}
    (folder / SOURCE_FILE).write_text(json.dumps(source, ensure_ascii=False), encoding="utf-8")


@dataclass
class CachedTable:
    folder: Path
    bytes: int
    source: dict | None  # what was read (path, settings, examples); None for a folder without its record
    stale: bool  # its file changed or is gone since (or it is not a complete table): no run will map it again


def cached_tables(cache_dir: str | os.PathLike | None = None) -> list[CachedTable]:
    """The tables in the data cache, each with its size and whether it is stale."""
    root = data_cache(cache_dir)
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        try:
            source = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
            spec = DataFile(Path(source["path"]), source["schema"], source["task"], source["columns"], source["kind"])
            stale = not is_complete(folder) or _table_key(spec) != folder.name
        except (OSError, ValueError, KeyError, TypeError, DataError):
            source, stale = None, True
        found.append(CachedTable(folder, size, source, stale))
    return found


def _chars(example: Example) -> int:
    """The length estimate used to group a very large mixture's batches: characters of the texts the model reads."""
    return len(example.prompt) + len(example.answer) + sum(len(c) for _, c in example.turns or ())


def _batches(examples: Iterator[Example]) -> Iterator[list[Example]]:
    batch: list[Example] = []
    for example in examples:
        batch.append(example)
        if len(batch) == BATCH_ROWS:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class TaskData:
    """One task's examples: rows of a file's table, or a built-in task's list. Indexing makes an `Example`."""

    name: str
    examples_list: Sequence[Example] | None = None
    table: FileTable | None = None
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.examples_list) if self.table is None else len(self.rows)

    def __getitem__(self, i: int) -> Example:
        return self.examples_list[i] if self.table is None else self.table.example(self.rows[i])

    def take(self, positions: np.ndarray) -> list[Example]:
        """The examples at `positions` (indices into this task)."""
        if self.table is None:
            return [self.examples_list[int(i)] for i in positions]
        return self.table.examples(self.rows[positions]) if len(positions) else []

    def split_keys(self) -> np.ndarray:
        if self.table is None:
            return split_keys(self.examples_list)
        return self.table.column("keys")[self.rows]

    def text_lengths(self, positions: np.ndarray) -> np.ndarray:
        """Characters of the prompt, answer and turns of the examples at `positions`: a length estimate that needs
        no example made (a file's are computed when it is read)."""
        if self.table is None:
            return np.array([_chars(self.examples_list[int(i)]) for i in positions], dtype=np.int32)
        return self.table.column("chars")[self.rows[positions]]

    def chunks(self, positions: np.ndarray, size: int = 4096) -> Iterator[list[Example]]:
        """The examples at `positions`, `size` at a time (for a pass over a large task)."""
        for start in range(0, len(positions), size):
            yield self.take(positions[start : start + size])


def file_tasks(
    specs: Sequence[DataFile], reserved: Sequence[str] = (), cache_dir: str | os.PathLike | None = None
) -> dict[str, TaskData]:
    """The tasks of the files, by name; a name used twice, or in `reserved` (built-in names), is an error."""
    reserved = set(reserved)
    tasks: dict[str, TaskData] = {}
    for spec in specs:
        table = load_file(spec, cache_dir)
        for name, rows in table.tasks().items():
            if name in reserved:
                raise DataError(f"{spec.path}: task {name!r} has the name of a built-in task; rename it")
            if name in tasks:
                raise DataError(f"{spec.path}: task {name!r} is defined twice (also in an earlier file)")
            tasks[name] = TaskData(name, table=table, rows=rows)
    return tasks
