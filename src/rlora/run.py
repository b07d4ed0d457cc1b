"""A run folder: where each of its files lives, its lock, its checkpoints, and loading the run it holds.

    RUN_DIR/config.yaml           the resolved run config (every default filled in)
    RUN_DIR/data_manifest.json    tasks, split, per-task counts of the training mixture and of the test sets
    RUN_DIR/checkpoints/          Trainer checkpoints (checkpoint-<step>), each marked complete once fully written
    RUN_DIR/adapter/              the final adapter (PEFT format); the run is finished once it exists
    RUN_DIR/adapter_init/         the adapter as initialised (step 0), for the head-similarity analysis
    RUN_DIR/train_log.jsonl       the Trainer's log history, one record a line, appended while training
                                  (loss, validation scores, router telemetry: `watch.py`, `telemetry.py`)
    RUN_DIR/tracking/             what the trackers of training.report_to write locally (TensorBoard, MLflow, ...)
    RUN_DIR/watch.json            what watching the run decided: the checkpoint kept (training.keep_best), a stop
    RUN_DIR/curves/               the training curves drawn from train_log.jsonl (`rlora curves`)
    RUN_DIR/train_metrics.json    final training metrics
    RUN_DIR/eval.json, eval.md    per-task accuracy and held-out loss of the adapter (`rlora eval`)
    RUN_DIR/eval_base.json, .md   the same for the base model alone (`rlora eval --base`, `rlora demo`)
    RUN_DIR/analysis/             head similarity, router usage and the head map (`rlora analyze`)
    RUN_DIR/demo.md               the demo's table (`rlora demo`)
    RUN_DIR/.rlora-lock           while a process writes the run (`RunFolder.writer`), its lock: one writer at a time

Every other module asks a `RunFolder` for these paths; `Run.open` is the one way to get a run's config, data,
model and adapter back, and it checks that the adapter is the run's (`adapters.py`) before any model loads.
Training writes the folder (`train.py`), `rlora eval` and `rlora analyze` their results (`commands/`); everything
is written atomically (`_io.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil
import socket
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import models
from ._io import (
    Busy,
    atomic_dir,
    atomic_write_json,
    atomic_write_json_and_view,
    atomic_write_text,
    exclusive_lock,
    held_by,
    is_complete,
    publish_dir,
    writing,
)
from .adapters import CONFIG_FILE, load_adapter, read_adapter
from .data import gold_spans
from .data.plan import DataPlan, plan_data
from .errors import AdapterError, ConfigError, RunFolderError, TrainingError
from .methods import PEFT_TYPES, adapter_config, is_multi_head
from .reports import results_table
from .runconfig import RunConfig, dump_run_config, load_run_config

logger = logging.getLogger(__name__)


class RunFolder:
    """The paths of one run folder, and the files that several commands read or write."""

    def __init__(self, root: str | Path) -> None:
        self.root = root = Path(root)
        self.config = root / "config.yaml"
        self.manifest = root / "data_manifest.json"
        self.checkpoints = root / "checkpoints"
        self.adapter = root / "adapter"
        self.adapter_staging = root / ".adapter.staging"  # every process saves the adapter here, then one rename
        self.adapter_init = root / "adapter_init"
        self.train_log = root / "train_log.jsonl"
        self.train_metrics = root / "train_metrics.json"
        self.tracking = root / "tracking"
        self.watch = root / "watch.json"
        self.curves = root / "curves"
        self.analysis = root / "analysis"
        self.demo_table = root / "demo.md"
        self.lock = root / ".rlora-lock"

    def results(self, base: bool = False, suffix: str = ".json") -> Path:
        """The evaluation results of the adapter, or with `base` of the base model alone (`suffix` .json or .md)."""
        return self.root / (("eval_base" if base else "eval") + suffix)

    def is_finished(self) -> bool:
        return self.adapter.is_dir()

    def complete_checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.checkpoints)

    def check_config(self, cfg: RunConfig, restart: bool = False) -> None:
        """Refuses to continue, reuse or overwrite a run folder that was made with another config, and to write a run
        into a folder that holds other files (hidden ones aside: a lock, a temporary file). A saved config that lacks
        a key added to rlora since (its default is what the run did) is the same config. With `restart` (training),
        a run that saved nothing yet (`saved_nothing`) may be started again with another config."""
        if self.config.is_file() and not self.same_config(cfg) and not (restart and self.saved_nothing()):
            raise ConfigError(
                f"{self.root} was made with a different config ({self.config}); use the same config and overrides, "
                "or another output_dir"
            )
        if not self.config.is_file() and self.root.is_dir():
            others = sorted(p.name for p in self.root.iterdir() if not p.name.startswith("."))
            if others:
                raise RunFolderError(
                    f"{self.root} holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) "
                    "and no run (no config.yaml); choose a new or empty output_dir"
                )

    def same_config(self, cfg: RunConfig) -> bool:
        """The saved config is `cfg`'s: the same settings, and paths that name the same files however spelled (the
        output_dir is this folder: relative to another working directory, or absolute, it is the same run)."""
        if self.config.read_text() == dump_run_config(cfg):
            return True
        return _identity(self.read_config()) == _identity(cfg)  # read: defaults filled in for keys it lacks

    def saved_nothing(self) -> bool:
        """The run started but saved no progress and no result (it stopped before its first checkpoint, e.g. a
        check that failed once the model was loaded): it holds only what a start writes."""
        start = {self.config, self.manifest, self.adapter_init, self.checkpoints, self.train_log, self.tracking}
        others = [p for p in self.root.iterdir() if not p.name.startswith(".") and p not in start]
        return not others and not self.complete_checkpoints()

    def clear_start(self) -> None:
        """Removes what a start that saved nothing wrote (`saved_nothing`), before a start with another config."""
        for path in (self.adapter_init, self.checkpoints, self.tracking):
            shutil.rmtree(path, ignore_errors=True)
        for path in (self.config, self.manifest, self.train_log):
            path.unlink(missing_ok=True)

    def check_start(self, cfg: RunConfig, resume: bool, is_main: bool = True) -> None:
        """What the folder allows, before anything is read or written: a new run, or with `resume` the continuation
        of the same config's run; and (`is_main`, the process that will write it) no other process writing it."""
        if is_main:
            self.check_free()
        if self.is_finished():
            raise TrainingError(f"{self.root} already holds a finished run ({self.adapter}); choose another output_dir")
        if self.complete_checkpoints() and not resume:
            raise TrainingError(
                f"{self.root} holds checkpoints of an unfinished run; pass --resume to continue it, "
                "or choose another output_dir"
            )
        if resume and not self.config.is_file():
            raise RunFolderError(
                f"--resume: {self.root} holds no run to resume (no config.yaml); start it without --resume"
            )
        self.check_config(cfg, restart=True)
        checkpoints = self.complete_checkpoints()
        problem = checkpoint_problem(checkpoints[-1], cfg) if resume and checkpoints else None
        if problem is not None:
            before = checkpoints[-2].name if len(checkpoints) > 1 else "step 0"
            raise RunFolderError(f"{problem}; to resume from {before} instead, remove {checkpoints[-1]}")

    def begin(self, cfg: RunConfig, resume: bool, is_main: bool) -> Path | None:
        """As the folder's writer (`writer`), before the model loads: `check_start` again (another process may have
        just written the folder); the main process clears an earlier start that saved nothing under another config,
        the checkpoints a kill left incomplete and a stale staging folder. Returns the checkpoint to resume from
        (None: step 0)."""
        self.check_start(cfg, resume, is_main=False)
        if is_main and self.config.is_file() and not self.same_config(cfg):  # a start that saved nothing
            logger.warning("%s: replacing an earlier start with another config, which saved nothing", self.root)
            self.clear_start()
        checkpoints = self.complete_checkpoints()
        if resume and not checkpoints:
            logger.warning("%s holds no complete checkpoint yet: training starts from step 0", self.root)
        if is_main:
            for path in incomplete_checkpoints(self.checkpoints) if resume else ():
                logger.warning("removing incomplete checkpoint %s (the run was interrupted while writing it)", path)
                shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(self.adapter_staging, ignore_errors=True)
        return checkpoints[-1] if resume and checkpoints else None

    def record_start(self, cfg: RunConfig, manifest: dict, save_init: Callable[[Path], None]) -> None:
        """The config, the data manifest and (once) the adapter at step 0, which `save_init` writes into a folder."""
        self.write_config(cfg)
        atomic_write_json(self.manifest, manifest)
        if not self.adapter_init.exists():  # the heads at step 0, for `rlora analyze`
            with atomic_dir(self.adapter_init) as tmp:
                save_init(tmp)

    def publish(self, log_history: list[dict], metrics: dict) -> None:
        """The finished run: the staged adapter made `adapter` whole or not at all, then the log and the metrics."""
        publish_dir(self.adapter_staging, self.adapter)
        atomic_write_text(self.train_log, "".join(json.dumps(record) + "\n" for record in log_history))
        atomic_write_json(self.train_metrics, metrics)

    def read_train_log(self) -> list[dict]:
        """The records of train_log.jsonl, written as training goes: a last line cut by a kill is left out (with a
        warning); any other line that is not a JSON object is a RunFolderError naming the file and the line."""
        try:
            lines = self.train_log.read_text(encoding="utf-8").split("\n")
        except FileNotFoundError:
            raise RunFolderError(f"{self.root}: no train_log.jsonl (the run has not logged a step yet)") from None
        except (OSError, UnicodeDecodeError) as error:
            raise RunFolderError(f"{self.train_log}: not readable ({error})") from None
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            elif number == len(lines):  # no newline after it: the line a kill cut
                logger.warning(
                    "%s: line %d is cut (the run was stopped while writing it); left out", self.train_log, number
                )
            else:
                raise RunFolderError(f"{self.train_log}: line {number}: expected a JSON object (one log record)")
        return records

    def record_watch(self, key: str, record: dict) -> None:
        """Adds `record` under `key` to RUN_DIR/watch.json (what watching the run decided: `watch.py`, `telemetry.py`);
        a damaged file is replaced."""
        data = {}
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(self.watch.read_text(encoding="utf-8"))
            data = loaded if isinstance(loaded, dict) else {}
        atomic_write_json(self.watch, data | {key: record})

    def check_free(self) -> None:
        """Refuses a folder that another process is writing (`writer`), naming it."""
        holder = held_by(self.lock)
        if holder is not None:
            raise self._busy(holder)

    @contextlib.contextmanager
    def writer(self) -> Iterator[None]:
        """Holds the run's lock while the block runs (making the folder if needed): a second process that would
        write the run meanwhile is refused, naming the first. The OS drops the lock when its process ends, however it
        ends. A folder made here that is still empty when the block ends (it failed early) is removed again."""
        made = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        try:
            with contextlib.ExitStack() as held:
                try:
                    held.enter_context(exclusive_lock(self.lock, holder))
                except Busy as busy:
                    raise self._busy(busy.holder) from None
                except PermissionError as error:
                    raise RunFolderError(f"{self.lock}: cannot take the run's lock ({error.strerror})") from None
                yield
        finally:
            if made and self.root.is_dir() and not any(self.root.iterdir()):
                self.root.rmdir()

    def _busy(self, holder: str) -> RunFolderError:
        return RunFolderError(
            f"{self.root} is being written by another process ({holder or 'unknown'}); wait for it to end, or choose "
            "another output_dir"
        )

    def write_config(self, cfg: RunConfig) -> None:
        atomic_write_text(self.config, dump_run_config(cfg))

    def read_config(self) -> RunConfig:
        if not self.config.is_file():
            raise RunFolderError(f"{self.root}: not a run folder (no config.yaml); train one with `rlora train`")
        return load_run_config(self.config)

    def write_results(self, results: dict, base: bool = False) -> None:
        """The results as JSON and their table beside it, never out of step (`atomic_write_json_and_view`); a disk
        that cannot take them is one line naming the folder."""
        table = results_table({"base" if base else results["method"]: results}) + "\n"
        with writing(self.root):
            atomic_write_json_and_view(self.results(base), results, self.results(base, ".md"), table)

    def read_results(self, base: bool = False) -> dict | None:
        """The saved results, or None when there are none, or when the file is damaged (not JSON, or without its
        tasks and average): the caller evaluates again, and a warning names the file."""
        path = self.results(base)
        if not path.is_file():
            return None
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(results, dict) and isinstance(results.get("tasks"), dict) and "average" in results:
                return results
            problem = "not rlora's results (no tasks and average)"
        except (OSError, ValueError) as error:
            problem = f"not readable JSON ({error})"
        logger.warning("%s: %s; evaluating the run again", path, problem)
        return None


