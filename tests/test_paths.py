"""Nothing written where it does not belong: names are not paths (`rlora.names`), every writer stays inside the folder
it was asked to write and replaces only folders rlora wrote, results are never out of step or lost to a folder that
cannot take them, and a resumed run trains on the data it started with.

Hostile names go through every command that writes (train, compare, demo, eval, analyze, export per task, the data
cache): each is one line naming the file and line, nothing is written, and a victim folder beside the output is
untouched. tests/test_bad_input.py pins each name's exact message.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from _tiny import untrained_runs, write_config

from rlora import names
from rlora._io import atomic_write_json_and_view, check_writable, writing
from rlora.cli import main
from rlora.data import schemas, store
from rlora.data.files import DataFile
from rlora.errors import MAX_MESSAGE, DataError, OutputError, one_line

HOSTILE = ["../../victim", "/tmp/victim", "..", "a\0b", ".hidden", "x" * 300]
RULE = names.rule()


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "expected a non-empty string"),
        (3, "expected a non-empty string"),
        (".", "'.' names a folder, not a name"),
        ("..", "'..' names a folder, not a name"),
        ("../../victim", "'../../victim' holds a path separator"),
        ("/tmp/victim", "'/tmp/victim' holds a path separator"),
        ("a\\b", "'a\\\\b' holds a path separator"),
        ("a\0b", "'a\\x00b' holds a NUL byte or another control character"),
        ("tab\there", "'tab\\there' holds a NUL byte or another control character"),
        (".hidden", "'.hidden' starts with a dot (a hidden file's name)"),
        ("x" * 129, f"'{'x' * 34}...' (129 characters) is longer than 128 bytes of UTF-8"),
        ("é" * 65, f"'{'é' * 34}...' (65 characters) is longer than 128 bytes of UTF-8"),  # 130 bytes
    ],
)
def test_a_name_that_is_not_a_plain_file_name_is_refused_with_why(name, why):
    assert names.name_problem(name) == why
    with pytest.raises(DataError, match="^where: " + re.escape(f"{why}; {RULE}") + "$"):
        names.check_name(name, "where", DataError)


@pytest.mark.parametrize("name", ["boolq", "arc-easy", "ARC_Challenge.v2", "a b", "tâche", "x" * 128, "é" * 64])
def test_plain_names_pass_the_rule(name):
    assert names.name_problem(name) is None


def test_inside_refuses_a_name_that_leaves_the_folder_or_a_link_that_does(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "victim").mkdir()
    out.mkdir()
    assert names.inside(out, "boolq") == out / "boolq"
    with pytest.raises(OutputError, match=r"out: name: '\.\.' names a folder"):
        names.inside(out, "..")
    with pytest.raises(OutputError, match=r"out: name: '/tmp/victim' holds a path separator"):
        names.inside(out, "/tmp/victim")
    (out / "boolq").symlink_to(tmp_path / "victim")  # a link planted in the output folder
    with pytest.raises(OutputError, match=rf"^{out}/boolq: resolves to {tmp_path}/victim, outside {out}; refused"):
        names.inside(out, "boolq")


# --- hostile task names through every command that writes ---------------------------------------------------------


@pytest.fixture(scope="module")
def runs(workspace, tmp_path_factory) -> dict[str, Path]:
    return untrained_runs(workspace, tmp_path_factory.mktemp("runs"))


def _hostile_data(tmp_path: Path, name: str) -> Path:
    """A task file whose even records (the second first) name the task `name`, the odd ones the file's own task."""
    path = tmp_path / "hostile.jsonl"
    rows = [{"prompt": f"p{i}", "answer": "a"} | ({"task": name} if i % 2 else {}) for i in range(40)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("mine")
    return victim


def _hostile_run(runs, tmp_path: Path, data: Path) -> Path:
    """A copy of the finished R-LoRA run whose config now reads `data` (the run trained before the file changed)."""
    run = tmp_path / "out" / "run"
    shutil.copytree(runs["rlora"], run)
    config = run / "config.yaml"
    text = config.read_text()
    start = text.index("jsonl:")
    end = text.index("\n", text.index("letters.jsonl", start))
    config.write_text(text[:start] + f"jsonl: [{data}]" + text[end:])
    return run


def _commands(tmp_path: Path, workspace: Path, runs, data: Path) -> dict[str, list[str]]:
    out = tmp_path / "out"
    config = write_config(workspace, out / "train")
    run = _hostile_run(runs, tmp_path, data)
    tasks = "data.tasks=[]"
    return {
        "train": ["train", str(config), f"data.jsonl=[{data}]"],
        "compare": ["compare", str(config), f"data.jsonl=[{data}]", "--seeds", "1", "--output", str(out / "cmp")],
        "demo": ["demo", tasks, f"data.jsonl=[{data}]", f"model={workspace / 'model'}", f"output_dir={out / 'demo'}"],
        "eval": ["eval", str(run)],
        "analyze": ["analyze", str(run)],
        "export-per-task": ["export", str(run), "--gates", "per-task", "--out", str(out / "exports")],
    }


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize("command", ["train", "compare", "demo", "eval", "analyze", "export-per-task"])
@pytest.mark.parametrize("name", HOSTILE, ids=["up-two", "absolute", "dot-dot", "nul", "hidden", "300-chars"])
def test_a_hostile_task_name_is_one_line_through_every_command_and_the_victim_survives(
    command, name, workspace, runs, tmp_path, capsys
):
    data = _hostile_data(tmp_path, name)
    argv = _commands(tmp_path, workspace, runs, data)[command]
    victim = _victim(tmp_path)
    before = _tree(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"rlora: error: {data}:2: field 'task': {names.name_problem(name)}; {RULE}"), err
    assert (victim / "precious.txt").read_text() == "mine"
    assert _tree(tmp_path) == before, "something was written"


def test_the_data_cache_keeps_no_table_of_a_file_with_a_hostile_task_name(tmp_path, monkeypatch):
    monkeypatch.setenv("RLORA_DATA_CACHE", str(tmp_path / "cache"))
    victim = _victim(tmp_path)
    for name in HOSTILE:
        with pytest.raises(DataError, match=r"hostile.jsonl:2: field 'task': "):
            store.load_file(DataFile(_hostile_data(tmp_path, name), schema="rlora"))
    assert list((tmp_path / "cache").iterdir()) == []  # no table, no temporary folder, no lock
    assert (victim / "precious.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["../../victim", "..", "/tmp/victim"])
def test_export_per_task_stays_inside_out_for_a_run_made_before_names_were_checked(
    name, runs, tmp_path, monkeypatch, capsys
):
    """A run whose data was read by an rlora that let any task name through (simulated: the reader's check is off)
    still exports nowhere but OUT/<task>: the writer checks its own target."""
    monkeypatch.setattr(schemas, "name_problem", lambda _name: None)
    run = _hostile_run(runs, tmp_path, _hostile_data(tmp_path, name))
    victim = _victim(tmp_path)
    before = _tree(tmp_path)
    assert main(["export", str(run), "--gates", "per-task", "--out", str(tmp_path / "exports")]) == 2
    err = capsys.readouterr().err.splitlines(keepends=True)[-1]  # after the model's loading bar: the plan needs it
    problem = names.name_problem(name)
    assert err == f"rlora: error: {tmp_path / 'exports'}: name: {problem}; {RULE}\n"
    assert (victim / "precious.txt").read_text() == "mine"
    assert _tree(tmp_path) == before, "something was written"


def test_an_export_never_replaces_a_folder_it_did_not_write(runs, tmp_path, capsys):
    victim = _victim(tmp_path)
    assert main(["export", str(runs["rlora"]), "--out", str(victim)]) == 2
    assert "exists and is not an earlier export (no gates.json)" in capsys.readouterr().err
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]


# --- results that cannot be written, or a write cut short ---------------------------------------------------------


@contextlib.contextmanager
def _mounted(where: Path, options: str) -> Path:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def _loads_no_model(monkeypatch) -> list:
    import rlora.models

    loaded = []
    real = rlora.models.load_model

    def load_model(*args, **kwargs):
        loaded.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(rlora.models, "load_model", load_model)
    return loaded


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only tmpfs needs root")
@pytest.mark.parametrize("command", ["eval", "analyze"])
def test_a_run_folder_that_cannot_be_written_is_refused_before_any_model_loads(
    command, runs, tmp_path, monkeypatch, capsys
):
    loaded = _loads_no_model(monkeypatch)
    with _mounted(tmp_path / "disk", "size=4m") as disk:
        shutil.copytree(runs["rlora"], disk / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert main([command, str(disk / "run")]) == 2
    done = "evaluated" if command == "eval" else "analyzed"
    what = "evaluate" if command == "eval" else "analyze"
    assert capsys.readouterr().err == (
        f"rlora: error: {disk / 'run'}: cannot write there (Read-only file system); nothing was {done} (its results "
        f"go there): make it writable, or {what} a copy\n"
    )
    assert loaded == []


def test_eval_on_a_full_disk_is_one_line_naming_the_folder(runs, tmp_path, monkeypatch, capsys):
    """The disk fills while the results are written (after the check, which makes an empty file only)."""
    import rlora._io

    run = tmp_path / "run"
    shutil.copytree(runs["rlora"], run)
    real = rlora._io.atomic_write_bytes

    def full(path, data):
        if Path(path).parent == run:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(rlora._io, "atomic_write_bytes", full)
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == f"rlora: error: {run}: cannot write there (the disk is full)"
    assert not (run / "eval.json").exists() and not (run / "eval.md").exists()


def test_check_writable_writes_nothing_and_names_a_full_disk(tmp_path, monkeypatch):
    check_writable(tmp_path / "not" / "yet", "x")  # the nearest folder that exists can take a file: fine
    assert list(tmp_path.iterdir()) == []  # nothing made
    real = os.statvfs(tmp_path)
    full = os.statvfs_result((*real[:4], 0, *real[5:]))  # f_bavail: no block left for a user
    monkeypatch.setattr(os, "statvfs", lambda _path: full)
    with pytest.raises(OutputError, match=rf"^{tmp_path}: cannot write there \(the disk is full\); nothing done$"):
        check_writable(tmp_path, "nothing done")
    with pytest.raises(OutputError, match=rf"^{tmp_path}: cannot write there \(the disk is full\)$"), writing(tmp_path):
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("killed_at", ["view removed", "json written"])
def test_a_kill_between_the_results_and_their_table_never_leaves_a_table_of_other_results(
    tmp_path, monkeypatch, killed_at
):
    """eval.md is rendered from eval.json: the old table goes first, then the JSON, then the table. Wherever a kill
    lands, the table on disk (if any) shows the JSON on disk."""
    import rlora._io

    atomic_write_json_and_view(tmp_path / "eval.json", {"acc": 1}, tmp_path / "eval.md", "acc 1\n")
    real_json, real_text = rlora._io.atomic_write_json, rlora._io.atomic_write_text

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    def killed_at_the_table(path, text):
        if str(path).endswith(".md"):
            raise KeyboardInterrupt
        real_text(path, text)

    if killed_at == "view removed":
        monkeypatch.setattr(rlora._io, "atomic_write_json", killed)
    else:
        monkeypatch.setattr(rlora._io, "atomic_write_text", killed_at_the_table)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json_and_view(tmp_path / "eval.json", {"acc": 2}, tmp_path / "eval.md", "acc 2\n")
    assert not (tmp_path / "eval.md").exists()
    assert json.loads((tmp_path / "eval.json").read_text()) == {"acc": 1 if killed_at == "view removed" else 2}
    monkeypatch.setattr(rlora._io, "atomic_write_json", real_json)
    monkeypatch.setattr(rlora._io, "atomic_write_text", real_text)
    atomic_write_json_and_view(tmp_path / "eval.json", {"acc": 3}, tmp_path / "eval.md", "acc 3\n")
    assert (tmp_path / "eval.md").read_text() == "acc 3\n"


# --- resuming on the data the run started with ---------------------------------------------------------------------


def test_a_resume_on_changed_task_data_is_refused_unless_the_user_accepts_it(workspace, tmp_path, capsys, caplog):
    from rlora.data.plan import plan_data
    from rlora.run import RunFolder
    from rlora.runconfig import load_run_config
    from rlora.train import DATA_FINGERPRINT_FILE

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "answer": f"{i}"}) + "\n" for i in range(12)))
    config = write_config(workspace, tmp_path / "run")
    overrides = [f"data.jsonl=[{data}]", "training.max_steps=2", "training.save_steps=1", "training.batch_size=2"]
    assert main(["train", str(config), *overrides]) == 0
    folder = RunFolder(tmp_path / "run")
    checkpoint = folder.complete_checkpoints()[-1]
    cfg = load_run_config(config, overrides)
    fingerprint = plan_data(cfg.data, cfg.seed).fingerprint()
    assert (checkpoint / DATA_FINGERPRINT_FILE).read_text() == fingerprint + "\n"
    shutil.rmtree(folder.adapter)  # as if it had stopped after its last checkpoint
    capsys.readouterr()
    with data.open("a") as f:
        f.write(json.dumps({"prompt": "say more", "answer": "more"}) + "\n")
    assert main(["train", str(config), *overrides, "--resume"]) == 2
    assert capsys.readouterr().err.endswith(
        f"rlora: error: {checkpoint}: the run's task data changed since this checkpoint was saved (a file edited, "
        "added or removed); pass --accept-changed-data to train on with the new data, or start a new run in another "
        "output_dir\n"
    )
    assert not folder.adapter.exists()
    with caplog.at_level(logging.WARNING, logger="rlora"):
        assert main(["train", str(config), *overrides, "--resume", "--accept-changed-data"]) == 0
    assert f"{checkpoint}: the run's task data changed since this checkpoint was saved; training on with the new " in (
        caplog.text
    )
    assert folder.is_finished()


