"""Bad input, one table: every kind of input a user can get wrong (the run config, overrides, JSONL data, run folders,
adapter folders, the Python API), with the exact error it gives.

A command prints one line on stderr and exits non-zero (no traceback, never silent), writes nothing and loads no
model, except where the fault can only show against the model (an adapter tensor of the wrong shape). The lock that
keeps a run folder to one writer, and how a killed writer releases it, is tested at the end.

Long on purpose: one table of cases, so that every message a user can see is found in one place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import huggingface_hub
import pytest
import torch
from _reference import read_jsonl_tasks
from _tiny import untrained_runs, write_config
from huggingface_hub.errors import RepositoryNotFoundError
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import rlora.models
import rlora.train
from rlora import load_adapter
from rlora._io import mark_complete
from rlora.cli import main
from rlora.errors import AdapterError, ConfigError, DataError, ModelError, RunFolderError
from rlora.run import RunFolder, load_run
from rlora.runconfig import load_run_config
from rlora.train import DATA_FINGERPRINT_FILE, train

RLORA_A = "base_model.model.model.layers.0.mlp.up_proj.rlora_A"  # (r=4, d_in=32) in the tiny model
MODELS = (
    "give an embedded model (smollm2-135m: converted once, on first use), a local model folder (config.json and "
    "weights, as save_pretrained writes them) or a Hugging Face Hub id (org/name)"
)


@pytest.fixture(scope="module")
def runs(workspace, tmp_path_factory) -> dict[str, Path]:
    """A finished run folder of each kind (R-LoRA, plain LoRA), made without training: config, moved adapter, init."""
    return untrained_runs(workspace, tmp_path_factory.mktemp("runs"))


@dataclass
class Ctx:
    """What a case builds its input with; everything it writes goes under `tmp`."""

    ws: Path
    tmp: Path
    runs: dict[str, Path]

    @property
    def config(self) -> str:
        return str(write_config(self.ws, self.tmp / "run"))

    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def jsonl(self, line: str) -> str:
        """A task file whose second line is `line` (the first is fine)."""
        return "data.jsonl=[" + self.file("data.jsonl", '{"prompt": "p", "answer": "a"}\n' + line + "\n") + "]"

    def run(self, method: str = "rlora", edit: Callable[[Path], object] | None = None) -> str:
        """A copy of a finished run of `method`, changed by `edit(run_folder)`."""
        path = self.tmp / "run"
        shutil.copytree(self.runs[method], path)
        if edit is not None:
            edit(path)
        return str(path)


def _edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    file.write_text(json.dumps(data | changes))


def _edit_tensors(file: Path, change: Callable[[dict], None]) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file)


def _truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def _adapter(run: Path) -> Path:
    return run / "adapter"


def _broken_model(c: Ctx) -> str:
    """A model folder whose weights file was cut short."""
    shutil.copytree(c.ws / "model", c.tmp / "model")
    _truncate(c.tmp / "model" / "model.safetensors")
    return str(c.tmp / "model")


def _unfinished_run(c: Ctx, damage: Callable[[Path], object]) -> list[str]:
    """`rlora train CONFIG --resume` on a run that stopped after its checkpoint-2, which `damage` then changed."""
    run = Path(c.run())
    RunFolder(run).write_config(load_run_config(c.config))  # the run of this config, in this folder
    checkpoint = run / "checkpoints" / "checkpoint-2"
    shutil.copytree(run / "adapter", checkpoint)
    shutil.rmtree(run / "adapter")
    (checkpoint / "trainer_state.json").write_text("{}")
    torch.save({"state": {}, "param_groups": []}, checkpoint / "optimizer.pt")
    mark_complete(checkpoint)
    damage(checkpoint)
    return ["train", c.config, "--resume"]


@dataclass
class Case:
    id: str
    argv: Callable[[Ctx], list[str]]
    error: str  # the whole stderr line after "rlora: error: "; {tmp} and {ws} are the case's folders, ... any text
    code: int = 2
    loads_model: bool = False  # the fault can only show against the loaded model
    rewrites_run: bool = False  # a resume that the Trainer refuses has rewritten the run's config and manifest (same)
    hub: Callable | None = field(default=None, repr=False)  # what asking the Hub about a model does
    slow: bool = False  # reads the built-in data


# 9 anchors, each a list of 9 aliases of the one before: 9**9 values once expanded, in 10 short lines
_ALIAS_BOMB = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)
)


# 4 anchors of 9 aliases each inside one key: under the 100,000-value cap, 946 KB once printed
_LONG_ALIAS = (
    "seed:\n  a0: &a0 ["
    + ", ".join(["xxxxxxxxxx"] * 9)
    + "]\n"
    + "".join(f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 4))
    + f"  a4: [{', '.join(['*a3'] * 9)}]\n"
)
NAME_RULE = "a name is a non-empty file name: no '/', '\\', control character or leading dot, at most 128 bytes"
HOSTILE_NAMES = [  # (label, name, why it is refused)
    ("up-two-folders", "../../victim", "'../../victim' holds a path separator"),
    ("absolute", "/tmp/victim", "'/tmp/victim' holds a path separator"),
    ("dot-dot", "..", "'..' names a folder, not a name"),
    ("nul", "a\0b", "'a\\x00b' holds a NUL byte or another control character"),
    ("newline", "a\nb", "'a\\nb' holds a NUL byte or another control character"),
    ("hidden", ".hidden", "'.hidden' starts with a dot (a hidden file's name)"),
    ("backslash", "a\\b", "'a\\\\b' holds a path separator"),
    (
        "too-long",
        "x" * 300,
        "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...' (300 characters) is longer than 128 bytes of UTF-8",
    ),
]


def _files_override(c: Ctx, record: str, settings: str) -> list[str]:
    """`rlora train` on one data file of two copies of `record`, read with `settings` (a data.files entry's keys)."""
    path = c.file("d.jsonl", f"{record}\n{record}\n")
    return ["train", c.config, "data.jsonl=[]", f"data.files=[{{path: {path}, {settings}}}]"]


class _RunsCode:
    """Pickles to a call of os.system: what a planted file would hold (refused unrun: `true` does nothing anyway)."""

    def __reduce__(self):
        return (os.system, ("true",))


def _planted_optimizer(checkpoint: Path) -> None:
    """A checkpoint whose trainer state is whole and whose optimizer file holds more than tensors."""
    from transformers import TrainerState

    TrainerState(global_step=2, max_steps=6, train_batch_size=4, logging_steps=1, save_steps=2).save_to_json(
        str(checkpoint / "trainer_state.json")
    )
    for name in ("optimizer.pt", "scheduler.pt"):  # the Trainer loads them together
        torch.save({"state": _RunsCode()}, checkpoint / name)


def _saved_dataset(c: Ctx, state: str) -> str:
    """A folder like datasets' save_to_disk writes, with `state` as its state.json."""
    c.file("ds/data-00000-of-00001.arrow", b"")
    return c.file("ds/state.json", state).removesuffix("/state.json")


def _fifo(c: Ctx) -> str:
    os.mkfifo(c.tmp / "f.jsonl")
    return str(c.tmp / "f.jsonl")


def _pickled_model(c: Ctx) -> str:
    """The tiny model folder with its weights as a pytorch_model.bin that holds more than tensors."""
    shutil.copytree(c.ws / "model", c.tmp / "model")
    (c.tmp / "model" / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _RunsCode()}, c.tmp / "model" / "pytorch_model.bin")
    return str(c.tmp / "model")


