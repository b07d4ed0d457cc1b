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
