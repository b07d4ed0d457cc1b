"""Tasks as memory-mapped Arrow tables: user files are read once, then every run maps them instead of loading them.

A user file (`files.DataFile`) is streamed through its reader, which checks every record and names the file, row
and field of any problem; the examples are written in batches to an Arrow IPC file in the cache,
`$RLORA_CACHE_DIR/data/<fingerprint>/examples.arrow` (or under `$RLORA_DATA_CACHE`), published whole or not at
all. The fingerprint covers the file's path, size and modification time and the reading settings, so an edited file
is read again. A later run memory-maps the table: its pages are read from disk when touched and belong to the page
cache, not the process.

Nothing in the cache is trusted unchecked, at a cost that does not grow with the data on every start. A table records
a blake2b hash of its source's bytes and of each of its own files (`INTEGRITY_FILE`), written when it is built; the
first run that finds all of them as recorded (a full check, reading every byte) then records their identities
(`IDENTITY_FILE`: size, modification and change times in ns, inode and device of the source and of each of the
table's files, and a hash of the Arrow file's first 4 KiB and its whole footer: its schema and where its record
batches lie). A later run compares those identities only. Writing a file changes its change time, which no user
can set back (`os.utime` sets the access and modification times only), and replacing it changes its inode, so a
source edited in place with its size and time kept, or a table damaged or rewritten, fails its identity, gets the
full check, and is read again (one warning), never used; a file merely touched, copied or restored passes the full
check and its new identity is recorded. A file changed within `RACY_NS` of the moment its identity is taken is not
trusted by identity (as git treats "racily clean" files): the next run checks it in full again. What identities
cannot see is a change below the file system (a flipped bit on disk): `rlora cache --verify` hashes every byte.
These checks are against accidents, not against someone who can write the cache (who could rewrite its records
too). One process at a time builds a table (a lock beside it, `.<key>.building`); `rlora cache` lists tables being
built and never removes them.

A task (`TaskData`) is then a table and the row numbers of its examples (a file may hold several tasks), or a
built-in task's list. The split, the mixture and the test sets are index arrays over tasks; an `Example` is made
only when one is read. Beside the table, per-row arrays hold each example's split key (`split.split_key`), task
and length in characters, so splitting a million examples is a comparison of a float64 array.

Over 500 lines because the cache's format, its building, verification and locking are one concern.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import stat as stat_mode
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from .._io import atomic_dir, atomic_write_json, held_by, is_complete, unmark_complete, waiting_lock
from ..errors import CacheError, DataError
from .example import DEFAULT_FORMAT, Example, with_default_format
from .files import DataFile, iter_examples
from .mixture import index_dtype
from .split import split_key, split_keys

logger = logging.getLogger(__name__)

STORE_VERSION = "3"  # bump when the table layout below changes: every cached table is then read again
BATCH_ROWS = 8192  # rows per Arrow record batch while a file is read
TABLE_FILE = "examples.arrow"
SOURCE_FILE = "source.json"  # what the table was read from, for `rlora cache`
INTEGRITY_FILE = "integrity.json"  # hashes of the source's bytes and of the table's own files, written last
OWN_FILES = (TABLE_FILE, "keys.npy", "chars.npy", "tasks.npy", "tasks.json", SOURCE_FILE)
IDENTITY_FILE = "identity.json"  # identities of the source and the files as the last full check found them
HASH_CHUNK = 1 << 20
ENDS = 1 << 12  # bytes hashed at each end of the table's file for its identity (its schema; its footer, below)
ARROW_MAGIC = b"ARROW1"  # an Arrow IPC file ends with its footer, the footer's length (int32) and this
RACY_NS = 2 * 10**9  # a file changed this recently when its identity is taken gets a full check next run too

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
    """A user file's examples: a memory-mapped Arrow table in the file's order (`examples` makes the `Example`s of
    some rows), and beside it three per-row arrays, memory-mapped too (`column`: split key, task code, length in
    characters), so that the plan indexes a task's rows in them instead of passing over a column of the table."""

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


def _table_key(fingerprint: str) -> str:
    return hashlib.sha256(f"{STORE_VERSION}:{fingerprint}".encode()).hexdigest()[:32]


