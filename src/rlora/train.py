"""Training on a multi-task mixture with the Hugging Face Trainer, into a run folder (its layout: `run.py`).

Single process, `torchrun --nproc_per_node=N`, `accelerate launch`, DeepSpeed and FSDP all go through the
same code: the Trainer does the distribution, every process builds the same data deterministically, and only
the main process writes the run folder's files.

The Trainer's customisations live in `trainer.py`, one class per job; checkpoint marking and the resume checks live
beside `train()`, which reads top to bottom.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib.util
import logging
import math
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from safetensors import SafetensorError
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.training_args import ParallelMode

from . import models
from ._io import atomic_write_text, mark_complete, unmark_complete
from .adapters import README_FILE, adapter_readme
from .data.plan import plan_data
from .errors import ConfigError, MissingPackage, RloraError, RunFolderError, TrainingError, pickle_refusal
from .methods import PEFT_TYPES, adapter_config, adapter_sizes, is_multi_head
from .run import (
    RunFolder,
    check_lengths,
    checkpoint_dir,
    complete_checkpoints,
)
from .runconfig import RunConfig, validate_run_config
from .trainer import RloraTrainer
from .watch import tracking, trainer_arguments, watch

logger = logging.getLogger(__name__)


DATA_FINGERPRINT_FILE = "rlora_data_fingerprint"  # in each checkpoint: `DataPlan.fingerprint` of the data it trained on


class _MarkComplete(TrainerCallback):
    """After the Trainer has written a checkpoint (state last), mark it complete; resume only trusts marked ones.
    Then, and only then, the oldest complete checkpoints beyond `keep` are removed (the Trainer's own rotation,
    which runs before this callback, is off): a kill at any moment leaves at least one complete checkpoint."""

    def __init__(self, keep: int, data_fingerprint: str) -> None:
        self.keep = keep
        self.data_fingerprint = data_fingerprint

    def on_save(self, args, state, control, **kwargs):
        if args.distributed_state is not None:
            args.distributed_state.wait_for_everyone()  # every process has written its part (rng state, shards)
        if state.is_world_process_zero:
            folder = checkpoint_dir(Path(args.output_dir), state.global_step)
            if folder.is_dir():
                atomic_write_text(folder / DATA_FINGERPRINT_FILE, self.data_fingerprint + "\n")
                mark_complete(folder, f"{state.global_step}\n")
            best = Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None
            for old in complete_checkpoints(Path(args.output_dir))[: -self.keep]:
                if old.name == best:  # training.keep_best: kept, as the Trainer's own rotation keeps it
                    continue
                unmark_complete(old)  # first: a kill during the removal leaves an incomplete one, never trusted
                shutil.rmtree(old, ignore_errors=True)
        return control


def precision_flags(precision: str) -> dict[str, bool]:
    """The Trainer's bf16/fp16 flags. bf16 without an accelerator runs on the CPU (torch's CPU autocast; the Trainer
    needs `use_cpu` for it); fp16 there is a ConfigError: accelerate would train in fp32 without a word."""
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and _accelerator() is None:
        raise ConfigError(
            "training.precision: fp16 needs a GPU (or another accelerator) and this machine has none (on a CPU the "
            "Trainer would silently train in fp32); use bf16, fp32 or auto"
        )
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _accelerator():
    if hasattr(torch, "accelerator"):  # torch >= 2.6
        return torch.accelerator.current_accelerator()
    return torch.device("cuda") if torch.cuda.is_available() else None


def _multi_process_without_gpu() -> bool:
    """Accelerate only sets up data parallelism over CPU processes (gloo) when told to use the CPU."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def build_peft_model(cfg: RunConfig, model: torch.nn.Module, task_names: list[str] | None = None) -> torch.nn.Module:
    """Adds the configured method's adapter; the adapter's random init is seeded by `cfg.seed`. A quantized base is
    prepared for training first, as PEFT's `prepare_model_for_kbit_training` does (its norms and other float weights
    in float32, gradients reaching the adapters through the frozen embeddings). An adapter that cannot fit in the
    memory left is refused first (`check_adapter_fits`). `task_names`: the run's tasks, in the data plan's order
    (the task ids of task routing)."""
    check_adapter_fits(cfg, model)
    if cfg.base.quantization != "none":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.training.gradient_checkpointing,
            gradient_checkpointing_kwargs=_checkpointing_kwargs(cfg),
        )
    peft_config = adapter_config(cfg.method, **dataclasses.asdict(cfg.adapter), model=model, task_names=task_names)
    set_seed(cfg.seed)
    return get_peft_model(model, peft_config)


