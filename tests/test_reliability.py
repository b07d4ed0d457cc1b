"""Nothing read back from disk is trusted unchecked: the data cache's tables are verified against their own record
and their source's bytes, a damaged or stale one is read again (never used), and a cache that cannot be written is
one line naming it. Also: two builders of one table, and a disk that fills up."""

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlora._io import exclusive_lock
from rlora.cli import main
from rlora.data import store
from rlora.data.files import DataFile, iter_examples
from rlora.errors import CacheError


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLORA_DATA_CACHE", str(tmp_path / "cache"))


def _source(tmp_path, n=300, answer="answer") -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"question {i:03d}", "answer": f"{answer} {i:03d}"}) + "\n" for i in range(n))
    )
    return path


def _served(path, _cache) -> list:
    """The examples a run would get from the cache (`_cache`, $RLORA_DATA_CACHE, is set by the caller: named for
    the reader)."""
    table = store.load_file(DataFile(path, schema="rlora"))
    return table.examples(np.arange(len(table)))


def _fresh(path) -> list:
    return list(iter_examples(DataFile(path, schema="rlora")))


def _table(cache) -> Path:
    (folder,) = [p for p in Path(cache).iterdir() if p.is_dir() and not p.name.startswith(".")]
    return folder


def _flip_bytes(file: Path) -> None:
    data = bytearray(file.read_bytes())
    at = data.find(b"answer 000")
    assert at >= 0
    data[at : at + 6] = b"HACKED"  # same size
    file.write_bytes(bytes(data))


def _zero_keys(file: Path) -> None:
    np.save(file, np.zeros_like(np.load(file)))  # every example would fall in one split; same size