# --- what a killed build leaves, and error lines of any length -----------------------------------------------------


def test_a_killed_cache_build_leaves_a_temporary_folder_that_the_next_build_removes(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RLORA_DATA_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    spec = DataFile(data, schema="rlora")
    key = store._table_key(spec.fingerprint())
    left = tmp_path / "cache" / f".{key}.k1ll3d.tmp"  # the name `atomic_dir` gives the table while it is built
    left.mkdir(parents=True)
    (left / "table.arrow").write_bytes(b"\0" * 100)
    other = tmp_path / "cache" / ".0123456789abcdef0123456789abcdef.x.tmp"  # another table's build: not ours
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="rlora"):
        assert len(store.load_file(spec)) == 1
    assert not left.exists() and other.exists()
    assert f"removing {left}, left by a build of this table that was interrupted" in caplog.text


def test_an_error_line_is_bounded_and_keeps_its_start_and_end():
    text = "where: " + "v" * 100_000 + " what to do"
    line = one_line(ValueError(text))
    assert len(line) <= MAX_MESSAGE + 40
    assert line.startswith("where: vvv") and line.endswith("vvv what to do")
    assert f"({len(text) - MAX_MESSAGE * 3 // 4 - MAX_MESSAGE // 5:,} characters left out)" in line
    assert one_line(ValueError("short\nsecond")) == "short second"


def test_a_run_folder_is_not_left_behind_by_a_start_that_fails_on_its_data(workspace, tmp_path, capsys):
    config = write_config(workspace, tmp_path / "run")
    assert main(["train", str(config), "data.max_length=1"]) == 2
    assert "the answer alone is" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]
