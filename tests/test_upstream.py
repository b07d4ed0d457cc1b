"""The private parts of other packages that rlora relies on, each pinned: on a version where one changes, its test
fails and says what rlora needs and where. (Where a public hook exists, rlora uses it instead: the head-only loss
is the Trainer's `compute_loss_func`, pinned by tests/test_output_head.py's gradient-accumulation test; the
standard library's `random.Random._randbelow` is pinned by tests/test_data_mixture.py.)"""

import accelerate
import peft
import torch
import transformers
from accelerate import PartialState
from transformers import TrainingArguments

from rlora.output_head import causal_lm
from rlora.trainer import LengthGroupedIndices, RloraTrainer


def test_accelerate_partial_state_keeps_its_attributes_in_a_shared_dict():
    """trainer.py turns FSDP on over CPU processes by setting `PartialState._shared_state["distributed_type"]`, as
    accelerate itself does on GPUs: that works while every PartialState's attributes are that one dict."""
    state = PartialState(cpu=True)
    shared = getattr(PartialState, "_shared_state", None)
    assert shared is state.__dict__ and "distributed_type" in shared, (
        f"accelerate {accelerate.__version__}: PartialState no longer keeps its attributes (distributed_type) in "
        "the class dict `_shared_state`; rlora.trainer.FsdpOverCpuProcesses.create_accelerator_and_postprocess "
        "(FSDP over CPU processes) must change"
    )


def test_the_trainer_takes_its_train_sampler_from_get_train_sampler(tmp_path):
    """train.py's length-grouped order without lists of Python integers is the Trainer's `_get_train_sampler`
    override; a Trainer that no longer calls it would silently train in another order."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    rows = [{"input_ids": [1] * n, "labels": [1] * n} for n in (1, 2, 3, 4)]
    dataset = _Lengths(rows)
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, train_sampling_strategy="group_by_length")
    args = args.set_dataloader(train_batch_size=2)
    trainer = RloraTrainer(model=model, args=args, train_dataset=dataset, data_collator=lambda rows: rows)
    sampler = trainer.get_train_dataloader().base_dataloader.batch_sampler.sampler
    assert isinstance(sampler, LengthGroupedIndices), (
        f"transformers {transformers.__version__}: Trainer.get_train_dataloader no longer takes its sampler from "
        f"Trainer._get_train_sampler (got {type(sampler).__name__}); rlora.train's length-grouped order is lost"
    )


class _Lengths(list):
    @property
    def lengths(self):
        return [len(r["input_ids"]) for r in self]


def test_torch_compile_keeps_the_compiled_module_as_orig_mod():
    """`output_head.causal_lm` unwraps a compiled model through `_orig_mod`, to find the output head."""
    inner = torch.nn.Linear(2, 2)
    compiled = torch.compile(inner, backend="eager")
    assert getattr(compiled, "_orig_mod", None) is inner, (
        f"torch {torch.__version__}: torch.compile's wrapper no longer holds the module as `_orig_mod`; "
        "rlora.output_head.causal_lm cannot find a compiled model's output head"
    )
    assert causal_lm(compiled) is inner


def test_peft_tuner_layers_have_the_private_helpers_rlora_calls():
    """rlora.tuner.layer casts the layer input with `BaseTunerLayer._cast_input_dtype` and keeps its offsets in
    `peft.tuners._buffer_dict.BufferDict`; rlora.tuner.model extends `BaseTuner._prepare_adapter_config`."""
    from peft.tuners import tuners_utils

    missing = [
        name
        for owner, name in (
            (tuners_utils.BaseTunerLayer, "_cast_input_dtype"),
            (tuners_utils.BaseTuner, "_prepare_adapter_config"),
        )
        if not callable(getattr(owner, name, None))
    ]
    try:
        from peft.tuners._buffer_dict import BufferDict  # noqa: F401
    except ImportError:
        missing.append("peft.tuners._buffer_dict.BufferDict")
    assert not missing, f"peft {peft.__version__}: gone: {', '.join(missing)}; rlora.tuner must change"