def _identity(cfg: RunConfig) -> dict:
    """What makes a run: its settings, with the output_dir left out (the folder holding the config is the run's) and a
    local model folder resolved (a relative path names the same folder from anywhere it was valid)."""
    d = cfg.to_dict()
    d.pop("output_dir")
    model = Path(d["model"]).expanduser()
    if model.is_dir():
        d["model"] = str(model.resolve())
    return d


def checkpoint_dir(checkpoints: Path, step: int) -> Path:
    """The Trainer's name for the checkpoint of `step`."""
    return checkpoints / f"checkpoint-{step}"


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """The Trainer checkpoints that were fully written (marked complete), oldest first."""
    return sorted((p for p in _checkpoints(checkpoints) if is_complete(p)), key=lambda p: int(p.name.split("-")[1]))


def incomplete_checkpoints(checkpoints: Path) -> list[Path]:
    """The checkpoints a killed run left half-written (never marked complete)."""
    return [p for p in _checkpoints(checkpoints) if not is_complete(p)]


def _checkpoints(checkpoints: Path) -> list[Path]:
    found = checkpoints.glob("checkpoint-*") if checkpoints.is_dir() else []
    return [p for p in found if p.name.removeprefix("checkpoint-").isdigit()]


TRAINER_STATE = "trainer_state.json"  # the Trainer's (transformers.trainer_callback.TRAINER_STATE_NAME)
TORCH_FILES = ("*.pt", "*.pth", "*.bin")  # what the Trainer writes with torch.save (optimizer, scheduler, rng, args)


