"""Writing files and folders so that a crash never leaves a half-written one behind: the one protocol rlora uses.

- A file is written to a temporary name beside it, flushed to disk and renamed over it (`atomic_write_*`).
- A folder is built under a temporary name beside it and renamed into place in one step (`atomic_dir`, or
  `publish_dir` for a folder that several processes wrote together): a reader sees the old folder or the new one,
  never a mix. The old folder is replaced only when it is rlora's: empty, or holding the file that the writer names
  as its mark (`owned`: the complete marker by default, an export's gates.json, ...); any other folder there is the
  user's, and the write is refused (`OutputError`) with nothing removed.
- A folder that is shared by processes that may race to build it (the converted model cache) is also marked
  complete (`COMPLETE_MARKER`) before it moves into place; the first complete one stays.
- A folder that another library writes in place (the Trainer's checkpoints) is marked complete once it is fully
  written (`mark_complete`); readers trust only the marked ones (`is_complete`).
- A folder that one process at a time may write (a run) has a lock file while its writer holds it
  (`exclusive_lock`), naming that writer. The lock is the OS's (flock): it goes when its process ends, however it
  ends, so a killed writer never leaves the folder locked (its file stays behind, unlocked, for the next writer to
  take over). It is the one file written in place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import OutputError

COMPLETE_MARKER = ".rlora-complete"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, flushes it to disk, then renames it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_write_json_and_view(path: str | Path, data: Any, view: str | Path, text: str) -> None:
    """`data` as JSON at `path` and `text`, its rendering, at `view` (eval.json and eval.md): the old view is removed
    first, then the JSON written, then the view. A kill at any point leaves a view of the same data as the JSON, or
    none (render it again from the JSON), never a view of other data."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(view)
    atomic_write_json(path, data)
    atomic_write_text(view, text)


def check_writable(folder: str | Path, what: str) -> None:
    """Refuses (`OutputError`) a folder that cannot take a file, before the work whose results go there: on a
    read-only file system, without write permission, or on a full disk (in the nearest folder that exists, for one
    not made yet). It writes nothing. `what` ends the message (what was not done). A file in the folder's place is
    left to the code that makes it."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return  # a file in the way: what makes the folder says so, naming it
    try:
        disk = os.statvfs(existing)
    except OSError as error:
        raise OutputError(f"{output_problem(folder, error)}; {what}") from None
    if disk.f_flag & os.ST_RDONLY:
        code = errno.EROFS
    elif not os.access(existing, os.W_OK | os.X_OK):
        code = errno.EACCES
    elif disk.f_bavail == 0:
        code = errno.ENOSPC
    else:
        return
    raise OutputError(f"{output_problem(folder, OSError(code, os.strerror(code)))}; {what}")


@contextlib.contextmanager
def writing(folder: str | Path) -> Iterator[None]:
    """Turns a failure to write into `folder` (a full disk, a read-only file system, no permission) into one line
    naming it (`OutputError`) instead of a traceback."""
    try:
        yield
    except OSError as error:
        if isinstance(error, OutputError) or error.errno not in WRITE_ERRNOS:
            raise
        raise OutputError(output_problem(Path(folder), error)) from None


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR)


def output_problem(folder: Path, error: OSError) -> str:
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    return f"{folder}: cannot write there ({'the disk is full' if full else error.strerror or error})"


def mark_complete(folder: str | Path, note: str = "") -> None:
    atomic_write_text(Path(folder) / COMPLETE_MARKER, note)


def unmark_complete(folder: str | Path) -> None:
    """Takes the mark off (before a complete folder is removed: a removal cut short leaves an unmarked one)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path(folder) / COMPLETE_MARKER)


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, shared: bool = False, owned: str | None = COMPLETE_MARKER) -> Iterator[Path]:
    """Yields a new temporary folder beside `path`; on success it replaces `path` in one rename, on error it is
    removed. With `shared`, the folder is marked complete first, and a complete folder that another process put at
    `path` meanwhile is kept (ours is dropped). A folder at `path` is replaced only when it is rlora's (see
    `publish_dir`); that is checked before the block runs too, so that nothing is built in vain."""
    path = Path(path)
    check_replaceable(path, owned)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; give it a normal folder's mode
    try:
        yield tmp
        if shared:
            mark_complete(tmp)
        publish_dir(tmp, path, keep_complete=shared, owned=owned)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def check_replaceable(path: Path, owned: str | None) -> None:
    """Refuses (`OutputError`) a `path` that holds something rlora may not replace: a file, or a folder that is not
    empty and lacks the file `owned` (with `owned` None, a folder of rlora's own tree: anything there is rlora's)."""
    if owned is None:
        return
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputError(f"{path}: exists and is not a folder; refused to replace it (choose another place)")
    if not path.is_dir() or (path / owned).is_file() or not any(path.iterdir()):
        return
    raise OutputError(
        f"{path}: a folder that rlora did not write (no {owned} in it); refused to replace it (choose another place)"
    )


def publish_dir(tmp: str | Path, path: str | Path, *, keep_complete: bool = False, owned: str | None = None) -> None:
    """Moves the finished folder `tmp` to `path` in one rename; a folder already at `path` is replaced, unless it
    is complete and `keep_complete` is set (then `tmp` is left for the caller to remove). With `owned`, only a folder
    that is empty or holds the file `owned` is replaced; anything else is refused (`check_replaceable`)."""
    tmp, path = Path(tmp), Path(path)
    if keep_complete and is_complete(path):
        return
    check_replaceable(path, owned)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(tmp, path)
    except OSError:
        if not (keep_complete and is_complete(path)):  # another process finished first: keep theirs
            raise


class Busy(Exception):
    """Another process holds the lock; `holder` is what it wrote in the lock file."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


@contextlib.contextmanager
def exclusive_lock(path: str | Path, holder: str) -> Iterator[None]:
    """Holds an exclusive lock on the file `path` while the block runs, with `holder` written in it, and removes the
    file after; raises `Busy` at once, naming the holder, when another process has it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise Busy(text) from None
        if _is_file_at(fd, path):
            break
        os.close(fd)  # its holder removed it between our open and our lock: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode() + b"\n", 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still locked: the next writer makes a new file
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def waiting_lock(path: str | Path, holder: str, poll_s: float = 0.1) -> Iterator[None]:
    """`exclusive_lock`, waiting while another process holds it (one builder of a shared folder at a time: the
    others wait, then find its result)."""
    while True:
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(exclusive_lock(path, holder))
            except Busy:
                time.sleep(poll_s)
                continue
            yield
            return


def _is_file_at(fd: int, path: str | Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def held_by(path: str | Path) -> str | None:
    """What the holder of the lock `path` wrote in it while another process holds it, else None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # none, or not ours to read: taking the lock will say
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
