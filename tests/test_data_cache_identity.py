"""The data cache's integrity at a cost that does not grow with the data: once a full check (every byte hashed) has
passed, a run compares the identities of the table's files and its source (size, times, inode, the hash of each
file's ends) and reads nothing else; any write changes a file's change time, so an edit that restores the size and
the modification time still gets the full check and is never served. `rlora cache --verify` hashes everything."""

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from rlora.cli import main
from rlora.data import store
from rlora.data.files import DataFile, iter_examples

RACY_NS = 50_000_000  # the tests wait this long (x2) after a write, instead of the default 2 s, before a full check


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLORA_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(store, "RACY_NS", RACY_NS)


def _source(tmp_path, n=300) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"question {i:04d}", "answer": f"answer {i:04d}"}) + "\n" for i in range(n))
    )
    return path


def _served(path) -> list:
    table = store.load_file(DataFile(path, schema="rlora"))
    return table.examples(np.arange(len(table)))


def _fresh(path) -> list:
    return list(iter_examples(DataFile(path, schema="rlora")))


def _table() -> Path:
    (folder,) = [p for p in Path(os.environ["RLORA_DATA_CACHE"]).iterdir() if p.is_dir() and not p.name.startswith(".")]
    return folder


def _settle() -> None:
    """Waits until the files written so far are older than the racy window."""
    time.sleep(2 * RACY_NS / 1e9)


def _fully_checked(path) -> Path:
    """A table of `path` built, then fully checked once its files are old enough: its identities are recorded."""
    _served(path)
    assert not (_table() / store.IDENTITY_FILE).exists()  # just written: racy, not trusted by identity yet
    _settle()
    assert _served(path) == _fresh(path)
    assert (_table() / store.IDENTITY_FILE).is_file()
    return _table()


@pytest.fixture
def hashes(monkeypatch):
    """The paths `content_hash` reads, in order (a warm start reads none)."""
    calls = []
    real = store.content_hash
    monkeypatch.setattr(store, "content_hash", lambda path: calls.append(Path(path).name) or real(path))
    return calls


def _rewrite_keeping_size_and_mtime(file: Path, old: bytes, new: bytes) -> None:
    before = file.stat()
    data = file.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1
    file.write_bytes(data.replace(old, new))
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `cp -p`, `rsync -t`, `touch -d` would
    after = file.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert after.st_ctime_ns != before.st_ctime_ns  # the one thing the writer cannot set back


def test_a_warm_start_hashes_nothing_once_a_full_check_has_passed(tmp_path, hashes):
    path = _source(tmp_path)
    _fully_checked(path)
    assert hashes == ["qa.jsonl", *store.OWN_FILES] * 2  # the build's hashes, then the full check's
    hashes.clear()
    assert _served(path) == _fresh(path)
    assert hashes == []


def test_a_table_altered_in_place_with_its_size_and_mtime_restored_is_refused(tmp_path, caplog, hashes):
    path = _source(tmp_path, n=20000)
    folder = _fully_checked(path)
    table = folder / store.TABLE_FILE
    at = table.read_bytes().find(b"answer 9000")
    assert store.ENDS < at < table.stat().st_size - store.ENDS  # outside the hashed ends: only the change time tells
    _rewrite_keeping_size_and_mtime(table, b"answer 9000", b"HACKED 9000")
    hashes.clear()
    with caplog.at_level(logging.WARNING, logger="rlora"):
        served = _served(path)
    assert served == _fresh(path) and served[9000].answer == "answer 9000"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"data cache: {folder}: damaged (examples.arrow is not the file it wrote); reading {path} again"
    ]
    assert hashes[:2] == ["qa.jsonl", "examples.arrow"]  # the identity failed: the full check found the damage


def test_a_source_edited_in_place_with_its_size_and_mtime_restored_is_read_again(tmp_path, caplog):
    path = _source(tmp_path)
    folder = _fully_checked(path)
    _rewrite_keeping_size_and_mtime(path, b'"answer 0007"', b'"ANSWER 0007"')
    with caplog.at_level(logging.WARNING, logger="rlora"):
        served = _served(path)
    assert served == _fresh(path) and served[7].answer == "ANSWER 0007"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"data cache: {folder}: stale (its source file's content changed); reading {path} again"
    ]


