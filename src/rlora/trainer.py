"""The Trainer that `rlora train` runs, one class per job: the head-only loss (`HeadOnlyLossTrainer`), the routers'
inputs, losses and learning rate (`RouterTraining`), the stop at a non-finite loss, FSDP over CPU processes, the
length-grouped order, and the validation scores of `watch.ValidationScores`; `RloraTrainer` is all of them."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import Trainer

from .data.mixture import index_dtype
from .errors import TrainingError
from .output_head import Capture, capture_hidden, causal_lm, head_only_loss, router_aux_loss
from .run import complete_checkpoints
from .watch import ValidationScores


class LengthGroupedIndices(torch.utils.data.Sampler):
    """transformers' `LengthGroupedSampler` order (a random permutation, cut into mega-batches of 50 batches at
    most, each sorted by length, longest first, and the longest item moved to the very first batch), in index
    arrays: the same indices for the same permutation, without the lists of Python integers it builds (hundreds of
    MB for millions of items). `tests/test_data_plan.py` checks it against transformers' function.

    The permutation of each epoch is drawn from a generator seeded by `seed` and the epoch (`set_epoch`, called by
    the Trainer before each epoch), never from the global generator: a run resumed in any epoch sees the order the
    uninterrupted run saw there, whatever the random draws before it."""

    def __init__(self, lengths, batch_size: int, seed: int = 0) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self) -> torch.Generator:
        """The generator of this epoch's permutation, a function of (seed, epoch) only."""
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        n = len(self.lengths)
        mult = min(n // (self.batch_size * 4), 50) or 1
        size = mult * self.batch_size
        indices = torch.randperm(n, generator=self.generator()).numpy()
        indices = indices.astype(index_dtype(n), copy=False)  # kept for the whole epoch
        starts = range(0, n, size)
        for start in starts:  # each mega-batch by length, longest first; equal lengths keep their order
            block = indices[start : start + size]
            indices[start : start + size] = block[np.argsort(-self.lengths[block], kind="stable")]
        maxima = self.lengths[indices[list(starts)]]
        first_max = int(np.argmax(maxima)) * size  # the first of equal maxima, as torch.argmax
        indices[0], indices[first_max] = indices[first_max], indices[0]
        return map(int, indices)


class HeadOnlyLossTrainer(Trainer):
    """The Trainer, with the causal-LM loss computed from the output head at the trained positions only
    (`output_head.head_only_loss`: no batch x sequence x vocabulary logits), the same loss and gradients as the
    model's own, its router's auxiliary loss included. The loss is the Trainer's public `compute_loss_func` hook: the
    Trainer runs the forward (under its autocast), counts the trained tokens and scales the loss as for any such
    function; `compute_loss` only makes that forward skip the logits (`capture_hidden`), and the head then runs in the
    forward's own autocast state. Where the model's weights are sharded over processes (DeepSpeed, FSDP: the head's
    weights exist whole only inside the model's forward) or the outputs are asked for, the same loss comes from the
    model's full logits through its own loss function. A label smoother or a `compute_loss_func` of the caller's is
    left to the Trainer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.compute_loss_func is None and self.label_smoother is None:
            self.compute_loss_func = self._causal_lm_loss
        self._capture: Capture | None = None
        self._shift_labels: torch.Tensor | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.compute_loss_func != self._causal_lm_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        self._shift_labels = inputs.pop("shift_labels", None)  # the Trainer passes only `labels` to the function
        skip_logits = not (return_outputs or self.is_deepspeed_enabled or self.is_fsdp_enabled)
        try:
            with capture_hidden(model) if skip_logits else contextlib.nullcontext() as self._capture:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._capture = self._shift_labels = None

    def _causal_lm_loss(self, outputs, labels, num_items_in_batch=None) -> torch.Tensor:
        if self._capture is not None:
            self._capture.outputs = outputs
            return head_only_loss(self._capture, labels, num_items_in_batch, self._shift_labels)
        lm = causal_lm(self.model)
        vocab_size = lm.config.get_text_config().vocab_size
        loss = lm.loss_function(
            outputs.logits, labels, vocab_size, num_items_in_batch=num_items_in_batch, shift_labels=self._shift_labels
        )
        aux = router_aux_loss(lm, outputs)
        return loss if aux is None else loss + aux.to(loss.device)


class RouterTraining:
    """The routers' part of training: each example's task and its real tokens given to the adapter's layers around
    the forward (`RLoraModel.routing`), the router losses added to the loss and logged, and with `router_lr_scale`
    != 1 the routers' weights in an optimizer group of their own at that multiple of the learning rate (following
    the same schedule)."""

    def __init__(self, *args, router_lr_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.router_lr_scale = router_lr_scale
        self.router_log: list[dict[str, torch.Tensor]] = []  # the router losses since the last log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The loss of the parent classes, with the router inputs (each example's task, its real tokens) given to
        the adapter's layers, and the router losses added (`with_router_losses`)."""
        tuner = rlora_tuner(self.accelerator.unwrap_model(model))
        task_ids = inputs.pop("task_ids", None)
        if tuner is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        tuner.clear_router_losses()
        with tuner.routing(task_ids, inputs.get("attention_mask")):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return self.with_router_losses(tuner, out, num_items_in_batch)

    def with_router_losses(self, tuner, out, num_items_in_batch):
        """`out` (a loss, or (loss, outputs)) plus the router losses of the forward pass just run (none when their
        coefficients are 0), scaled as the Trainer scales the loss for gradient accumulation; their raw values are
        kept for the next log."""
        losses = tuner.router_losses()
        if losses is None:
            return out
        self.router_log.append({k: v.detach() for k, v in losses.items()})
        extra = losses["loss"]
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:  # as `Trainer.training_step` decides it
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func
        if scaled:  # the main loss is already a share of the accumulated batch's; the router losses become one too
            extra = extra / self.current_gradient_accumulation_steps
        if isinstance(out, tuple):
            return (out[0] + extra.to(out[0].dtype), *out[1:])
        return out + extra.to(out.dtype)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, with the router losses' mean since the last log (`router_balance_loss`,
        `router_z_loss`: raw, before their coefficients; the logged `loss` includes them times their coefficients)."""
        if self.router_log and "loss" in logs:
            for key in ("balance", "z"):
                logs[f"router_{key}_loss"] = torch.stack([r[key] for r in self.router_log]).mean().item()
            self.router_log.clear()
        super().log(logs, start_time)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.router_lr_scale != 1.0:
            routers = {id(p) for n, p in self.model.named_parameters() if is_router_parameter(n) and p.requires_grad}
            moved = []
            for group in optimizer.param_groups:
                moved += [p for p in group["params"] if id(p) in routers]
                group["params"] = [p for p in group["params"] if id(p) not in routers]
            if moved:
                lr = optimizer.param_groups[0]["lr"] * self.router_lr_scale
                optimizer.add_param_group({"params": moved, "lr": lr, "weight_decay": 0.0})
        return optimizer


class StopOnNonFiniteLoss:
    """Stops at the first NaN or infinite loss, naming the step; the last good checkpoint stays on disk."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            last = complete_checkpoints(Path(self.args.output_dir))
            kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint had been written yet"
            raise TrainingError(
                f"non-finite training loss ({loss.item()}) at step {self.state.global_step + 1}; training stopped, "
                f"{kept}. Lower training.lr or check the data."
            )
        return loss