def _no_network(*args, **kwargs):
    raise ConnectionError("no network")


def _no_such_repo(*args, **kwargs):
    raise RepositoryNotFoundError("404", response=mock.Mock())


CASES = [
    # --- the run config file ---
    Case(
        "empty-config",
        lambda c: ["train", c.file("empty.yaml", "")],
        "{tmp}/empty.yaml: no settings (the file is empty or only comments); start from a preset (compare-cpu, demo, "
        "paper-qwen2.5-0.5b): name it, or copy it from ...",
    ),
    Case(
        "comment-only-config",
        lambda c: ["train", c.file("c.yaml", "# model: smollm2-135m\n\n# seed: 1\n")],
        "{tmp}/c.yaml: no settings (the file is empty or only comments); start from a preset ...",
    ),
    Case(
        "section-given-twice",
        lambda c: ["train", c.file("twice.yaml", Path(c.config).read_text() + "training:\n  lr: 5e-4\n")],
        "{tmp}/twice.yaml: line 20: key 'training' is given twice in one section (first on line 9); merge them",
    ),
    Case(
        "key-given-twice-in-a-section",
        lambda c: ["train", c.file("twice.yaml", "data:\n  tasks: [boolq]\n  format: rc\n  tasks: [piqa]\n")],
        "{tmp}/twice.yaml: line 4: key 'tasks' is given twice in one section (first on line 2); merge them",
    ),
    Case(
        "config-not-utf8",
        lambda c: ["train", c.file("latin1.yaml", "output_dir: caf\xe9\n".encode("latin-1"))],
        "{tmp}/latin1.yaml: not UTF-8 text (byte 15)",
    ),
    Case(
        "config-nested-too-deeply",
        lambda c: ["train", c.file("deep.yaml", "seed: " + "[" * 5000 + "]" * 5000 + "\n")],
        "{tmp}/deep.yaml: not valid YAML: nested too deeply",
    ),
    Case(
        "config-with-an-alias-bomb",
        lambda c: ["train", c.file("bomb.yaml", _ALIAS_BOMB + "training: *a9\n")],
        "{tmp}/bomb.yaml: refused: a YAML document with aliases that expand past 100,000 values (an alias bomb?)",
    ),
    Case(
        "override-with-an-alias-bomb",
        lambda c: ["train", c.config, "seed={" + _ALIAS_BOMB.replace("\n", ", ") + "b: *a9}"],
        "override seed: refused: a YAML value with aliases that expand past 100,000 values (an alias bomb?)",
    ),
    Case(
        "config-nested-past-the-limit",
        lambda c: ["train", c.file("deep.yaml", "seed: " + "[" * 40 + "]" * 40 + "\n")],
        "{tmp}/deep.yaml: refused: a YAML document with nesting deeper than 32 levels",
    ),
    Case(
        "adapter-heads-that-cannot-fit",
        lambda c: ["train", c.config, "adapter.num_heads=100000000"],
        "adapter: r 4 x num_heads 100000000 on this model makes ... adapter weights, about ... GiB to train (with "
        "gradients and optimizer state), more than the ... GiB free; lower adapter.r or adapter.num_heads",
        loads_model=True,
    ),
    Case(
        "adapter-rank-that-cannot-fit",
        lambda c: ["train", c.config, "adapter.r=1000000000"],
        "adapter: r 1000000000 x num_heads 3 on this model makes ... GiB free; lower adapter.r or adapter.num_heads",
        loads_model=True,
    ),
    Case(
        "max-new-tokens-past-the-models-context",
        lambda c: ["train", c.config, "eval.max_new_tokens=64"],
        "eval.max_new_tokens: 64 leaves no room for a prompt in the model's context of 64 tokens; lower it",
        loads_model=True,
    ),
    Case(
        "columns-naming-a-column-the-file-lacks",
        lambda c: _files_override(c, '{"instruction": "i", "input": "x", "output": "o"}', "columns: {input: contxt}"),
        "{tmp}/d.jsonl: columns: input: the file has no column 'contxt' (none of its 2 records has a value there); "
        "fix the column's name or drop the entry",
    ),
    Case(
        "record-fitting-two-schemas",
        lambda c: _files_override(c, '{"prompt": "p", "instruction": "i", "output": "o"}', "schema: auto"),
        "{tmp}/d.jsonl:1: the fields fit two schemas, alpaca ('instruction') and rlora ('prompt'); set schema: to the "
        "one to read",
    ),
    Case(
        "save-to-disk-folder-with-a-bad-state",
        lambda c: ["train", c.config, "data.jsonl=[]", f"data.files=[{_saved_dataset(c, '[]')}]"],
        "{cfg}: data.files[0]: {tmp}/ds/state.json: not the state datasets' save_to_disk writes (a JSON object with "
        "_data_files)",
    ),
    Case(
        "data-file-that-is-a-fifo",
        lambda c: ["train", c.config, "data.jsonl=[]", f"data.files=[{_fifo(c)}]"],
        "{cfg}: data.files[0]: {tmp}/f.jsonl: not a regular file (a FIFO, a device or a socket); give a data file",
    ),
    Case(
        "model-weights-that-are-a-pickle",
        lambda c: ["train", c.config, f"model={_pickled_model(c)}"],
        "model '{tmp}/model': a weights file was refused: it holds Python objects, not only tensors (a pickle that "
        "could run code when loaded); torch's weights-only loading says: ...",
        loads_model=True,
    ),
    Case(
        "checkpoint-file-that-is-a-pickle",
        lambda c: _unfinished_run(c, _planted_optimizer),
        "{tmp}/run/checkpoints/checkpoint-2: a file of the checkpoint was refused: it holds Python objects, not only "
        "tensors (a pickle that could run code when loaded); torch's weights-only loading says: ...; remove "
        "{tmp}/run/checkpoints/checkpoint-2 to resume from the one before",
        loads_model=True,
        rewrites_run=True,
    ),
    Case(
        "lm-eval-with-a-missing-model-folder",
        lambda c: ["lm-eval", "--model", "hf", "--model_args", f"pretrained={c.tmp}/none", "--tasks", "x"],
        "lm-eval: --model_args pretrained={tmp}/none: no such folder; give a model folder (config.json)",
    ),
    Case(
        "lm-eval-with-a-wrong-adapter-path",
        lambda c: ["lm-eval", "--model", "hf", "--model_args", f"pretrained={c.ws}/model,peft={c.tmp}", "--tasks", "x"],
        "lm-eval: --model_args peft={tmp}: no adapter_config.json in it; give an adapter folder (adapter_config.json)",
    ),
    Case(
        "config-is-a-folder",
        lambda c: ["train", str(c.tmp)],
        "{tmp}: cannot read the run config (Is a directory); presets: compare-cpu, demo, paper-qwen2.5-0.5b",
    ),
    # --- keys out of their range, from the file or the command line ---
    Case(
        "override-given-twice",
        lambda c: ["train", c.config, "training.lr=1e-3", "training.lr=1e-4"],
        "override 'training.lr=1e-4': training.lr is already set on the command line",
    ),
    Case(
        "override-inside-an-overridden-section",
        lambda c: ["train", c.config, "training={lr: 1e-3}", "training.lr=1e-4"],
        "override 'training.lr=1e-4': training is already set on the command line",
    ),
    Case(
        "seed-negative",
        lambda c: ["train", c.config, "seed=-1"],
        "{cfg}: seed: expected an integer in [0, 2**32 - 1], got -1",
    ),
    Case(
        "seed-too-large",
        lambda c: ["train", c.config, "seed=4294967296"],
        "{cfg}: seed: expected an integer in [0, 2**32 - 1], got 4294967296",
    ),
    Case(
        "total-train-zero",
        lambda c: ["train", c.config, "data.total_train=0"],
        "{cfg}: data.total_train: expected an integer >= 1 or null, got 0",
    ),
    Case(
        "max-train-per-task-zero",
        lambda c: ["train", c.config, "data.max_train_per_task=0"],
        "{cfg}: data.max_train_per_task: expected an integer >= 1 or null, got 0",
    ),
    Case(
        "max-eval-per-task-zero",
        lambda c: ["eval", c.config, "data.max_eval_per_task=0"],
        "{cfg}: data.max_eval_per_task: expected an integer >= 1 or null, got 0",
    ),
    Case(
        "temperature-zero",
        lambda c: ["train", c.config, "data.temperature=0"],
        "{cfg}: data.temperature: expected a finite number > 0, got 0.0",
    ),
    Case(
        "temperature-infinite",
        lambda c: ["train", c.config, "data.temperature=.inf"],
        "{cfg}: data.temperature: expected a finite number > 0, got inf",
    ),
    Case(
        "lora-alpha-negative",
        lambda c: ["train", c.config, "adapter.lora_alpha=-1"],
        "{cfg}: adapter.lora_alpha: expected a finite number > 0, got -1.0",
    ),
    Case(
        "lora-alpha-infinite",
        lambda c: ["train", c.config, "adapter.lora_alpha=.inf"],
        "{cfg}: adapter.lora_alpha: expected a finite number > 0, got inf",
    ),
    Case(
        "init-gamma-infinite",
        lambda c: ["train", c.config, "adapter.init_gamma=.inf"],
        "{cfg}: adapter.init_gamma: expected a finite number > 0, got inf",
    ),
    Case(
        "lora-rank-zero",
        lambda c: ["train", c.config, "method=lora", "adapter.lora_r=0"],
        "{cfg}: adapter.lora_r: expected an integer >= 1 or null, got 0",
    ),
    Case(
        "no-target-modules",
        lambda c: ["train", c.config, "adapter.target_modules=[]"],
        "{cfg}: adapter.target_modules: expected a non-empty list of module names, a regex, 'all-linear' or null, "
        "got []",
    ),
    Case(
        "max-steps-zero",
        lambda c: ["train", c.config, "training.max_steps=0"],
        "{cfg}: training.max_steps: expected an integer >= 1, or -1 to train for training.epochs, got 0",
    ),
    Case(
        "dataloader-workers-negative",
        lambda c: ["train", c.config, "training.dataloader_workers=-1"],
        "{cfg}: training.dataloader_workers: expected an integer >= 0, got -1",
    ),
    Case(
        "fsdp-option-unknown",
        lambda c: ["train", c.config, "training.fsdp=bogus"],
        "training: the Trainer refuses these settings: Unknown `fsdp` option: bogus",
    ),
    Case(
        "fsdp-in-a-single-process",
        lambda c: ["train", c.config, "training.fsdp=full_shard auto_wrap"],
        "training.fsdp: FSDP shards the model over several processes; start them with torchrun or accelerate launch, "
        "or leave training.fsdp unset",
    ),
    Case(
        "fsdp-and-deepspeed",
        lambda c: ["train", c.config, "training.fsdp=full_shard", f"training.deepspeed={c.file('ds.json', '{}')}"],
        "{cfg}: training.fsdp: not together with training.deepspeed; give one of them",
    ),
    # --- the base model's loading and the training engines ---
    Case(
        "quantization-unknown",
        lambda c: ["train", c.config, "base.quantization=3bit"],
        "{cfg}: base.quantization: expected one of none, 4bit, 8bit, got '3bit'",
    ),
    Case(
        "quant-type-without-4bit",
        lambda c: ["train", c.config, "base.quantization=8bit", "base.quant_type=fp4"],
        "{cfg}: base.quant_type: only for base.quantization: 4bit (it is 8bit); leave it unset",
    ),
    Case(
        "compute-dtype-unknown",
        lambda c: ["train", c.config, "base.quantization=4bit", "base.compute_dtype=int8"],
        "{cfg}: base.compute_dtype: expected one of float32, bfloat16, float16, got 'int8'",
    ),
    Case(
        "base-dtype-unknown",
        lambda c: ["train", c.config, "base.dtype=int8"],
        "{cfg}: base.dtype: expected one of float32, bfloat16, float16, got 'int8'",
    ),
    Case(
        "attention-unknown",
        lambda c: ["train", c.config, "base.attn_implementation=fast"],
        "{cfg}: base.attn_implementation: expected one of eager, sdpa, flash_attention_2 or null, got 'fast'",
    ),
    Case(
        "reentrant-without-checkpointing",
        lambda c: ["train", c.config, "training.gradient_checkpointing_reentrant=true"],
        "{cfg}: training.gradient_checkpointing_reentrant: only with training.gradient_checkpointing: true",
    ),
    Case(
        "quantized-base-with-deepspeed",
        lambda c: ["train", c.config, "base.quantization=4bit", f"training.deepspeed={c.file('ds.json', '{}')}"],
        "{cfg}: base.quantization: a 4bit base is not sharded by rlora (training.deepspeed); train it data-parallel "
        "(torchrun) or unquantized",
    ),
    Case(
        "quantized-base-with-fsdp",
        lambda c: ["train", c.config, "base.quantization=8bit", "training.fsdp=full_shard"],
        "{cfg}: base.quantization: a 8bit base is not sharded by rlora (training.fsdp); train it data-parallel "
        "(torchrun) or unquantized",
    ),
    # --- paths ---
    Case(
        "output-dir-empty",
        lambda c: ["train", c.config, "output_dir=''"],
        "{cfg}: output_dir: expected a folder path, got ''",
    ),
    Case(
        "output-dir-is-a-file",
        lambda c: ["train", c.config, f"output_dir={c.file('out', 'x')}"],
        "{cfg}: output_dir: {tmp}/out exists and is not a folder",
    ),
    Case(
        "output-dir-under-a-file",
        lambda c: ["train", c.config, f"output_dir={c.file('out', 'x')}/run"],
        "{cfg}: output_dir: {tmp}/out is a file, so {tmp}/out/run cannot be made",
    ),
    Case(
        "output-dir-holds-other-files",
        lambda c: ["train", c.config, f"output_dir={Path(c.file('other/notes.txt', 'x')).parent}"],
        "{tmp}/other holds other files (notes.txt) and no run (no config.yaml); choose a new or empty output_dir",
    ),
    Case(
        "eval-config-into-a-folder-holding-other-files",
        lambda c: ["eval", c.config, f"output_dir={Path(c.file('other/notes.txt', 'x')).parent}"],
        "{tmp}/other holds other files (notes.txt) and no run (no config.yaml); choose a new or empty output_dir",
    ),
    Case(
        "cache-dir-is-a-file",
        lambda c: ["train", c.config, "model=smollm2-135m", "--cache-dir", c.file("cache", "x")],
        "the model cache {tmp}/cache: cannot make {tmp}/cache/models (Not a directory); give --cache-dir or "
        "$RLORA_CACHE_DIR a folder that can be written",
    ),
    Case(
        "jsonl-is-a-folder",
        lambda c: ["train", c.config, f"data.jsonl=[{c.tmp}]"],
        "{cfg}: data.jsonl[0]: {tmp} is not a file",
    ),
    Case(
        "deepspeed-config-missing",
        lambda c: ["train", c.config, f"training.deepspeed={c.tmp}/ds.json"],
        "{cfg}: training.deepspeed: no such file: {tmp}/ds.json",
    ),
    Case(
        "deepspeed-config-not-json",
        lambda c: ["train", c.config, f"training.deepspeed={c.file('ds.json', '{zero: 2}')}"],
        "{cfg}: training.deepspeed: {tmp}/ds.json: not a readable JSON file (...)",
    ),
    # --- the model ---
    Case(
        "model-path-missing",
        lambda c: ["train", c.config, "model=/no/such/dir"],
        "{cfg}: model: no such folder: /no/such/dir; " + MODELS,
    ),
    Case(
        "model-name-unknown",
        lambda c: ["train", c.config, "model=smollm2-360m"],
        "{cfg}: model: 'smollm2-360m' is not an embedded model (did you mean 'smollm2-135m'?), a local folder or a "
        "Hub id; " + MODELS,
    ),
    Case(
        "model-folder-without-config",
        lambda c: ["train", c.config, f"model={c.tmp}"],
        "{cfg}: model: {tmp} is not a model folder (no config.json); " + MODELS,
    ),
    Case(
        "model-is-a-file",
        lambda c: ["train", c.config, f"model={c.file('model.bin', 'x')}"],
        "{cfg}: model: {tmp}/model.bin is a file, not a model folder; " + MODELS,
    ),
    Case(
        "model-on-the-hub-without-network",
        lambda c: ["train", c.config, "model=someorg/somemodel"],
        "model 'someorg/somemodel': no such local folder, not in the Hugging Face cache, and the Hub cannot be "
        "reached: ConnectionError; download it once where there is a network, or " + MODELS,
        hub=_no_network,
    ),
    Case(
        "model-not-on-the-hub",
        lambda c: ["train", c.config, "model=someorg/somemodel"],
        "model 'someorg/somemodel': no such local folder, and no such model on the Hugging Face Hub (a private or "
        "gated one needs `hf auth login`); " + MODELS,
        hub=_no_such_repo,
    ),
    Case(
        "eval-config-with-a-model-on-the-hub-without-network",
        lambda c: ["eval", c.config, "model=someorg/somemodel"],
        "model 'someorg/somemodel': no such local folder, not in the Hugging Face cache, and the Hub cannot be "
        "reached: ConnectionError; download it once where there is a network, or " + MODELS,
        hub=_no_network,
    ),
    Case(
        "eval-config-with-a-bad-model-path",
        lambda c: ["eval", c.config, "model=/no/such/dir"],
        "{cfg}: model: no such folder: /no/such/dir; " + MODELS,
    ),
    Case(
        "model-weights-truncated",
        lambda c: ["train", c.config, f"model={_broken_model(c)}"],
        "model '{tmp}/model': ...",
        loads_model=True,  # the fault is in the weights: found by loading them, and the run folder is left unmade
    ),
    Case(
        "eval-config-with-truncated-model-weights",
        lambda c: ["eval", c.config, f"model={_broken_model(c)}"],
        "model '{tmp}/model': ...",
        loads_model=True,
    ),
    Case(
        "chat-template-the-tokenizer-lacks",
        lambda c: ["train", c.config, "data.chat_template=true"],
        "model '{ws}/model': its tokenizer has no chat template; use plain prompts (data.chat_template: false, or no "
        "--chat-template)",
    ),
    Case(
        "show-with-a-chat-template-the-tokenizer-lacks",
        lambda c: ["show", "rte", "--chat-template", "--model", str(c.ws / "model")],
        "model '{ws}/model': its tokenizer has no chat template; use plain prompts (data.chat_template: false, or no "
        "--chat-template)",
        slow=True,
    ),
    # --- JSONL task data ---
    # --- instruction data (data.files) ---
    Case(
        "alpaca-json-record-without-output",
        lambda c: [
            "train",
            c.config,
            "data.files=[" + c.file("a.json", '[{"instruction": "i", "output": "o"}, {"instruction": "i"}]') + "]",
        ],
        "{tmp}/a.json: record 2: field 'output': missing",
    ),
    Case(
        "sharegpt-tool-turn",
        lambda c: [
            "train",
            c.config,
            "data.files=["
            + c.file(
                "s.jsonl",
                json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "tool", "value": "a"}]}),
            )
            + "]",
        ],
        "{tmp}/s.jsonl:1: field 'conversations': turn 2: role 'tool' is not supported (tool turns are not supported; "
        "only human, gpt, system, user, assistant)",
    ),
    Case(
        "csv-mapped-column-empty",
        lambda c: [
            "train",
            c.config,
            "data.files=[{path: "
            + c.file("c.csv", "question,response\nq,a\nq2,\n")
            + ", columns: {instruction: question, output: response}}]",
        ],
        "{tmp}/c.csv:3: field 'output' (column 'response'): missing",
    ),
    Case(
        "files-unknown-schema",
        lambda c: ["train", c.config, "data.files=[{path: " + c.file("a.json", "[]") + ", schema: alpacca}]"],
        "{cfg}: data.files[0]: schema: expected one of auto, rlora, alpaca, sharegpt, messages, got 'alpacca'",
    ),
    Case(
        "files-unsupported-kind",
        lambda c: ["train", c.config, "data.files=[" + c.file("x.txt", "hi") + "]"],
        "{cfg}: data.files[0]: {tmp}/x.txt: unsupported kind of data file (.txt); expected .jsonl, .ndjson, "
        ".json, .csv, .parquet, or a folder written by datasets' save_to_disk",
    ),
    Case(
        "files-misspelt-key",
        lambda c: ["train", c.config, "data.files=[{path: " + c.file("a.json", "[]") + ", colums: {}}]"],
        "{cfg}: data.files[0]: unknown key 'colums'; valid keys: path, schema, task, columns",
    ),
    Case(
        "files-entry-not-a-path",
        lambda c: ["train", c.config, "data.files=[3]"],
        "{cfg}: data.files[0]: expected a string or a mapping, got 3",
    ),
    Case(
        "jsonl-nested-too-deeply",
        lambda c: ["train", c.config, c.jsonl('{"prompt": ' + "[" * 100000 + "]" * 100000 + ', "answer": "a"}')],
        "{tmp}/data.jsonl:2: invalid JSON: nested too deeply",
    ),
    Case(
        "jsonl-field-given-twice",
        lambda c: ["train", c.config, c.jsonl('{"prompt": "p", "answer": "a", "prompt": "q"}')],
        "{tmp}/data.jsonl:2: field 'prompt' is given twice",
    ),
    Case(
        "jsonl-27-choices",
        lambda c: [
            "train",
            c.config,
            c.jsonl(json.dumps({"prompt": "p", "choices": list("abcdefghijklmnopqrstuvwxyz!"), "gold": 0})),
        ],
        "{tmp}/data.jsonl:2: field 'choices': 27 choices but only 26 letters to label them; give labels, one per "
        "choice",
    ),
    Case(
        "jsonl-choice-given-twice",
        lambda c: ["train", c.config, c.jsonl('{"prompt": "p", "choices": ["a", "b", "a"], "gold": 2}')],
        "{tmp}/data.jsonl:2: field 'choices': \"a\" is given twice; each must be distinct",
    ),
    Case(
        "jsonl-blank-choice",
        lambda c: ["train", c.config, c.jsonl('{"prompt": "p", "choices": ["a", "  "], "gold": 0}')],
        "{tmp}/data.jsonl:2: field 'choices': expected a list of at least 2 non-empty strings",
    ),
    Case(
        "jsonl-lone-surrogate",
        lambda c: ["train", c.config, c.jsonl('{"prompt": "p\\ud800", "answer": "a"}')],
        "{tmp}/data.jsonl:2: field 'prompt': not valid Unicode text (\\ud800)",
    ),
    Case(
        "jsonl-id-not-a-name",
        lambda c: ["train", c.config, c.jsonl('{"id": null, "prompt": "p", "answer": "a"}')],
        "{tmp}/data.jsonl:2: field 'id': expected a string or an integer, got null",
    ),
    # --- run folders ---
    Case(
        "resume-without-a-run",
        lambda c: ["train", c.config, "--resume"],
        "--resume: {tmp}/run holds no run to resume (no config.yaml); start it without --resume",
    ),
    Case(
        "resume-from-a-checkpoint-cut-short",
        lambda c: _unfinished_run(c, lambda ckpt: _truncate(ckpt / "optimizer.pt")),
        "{tmp}/run/checkpoints/checkpoint-2/optimizer.pt: not a whole file, truncated or damaged; to resume from "
        "step 0 instead, remove {tmp}/run/checkpoints/checkpoint-2",
    ),
    Case(
        "resume-from-a-checkpoint-of-another-method",
        lambda c: _unfinished_run(c, lambda ckpt: _edit_json(ckpt / "adapter_config.json", head_init="zeros")),
        "{tmp}/run/checkpoints/checkpoint-2/adapter_config.json: head_init is 'zeros'; the run's config (method "
        "rlora) gives 'random'; to resume from step 0 instead, remove {tmp}/run/checkpoints/checkpoint-2",
    ),
    Case(
        "run-config-edited-out-of-range",
        lambda c: [
            "eval",
            c.run(
                edit=lambda r: (r / "config.yaml").write_text(
                    (r / "config.yaml").read_text().replace("seed: 0", "seed: -3")
                )
            ),
        ],
        "{tmp}/run/config.yaml: seed: expected an integer in [0, 2**32 - 1], got -3",
    ),
    Case(
        "adapter-says-lora-in-an-rlora-run",
        lambda c: ["eval", c.run(edit=lambda r: _edit_json(_adapter(r) / "adapter_config.json", peft_type="LORA"))],
        "{tmp}/run/adapter/adapter_config.json: peft_type is 'LORA'; expected a 'RLORA' adapter",
    ),
    Case(
        "a-lora-adapter-in-an-rlora-run",
        lambda c: [
            "eval",
            c.run(
                edit=lambda r: (shutil.rmtree(_adapter(r)), shutil.copytree(c.runs["lora"] / "adapter", _adapter(r)))
            ),
        ],
        "{tmp}/run/adapter/adapter_config.json: peft_type is 'LORA'; expected a 'RLORA' adapter",
    ),
    Case(
        "an-rlora-adapter-in-a-lora-run",
        lambda c: [
            "eval",
            c.run(
                "lora",
                edit=lambda r: (shutil.rmtree(_adapter(r)), shutil.copytree(c.runs["rlora"] / "adapter", _adapter(r))),
            ),
        ],
        "{tmp}/run/adapter/adapter_config.json: peft_type is 'RLORA'; expected a 'LORA' adapter",
    ),
    Case(
        "adapter-peft-type-unknown",
        lambda c: ["eval", c.run(edit=lambda r: _edit_json(_adapter(r) / "adapter_config.json", peft_type="FOO"))],
        "{tmp}/run/adapter/adapter_config.json: peft_type 'FOO' is not a PEFT method (R-LoRA's is 'RLORA', LoRA's "
        "'LORA')",
    ),
    Case(
        "adapter-of-another-method",
        lambda c: ["eval", c.run(edit=lambda r: _edit_json(_adapter(r) / "adapter_config.json", head_init="zeros"))],
        "{tmp}/run/adapter/adapter_config.json: head_init is 'zeros'; the run's config (method rlora) gives 'random'",
    ),
    Case(
        "adapter-setting-out-of-range",
        lambda c: ["eval", c.run(edit=lambda r: _edit_json(_adapter(r) / "adapter_config.json", num_heads=0))],
        "{tmp}/run/adapter/adapter_config.json: RLoraConfig.num_heads: expected an integer >= 1, got 0",
    ),
    Case(
        "adapter-config-not-json",
        lambda c: ["eval", c.run(edit=lambda r: (_adapter(r) / "adapter_config.json").write_text("{"))],
        "{tmp}/run/adapter/adapter_config.json: not a readable JSON file (...)",
    ),
    Case(
        "adapter-config-missing",
        lambda c: ["eval", c.run(edit=lambda r: (_adapter(r) / "adapter_config.json").unlink())],
        "{tmp}/run/adapter/adapter_config.json: missing; an adapter folder holds adapter_config.json and "
        "adapter_model.safetensors",
    ),
    Case(
        "adapter-weights-missing",
        lambda c: ["eval", c.run(edit=lambda r: (_adapter(r) / "adapter_model.safetensors").unlink())],
        "{tmp}/run/adapter/adapter_model.safetensors: missing; an adapter folder holds adapter_config.json and "
        "adapter_model.safetensors",
    ),
    Case(
        "adapter-weights-truncated",
        lambda c: ["eval", c.run(edit=lambda r: _truncate(_adapter(r) / "adapter_model.safetensors"))],
        "{tmp}/run/adapter/adapter_model.safetensors: not a whole safetensors file, truncated or damaged (Error while "
        "deserializing header: ...)",
    ),
    Case(
        "adapter-weights-empty",
        lambda c: ["eval", c.run(edit=lambda r: (_adapter(r) / "adapter_model.safetensors").write_bytes(b""))],
        "{tmp}/run/adapter/adapter_model.safetensors: not a whole safetensors file, truncated or damaged (Error while "
        "deserializing header: ...)",
    ),
    Case(
        "analyze-adapter-weights-truncated",
        lambda c: ["analyze", c.run(edit=lambda r: _truncate(_adapter(r) / "adapter_model.safetensors"))],
        "{tmp}/run/adapter/adapter_model.safetensors: not a whole safetensors file, truncated or damaged (...)",
    ),
    Case(
        "analyze-init-adapter-truncated",
        lambda c: ["analyze", c.run(edit=lambda r: _truncate(r / "adapter_init" / "adapter_model.safetensors", 0.9))],
        "{tmp}/run/adapter_init/adapter_model.safetensors: not a whole safetensors file, truncated or damaged (...)",
    ),
    Case(
        "adapter-weights-not-finite",
        lambda c: [
            "eval",
            c.run(
                edit=lambda r: _edit_tensors(
                    _adapter(r) / "adapter_model.safetensors", lambda t: t[RLORA_A].__setitem__((0, 0), float("nan"))
                )
            ),
        ],
        "{tmp}/run/adapter/adapter_model.safetensors: tensor '" + RLORA_A + "' holds NaN or infinite values",
    ),
    Case(
        "adapter-tensor-missing",
        lambda c: [
            "eval",
            c.run(edit=lambda r: _edit_tensors(_adapter(r) / "adapter_model.safetensors", lambda t: t.pop(RLORA_A))),
        ],
        "{tmp}/run/adapter/adapter_model.safetensors: tensor '" + RLORA_A + "' is missing (missing: 1 of the 30 "
        "tensors of this RLORA adapter (r=4))",
        loads_model=True,
    ),
    Case(
        "adapter-tensor-of-another-shape",
        lambda c: [
            "eval",
            c.run(
                edit=lambda r: _edit_tensors(
                    _adapter(r) / "adapter_model.safetensors", lambda t: t.update({RLORA_A: torch.zeros(4, 33)})
                )
            ),
        ],
        "{tmp}/run/adapter/adapter_model.safetensors: tensor '" + RLORA_A + "' has shape [4, 33]; this RLORA adapter "
        "(r=4) needs [4, 32]",
        loads_model=True,
    ),
    Case(
        "adapter-tensor-left-unused",
        lambda c: [
            "eval",
            c.run(
                edit=lambda r: _edit_tensors(
                    _adapter(r) / "adapter_model.safetensors",
                    lambda t: t.update({"base_model.model.extra": torch.zeros(2)}),
                )
            ),
        ],
        "{tmp}/run/adapter/adapter_model.safetensors: tensor 'base_model.model.extra' is not part of this RLORA "
        "adapter (r=4) on this model; it would be left unused",
        loads_model=True,
    ),
    Case(
        "eval-a-folder-that-is-no-run",
        lambda c: ["eval", str(c.tmp)],
        "{tmp}: not a run folder (no config.yaml); train one with `rlora train`",
    ),
    # --- names that would become paths (see rlora.names; tests/test_paths.py runs them through every writer) ---
    *[
        Case(
            f"task-name-{label}",
            lambda c, name=name: ["train", c.config, c.jsonl(json.dumps({"task": name, "prompt": "p", "answer": "a"}))],
            "{tmp}/data.jsonl:2: field 'task': " + why + "; " + NAME_RULE,
        )
        for label, name, why in HOSTILE_NAMES
    ],
    Case(
        "task-name-in-the-config-that-is-a-path",
        lambda c: ["train", c.config, "data.jsonl=[]", f"data.files=[{{path: {c.file('d.jsonl', '{}')}, task: ../x}}]"],
        "{cfg}: data.files[0]: task: '../x' holds a path separator; " + NAME_RULE,
    ),
    Case(
        "task-name-from-a-hidden-files-name",
        lambda c: [
            "train",
            c.config,
            "data.jsonl=[" + c.file(".hidden.jsonl", '{"prompt": "p", "answer": "a"}\n') + "]",
        ],
        "{tmp}/.hidden.jsonl: the task's name, from the file's name: '.hidden' starts with a dot (a hidden file's "
        "name); " + NAME_RULE + "; or give task:",
    ),
    # --- left from the reliability probes ---
    Case(
        "nul-byte-in-a-csv-cell",
        lambda c: [
            "train",
            c.config,
            "data.jsonl=[]",
            "data.files=[" + c.file("n.csv", "prompt,answer\np,a\nq,b\0c\n") + "]",
        ],
        "{tmp}/n.csv:3: column 2 ('answer'): a NUL byte in the cell; not text",
    ),
    Case(
        "compare-with-an-empty-lr",
        lambda c: ["compare", c.config, "--seeds", "1", "--lr", ""],
        "--lr '': expected comma-separated learning rates to choose from, e.g. 3e-4,1e-3",
    ),
    Case(
        "accept-changed-data-without-resume",
        lambda c: ["train", c.config, "--accept-changed-data"],
        "--accept-changed-data: goes with --resume (a run resumed on data that changed)",
    ),
    Case(
        "error-line-that-an-alias-makes-long",  # 946 KB of values, cut to MAX_MESSAGE characters (the path varies)
        lambda c: ["train", c.file("long.yaml", _LONG_ALIAS)],
        "{tmp}/long.yaml: seed: expected an integer, got {{'a0': ['xxxxxxxxxx', ... "
        "(94...,... characters left out) ... xxxxxxxxx'], ... 'xxxxxxxxxx']]]]]}}",
    ),
    Case(
        "resume-after-the-task-data-changed",
        lambda c: _unfinished_run(c, lambda checkpoint: (checkpoint / DATA_FINGERPRINT_FILE).write_text("0" * 32)),
        "{tmp}/run/checkpoints/checkpoint-2: the run's task data changed since this checkpoint was saved (a file "
        "edited, added or removed); pass --accept-changed-data to train on with the new data, or start a new run in "
        "another output_dir",
        rewrites_run=True,
    ),
    Case(
        "compare-with-a-negative-seed",
        lambda c: ["compare", c.config, "--seeds", "1", "--first-seed", "-1"],
        "compare: seed: expected an integer in [0, 2**32 - 1], got -1",
    ),
    Case(
        "compare-into-a-file",
        lambda c: ["compare", c.config, "--seeds", "1", "--output", c.file("out", "x")],
        "compare: output_dir: {tmp}/out is a file, so {tmp}/out/hydralora/seed0 cannot be made",
    ),
]


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def _expected(template: str, **paths) -> re.Pattern:
    text = re.escape("rlora: error: " + template.format(**paths))
    return re.compile(text.replace(re.escape("..."), ".*") + "\n")


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=[pytest.mark.slow] if c.slow else []) for c in CASES], ids=[c.id for c in CASES]
)
def test_bad_input_is_one_line_on_stderr_and_an_exit_code_writing_nothing(
    case, workspace, runs, tmp_path, monkeypatch, capsys
):
    loaded = []
    real_load_model = rlora.models.load_model

    def load_model(*args, **kwargs):
        loaded.append(args)
        return real_load_model(*args, **kwargs)

    monkeypatch.setattr(rlora.models, "load_model", load_model)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", case.hub or _no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    rlora.models._hub_options.cache_clear()
    argv = case.argv(Ctx(workspace, tmp_path, runs))
    before = _tree(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    if case.loads_model:  # the model's loading shows its progress bar first
        assert "Traceback" not in err
        err = err.splitlines(keepends=True)[-1]
    assert _expected(case.error, tmp=tmp_path, ws=workspace, cfg=tmp_path / "run.yaml").fullmatch(err), err
    assert code == case.code
    if case.rewrites_run:
        before = {p: t for p, t in before.items() if p not in ("run", "run/config.yaml", "run/data_manifest.json")}
        after = {
            p: t for p, t in _tree(tmp_path).items() if p not in ("run", "run/config.yaml", "run/data_manifest.json")
        }
        assert after == before, "something was written"
    else:
        assert _tree(tmp_path) == before, "something was written"
    assert bool(loaded) == case.loads_model


def test_fp16_needs_an_accelerator_and_flash_attention_a_gpu(workspace, tmp_path, capsys):
    if rlora.train._accelerator() is not None:
        pytest.skip("this machine has an accelerator")
    config = write_config(workspace, tmp_path / "run")
    assert main(["train", str(config), "training.precision=fp16"]) == 2
    assert capsys.readouterr().err == (
        "rlora: error: training.precision: fp16 needs a GPU (or another accelerator) and this machine has none (on a "
        "CPU the Trainer would silently train in fp32); use bf16, fp32 or auto\n"
    )
    assert main(["train", str(config), "base.attn_implementation=flash_attention_2"]) == 2
    assert capsys.readouterr().err == (
        f"rlora: error: {config}: base.attn_implementation: flash_attention_2 needs a CUDA GPU and this machine has "
        "none; use sdpa\n"
    )
    assert not (tmp_path / "run").exists()


def test_accelerates_own_fsdp_settings_over_cpu_processes_are_refused_instead_of_training_as_ddp(
    workspace, tmp_path, capsys, monkeypatch
):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    # as under accelerate launch --use_fsdp with 2 CPU processes: refused before any process group is set up
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    config = write_config(workspace, tmp_path / "run")
    assert main(["train", str(config)]) == 2
    assert capsys.readouterr().err == (
        "rlora: error: training.fsdp: unset, and accelerate's own FSDP settings (accelerate launch --use_fsdp) are "
        "applied on accelerator devices only: these CPU processes would train data-parallel without a word. Give the "
        'FSDP options as training.fsdp (e.g. "full_shard auto_wrap") to shard over CPU processes\n'
    )
    assert not (tmp_path / "run").exists()


def test_quantization_without_bitsandbytes_and_compiling_or_deepspeed_without_a_compiler_are_refused(
    workspace, tmp_path, capsys, monkeypatch
):
    config = write_config(workspace, tmp_path / "run")
    real_find_spec = rlora.models.importlib.util.find_spec
    monkeypatch.setattr(
        rlora.models.importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real_find_spec(n, *a)
    )
    assert main(["train", str(config), "base.quantization=4bit"]) == 2
    assert capsys.readouterr().err == (
        f"rlora: error: {config}: base.quantization: 4bit needs the bitsandbytes package, not installed; pip install "
        "'rlora[quant]' (bitsandbytes)\n"
    )
    monkeypatch.undo()
    if torch.cuda.is_available():
        return
    monkeypatch.setattr(rlora.models.shutil, "which", lambda _name: None)
    assert main(["train", str(config), "training.torch_compile=true"]) == 2
    assert capsys.readouterr().err == (
        f"rlora: error: {config}: training.torch_compile: on a CPU torch.compile builds C++ code and no C++ compiler "
        "(c++, g++, clang++) is on PATH; install one or set training.torch_compile: false\n"
    )
    (tmp_path / "ds.json").write_text("{}")
    assert main(["train", str(config), f"training.deepspeed={tmp_path / 'ds.json'}"]) == 2
    assert capsys.readouterr().err == (
        "rlora: error: training.deepspeed: on CPUs DeepSpeed builds its communication op from C++ on its first run "
        "and no C++ compiler (c++, g++, clang++) is on PATH; install one, or shard with training.fsdp instead\n"
    )
    assert not (tmp_path / "run").exists()


def test_a_bad_command_is_one_line_and_no_traceback_from_a_fresh_process(runs, tmp_path):
    run = shutil.copytree(runs["rlora"], tmp_path / "run")
    _edit_json(run / "adapter" / "adapter_config.json", peft_type="LORA")
    result = subprocess.run(
        [sys.executable, "-m", "rlora", "eval", str(run)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("rlora: error: ") and "Traceback" not in result.stderr
    assert not (run / "eval.json").exists()


# --- the Python API: the same faults are the same errors ---


def _model(workspace):
    return AutoModelForCausalLM.from_pretrained(workspace / "model").eval()


def test_api_errors_are_rlora_errors_of_the_expected_builtin_kind(workspace, runs, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    rlora.models._hub_options.cache_clear()
    nested = tmp_path / "nested.jsonl"
    nested.write_text('{"prompt": ' + "[" * 100000 + "]" * 100000 + ', "answer": "a"}\n')
    twice = tmp_path / "twice.yaml"
    twice.write_text("seed: 1\nseed: 2\n")
    foo = shutil.copytree(runs["rlora"], tmp_path / "foo")
    _edit_json(foo / "adapter" / "adapter_config.json", peft_type="FOO")
    lora_typed = shutil.copytree(runs["rlora"], tmp_path / "lora_typed")
    _edit_json(lora_typed / "adapter" / "adapter_config.json", peft_type="LORA")
    made_in_python = load_run_config(write_config(workspace, tmp_path / "none"))
    made_in_python.seed = -1
    cases = [
        (lambda: train(made_in_python), ConfigError, "run config: seed: expected an integer in [0, 2**32 - 1], got -1"),
        (lambda: load_run_config(twice), ConfigError, "line 2: key 'seed' is given twice"),
        (lambda: read_jsonl_tasks([nested]), DataError, "nested.jsonl:1: invalid JSON: nested too deeply"),
        (lambda: load_adapter(_model(workspace), foo / "adapter"), AdapterError, "peft_type 'FOO' is not a PEFT"),
        (lambda: load_run(lora_typed), AdapterError, "peft_type is 'LORA'; expected a 'RLORA' adapter"),
        (lambda: rlora.models.load_model_and_tokenizer("/no/such/dir"), ModelError, "no such folder: /no/such/dir"),
        (lambda: rlora.models.load_tokenizer("someorg/somemodel"), ModelError, "and HF_HUB_OFFLINE is set"),
        (
            lambda: train(load_run_config(write_config(workspace, tmp_path / "none")), resume=True),
            RunFolderError,
            "--resume",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=re.escape(message)) as raised:
            call()
        assert isinstance(raised.value, ValueError | OSError | RunFolderError)
    assert not (tmp_path / "none").exists()


def test_load_adapter_refuses_an_adapter_whose_tensors_are_not_its_types_and_leaves_the_model_as_it_was(
    workspace, runs, tmp_path
):
    """The silent case through the API: `peft_type` LORA over R-LoRA weights loads no weight at all in PEFT."""
    lora_typed = shutil.copytree(runs["rlora"] / "adapter", tmp_path / "adapter")
    _edit_json(lora_typed / "adapter_config.json", peft_type="LORA")
    model = _model(workspace)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: tensor '.*lora_A.weight' is missing"):
        load_adapter(model, lora_typed)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any("lora" in name for name, _ in model.named_modules())


@pytest.mark.parametrize("method", ["rlora", "lora"])
def test_load_adapter_gives_what_peft_from_pretrained_gives(workspace, runs, method):
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    ours = load_adapter(_model(workspace), runs[method] / "adapter")
    peft = PeftModel.from_pretrained(_model(workspace), runs[method] / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, peft(input_ids=ids).logits, rtol=0, atol=0)
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    with torch.no_grad():
        assert not torch.equal(ours(input_ids=ids).logits, _model(workspace)(input_ids=ids).logits)


def test_load_adapter_adds_a_named_adapter_to_a_peft_model(workspace, runs):
    model = load_adapter(_model(workspace), runs["rlora"] / "adapter")
    load_adapter(model, runs["rlora"] / "adapter_init", "init", peft_type="RLORA")
    assert set(model.peft_config) == {"default", "init"} and model.active_adapter == "default"
    with pytest.raises(AdapterError, match="peft_type is 'RLORA'; expected a 'LORA' adapter"):
        load_adapter(model, runs["rlora"] / "adapter_init", "other", peft_type="LORA")
    assert set(model.peft_config) == {"default", "init"}


# --- one writer per run folder ---


def _hold_lock(run: Path) -> subprocess.Popen:
    script = (
        "import sys\nfrom rlora.run import RunFolder\n"
        f"with RunFolder({str(run)!r}).writer():\n    print('held', flush=True)\n    sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_run_folder_that_a_live_process_writes_is_refused_until_that_process_dies(workspace, tmp_path, capsys):
    config = write_config(workspace, tmp_path / "run")
    holder = _hold_lock(tmp_path / "run")
    RunFolder(tmp_path / "run").write_config(load_run_config(config))  # as training does once its model has loaded
    try:
        busy = (
            f"{tmp_path / 'run'} is being written by another process (pid {holder.pid} on "
            f"{socket.gethostname()}, since ...); wait for it to end, or choose another output_dir"
        )
        for argv in (["train", str(config)], ["train", str(config), "--resume"], ["eval", str(config)]):
            assert main(argv) == 2
            assert _expected(busy).fullmatch(capsys.readouterr().err)
        assert main(["eval", str(tmp_path / "run")]) == 2
        assert _expected(
            f"{tmp_path / 'run'}: the run has no adapter yet; it is being trained (pid {holder.pid} on ...): wait for "
            "it to end"
        ).fullmatch(capsys.readouterr().err)
        assert sorted(os.listdir(tmp_path / "run")) == [".rlora-lock", "config.yaml"]
    finally:
        holder.kill()  # killed: it cannot release anything itself
        holder.wait()
    assert (tmp_path / "run" / ".rlora-lock").exists()  # left behind, but no longer locked
    assert main(["train", str(config)]) == 0
    assert not (tmp_path / "run" / ".rlora-lock").exists() and (tmp_path / "run" / "adapter").is_dir()


def test_a_writer_that_ends_removes_its_lock_and_a_folder_it_made_and_left_empty(tmp_path):
    folder = RunFolder(tmp_path / "run")
    with pytest.raises(ModelError), folder.writer():
        assert folder.lock.is_file()
        raise ModelError("the model could not load")
    assert not folder.root.exists()
    with folder.writer():
        folder.write_config(load_run_config(None))
    assert sorted(os.listdir(folder.root)) == ["config.yaml"]