def checkpoint_problem(checkpoint: Path, cfg: RunConfig) -> str | None:
    """None if training can resume from `checkpoint`: its adapter (when it holds one) is the run's, its trainer state
    and the files it saved with torch are whole; else what is wrong, naming the file."""
    if (checkpoint / CONFIG_FILE).is_file():
        try:
            check_adapter(checkpoint, cfg)
        except AdapterError as error:
            return str(error)
    state = checkpoint / TRAINER_STATE
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"{state}: not a readable JSON file ({error})"
    for file in sorted(f for pattern in TORCH_FILES for f in checkpoint.glob(pattern)):
        if not zipfile.is_zipfile(file):  # torch.save writes a zip archive; a cut one has no directory at its end
            return f"{file}: not a whole file, truncated or damaged"
    return None


class Run:
    """A run opened once: its folder and config (read once), its method's facts, its context limit, and, loaded when
    first asked for, its data plan, tokenizer, base model (loaded as the run's `base` section says) and adapter.

    `Run.open` checks, before any model loads, that the folder is a run, that it is finished and its adapter is the
    run's (`check_adapter`, once), and with `multi_head` that it has heads. Every verb after training reaches a run
    this way."""

    def __init__(
        self, folder: RunFolder, cfg: RunConfig, cache_dir: str | None = None, *, adapter: bool = True
    ) -> None:
        self.folder, self.cfg, self.cache_dir, self.with_adapter = folder, cfg, cache_dir, adapter

    @classmethod
    def open(
        cls, run_dir: str | Path, cache_dir: str | None = None, *, adapter: bool = True, multi_head: bool = False
    ) -> Run:
        """The run in `run_dir`; with `adapter` (the default) its trained adapter, checked here. A folder that is no
        run, has no adapter yet, holds an adapter that is not the run's or (with `multi_head`) is a plain LoRA run is
        refused here, before any model loads."""
        folder = RunFolder(run_dir)
        run = cls(folder, folder.read_config(), cache_dir, adapter=adapter)
        if adapter:
            run.require_finished()
        if multi_head:
            run.require_multi_head("analyze a multi-head run")
        if adapter:
            check_adapter(folder.adapter, run.cfg)
        return run

    @property
    def multi_head(self) -> bool:
        """Heads and a router (every method but plain LoRA; `methods.is_multi_head`)."""
        return is_multi_head(self.cfg.method)

    @property
    def peft_type(self) -> str:
        """The `peft_type` the run's adapters have (`methods.PEFT_TYPES`)."""
        return PEFT_TYPES[self.cfg.method]

    def require_multi_head(self, need: str) -> None:
        """A RunFolderError unless the run has heads and a router; `need` says what to do instead."""
        if not self.multi_head:
            raise RunFolderError(f"{self.folder.root}: a plain LoRA run has one head and no router; {need}")

    def require_finished(self) -> None:
        """A RunFolderError unless the run has its adapter: it is being trained, or it stopped."""
        if self.folder.is_finished():
            return
        holder = held_by(self.folder.lock)
        then = (
            f"it is being trained ({holder}): wait for it to end"
            if holder
            else "finish it with `rlora train ... --resume`"
        )
        raise RunFolderError(f"{self.folder.root}: the run has no adapter yet; {then}")

    @functools.cached_property
    def plan(self) -> DataPlan:
        # the validation split is carved as training carved it (training.eval_steps): the same training mixture
        return plan_data(self.cfg.data, self.cfg.seed, self.cache_dir, self.cfg.training.eval_steps is not None)

    @functools.cached_property
    def _base(self) -> tuple[Any, Any]:
        return load_base_model(self.cfg, self.cache_dir)

    @property
    def tokenizer(self) -> Any:
        """The base model's tokenizer, with the chat template the run config asks for (loaded with the base)."""
        return self._base[1]

    @property
    def base_model(self) -> Any:
        """The base model, loaded as the run config's `base` section says (quantized or not). PEFT adapts it in
        place: once `model` is loaded it holds the adapter's layers; open the run with `adapter=False` for a bare
        base."""
        return self._base[0]

    @functools.cached_property
    def model(self) -> Any:
        """The base model with the run's adapter on it (checked when the run was opened), or the base model alone
        for a run opened without its adapter."""
        if not self.with_adapter:
            return self.base_model
        return load_adapter(self.base_model, self.folder.adapter, peft_type=self.peft_type)

    def load(self) -> Run:
        """Loads now what is otherwise loaded when first used: the data plan first (a bad data file fails before any
        model loads), then the model with its adapter."""
        _ = self.plan, self.model
        return self

    @property
    def context_length(self) -> int | None:
        """The most tokens (prompt and generated) the model reads (`models.context_length`); None if it does not say."""
        return models.context_length(self.model)

    def check_lengths(self) -> None:
        check_lengths(self.cfg, self.model)