class FsdpOverCpuProcesses:
    """`training.fsdp` shards over CPU processes too."""

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's, with FSDP switched on over CPU processes: accelerate turns the Trainer's FSDP setting on for
        accelerator devices only and would train data-parallel there without a word, while FSDP2's `fully_shard`
        shards over gloo as well. Switched on as accelerate does it on GPUs: the plugin on the shared state, and the
        distributed type on it and on the process state it is copied from."""
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if self.args.fsdp_plugin_args is not None and state.distributed_type == DistributedType.MULTI_CPU:
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.is_fsdp_enabled = True


class LengthGroupedOrder:
    """`group_by_length` in index arrays (`LengthGroupedIndices`), the same order as transformers' sampler."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            return LengthGroupedIndices(
                dataset.lengths,
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            )
        return super()._get_train_sampler(train_dataset)


class RloraTrainer(
    RouterTraining, StopOnNonFiniteLoss, FsdpOverCpuProcesses, LengthGroupedOrder, ValidationScores, HeadOnlyLossTrainer
):
    """The Trainer `rlora train` runs: the head-only loss, and each job above in its own class, in this order."""


def is_router_parameter(name: str) -> bool:
    """The routers' weights: the token router W_r and the task logits of task routing (`training.router_lr_scale`)."""
    return "rlora_router" in name or "rlora_task_logits" in name


def rlora_tuner(model):
    """The `RLoraModel` inside a PEFT model (None for any other model: plain LoRA)."""
    from .tuner import RLoraModel

    tuner = getattr(model, "base_model", None)
    return tuner if isinstance(tuner, RLoraModel) else None
