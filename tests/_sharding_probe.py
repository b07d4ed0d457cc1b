"""`rlora train` (the arguments after the script) with probes that record, in every process, how the model's parameters
are held: right after the base model is loaded (`models.load_model` returns; ZeRO-3 partitions as it loads) and when
training begins (the Trainer has wrapped the model: FSDP2 has sharded it). Each record is
`$RLORA_SHARDING_PROBE/rank<R>-<when>.json`: per parameter, its global numel and shape, the numel this process holds,
from DeepSpeed's partition attributes (`ds_numel`, `ds_tensor`) or the DTensor's placements. For the tests in
test_distributed.py (started under torchrun instead of `-m rlora`); rlora's code is not changed, only wrapped."""

import json
import os
import sys
from pathlib import Path

from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainerCallback

from rlora import models
from rlora.cli import main

OUT = Path(os.environ["RLORA_SHARDING_PROBE"])


def held(param) -> dict:
    """What this process holds of `param`."""
    if isinstance(param, DTensor):
        local = param.to_local()
        return {
            "shape": list(param.shape),
            "numel": param.numel(),
            "local_numel": local.numel(),
            "placements": [repr(p) for p in param.placements],  # "Shard(dim=0)"
        }
    if hasattr(param, "ds_numel"):  # a ZeRO-3 parameter: its data is an empty placeholder, its shard in ds_tensor
        return {
            "shape": list(param.ds_shape),
            "numel": param.ds_numel,
            "local_numel": param.ds_tensor.numel(),
            "data_numel": param.data.numel(),
            "ds_status": str(param.ds_status),
        }
    return {"shape": list(param.shape), "numel": param.numel(), "local_numel": param.numel()}


def record(when: str, model) -> None:
    rank = int(os.environ.get("RANK", "0"))
    params = {name: held(p) | {"trainable": p.requires_grad} for name, p in model.named_parameters()}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"rank{rank}-{when}.json").write_text(json.dumps(params))


_load_model = models.load_model


def load_model(*args, **kwargs):
    model = _load_model(*args, **kwargs)
    record("loaded", model)
    return model


class _AtTrainBegin(TrainerCallback):
    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, *_, **__):
        record("training", self.trainer.model)  # FSDP2 shards it in place; DeepSpeed's engine wraps it


_init = Trainer.__init__


def init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.add_callback(_AtTrainBegin(self))


models.load_model = load_model
Trainer.__init__ = init

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
