"""The errors rlora raises for what its user can fix. They all derive from `RloraError`.

The command line prints one of these as a single line (exit code 2; 1 when training stopped); any other exception
is a bug in rlora or below it and keeps its traceback. Each type also derives from the built-in exception a library
caller would expect (`ValueError` for bad settings or data, `ImportError` for a missing package, ...).
"""


class RloraError(Exception):
    """Something the user can fix; the message says what and where."""


class ConfigError(RloraError, ValueError):
    """A configuration that cannot be used; the message names the file or field and what was expected."""


class DataError(RloraError, ValueError):
    """Task data or data settings that cannot be used: the message names the file, the line and the field, or the
    task and what was expected."""


class RunFolderError(RloraError):
    """A folder that is not a run, or not one that this command can use (not finished, or of another method)."""


class MissingPackage(RloraError, ImportError):
    """A package that ships the embedded model or data is not installed; the message gives the install command."""


class AdapterError(RloraError, ValueError):
    """A saved adapter that is not what it says: unreadable, of another type or method, or with weights that do not
    fit its model; the message names the file and the tensor or field."""


class ModelError(RloraError, OSError):
    """A model path or Hub id that cannot be loaded."""


class TrainingError(RloraError, RuntimeError):
    """Training stopped or cannot start; the message says why and what was kept."""


class CacheError(RloraError, OSError):
    """A cache folder that cannot be used (not a folder, not writable, its disk full); the message names it."""


class OutputError(RloraError, OSError):
    """A place rlora was asked to write that it may not or cannot use: outside the folder the user named, a folder
    rlora did not write (it would be replaced), not writable, or on a full disk; the message names it."""


MAX_MESSAGE = 2000  # characters of an error line: a value echoed back (an expanded YAML alias) can be megabytes


def one_line(error: Exception) -> str:
    """`error`'s message as the one line the command line prints, at most `MAX_MESSAGE` characters: the middle of a
    longer one is left out (its start says where, its end what to do), and the count of what was left out said."""
    text = " ".join(str(error).splitlines())
    if len(text) <= MAX_MESSAGE:
        return text
    head, tail = MAX_MESSAGE * 3 // 4, MAX_MESSAGE // 5
    return f"{text[:head]} ... ({len(text) - head - tail:,} characters left out) ... {text[-tail:]}"


def pickle_refusal(error: Exception) -> str:
    """Why torch's weights-only loading refused a file, in one clause: the object it would not build."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1] if lines else "")
    return (
        "refused: it holds Python objects, not only tensors (a pickle that could run code when loaded); "
        f"torch's weights-only loading says: {detail.rstrip('.')}"
    )
