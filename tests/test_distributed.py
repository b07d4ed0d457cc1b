"""`rlora train` over 2 CPU processes (gloo): data-parallel, FSDP2 and DeepSpeed ZeRO-3 give the adapter of a single
process trained on the same global batches; inside the runs, ZeRO-3 holds half of every base weight per process as
the model loads and FSDP2 shards every parameter (a probe records what each process holds: `_sharding_probe.py`)."""

import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny import write_config
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlora.cli import main
from rlora.errors import RunFolderError
from rlora.models import has_cpp_compiler
from rlora.runconfig import load_run_config
from rlora.train import _deepspeed_loads_tag, check_deepspeed_checkpoint, train

# Every process draws the same batches as the single one (seeded sampler, random order: the length-grouped order is
# cut by the per-process batch size) and no dropout mask (drawn per process, it would differ from the single one's).
SAME_RUN = ["training.max_steps=3", "training.group_by_length=false", "adapter.lora_dropout=0"]
# float32 adapters after 3 AdamW steps at lr 1e-3: a process's share of the gradients is summed in another order, so
# they differ in the last bits (measured: 1e-8); a wrong batch, scale or missing reduction moves them by ~1e-3.
F32_STEPS = {"atol": 1e-6, "rtol": 0}
ZERO3 = {
    "zero_optimization": {"stage": 3},
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


PROBE = Path(__file__).with_name("_sharding_probe.py")


def two_processes(config, *overrides, timeout, probe=None):
    """`rlora train` in 2 processes; with `probe` (a folder), through `_sharding_probe.py`, which records there how
    each process holds the parameters once the base model is loaded and once training begins."""
    command = ["-m", "rlora", "train"] if probe is None else [str(PROBE)]
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + [*command, str(config), *SAME_RUN, *overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | ({"RLORA_SHARDING_PROBE": str(probe)} if probe else {}),
    )


def held(probe, when):
    """Per process (rank 0, 1), what `_sharding_probe.py` recorded: parameter name -> global and local numel, ..."""
    ranks = [json.loads((probe / f"rank{rank}-{when}.json").read_text()) for rank in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    return ranks


@pytest.fixture(scope="module")
def single(workspace, tmp_path_factory):
    """The adapter of one process trained with batch 8: the global batch of 2 processes of batch 4."""
    out = tmp_path_factory.mktemp("single") / "run"
    train(load_run_config(write_config(workspace, out), [*SAME_RUN, "training.batch_size=8"]))
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_resumes_to(config, *overrides, single):
    """Killed after step 2's checkpoint, the run resumes from it (training step 3 only) to the same adapter."""
    run = config.with_suffix("")
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints" / "checkpoint-3")
    resumed = two_processes(config, *overrides, "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_adapter(run, single)
    metrics = json.loads((run / "train_metrics.json").read_text())
    assert metrics["train_loss"] == pytest.approx(metrics["final_loss"], rel=1e-6)  # the mean loss of step 3 alone


def assert_same_adapter(run, single):
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == single.keys()
    for name, weight in single.items():
        torch.testing.assert_close(adapter[name], weight, **F32_STEPS)


def test_two_process_data_parallel_training_gives_the_single_process_adapter_and_evaluates(workspace, tmp_path, single):
    config = write_config(workspace, tmp_path / "ddp")
    result = two_processes(config, timeout=300, probe=tmp_path / "probe")
    assert result.returncode == 0, result.stderr[-3000:]
    for when in ("loaded", "training"):  # data-parallel: every process holds every parameter whole
        for params in held(tmp_path / "probe", when):
            assert all(p["local_numel"] == p["numel"] and "placements" not in p for p in params.values())
    metrics = json.loads((tmp_path / "ddp" / "train_metrics.json").read_text())
    assert metrics["global_step"] == 3
    # two processes of batch 4 make global batches of 8: the epoch count after 3 steps says so
    n_train = json.loads((tmp_path / "ddp" / "data_manifest.json").read_text())["train_examples"]
    log = [json.loads(line) for line in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()]
    last = [r for r in log if "loss" in r][-1]
    assert last["epoch"] == pytest.approx(3 / -(-n_train // 8), abs=1e-3)
    assert_same_adapter(tmp_path / "ddp", single)
    assert main(["eval", str(tmp_path / "ddp")]) == 0
    assert json.loads((tmp_path / "ddp" / "eval.json").read_text())["tasks"]["colors"]["n"] == 6


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or not has_cpp_compiler(),
    reason="deepspeed is not installed, or no C++ compiler builds its communication op on a CPU",
)
def test_zero3_over_two_processes_gathers_the_single_process_adapter_and_resumes(workspace, tmp_path, single):
    ds_config = tmp_path / "zero3.json"
    ds_config.write_text(json.dumps(ZERO3))
    config = write_config(workspace, tmp_path / "zero3")
    # the first DeepSpeed run on a machine compiles its shared-memory communication op (minutes), later ones reuse it
    result = two_processes(config, f"training.deepspeed={ds_config}", timeout=600, probe=tmp_path / "probe")
    assert result.returncode == 0, result.stderr[-3000:]
    # as the base loads (before the Trainer or DeepSpeed's engine exist), each of its weights is already split in
    # two: each process holds its half (DeepSpeed pads a partition to ceil(numel / 2)) and no whole weight
    for params in held(tmp_path / "probe", "loaded"):
        for name, p in params.items():
            assert (p["local_numel"], p["data_numel"]) == (-(-p["numel"] // 2), 0), name
    for params in held(tmp_path / "probe", "training"):  # and so they stay, adapters included, while it trains
        assert all(p["local_numel"] == -(-p["numel"] // 2) and p["data_numel"] == 0 for p in params.values())
    assert_same_adapter(tmp_path / "zero3", single)  # the shards were gathered: every weight whole, none empty
    assert_resumes_to(config, f"training.deepspeed={ds_config}", single=single)
    base = AutoModelForCausalLM.from_pretrained(workspace / "model")
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(base, tmp_path / "zero3" / "adapter"))
    assert loaded.keys() == single.keys()
    for name, weight in single.items():
        torch.testing.assert_close(loaded[name], weight, **F32_STEPS)


def test_fsdp_over_two_cpu_processes_shards_resumes_and_gives_the_single_process_adapter(workspace, tmp_path, single):
    config = write_config(workspace, tmp_path / "fsdp")
    fsdp = "training.fsdp=full_shard auto_wrap"
    result = two_processes(config, fsdp, timeout=300, probe=tmp_path / "probe")
    assert result.returncode == 0, result.stderr[-3000:]
    # training: every parameter, base and adapter, is a DTensor sharded on its first dimension, the two processes'
    # shards making the whole (torch.chunk's split: ceil(rows / 2) on the first process, the rest on the second)
    ranks = held(tmp_path / "probe", "training")
    for name, p in ranks[0].items():
        rows, per_row = p["shape"][0], p["numel"] // p["shape"][0]
        assert [r[name]["placements"] for r in ranks] == [["Shard(dim=0)"]] * 2, name
        first = -(-rows // 2) * per_row
        assert [r[name]["local_numel"] for r in ranks] == [first, p["numel"] - first], name
    assert_same_adapter(tmp_path / "fsdp", single)
    assert (tmp_path / "fsdp/checkpoints/checkpoint-2/pytorch_model_fsdp.bin").is_file()  # FSDP's, not DDP's
    assert_resumes_to(config, fsdp, single=single)


class _RunsCode:
    """Pickles to a call of os.system: what a planted file would hold (refused unrun: `true` does nothing anyway)."""

    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_a_planted_deepspeed_checkpoint_file_is_refused_before_deepspeed_unpickles_it(tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    (checkpoint / "global_step2").mkdir(parents=True)
    (checkpoint / "latest").write_text("global_step2")
    torch.save({"module": {"w": torch.zeros(2)}}, checkpoint / "global_step2" / "mp_rank_00_model_states.pt")
    assert check_deepspeed_checkpoint(checkpoint) == "global_step2"  # tensors and containers load
    torch.save({"optimizer_state_dict": _RunsCode()}, checkpoint / "global_step2" / "zero_pp_rank_0_optim_states.pt")
    with pytest.raises(pickle.UnpicklingError, match="GLOBAL posix.system"):
        check_deepspeed_checkpoint(checkpoint)


def _planted_elsewhere(tmp_path: Path) -> Path:
    """A checkpoint whose own global_step2 is whole, and a folder outside it holding a file that runs code."""
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    (checkpoint / "global_step2").mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}}, checkpoint / "global_step2" / "mp_rank_00_model_states.pt")
    (tmp_path / "elsewhere" / "global_step9").mkdir(parents=True)
    torch.save({"module": _RunsCode()}, tmp_path / "elsewhere" / "global_step9" / "mp_rank_00_model_states.pt")
    return checkpoint


@pytest.mark.parametrize(
    "latest",
    [
        "../../../elsewhere/global_step9",
        "{tmp}/elsewhere/global_step9",
        "global_step9",  # a link in the checkpoint to the folder outside
        "global_step2/../../../../elsewhere/global_step9",
        "global_step3",  # no such folder
    ],
)
def test_a_deepspeed_latest_that_points_anywhere_but_a_step_folder_of_the_checkpoint_is_refused_unread(
    tmp_path, latest
):
    """DeepSpeed would resume from whatever folder `latest` names, unpickling its files: rlora reads `latest`
    itself and refuses it before any file is loaded (the planted file would be an UnpicklingError if it were read)."""
    checkpoint = _planted_elsewhere(tmp_path)
    (checkpoint / "global_step9").symlink_to(tmp_path / "elsewhere" / "global_step9")
    tag = latest.format(tmp=tmp_path)
    (checkpoint / "latest").write_text(tag + "\n")
    expected = (
        f"{checkpoint}/latest: names {tag[:40]!r}, expected global_stepN naming a folder of the checkpoint; "
        f"remove {checkpoint} to resume from the one before"
    )
    with pytest.raises(RunFolderError) as raised:
        check_deepspeed_checkpoint(checkpoint)
    assert str(raised.value) == expected


def test_a_deepspeed_checkpoint_without_a_readable_latest_is_refused(tmp_path):
    checkpoint = _planted_elsewhere(tmp_path)
    with pytest.raises(RunFolderError, match=r"checkpoint-2/latest: cannot read DeepSpeed's checkpoint tag \(No such"):
        check_deepspeed_checkpoint(checkpoint)
    (checkpoint / "latest").write_bytes(b"global_step2\xff")
    with pytest.raises(RunFolderError, match=r"cannot read DeepSpeed's checkpoint tag \(not ASCII text\)"):
        check_deepspeed_checkpoint(checkpoint)


def test_the_trainer_resumes_deepspeed_from_the_checked_tag_it_is_given():
    """The Trainer resumes DeepSpeed through transformers' `deepspeed_load_checkpoint`, which passes no tag (DeepSpeed
    would read `latest` again); while `_deepspeed_loads_tag` holds, that call passes the checked tag explicitly."""
    import transformers.trainer as hf_trainer

    calls = []

    class Engine:
        def load_checkpoint(self, path, **kwargs):
            calls.append((path, kwargs))
            return path, {}

    original = hf_trainer.deepspeed_load_checkpoint
    with _deepspeed_loads_tag("global_step4"):
        hf_trainer.deepspeed_load_checkpoint(Engine(), "ckpt", load_module_strict=False)
    assert hf_trainer.deepspeed_load_checkpoint is original
    assert calls == [
        (
            "ckpt",
            {
                "tag": "global_step4",
                "load_module_strict": False,
                "load_optimizer_states": True,
                "load_lr_scheduler_states": True,
            },
        )
    ]