LoadedRun = Run  # the former name, for code that still says it


def load_run(
    run_dir: str | Path, cache_dir: str | None = None, *, adapter: bool = True, multi_head: bool = False
) -> Run:
    """`Run.open(...).load()`: the former way to open a run, kept for the code that still calls it."""
    return Run.open(run_dir, cache_dir, adapter=adapter, multi_head=multi_head).load()


def load_base_model(cfg: RunConfig, cache_dir: str | None = None) -> tuple[Any, Any]:
    """The run's base model and tokenizer (with the chat template the run config asks for, loaded as its `base`
    section says: quantized or not), without any adapter (`Run.base_model` and `Run.tokenizer` load them so)."""
    return models.load_model_and_tokenizer(
        cfg.model, cache_dir=cache_dir, chat_template=cfg.data.chat_template, loading=cfg.base
    )


ADAPTER_FIELDS = ("r", "num_heads", "lora_alpha", "lora_dropout", "head_init", "head_dropout", "router_init")
ADAPTER_FIELDS += ("init_gamma", "use_rslora", "target_modules")
ADAPTER_FIELDS += ("share", "routing", "balance_loss_coef", "router_z_loss_coef", "heads_pattern")


def check_adapter(path: Path, cfg: RunConfig) -> None:
    """The adapter folder at `path` is readable (`adapters.read_adapter`) and is the run's: its method's `peft_type`
    and the settings the run config gives its method (an `AdapterError` naming the file and the field otherwise)."""
    found, _ = read_adapter(path, PEFT_TYPES[cfg.method])
    settings = dataclasses.asdict(cfg.adapter)
    if (
        not is_multi_head(cfg.method) and settings["lora_r"] is None
    ):  # matched to the model: its shapes are checked on loading
        settings["lora_r"] = found.r
    expected = adapter_config(cfg.method, **settings, task_names=getattr(found, "task_names", None))
    for name in ADAPTER_FIELDS:
        if not hasattr(expected, name) or (
            name == "target_modules" and not isinstance(cfg.adapter.target_modules, list)
        ):
            continue  # PEFT saves the names that a regex, "all-linear" or the architecture's default matched
        want, got = getattr(expected, name), getattr(found, name, None)
        if got != want:
            want, got = (sorted(v) if isinstance(v, set) else v for v in (want, got))
            raise AdapterError(
                f"{path / CONFIG_FILE}: {name} is {got!r}; the run's config (method {cfg.method}) gives {want!r}"
            )