def _checkpointing_kwargs(cfg: RunConfig) -> dict[str, bool]:
    return {"use_reentrant": cfg.training.gradient_checkpointing_reentrant}


TRAINING_COPIES = 4  # an adapter weight in training: itself, its gradient and AdamW's two moments


def check_adapter_fits(cfg: RunConfig, model: torch.nn.Module) -> None:
    """Refuses (one line, before any allocation) an adapter whose weights, gradients and optimizer state would need
    more memory than the device holding `model` has free: `adapter.num_heads` and `adapter.r` have no fixed ceiling,
    the model's layer sizes and the machine set it."""
    a = cfg.adapter
    try:
        heads, per_rank = adapter_sizes(model, a.target_modules, a.r, a.num_heads)
    except ConfigError:  # no layer matches: PEFT says so, in its words
        return
    plain = not is_multi_head(cfg.method) and a.lora_r is not None
    weights = per_rank * a.lora_r if plain else heads
    what = f"lora_r {a.lora_r}" if plain else f"r {a.r} x num_heads {a.num_heads}"
    need = weights * TRAINING_COPIES * 4  # float32
    free = models.free_memory(next(model.parameters()).device)
    if free is not None and need > free:
        raise ConfigError(
            f"adapter: {what} on this model makes {weights:,} adapter weights, about "
            f"{need / 2**30:.1f} GiB to train (with gradients and optimizer state), more than the "
            f"{free / 2**30:.1f} GiB free; lower adapter.r or adapter.num_heads"
        )


def training_arguments(cfg: RunConfig, folder: RunFolder) -> TrainingArguments:
    t = cfg.training
    flags = precision_flags(t.precision)
    return TrainingArguments(
        output_dir=str(folder.checkpoints),
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
        save_total_limit=None,  # rotation after a checkpoint is marked complete: _MarkComplete
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_workers,
        dataloader_pin_memory=_accelerator() is not None,  # pinned pages only help a copy to an accelerator
        ddp_find_unused_parameters=False,
        deepspeed=t.deepspeed,
        fsdp=t.fsdp or "",
        disable_tqdm=False,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs=_checkpointing_kwargs(cfg) if t.gradient_checkpointing else None,
        torch_compile=t.torch_compile,
        use_cpu=_multi_process_without_gpu() or (flags["bf16"] and _accelerator() is None),
        **flags,
        **trainer_arguments(cfg, folder),  # trackers, validation scoring, best checkpoint: watch.py
    )


