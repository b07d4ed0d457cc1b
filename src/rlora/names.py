"""Names are not paths: the one rule for a name that becomes part of a file or folder name (a task, a method label,
an adapter, a file stem), and the one check every writer makes on the path it writes.

A name is refused where it is read (`name_problem` says why, the reader names the file and line), never rewritten:
a user who named a task `../victim` made a mistake that a silently changed folder name would hide. Refused:

- the empty name, `.` and `..`, and any name that starts with a dot (hidden files, and rlora's own temporary names);
- a path separator (`/`, `\\`) or a NUL byte, or any other control character (a newline splits a log line);
- more than `MAX_BYTES` bytes of UTF-8 (file systems allow 255, and rlora adds its suffixes and temporary names).

`inside(folder, name)` is the writer's side: the path `folder/name`, resolved, and refused unless it lies inside
`folder` resolved (a name that passed the rule always does; a name read from an older run folder, or a link planted
inside the folder, may not).
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from .errors import ConfigError, OutputError

MAX_BYTES = 128


def name_problem(name: object) -> str | None:
    """Why `name` cannot be part of a path, in one clause, or None when it can."""
    if not isinstance(name, str) or not name:
        return "expected a non-empty string"
    if name in (".", ".."):
        return f"{name!r} names a folder, not a name"
    if "/" in name or "\\" in name:
        return f"{_shown(name)} holds a path separator"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return f"{_shown(name)} holds a NUL byte or another control character"
    if name.startswith("."):
        return f"{_shown(name)} starts with a dot (a hidden file's name)"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        return f"{_shown(name)} is longer than {MAX_BYTES} bytes of UTF-8"
    return None


def rule() -> str:
    """The rule in a few words, for the end of an error message."""
    return f"a name is a non-empty file name: no '/', '\\', control character or leading dot, at most {MAX_BYTES} bytes"


def check_name(name: object, where: str, error: type[Exception] = ConfigError) -> str:
    """`name` when it can be part of a path, else `error` saying `where: <why>; <the rule>`."""
    problem = name_problem(name)
    if problem is not None:
        raise error(f"{where}: {problem}; {rule()}")
    return name  # type: ignore[return-value]


def inside(folder: str | Path, name: str) -> Path:
    """`folder/name` for a `name` that passes the rule, refused (`OutputError`) unless it resolves (links followed) to
    a path strictly inside `folder` resolved."""
    check_name(name, f"{folder}: name", OutputError)
    root = Path(folder).resolve()
    target = (root / name).resolve()
    if root not in target.parents:
        raise OutputError(f"{Path(folder) / name}: resolves to {target}, outside {root}; refused to write there")
    return Path(folder) / name


def _shown(name: str, limit: int = 40) -> str:
    text = repr(name)
    return text if len(text) <= limit else f"{text[: limit - 5]}...' ({len(name)} characters)"