def gold_sequences(run: Run, max_per_task: int | None = None) -> dict[str, list[list[int]]]:
    """Per task, the token ids of the first `max_per_task` (all: None) evaluated examples' gold context and answer,
    as training reads them (RC or MC, as configured)."""
    d = run.cfg.data
    spans = {
        task: [gold_spans(run.tokenizer, e, d.chat_template, d.max_length) for e in examples[:max_per_task]]
        for task, examples in run.plan.test.items()
    }
    return {task: [s.prompt + s.answer for s in task_spans] for task, task_spans in spans.items()}


def check_lengths(cfg: RunConfig, model) -> None:
    """`eval.max_new_tokens` within the model's context (its `max_position_embeddings`), else a ConfigError naming
    both numbers; a `data.max_length` past it is a warning (only examples longer than the context would be read at
    positions the model was never trained on; each generation's prompt is checked in `evaluate.predict`)."""
    context = models.context_length(model)
    if context is None:
        return
    if cfg.eval.max_new_tokens >= context:
        raise ConfigError(
            f"eval.max_new_tokens: {cfg.eval.max_new_tokens} leaves no room for a prompt in the model's context of "
            f"{context} tokens; lower it"
        )
    if cfg.data.max_length > context:
        logger.warning(
            "data.max_length %d exceeds the model's context of %d tokens: longer examples would be read at positions "
            "the model was never trained on",
            cfg.data.max_length,
            context,
        )