def train(
    cfg: RunConfig, resume: bool = False, cache_dir: str | None = None, accept_changed_data: bool = False
) -> Path:
    """Trains `cfg` into `cfg.output_dir` and returns the run folder. Bad input fails before the model loads and
    before anything is written; a folder that another process is training in is refused (`RunFolder.writer`). A
    resume whose task data changed since its checkpoint is refused, unless `accept_changed_data` (then a warning)."""
    validate_run_config(cfg, "run config")  # the one check of the config here: a RunConfig made in Python gets it too
    folder = RunFolder(cfg.output_dir)
    args = _trainer_arguments(cfg, folder)  # before the model loads, and held while it does: ZeRO-3 loads partitioned
    is_main = args.process_index == 0  # the one process that writes the run folder (and holds its lock)
    _zero3_ready(args)
    folder.check_start(cfg, resume, is_main)

    # validates tasks and files, before any model is loaded; training.eval_steps scores a validation split
    plan = plan_data(cfg.data, cfg.seed, cache_dir, validation=cfg.training.eval_steps is not None)
    logger.info("training mixture:\n%s", plan.counts_table())
    tokenizer = models.load_tokenizer(cfg.model, cache_dir, chat_template=cfg.data.chat_template)
    train_dataset = plan.train_dataset(tokenizer)  # every example fits data.max_length

    with (
        folder.writer() if is_main else contextlib.nullcontext(),
        _full_disk(folder),
        _no_start_left(folder, is_main),
        tracking(cfg, folder),
    ):
        last = folder.begin(cfg, resume, is_main)
        fingerprint = plan.fingerprint()
        if last is not None:
            check_same_data(last, fingerprint, accept_changed_data)
        base = models.load_model(cfg.model, tokenizer, cache_dir=cache_dir, loading=cfg.base)
        check_lengths(cfg, base)
        model = build_peft_model(cfg, base, task_names=list(plan.tasks))
        if is_main:
            model.print_trainable_parameters()
            folder.record_start(cfg, plan.manifest(), lambda tmp: _save_adapter(model, tmp, cfg))

        trainer = RloraTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            data_collator=plan.collator(tokenizer),
            processing_class=tokenizer,
            callbacks=[_MarkComplete(keep=cfg.training.save_total_limit, data_fingerprint=fingerprint)],
            router_lr_scale=cfg.training.router_lr_scale,
            eval_dataset=plan.validation if cfg.training.eval_steps is not None else None,
        )
        watch(trainer, cfg, plan, folder)  # the log as it goes, trackers' parameters, validation, router telemetry
        result = _fit(trainer, last)

        trainer.save_model(str(folder.adapter_staging))  # on every process: gathers ZeRO-3/FSDP shards; main writes
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            _write_readme(folder.adapter_staging, cfg)
            metrics = dict(result.metrics) | {"global_step": trainer.state.global_step}
            metrics["final_loss"] = _last_logged_loss(trainer.state.log_history)
            folder.publish(trainer.state.log_history, metrics)
    return folder.root


def _trainer_arguments(cfg: RunConfig, folder: RunFolder) -> TrainingArguments:
    """`training_arguments`, with what the Trainer or this machine refuses of them as a ConfigError, before anything
    is read or written."""
    launched_with_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if launched_with_fsdp and not cfg.training.fsdp and _multi_process_without_gpu():
        raise ConfigError(
            "training.fsdp: unset, and accelerate's own FSDP settings (accelerate launch --use_fsdp) are applied on "
            "accelerator devices only: these CPU processes would train data-parallel without a word. Give the FSDP "
            'options as training.fsdp (e.g. "full_shard auto_wrap") to shard over CPU processes'
        )
    if cfg.training.deepspeed is not None and not torch.cuda.is_available() and not models.has_cpp_compiler():
        raise ConfigError(
            "training.deepspeed: on CPUs DeepSpeed builds its communication op from C++ on its first run and no C++ "
            "compiler (c++, g++, clang++) is on PATH; install one, or shard with training.fsdp instead"
        )
    if cfg.training.deepspeed is not None and importlib.util.find_spec("deepspeed") is None:
        raise MissingPackage("training.deepspeed: the deepspeed package is not installed; pip install deepspeed")
    try:
        args = training_arguments(cfg, folder)
    except ValueError as error:  # the Trainer's own checks of its settings (e.g. an fsdp option)
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"training: the Trainer refuses these settings: {' '.join(str(error).split())}") from None
    if args.fsdp and not args.fsdp_config.get("xla", False) and args.parallel_mode != ParallelMode.DISTRIBUTED:
        raise ConfigError(
            "training.fsdp: FSDP shards the model over several processes; start them with torchrun or accelerate "
            "launch, or leave training.fsdp unset"
        )
    return args