def _cut_in_half(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


DAMAGE = {
    "bytes changed in place": ("examples.arrow", _flip_bytes, "examples.arrow is not the file it wrote"),
    "keys.npy rewritten": ("keys.npy", _zero_keys, "keys.npy is not the file it wrote"),
    "table cut in half": ("examples.arrow", _cut_in_half, "examples.arrow is missing or has another size"),
    "keys.npy truncated": ("keys.npy", _cut_in_half, "keys.npy is missing or has another size"),
    "keys.npy missing": ("keys.npy", Path.unlink, "keys.npy is missing or has another size"),
    "record missing": ("integrity.json", Path.unlink, "integrity.json is missing or unreadable"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_table_is_read_again_with_a_warning_never_used(tmp_path, caplog, case):
    name, damage, problem = DAMAGE[case]
    path, cache = _source(tmp_path), tmp_path / "cache"
    assert _served(path, cache) == _fresh(path)
    folder = _table(cache)
    damage(folder / name)
    with caplog.at_level(logging.WARNING, logger="rlora"):
        assert _served(path, cache) == _fresh(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"data cache: {folder}: damaged ({problem}); reading {path} again"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlora"):
        assert _served(path, cache) == _fresh(path)  # the rebuilt table is whole: no second warning
    assert not caplog.records


def test_a_source_edited_keeping_its_size_and_time_is_read_again(tmp_path, caplog, capsys):
    path, cache = _source(tmp_path), tmp_path / "cache"
    _served(path, cache)
    stat = path.stat()
    path.write_text(path.read_text().replace('"answer ', '"ANSWER '))  # the answers' texts, same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p`, `rsync -t`, `touch -d` would
    assert path.stat().st_size == stat.st_size
    assert main(["cache"]) == 0
    assert f"{path}: stale (its file changed or is gone)" in capsys.readouterr().out
    with caplog.at_level(logging.WARNING, logger="rlora"):
        served = _served(path, cache)
    assert served == _fresh(path) and served[0].answer == "ANSWER 000"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"data cache: {_table(cache)}: stale (its source file's content changed); reading {path} again"
    ]


def test_rlora_cache_marks_damaged_tables_and_never_removes_one_being_built(tmp_path, capsys):
    path = _source(tmp_path)
    _served(path, None)
    folder = _table(tmp_path / "cache")
    _zero_keys(folder / "keys.npy")
    building = tmp_path / "cache" / f".{'0' * 32}.abc123.tmp"  # a build of another table, under way
    building.mkdir()
    (building / "examples.arrow").write_bytes(b"half")
    with exclusive_lock(tmp_path / "cache" / f".{'0' * 32}.building", "pid 1"):
        assert main(["cache", "--clear-stale"]) == 0
        out = capsys.readouterr().out
        assert f"{path}: damaged (its files are not those it wrote)" not in out  # removed: it was damaged
        assert f"{building.name}: being built by another process" in out
        assert building.is_dir() and not folder.exists()
    assert main(["cache"]) == 0  # its builder is gone (the lock is free): a build that was cut short
    assert f"{building.name}: partial (a build that was cut short)" in capsys.readouterr().out
    assert main(["cache", "--clear-stale"]) == 0
    assert not building.exists()


@pytest.mark.slow  # `rlora tasks` reads the built-in tasks first
def test_a_cache_that_is_a_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    path = _source(tmp_path)
    (tmp_path / "not-a-folder").write_text("x")
    monkeypatch.setenv("RLORA_DATA_CACHE", str(tmp_path / "not-a-folder"))
    with pytest.raises(CacheError, match=r"^data cache .*not-a-folder: cannot write \(it is not a folder; set"):
        _served(path, None)
    assert main(["tasks", "--data", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"rlora: error: data cache {tmp_path / 'not-a-folder'}: cannot write (it is not a folder; set "
        "RLORA_DATA_CACHE to a folder you can write)\n"
    )


_BUILD = """
import sys
from rlora.data import store
from rlora.data.files import DataFile
table = store.load_file(DataFile(sys.argv[1], schema="rlora"))
print(len(table), table.example(len(table) - 1).answer)
"""


def test_two_processes_building_one_table_agree_and_leave_one_table(tmp_path):
    path, cache = _source(tmp_path, n=20000), tmp_path / "cache"
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUILD, str(path)], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == ["20000 answer 19999\n"] * 2
    assert [p.name for p in cache.iterdir()] == [_table(cache).name]  # no temporary folder or lock left
    assert store.table_problem(_table(cache), store.content_hash(path)) is None


@contextlib.contextmanager
def _small_disk(where: Path, size: str):
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_under_the_data_cache_is_one_line_and_leaves_nothing_trusted(tmp_path, monkeypatch):
    path = _source(tmp_path, n=20000)
    with _small_disk(tmp_path / "disk", "256k") as disk:
        monkeypatch.setenv("RLORA_DATA_CACHE", str(disk))
        with pytest.raises(CacheError, match=rf"^data cache {disk}: cannot write \(its disk is full; free space"):
            _served(path, disk)
        assert [p.name for p in disk.iterdir()] == []  # the partial build is gone, nothing left to trust


def test_an_alias_bomb_is_refused_with_memory_flat(tmp_path):
    import tracemalloc

    from rlora.errors import ConfigError
    from rlora.runconfig import load_run_config

    levels = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)
    )
    config = tmp_path / "bomb.yaml"
    config.write_text(levels + "training: *a9\n")
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="refused: a YAML document with aliases that expand past 100,000"):
            load_run_config(config)
        with pytest.raises(ConfigError, match="override seed: refused: a YAML value with aliases"):
            load_run_config(None, ["seed={" + levels.replace("\n", ", ") + "b: *a9}"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000  # 9**9 values would take gigabytes; the node graph of 10 lines takes kilobytes


def test_a_start_that_saved_nothing_does_not_block_the_corrected_config(workspace, tmp_path, monkeypatch):
    import transformers
    from _tiny import write_config

    from rlora.run import RunFolder
    from rlora.runconfig import load_run_config
    from rlora.train import train

    def stops(_self, *args, **kwargs):
        raise KeyboardInterrupt  # stopped before the first step, after the run's start was written

    monkeypatch.setattr(transformers.Trainer, "train", stops)
    with pytest.raises(KeyboardInterrupt):
        train(load_run_config(write_config(workspace, tmp_path / "run"), ["training.lr=5e-3"]))
    folder = RunFolder(tmp_path / "run")
    assert folder.config.is_file() and folder.adapter_init.is_dir() and folder.saved_nothing()
    monkeypatch.undo()
    fixed = load_run_config(write_config(workspace, tmp_path / "run"), ["training.max_steps=2"])
    train(fixed)
    assert folder.same_config(fixed) and folder.is_finished()
    assert not folder.saved_nothing()  # now it holds a finished run: another config is refused again
    with pytest.raises(ValueError, match="was made with a different config"):
        folder.check_config(load_run_config(write_config(workspace, tmp_path / "run")), restart=True)


def test_a_run_is_the_same_however_its_folder_is_spelled(workspace, tmp_path, monkeypatch):
    from _tiny import write_config

    from rlora.run import RunFolder
    from rlora.runconfig import load_run_config

    config = write_config(workspace, tmp_path / "x")
    monkeypatch.chdir(tmp_path)
    relative = load_run_config(config, ["output_dir=runs/a"])
    RunFolder("runs/a").write_config(relative)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # --resume from another folder, naming the run absolutely
    absolute = load_run_config(config, [f"output_dir={tmp_path / 'runs' / 'a'}"])
    assert RunFolder(absolute.output_dir).same_config(absolute)
    monkeypatch.chdir(tmp_path)
    assert not RunFolder(absolute.output_dir).same_config(load_run_config(config, ["output_dir=runs/a", "seed=1"]))


def test_a_damaged_results_file_is_named_and_evaluated_again(tmp_path, caplog):
    from rlora.run import RunFolder

    folder = RunFolder(tmp_path)
    for text, problem in [('{"tasks": {"a"', "not readable JSON"), ("[1, 2]", "not rlora's results")]:
        folder.results().write_text(text)
        with caplog.at_level(logging.WARNING, logger="rlora"):
            assert folder.read_results() is None
        assert caplog.records[-1].getMessage().startswith(f"{folder.results()}: {problem}")
        assert caplog.records[-1].getMessage().endswith("; evaluating the run again")


def test_a_conversion_killed_midway_leaves_nothing_the_next_one_does_not_remove(tmp_path, monkeypatch, caplog):
    from rlora import models

    def convert(_gguf, folder):
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_gguf_to_safetensors", convert)
    left = tmp_path / "models" / f".{models.DEFAULT_MODEL}.k1ll3d.tmp"  # what a killed conversion leaves
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"\0" * 1000)
    with caplog.at_level(logging.WARNING, logger="rlora"):
        target = models.resolve_model(models.DEFAULT_MODEL, tmp_path)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [models.DEFAULT_MODEL]
    assert (Path(target) / "config.json").is_file()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"removing {left}, left by a conversion that was interrupted"
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_under_the_run_folder_stops_training_in_one_line_keeping_what_is_whole(workspace, tmp_path):
    from _tiny import write_config

    from rlora.run import checkpoint_problem, complete_checkpoints
    from rlora.runconfig import load_run_config

    with _small_disk(tmp_path / "disk", "1m") as disk:  # a few checkpoints of the tiny run fit, not 40
        config = write_config(workspace, disk / "run")
        overrides = ["training.max_steps=40", "training.save_steps=1", "training.save_total_limit=100"]
        result = subprocess.run(
            [sys.executable, "-m", "rlora", "train", str(config), *overrides],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 1, result.stderr[-2000:]
        assert "Traceback" not in result.stderr, result.stderr[-2500:]
        lines = [line[line.index("rlora: ") :] for line in result.stderr.splitlines() if "rlora: " in line]
        assert len(lines) == 1, result.stderr[-3000:]  # (after a progress bar's carriage return)
        line = lines[0]
        assert line.startswith(f"rlora: training stopped: {disk / 'run'}: the disk is full; training stopped, "), line
        cfg = load_run_config(config, overrides)
        complete = complete_checkpoints(disk / "run" / "checkpoints")
        assert complete and line.endswith(
            f"the last complete checkpoint is {complete[-1]}. Free space there, then rerun with --resume"
        )
        for checkpoint in complete:  # whatever is marked complete is whole
            assert checkpoint_problem(checkpoint, cfg) is None
