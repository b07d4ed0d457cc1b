"""Files written so that a crash never leaves a half-written one."""

import os
import stat

import pytest

from rlora._io import atomic_dir, atomic_write_text


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