def load_file(spec: DataFile, cache_dir: str | os.PathLike | None = None) -> FileTable:
    """The file's table: mapped from the cache once it and its source check out (`verified_problem`), or read (and
    checked) once and cached first. A damaged or stale table is read again, with a warning."""
    root = usable_cache(cache_dir)
    stamp = spec.fingerprint()  # path, size, time and settings
    key = _table_key(stamp)
    folder = root / key
    table = _checked_table(spec, folder)
    if table is not None:
        return table
    with _building(root, key):
        table = _checked_table(spec, folder, warn=False)  # another process may have built it meanwhile
        if table is not None:
            return table
        if folder.exists():
            _discard(folder)
        for left in root.glob(f".{key}.*.tmp"):  # a build of this table that was killed: its lock is ours now
            logger.warning("removing %s, left by a build of this table that was interrupted", left)
            shutil.rmtree(left, ignore_errors=True)
        logger.info("reading %s into %s", spec.path, folder)
        source = content_hash(spec.path)
        try:
            with atomic_dir(folder, shared=True, owned=None) as tmp:
                _write_table(spec, tmp, source, stamp)
        except OSError as error:
            raise _cache_error(root, error) from None
    return FileTable(spec, folder)


def _checked_table(spec: DataFile, folder: Path, warn: bool = True) -> FileTable | None:
    """The complete table at `folder` if it and its source are what it recorded (`verified_problem`), else None (a
    warning names the problem when `warn`)."""
    if not is_complete(folder):
        return None
    problem = verified_problem(folder, spec.path)
    if problem is None:
        try:
            return FileTable(spec, folder)
        except (OSError, ValueError, pa.ArrowException) as error:
            problem = f"unreadable ({' '.join(str(error).split())})"
    if warn:
        logger.warning("data cache: %s: %s; reading %s again", folder, problem, spec.path)
    return None


def verified_problem(folder: Path, source: Path, full: bool = False) -> str | None:
    """None if the table at `folder` may be served for the file `source`, else what is wrong. Unless `full`, a table
    whose files and source have the identities recorded by its last full check passes without reading them; any
    other gets the full check (`table_problem`: every byte hashed), which, when it passes, records their identities
    (taken before hashing, so a change during the check is seen next time). A read-only cache is checked in full
    every time."""
    if not full and _unchanged(folder, source):
        return None
    identities = _identities(folder, source, racy_before=time.time_ns() - RACY_NS)
    problem = table_problem(folder, content_hash(source))
    if problem is None and identities is not None and is_complete(folder):  # not one discarded meanwhile
        with contextlib.suppress(OSError):
            atomic_write_json(folder / IDENTITY_FILE, identities)
    return problem


