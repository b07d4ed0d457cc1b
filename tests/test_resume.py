"""Resuming is exact wherever a run stopped, and no moment of a run leaves it without a complete checkpoint."""

import shutil

import pytest
import torch
import transformers
from _tiny import write_config
from safetensors.torch import load_file

from rlora.run import RunFolder
from rlora.runconfig import load_run_config
from rlora.train import complete_checkpoints, train

# 3 epochs of a tiny task, one checkpoint a step (all kept), with the default length-grouped order
THREE_EPOCHS = ["training.max_steps=-1", "training.epochs=3", "training.save_steps=1", "training.save_total_limit=100"]
THREE_EPOCHS += ["training.batch_size=8"]


def _adapter(run) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow  # 4 trainings with a checkpoint a step: ~20 s idle
def test_resuming_from_a_checkpoint_in_any_epoch_trains_the_uninterrupted_adapter_bitwise(workspace, tmp_path):
    one_task = [f"data.jsonl=[{workspace / 'colors.jsonl'}]"]
    cfg = load_run_config(write_config(workspace, tmp_path / "whole"), THREE_EPOCHS + one_task)
    whole = train(cfg)
    steps = len(complete_checkpoints(whole / "checkpoints"))
    per_epoch = steps // 3
    assert steps == 3 * per_epoch and per_epoch >= 3
    expected = _adapter(whole)
    for step in (1, per_epoch + 1, 3 * per_epoch - 1):  # in epochs 1, 2 and 3
        out = tmp_path / f"from-{step}"
        shutil.copytree(whole, out)
        shutil.rmtree(out / "adapter")
        for checkpoint in complete_checkpoints(out / "checkpoints"):
            if int(checkpoint.name.split("-")[1]) > step:
                shutil.rmtree(checkpoint)
        resumed_cfg = load_run_config(write_config(workspace, out), THREE_EPOCHS + one_task)
        RunFolder(out).write_config(resumed_cfg)  # the copy's own output_dir
        torch.manual_seed(1000 + step)  # another global generator state than the uninterrupted run's
        train(resumed_cfg, resume=True)
        got = _adapter(out)
        # Bitwise, legitimately: the same process, machine, ops and data order on both sides, and the Trainer
        # restores the optimizer, scheduler and RNG states from the checkpoint, so every step computes the same
        # floats in the same order; any difference is a different example order or a lost state, not rounding.
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), f"resumed from step {step}"


def test_a_checkpoint_is_complete_before_the_one_before_it_is_removed(workspace, tmp_path, monkeypatch):
    seen = []  # after each checkpoint write, before rlora's own callback: what a kill there would leave
    save = transformers.Trainer._save_checkpoint

    def recording(self, model, trial):
        save(self, model, trial)
        seen.append([p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")])

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", recording)
    cfg = load_run_config(write_config(workspace, tmp_path / "run"), ["training.save_total_limit=1"])
    run = train(cfg)
    assert seen == [[], ["checkpoint-2"], ["checkpoint-4"]]  # checkpoints at steps 2, 4, 6 (max_steps 6)
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["checkpoint-6"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-6"]


@pytest.mark.slow  # two short trainings in fresh processes: ~30 s idle
def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_adapter_bitwise(workspace, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    one_task = [f"data.jsonl=[{workspace / 'colors.jsonl'}]", "training.max_steps=-1", "training.epochs=2"]
    one_task += ["training.batch_size=8", "training.save_steps=2", "training.save_total_limit=1"]

    def train_cli(out):
        config = write_config(workspace, out)
        return [sys.executable, "-m", "rlora", "train", str(config), *one_task]

    whole = subprocess.run(train_cli(tmp_path / "whole"), capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = subprocess.Popen(train_cli(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and killed.poll() is None:
        done = complete_checkpoints(checkpoints)
        if done and int(done[-1].name.split("-")[1]) >= 6:  # past the first epoch (5 steps of 8 from 34 examples)
            break
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "adapter").exists(), "the run ended before the kill"
    resumed = subprocess.run([*train_cli(tmp_path / "killed"), "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got, expected = _adapter(tmp_path / "killed"), _adapter(tmp_path / "whole")
    # bitwise: same machine, same kind of process, same ops and order (see the test above)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