def _zero3_ready(args: TrainingArguments) -> None:
    """Makes DeepSpeed's communication layer wrap the process group the arguments have set up, before the model loads.
    With a ZeRO-3 config the arguments switch on `deepspeed.zero.Init` in `from_pretrained` (they hold the config it
    reads), which partitions the weights as they load and checks the config's batch sizes against DeepSpeed's world
    size: on GPUs accelerate has initialised that layer already; over CPU processes (gloo) nothing has, and the world
    size would read 1."""
    if args.deepspeed and args.world_size > 1:
        from deepspeed import comm

        if not comm.is_initialized():
            comm.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def check_same_data(checkpoint: Path, fingerprint: str, accept_changed_data: bool = False) -> None:
    """Resuming from `checkpoint` on data whose `DataPlan.fingerprint` is not the one it was saved with would train the
    rest of the run on other data, silently: refused (RunFolderError), or with `accept_changed_data` a warning. A
    checkpoint without a fingerprint (saved by an older rlora) has nothing to compare."""
    try:
        saved = (checkpoint / DATA_FINGERPRINT_FILE).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError):
        saved = "unreadable"
    if saved == fingerprint:
        return
    what = f"{checkpoint}: the run's task data changed since this checkpoint was saved"
    if accept_changed_data:
        logger.warning("%s; training on with the new data (--accept-changed-data)", what)
        return
    raise RunFolderError(
        f"{what} (a file edited, added or removed); pass --accept-changed-data to train on with the new data, or "
        "start a new run in another output_dir"
    )


def _fit(trainer: Trainer, last: Path | None):
    """`trainer.train()`, from checkpoint `last` if given; a checkpoint whose pickled state was planted or altered is
    a RunFolderError naming it."""
    try:
        if last is not None and trainer.is_deepspeed_enabled:
            with _deepspeed_loads_tag(check_deepspeed_checkpoint(last)):
                return trainer.train(resume_from_checkpoint=str(last))
        return trainer.train(resume_from_checkpoint=str(last) if last else None)
    except pickle.UnpicklingError as error:  # a checkpoint file (optimizer, scheduler, rng) planted or altered
        if last is None:
            raise
        raise RunFolderError(
            f"{last}: a file of the checkpoint was {pickle_refusal(error)}; remove {last} to resume from the one before"
        ) from None


DEEPSPEED_TAG = re.compile(r"global_step\d{1,12}")  # the tags the Trainer's DeepSpeed checkpoints are saved under


def check_deepspeed_checkpoint(checkpoint: Path) -> str:
    """The tag DeepSpeed is to resume `checkpoint` from, once checked: rlora reads the checkpoint's `latest` file
    itself (DeepSpeed would follow it anywhere), accepts only a plain `global_stepN` naming a folder of the checkpoint,
    and loads every file in that folder with torch's weights-only loading first. DeepSpeed unpickles its files with
    torch's full unpickler (`weights_only=False`), which would run whatever code a planted file holds; the weights-only
    loading builds tensors, containers and the few plain DeepSpeed records its files hold (ZeRO stage, loss scaler,
    fragment address), and nothing else: pickle.UnpicklingError otherwise. Any other fault is a RunFolderError."""
    latest = checkpoint / "latest"
    redo = f"remove {checkpoint} to resume from the one before"
    try:
        with open(latest, "rb") as f:
            tag = f.read(64).decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as error:
        why = error.strerror if isinstance(error, OSError) else "not ASCII text"
        raise RunFolderError(f"{latest}: cannot read DeepSpeed's checkpoint tag ({why}); {redo}") from None
    folder = checkpoint / tag
    if not DEEPSPEED_TAG.fullmatch(tag) or folder.is_symlink() or not folder.is_dir():
        raise RunFolderError(
            f"{latest}: names {tag[:40]!r}, expected global_stepN naming a folder of the checkpoint; {redo}"
        )
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]):
        for path in sorted(folder.rglob("*.pt")):  # what DeepSpeed loads: model, optimizer and expert states
            torch.load(path, map_location="cpu", weights_only=True)
    return tag


