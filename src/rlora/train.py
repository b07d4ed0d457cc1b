"""Training on a multi-task mixture with the Hugging Face Trainer.

The run folder holds everything about a run:

    RUN_DIR/config.yaml          the resolved run config (every default filled in)
    RUN_DIR/data_manifest.json   tasks, split, per-task counts of the training mixture and of the test sets
    RUN_DIR/checkpoints/         Trainer checkpoints (each marked complete once fully written)
    RUN_DIR/adapter/             the final adapter (PEFT format), written atomically
    RUN_DIR/adapter_init/        the adapter as initialised (step 0), for the head-similarity analysis
    RUN_DIR/train_log.jsonl      the Trainer's log history, one record a line
    RUN_DIR/train_metrics.json   final training metrics

Single process, `torchrun --nproc_per_node=N`, `accelerate launch`, DeepSpeed and FSDP all go through the
same code: the Trainer does the distribution, every process builds the same data deterministically, and only
the main process writes the run folder's files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from ._io import atomic_dir, atomic_write_json, atomic_write_text
from .data_plan import plan_data
from .methods import adapter_config
from .runconfig import RunConfig, check_same_config, dump_run_config

logger = logging.getLogger(__name__)
COMPLETE_MARKER = "checkpoint_complete"


class TrainingError(RuntimeError):
    """Training stopped; the message says why and what was kept."""


@dataclass
class RunPaths:
    root: Path

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def adapter_init(self) -> Path:
        return self.root / "adapter_init"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"


def complete_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints that were fully written, oldest first."""
    if not folder.is_dir():
        return []
    done = [p for p in folder.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


class _MarkComplete(TrainerCallback):
    """After the Trainer has written a checkpoint (state last), mark it complete; resume only trusts marked ones."""

    def on_save(self, args, state, control, **kwargs):
        if args.distributed_state is not None:
            args.distributed_state.wait_for_everyone()  # every process has written its part (rng state, shards)
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                atomic_write_text(folder / COMPLETE_MARKER, f"{state.global_step}\n")
        return control


class _FiniteLossTrainer(Trainer):
    """Stops at the first NaN or infinite loss, naming the step; the last good checkpoint stays on disk.

    With `router_lr_scale` != 1 the routers' weights train at that multiple of the learning rate (their own
    optimizer group, following the same schedule)."""

    def __init__(self, *args, router_lr_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.router_lr_scale = router_lr_scale

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.router_lr_scale != 1.0:
            routers = {id(p) for n, p in self.model.named_parameters() if "rlora_router" in n and p.requires_grad}
            moved = []
            for group in optimizer.param_groups:
                moved += [p for p in group["params"] if id(p) in routers]
                group["params"] = [p for p in group["params"] if id(p) not in routers]
            if moved:
                lr = optimizer.param_groups[0]["lr"] * self.router_lr_scale
                optimizer.add_param_group({"params": moved, "lr": lr, "weight_decay": 0.0})
        return optimizer

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


def precision_flags(precision: str) -> dict[str, bool]:
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _multi_process_without_gpu() -> bool:
    """Accelerate only sets up data parallelism over CPU processes (gloo) when told to use the CPU."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def build_peft_model(cfg: RunConfig, model: torch.nn.Module) -> torch.nn.Module:
    """Adds the configured method's adapter; the adapter's random init is seeded by `cfg.seed`."""
    peft_config = adapter_config(cfg.method, **dataclasses.asdict(cfg.adapter), model=model)
    set_seed(cfg.seed)
    return get_peft_model(model, peft_config)


def training_arguments(cfg: RunConfig, paths: RunPaths) -> TrainingArguments:
    t = cfg.training
    return TrainingArguments(
        output_dir=str(paths.checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        remove_unused_columns=False,
        report_to=[],
        dataloader_num_workers=t.dataloader_workers,
        ddp_find_unused_parameters=False,
        deepspeed=t.deepspeed,
        fsdp=t.fsdp or "",
        disable_tqdm=False,
        use_cpu=_multi_process_without_gpu(),
        **precision_flags(t.precision),
    )


def train(cfg: RunConfig, resume: bool = False, cache_dir: str | None = None) -> Path:
    """Trains `cfg` into `cfg.output_dir` and returns the run folder. Bad input fails before the model loads."""
    paths = RunPaths(Path(cfg.output_dir))
    if paths.adapter.exists():
        raise TrainingError(f"{paths.root} already holds a finished run ({paths.adapter}); choose another output_dir")
    checkpoints = complete_checkpoints(paths.checkpoints)
    if checkpoints and not resume:
        raise TrainingError(
            f"{paths.root} holds checkpoints of an unfinished run; pass --resume to continue it, "
            "or choose another output_dir"
        )
    check_same_config(cfg, paths.root)
    plan = plan_data(cfg)  # validates tasks and files, before any model is loaded
    logger.info("training mixture:\n%s", plan.counts_table())

    from .models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(cfg.model, cache_dir=cache_dir)
    model = build_peft_model(cfg, model)
    args = training_arguments(cfg, paths)
    if args.process_index == 0:
        model.print_trainable_parameters()
        paths.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(paths.root / "config.yaml", dump_run_config(cfg))
        atomic_write_json(paths.root / "data_manifest.json", plan.manifest())
        if not paths.adapter_init.exists():  # the heads at step 0, for `rlora analyze`
            with atomic_dir(paths.adapter_init) as tmp:
                model.save_pretrained(tmp)
    if resume:
        _drop_incomplete_checkpoints(paths.checkpoints, args.process_index)
    staging = paths.root / ".adapter.staging"
    if args.process_index == 0:
        shutil.rmtree(staging, ignore_errors=True)
    last = checkpoints[-1] if resume and checkpoints else None

    trainer = _FiniteLossTrainer(
        model=model,
        args=args,
        train_dataset=plan.train_dataset(tokenizer),
        data_collator=plan.collator(tokenizer),
        processing_class=tokenizer,
        callbacks=[_MarkComplete()],
        router_lr_scale=cfg.training.router_lr_scale,
    )
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    trainer.save_model(str(staging))  # on every process: gathers ZeRO-3/FSDP shards; the main process writes
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        os.replace(staging, paths.adapter)  # the adapter appears whole or not at all
        log = "".join(json.dumps(record) + "\n" for record in trainer.state.log_history)
        atomic_write_text(paths.root / "train_log.jsonl", log)
        metrics = dict(result.metrics) | {"global_step": trainer.state.global_step}
        metrics["final_loss"] = _last_logged_loss(trainer.state.log_history)
        atomic_write_json(paths.root / "train_metrics.json", metrics)
    return paths.root


def ensure_trained(cfg: RunConfig, cache_dir: str | None = None) -> Path:
    """The run folder of `cfg`, trained: a finished run is reused, an interrupted one resumed."""
    paths = RunPaths(Path(cfg.output_dir))
    if not paths.adapter.is_dir():
        train(cfg, resume=bool(complete_checkpoints(paths.checkpoints)), cache_dir=cache_dir)
    return paths.root


def _last_logged_loss(history: list[dict]) -> float | None:
    losses = [r["loss"] for r in history if "loss" in r]
    return losses[-1] if losses and math.isfinite(losses[-1]) else None


def _drop_incomplete_checkpoints(folder: Path, process_index: int) -> None:
    if process_index != 0 or not folder.is_dir():
        return
    complete = set(complete_checkpoints(folder))
    for path in folder.glob("checkpoint-*"):
        if path not in complete:
            logger.warning("removing incomplete checkpoint %s (the run was interrupted while writing it)", path)
            shutil.rmtree(path, ignore_errors=True)
