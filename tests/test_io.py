"""Files written so that a crash never leaves a half-written one."""

import os
import re
import stat

import pytest

from rlora._io import COMPLETE_MARKER, atomic_dir, atomic_write_text, is_complete, mark_complete
from rlora.errors import OutputError


def test_atomic_writes_leave_one_whole_file_with_a_normal_mode(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "one")
    atomic_write_text(tmp_path / "a.txt", "two")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").read_text() == "two"
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~mask
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash while writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no folder, no temporary left


def test_an_atomic_folder_replaces_the_old_one_whole(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "old.txt").write_text("old")
    (tmp_path / "folder" / "mark.json").write_text("{}")  # the writer's own mark: the folder is rlora's
    with atomic_dir(tmp_path / "folder", owned="mark.json") as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "folder").iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


@pytest.mark.parametrize("kind", ["folder", "file", "link"])
def test_an_atomic_folder_never_replaces_what_rlora_did_not_write(tmp_path, kind):
    """Only an empty folder or one with the writer's mark is replaced; a user's folder or file stays, untouched, and
    nothing is built (the check comes before the block)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    target = {"folder": victim, "file": victim / "keep.txt", "link": tmp_path / "link"}[kind]
    if kind == "link":
        target.symlink_to(victim)
    why = "a folder that rlora did not write (no mark.json in it)" if kind == "folder" else "exists and is not a folder"
    refused = pytest.raises(OutputError, match=f"^{target}: {re.escape(why)}; refused to replace it")
    with refused, atomic_dir(target, owned="mark.json"):
        raise AssertionError("built in vain")
    assert (victim / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["victim"] + (["link"] if kind == "link" else []))


def test_an_empty_folder_is_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    with atomic_dir(tmp_path / "out", owned="mark.json") as tmp:
        (tmp / "mark.json").write_text("{}")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mark.json"]


def test_a_shared_folder_is_marked_complete_and_the_first_complete_one_stays(tmp_path):
    with atomic_dir(tmp_path / "cache", shared=True) as tmp:
        (tmp / "weights").write_text("first")
    assert is_complete(tmp_path / "cache")
    with atomic_dir(tmp_path / "cache", shared=True) as tmp:  # a second process that finished later
        (tmp / "weights").write_text("second")
    assert (tmp_path / "cache" / "weights").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_a_folder_written_in_place_is_complete_only_once_marked(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    assert not is_complete(tmp_path / "checkpoint-2")
    mark_complete(tmp_path / "checkpoint-2", "2\n")
    assert is_complete(tmp_path / "checkpoint-2")
    assert (tmp_path / "checkpoint-2" / COMPLETE_MARKER).read_text() == "2\n"