@contextlib.contextmanager
def _deepspeed_loads_tag(tag: str) -> Iterator[None]:
    """While the block runs, the Trainer resumes DeepSpeed from the checkpoint folder `tag` (checked by
    `check_deepspeed_checkpoint`) instead of whatever the checkpoint's `latest` file says by then. The Trainer calls
    transformers' `deepspeed_load_checkpoint`, which passes no tag; this one passes it (a test pins the name)."""
    import transformers.trainer as hf_trainer

    def load(engine, checkpoint_path: str, load_module_strict: bool = True) -> None:
        path, _ = engine.load_checkpoint(
            checkpoint_path,
            tag=tag,
            load_module_strict=load_module_strict,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise RunFolderError(f"{checkpoint_path}: DeepSpeed could not load {tag}; remove it to resume from before")

    original = hf_trainer.deepspeed_load_checkpoint
    hf_trainer.deepspeed_load_checkpoint = load
    try:
        yield
    finally:
        hf_trainer.deepspeed_load_checkpoint = original


def _save_adapter(model, folder: Path, cfg: RunConfig) -> None:
    model.save_pretrained(folder)
    _write_readme(folder, cfg)


def _write_readme(adapter: Path, cfg: RunConfig) -> None:
    """Replaces PEFT's model card template with what a user of this adapter needs to know (`adapter_readme`)."""
    text = adapter_readme(cfg.method, PEFT_TYPES[cfg.method], cfg.model, cfg.base.quantization)
    atomic_write_text(Path(adapter) / README_FILE, text)


FULL = 1 << 20  # bytes free below which a failed write is put down to a full disk (torch.save says "basic_ios")


@contextlib.contextmanager
def _no_start_left(folder: RunFolder, is_main: bool) -> Iterator[None]:
    """Bad input that shows only once training reads it (an example whose answer alone is longer than
    data.max_length) leaves no start behind: what the start wrote is removed when it saved nothing, so the folder
    goes too if the run made it (`RunFolder.writer`). An interrupted start is kept: it resumes."""
    try:
        yield
    except RloraError as error:
        if is_main and not isinstance(error, TrainingError) and folder.root.is_dir() and folder.saved_nothing():
            folder.clear_start()
        raise


@contextlib.contextmanager
def _full_disk(folder: RunFolder):
    """A write that fails because the run folder's disk is full (ENOSPC, safetensors' "No space left", or
    torch.save's stream error with under `FULL` bytes left) is a TrainingError naming the folder and the last
    complete checkpoint, which stays usable: nothing half-written is marked complete."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        if isinstance(error, RloraError):
            raise
        full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error)
        if not full and not isinstance(error, OSError):
            with contextlib.suppress(OSError):
                full = shutil.disk_usage(folder.root).free < FULL
        if not full:
            raise
        last = complete_checkpoints(folder.checkpoints)
        kept = f"the last complete checkpoint is {last[-1]}" if last else "no checkpoint was complete"
        raise TrainingError(
            f"{folder.root}: the disk is full; training stopped, {kept}. Free space there, then rerun with --resume"
        ) from None


def ensure_trained(cfg: RunConfig, cache_dir: str | None = None) -> Path:
    """The run folder of `cfg`, trained: a finished run is reused, an interrupted one resumed."""
    folder = RunFolder(cfg.output_dir)
    if not folder.is_finished():
        train(cfg, resume=bool(folder.complete_checkpoints()), cache_dir=cache_dir)
    return folder.root


def _last_logged_loss(history: list[dict]) -> float | None:
    losses = [r["loss"] for r in history if "loss" in r]
    return losses[-1] if losses and math.isfinite(losses[-1]) else None