def _unchanged(folder: Path, source: Path) -> bool:
    try:
        recorded = json.loads((folder / IDENTITY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return recorded == _identities(folder, source)


def _identities(folder: Path, source: Path, racy_before: int | None = None) -> dict | None:
    """The identities of the table's files and of its source's file(s); None if one is missing or not a regular
    file, or (given `racy_before`, in ns) was changed at or after that moment."""
    try:
        source = Path(source).expanduser().resolve()
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        sources = {file.relative_to(source).as_posix(): _identity(file, racy_before) for file in files}
        own = {name: _identity(folder / name, racy_before, name == TABLE_FILE) for name in (*OWN_FILES, INTEGRITY_FILE)}
    except OSError:
        return None
    if None in sources.values() or None in own.values():
        return None
    return {"source": str(source), "source_files": sources, "files": own}


def _identity(path: Path, racy_before: int | None, ends: bool = False) -> dict | None:
    """A file's size, times, inode and device, and with `ends` the hash of its ends (`_ends_hash`)."""
    info = path.stat()
    if not stat_mode.S_ISREG(info.st_mode):
        return None
    if racy_before is not None and max(info.st_ctime_ns, info.st_mtime_ns) >= racy_before:
        return None
    identity = {
        "bytes": info.st_size,
        "mtime_ns": info.st_mtime_ns,
        "ctime_ns": info.st_ctime_ns,
        "inode": info.st_ino,
        "device": info.st_dev,
    }
    if ends:
        with open(path, "rb") as f:
            identity["ends"] = _ends_hash(f, info.st_size)
    return identity


def _ends_hash(f, size: int) -> str:
    """blake2b of a file's first `ENDS` bytes and of its last `ENDS`, or, for an Arrow IPC file, of its whole footer
    (where every record batch lies; 24 bytes a batch)."""
    tail = min(size, ENDS)
    f.seek(max(0, size - 4 - len(ARROW_MAGIC)))
    trailer = f.read()
    if len(trailer) == 4 + len(ARROW_MAGIC) and trailer.endswith(ARROW_MAGIC):
        tail = min(size, int.from_bytes(trailer[:4], "little") + len(trailer))
    f.seek(0)
    digest = hashlib.blake2b(f.read(ENDS), digest_size=20)
    f.seek(size - tail)
    digest.update(f.read(tail))
    return digest.hexdigest()


def table_problem(folder: Path, source: str | None) -> str | None:
    """None if the table's own files are those it recorded (size and hash) and, when `source` is given, its source's
    bytes hash to it; else what is wrong."""
    try:
        recorded = json.loads((folder / INTEGRITY_FILE).read_text(encoding="utf-8"))
        files = recorded["files"]
        if sorted(files) != sorted(OWN_FILES):
            return "damaged (its record of its files is incomplete)"
        for name in OWN_FILES:
            path = folder / name
            if not path.is_file() or path.stat().st_size != files[name]["bytes"]:
                return f"damaged ({name} is missing or has another size)"
            if content_hash(path) != files[name]["blake2b"]:
                return f"damaged ({name} is not the file it wrote)"
        if source is not None and recorded["source"] != source:
            return "stale (its source file's content changed)"
    except (OSError, ValueError, KeyError, TypeError, DataError):
        return f"damaged ({INTEGRITY_FILE} is missing or unreadable)"
    return None


def content_hash(path: Path) -> str:
    """blake2b of a file's bytes, or of a folder's files (their relative names and bytes, in name order)."""
    digest = hashlib.blake2b(digest_size=20)
    if path.exists() and not path.is_dir() and not path.is_file():  # reading a FIFO would wait for a writer
        raise DataError(f"{path}: not a regular file (a FIFO, a device or a socket); give a data file")
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file != path:
                digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            with open(file, "rb") as f:
                while chunk := f.read(HASH_CHUNK):
                    digest.update(chunk)
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error}") from None
    return digest.hexdigest()


def usable_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """The data cache folder, made if needed; a place that cannot be one is a `CacheError` naming it."""
    root = data_cache(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _cache_error(root, error) from None
    return root


def _cache_error(root: Path, error: OSError) -> CacheError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "its disk is full; free space there or"
    elif isinstance(error, (FileExistsError, NotADirectoryError)):
        why = "it is not a folder;"
    else:
        why = f"{error.strerror or error};"
    return CacheError(f"data cache {root}: cannot write ({why} set {DATA_CACHE_ENV_VAR} to a folder you can write)")


def _building_lock(root: Path, key: str) -> Path:
    return root / f".{key}.building"


@contextlib.contextmanager
def _building(root: Path, key: str) -> Iterator[None]:
    """Holds the lock of the table `key` while the block runs, waiting for another builder to finish first."""
    try:
        with waiting_lock(_building_lock(root, key), f"pid {os.getpid()} on {socket.gethostname()}"):
            yield
    except CacheError:
        raise
    except OSError as error:  # the lock's file cannot be made
        raise _cache_error(root, error) from None


def _discard(folder: Path) -> None:
    """Takes a damaged or stale table out of use (unmarked, renamed aside), then removes it."""
    unmark_complete(folder)
    aside = folder.with_name(f".{folder.name}.discarded-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _write_table(spec: DataFile, folder: Path, source: str, stamp: str) -> None:
    """Reads the file into the table at `folder`; `source` is the hash of its bytes and `stamp` its fingerprint,
    taken before: a file that changes while it is read (its fingerprint moves) is an error, not a table."""
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
    record = {"path": str(spec.path), "schema": spec.schema, "task": spec.task, "columns": spec.columns}
    record |= {"kind": spec.kind, "examples": len(keys)}
    (folder / SOURCE_FILE).write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    if spec.fingerprint() != stamp:
        raise DataError(f"{spec.path}: changed while it was read; run again once it is written")
    files = {
        name: {"bytes": (folder / name).stat().st_size, "blake2b": content_hash(folder / name)} for name in OWN_FILES
    }
    (folder / INTEGRITY_FILE).write_text(json.dumps({"source": source, "files": files}), encoding="utf-8")


@dataclass
class CachedTable:
    folder: Path
    bytes: int
    source: dict | None  # what was read (path, settings, examples); None for a folder without its record
    state: str  # "ok", "stale" (its file changed or is gone), "damaged", "partial" (a build that was cut short)
    # or "building" (another process is writing it: never removed)

    @property
    def stale(self) -> bool:
        """No run will map it again: removable."""
        return self.state in ("stale", "damaged", "partial")


def cached_tables(cache_dir: str | os.PathLike | None = None, verify: bool = False) -> list[CachedTable]:
    """The tables in the data cache (and the folders of builds under way or cut short), each with its size and
    state; every table and its source are checked as a run would (`verified_problem`), or, with `verify`, every byte
    of them is hashed."""
    root = data_cache(cache_dir)
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        if folder.name.startswith("."):  # .<key>.<random>.tmp being built, or left by a killed build
            key = folder.name[1:].split(".")[0]
            state = "building" if held_by(_building_lock(root, key)) else "partial"
            found.append(CachedTable(folder, size, None, state))
            continue
        try:
            source = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
            spec = DataFile(Path(source["path"]), source["schema"], source["task"], source["columns"], source["kind"])
        except (OSError, ValueError, KeyError, TypeError):
            found.append(CachedTable(folder, size, None, "damaged"))
            continue
        state = "ok"
        try:
            if not is_complete(folder):
                state = "partial"
            elif _table_key(spec.fingerprint()) != folder.name:
                state = "stale"
            else:
                problem = verified_problem(folder, spec.path, full=verify)
                state = "ok" if problem is None else problem.split(" ")[0]
        except DataError:  # its file is gone or unreadable
            state = "stale"
        found.append(CachedTable(folder, size, source, state))
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


class TaskData:
    """One task's examples, of one of two kinds: `ListTask` (a built-in task's list, in memory) or `TableTask` (rows
    of a file's table, mapped from disk). Indexing makes an `Example`, in formulation `default_format` unless it
    names its own (`with_default_format`): the run's formulation is resolved here, where the examples are made, and
    nowhere else. Each kind gives its length, its raw examples, their split keys and their lengths in characters."""

    name: str
    default_format: str

    def __len__(self) -> int:
        raise NotImplementedError

    def _example(self, i: int) -> Example:
        raise NotImplementedError

    def _examples(self, positions: np.ndarray) -> list[Example]:
        raise NotImplementedError

    def split_keys(self) -> np.ndarray:
        raise NotImplementedError

    def text_lengths(self, positions: np.ndarray) -> np.ndarray:
        """Characters of the prompt, answer and turns of the examples at `positions`: a length estimate that needs
        no example made (a file's are computed when it is read)."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> Example:
        return with_default_format(self._example(i), self.default_format)

    def take(self, positions: np.ndarray) -> list[Example]:
        """The examples at `positions` (indices into this task)."""
        return [with_default_format(e, self.default_format) for e in self._examples(positions)]

    def chunks(self, positions: np.ndarray, size: int = 4096) -> Iterator[list[Example]]:
        """The examples at `positions`, `size` at a time (for a pass over a large task)."""
        for start in range(0, len(positions), size):
            yield self.take(positions[start : start + size])


@dataclass
class ListTask(TaskData):
    """A task whose examples are a list in memory (a built-in task's)."""

    name: str
    examples_list: Sequence[Example]
    default_format: str = DEFAULT_FORMAT

    def __len__(self) -> int:
        return len(self.examples_list)

    def _example(self, i: int) -> Example:
        return self.examples_list[i]

    def _examples(self, positions: np.ndarray) -> list[Example]:
        return [self.examples_list[int(i)] for i in positions]

    def split_keys(self) -> np.ndarray:
        return split_keys(self.examples_list)

    def text_lengths(self, positions: np.ndarray) -> np.ndarray:
        return np.array([_chars(self.examples_list[int(i)]) for i in positions], dtype=np.int32)


@dataclass
class TableTask(TaskData):
    """A task whose examples are rows of a file's Arrow table (`FileTable`), made when read."""

    name: str
    table: FileTable
    rows: np.ndarray
    default_format: str = DEFAULT_FORMAT

    def __len__(self) -> int:
        return len(self.rows)

    def _example(self, i: int) -> Example:
        return self.table.example(self.rows[i])

    def _examples(self, positions: np.ndarray) -> list[Example]:
        return self.table.examples(self.rows[positions]) if len(positions) else []

    def split_keys(self) -> np.ndarray:
        return self.table.column("keys")[self.rows]

    def text_lengths(self, positions: np.ndarray) -> np.ndarray:
        return self.table.column("chars")[self.rows[positions]]


def file_tasks(
    specs: Sequence[DataFile],
    reserved: Sequence[str] = (),
    cache_dir: str | os.PathLike | None = None,
    default_format: str = DEFAULT_FORMAT,
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
            tasks[name] = TableTask(name, table, rows, default_format)
    return tasks