def test_a_touched_table_passes_the_full_check_and_its_new_identity_is_recorded(tmp_path, caplog, hashes):
    path = _source(tmp_path)
    folder = _fully_checked(path)
    os.chmod(folder / "keys.npy", 0o644)  # a change of its metadata only (its change time moves)
    _settle()
    hashes.clear()
    with caplog.at_level(logging.WARNING, logger="rlora"):
        assert _served(path) == _fresh(path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert hashes == ["qa.jsonl", *store.OWN_FILES]  # the full check, and no build
    hashes.clear()
    assert _served(path) == _fresh(path)
    assert hashes == []


def test_a_changed_file_end_fails_the_identity_even_with_its_stat_recorded_again(tmp_path):
    """The hash of the ends (an Arrow file's footer) is part of the identity: a table whose recorded stat was made to
    match again (as a restore of the whole folder with its record could) still gets the full check."""
    path = _source(tmp_path)
    folder = _fully_checked(path)
    table = folder / store.TABLE_FILE
    data = bytearray(table.read_bytes())
    data[-12] ^= 0xFF  # inside the footer
    table.write_bytes(bytes(data))
    record = json.loads((folder / store.IDENTITY_FILE).read_text())
    info = table.stat()
    record["files"][store.TABLE_FILE] |= {"mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns}
    (folder / store.IDENTITY_FILE).write_text(json.dumps(record))
    assert store.verified_problem(folder, path) == "damaged (examples.arrow is not the file it wrote)"


def test_rlora_cache_verify_finds_a_flipped_byte_that_identity_cannot_see(tmp_path, capsys):
    """A byte changed below the file system (bit rot on disk) moves no time: a run and `rlora cache` trust the
    identity; `--verify` hashes every byte, marks the table damaged, and `--clear-stale` then removes it."""
    path = _source(tmp_path, n=20000)
    folder = _fully_checked(path)
    table = folder / store.TABLE_FILE
    data = bytearray(table.read_bytes())
    at = data.find(b"answer 9000")
    assert store.ENDS < at < len(data) - store.ENDS  # in the middle: outside the hashed ends
    data[at] ^= 0x01
    table.write_bytes(bytes(data))
    record = json.loads((folder / store.IDENTITY_FILE).read_text())
    info = table.stat()
    record["files"][store.TABLE_FILE] |= {"mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns}
    (folder / store.IDENTITY_FILE).write_text(json.dumps(record))  # what the file system shows is as recorded
    assert main(["cache"]) == 0
    assert f"{path}: 20000 examples" in capsys.readouterr().out
    assert main(["cache", "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"{path}: damaged (its files are not those it wrote)" in out
    assert out.endswith(
        "1 tables, %.1f MB; every byte verified\nrlora cache --clear-stale removes the stale, "
        "damaged and partial ones\n" % (sum(f.stat().st_size for f in folder.iterdir()) / 1e6)
    )
    assert main(["cache", "--verify", "--clear-stale"]) == 0
    assert not folder.exists()
    assert _served(path) == _fresh(path)


def test_rlora_cache_verify_passes_a_whole_table(tmp_path, capsys, hashes):
    path = _source(tmp_path)
    _fully_checked(path)
    hashes.clear()
    assert main(["cache", "--verify"]) == 0
    assert f"{path}: 300 examples" in capsys.readouterr().out
    assert hashes == ["qa.jsonl", *store.OWN_FILES]


def test_a_cache_that_cannot_record_identities_is_checked_in_full_every_time(tmp_path, monkeypatch, hashes):
    path = _source(tmp_path)
    _served(path)
    _settle()

    def read_only(*_):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(store, "atomic_write_json", read_only)
    for _ in range(2):
        hashes.clear()
        assert _served(path) == _fresh(path)
        assert hashes == ["qa.jsonl", *store.OWN_FILES]
    assert not (_table() / store.IDENTITY_FILE).exists()


def test_files_changed_within_the_racy_window_are_not_trusted_by_identity(tmp_path, monkeypatch, hashes):
    """A file written moments before its identity is taken could be written again within the same tick of a coarse
    clock, keeping its times: its identity is not recorded, and the next run checks it in full again."""
    monkeypatch.setattr(store, "RACY_NS", 3600 * 10**9)  # everything written in the last hour is recent
    path = _source(tmp_path)
    _served(path)
    for _ in range(2):
        hashes.clear()
        assert _served(path) == _fresh(path)
        assert hashes == ["qa.jsonl", *store.OWN_FILES]
    assert not (_table() / store.IDENTITY_FILE).exists()
