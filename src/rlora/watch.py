"""Watching a run while it trains: the trackers of `training.report_to`, each task's validation scores every
`training.eval_steps`, the best checkpoint (`training.keep_best`), and RUN_DIR/train_log.jsonl written as training
goes, so that a killed run's curves can still be drawn (`rlora curves`). The router's telemetry is `telemetry.py`'s.

Everything goes through the Trainer's own machinery: the trackers are its integrations (`report_to`), the scores
are logged with `Trainer.log` (so every tracker and the log get them), the best checkpoint is its
`load_best_model_at_end` on the metric `eval_loss`, the mean of the tasks' validation losses.

Trackers work offline by default: TensorBoard writes its event files in RUN_DIR/tracking/tensorboard; MLflow, unless
MLFLOW_TRACKING_URI is set, a local database RUN_DIR/tracking/mlflow.db (artifacts beside it); W&B runs in offline
mode under RUN_DIR/tracking unless WANDB_MODE is set; Trackio is local unless told of a Space.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ._io import atomic_write_text
from .errors import MissingPackage
from .evaluate import evaluate_examples
from .run import RunFolder
from .runconfig import RunConfig
from .telemetry import is_layer_metric, rng_devices, router_telemetry

logger = logging.getLogger(__name__)

MLFLOW_EXPERIMENT = "rlora"  # the experiment of a run's own MLflow database (MLFLOW_EXPERIMENT_NAME unset)
BEST_METRIC = "loss"  # the Trainer's metric_for_best_model: eval_loss, the mean of the tasks' validation losses

# What each tracker needs installed: (module, pip name); MLflow's local database needs SQLAlchemy and Alembic too
_PACKAGES = {
    "tensorboard": [("tensorboard", "tensorboard")],
    "mlflow": [("mlflow", "mlflow-skinny")],
    "wandb": [("wandb", "wandb")],
    "trackio": [("trackio", "trackio")],
}
_LOCAL_MLFLOW = [("sqlalchemy", "sqlalchemy"), ("alembic", "alembic")]
_URI = "MLFLOW_TRACKING_URI"


def trackers(cfg: RunConfig) -> list[str]:
    return [name for name in cfg.training.report_to if name != "none"]


def trainer_arguments(cfg: RunConfig, folder: RunFolder) -> dict[str, Any]:
    """The Trainer's settings of what is watched: its trackers (each installed, else a MissingPackage before anything
    loads), its evaluation steps and best checkpoint."""
    check_packages(cfg)
    t = cfg.training
    scoring = t.eval_steps is not None
    return {
        "report_to": trackers(cfg),
        "run_name": folder.root.name,
        "eval_strategy": "steps" if scoring else "no",
        "eval_steps": t.eval_steps,
        "load_best_model_at_end": t.keep_best,
        "metric_for_best_model": BEST_METRIC if t.keep_best else None,
        "greater_is_better": False if t.keep_best else None,
    }


def check_packages(cfg: RunConfig) -> None:
    """Each tracker's package is installed, else a MissingPackage naming the extra that installs it."""
    for name in trackers(cfg):
        needed = _PACKAGES[name] + (_LOCAL_MLFLOW if name == "mlflow" and not os.environ.get(_URI) else [])
        missing = [pip for module, pip in needed if importlib.util.find_spec(module) is None]
        if missing:
            extra = "rlora[track]" if name in ("tensorboard", "mlflow") else f"rlora[{name}]"
            raise MissingPackage(
                f"training.report_to: {name} needs {', '.join(missing)}, not installed; pip install '{extra}'"
            )


def local_settings(cfg: RunConfig, folder: RunFolder) -> dict[str, str]:
    """The environment that keeps each tracker of the run local (a variable the user has set is left as it is)."""
    root = folder.tracking.absolute()
    wanted: dict[str, str] = {}
    names = trackers(cfg)
    if "tensorboard" in names:
        wanted["TENSORBOARD_LOGGING_DIR"] = str(root / "tensorboard")
    if "mlflow" in names:
        wanted |= {_URI: local_settings_uri(folder), "MLFLOW_EXPERIMENT_NAME": MLFLOW_EXPERIMENT}
    if "wandb" in names:
        wanted |= {"WANDB_MODE": "offline", "WANDB_DIR": str(root)}
    return {key: value for key, value in wanted.items() if key not in os.environ}


@contextlib.contextmanager
def tracking(cfg: RunConfig, folder: RunFolder) -> Iterator[None]:
    """While training: the trackers' environment (`local_settings`), restored afterwards. An MLflow run that training
    left open by failing is ended as FAILED (the next run in this process would otherwise log into it)."""
    settings = local_settings(cfg, folder)
    os.environ.update(settings)
    try:
        yield
    except BaseException:
        if "mlflow" in trackers(cfg) and "mlflow" in sys.modules and sys.modules["mlflow"].active_run() is not None:
            sys.modules["mlflow"].end_run(status="FAILED")
        raise
    finally:
        for key in settings:
            os.environ.pop(key, None)


def prepare_local_trackers(cfg: RunConfig, folder: RunFolder) -> None:
    """RUN_DIR/tracking, and for a local MLflow database its experiment, with the artifacts beside the database."""
    if trackers(cfg):
        folder.tracking.mkdir(parents=True, exist_ok=True)
    uri = os.environ.get(_URI, "")
    if "mlflow" in trackers(cfg) and uri == local_settings_uri(folder):
        _mlflow_experiment(uri, folder.tracking / "mlflow-artifacts")


def local_settings_uri(folder: RunFolder) -> str:
    return f"sqlite:///{folder.tracking.absolute() / 'mlflow.db'}"


def _mlflow_experiment(uri: str, artifacts: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", MLFLOW_EXPERIMENT)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=artifacts.absolute().as_uri())


def flat_settings(cfg: RunConfig) -> dict[str, str]:
    """The run config as flat `rlora.section.key` parameters (values as text, JSON where not text), which every tracker
    logs as parameters (the prefix keeps them apart from the Trainer's own arguments, which the trackers log too)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        else:
            out[prefix] = json.dumps(value) if not isinstance(value, str) else value

    walk("rlora", cfg.to_dict())
    return out


class LogParameters(TrainerCallback):
    """At the start of training (after the trackers' own start), the run config's settings, the method's and the
    adapter's included, as parameters of every tracker: MLflow's params, a TensorBoard text of the config, W&B's and
    Trackio's config."""

    def __init__(self, cfg: RunConfig, callbacks: list) -> None:
        self.cfg, self.callbacks = cfg, callbacks  # the trainer's callbacks, the trackers' among them

    def on_train_begin(self, _args, state, _control, **_kwargs):
        if not state.is_world_process_zero:
            return
        params = flat_settings(self.cfg)
        names = trackers(self.cfg)
        if "mlflow" in names:
            import mlflow

            if mlflow.active_run() is not None:
                items = list(params.items())
                for start in range(0, len(items), 100):  # MLflow takes at most 100 params a call
                    mlflow.log_params(dict(items[start : start + 100]))
        if "tensorboard" in names:
            for callback in self.callbacks:
                writer = getattr(callback, "tb_writer", None)
                if writer is not None:
                    text = "\n".join(f"    {key}: {value}" for key, value in params.items())
                    writer.add_text("rlora/config", text)
        for name in ("wandb", "trackio"):
            if name in names:
                module = __import__(name)
                module.config.update(params, allow_val_change=True)


class StreamedLog(TrainerCallback):
    """RUN_DIR/train_log.jsonl as training goes: at the start it is the Trainer's log history so far (a resumed run:
    the history its checkpoint holds, so records of steps after the checkpoint go), then every record is appended as
    it is logged. A kill leaves at most a cut last line (`rlora curves` skips it); the finished run's log is written
    whole again (`RunFolder.publish`)."""

    def __init__(self, folder: RunFolder) -> None:
        self.path = folder.train_log

    def on_train_begin(self, _args, state, _control, **kwargs):
        if state.is_world_process_zero:
            atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in state.log_history))

    def on_log(self, _args, state, _control, **kwargs):
        if state.is_world_process_zero and state.log_history:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(state.log_history[-1]) + "\n")


class ConsoleProgress(ProgressCallback):
    """The Trainer's progress bar, printing each log record without the per-layer router telemetry (a line of a few
    hundred numbers for a real model); trackers and the log get every number."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        shown = {key: value for key, value in (logs or {}).items() if not is_layer_metric(key)}
        return super().on_log(args, state, control, logs=shown, **kwargs)


class KeepBest(TrainerCallback):
    """At the end of training with `training.keep_best`: the checkpoint the Trainer kept as best (lowest mean
    validation loss) and loaded as the run's adapter, recorded in RUN_DIR/watch.json."""

    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder

    def on_train_end(self, _args, state, _control, **kwargs):
        if not state.is_world_process_zero:
            return
        best = state.best_model_checkpoint
        record = {
            "metric": "eval_loss: the mean over tasks of each task's validation loss (nats per trained token)",
            "best_step": state.best_global_step,
            "best_value": state.best_metric,
            "checkpoint": Path(best).name if best else None,
            "adapter": "the best checkpoint's" if best else "the last step's (no step was scored)",
            "last_step": state.global_step,
        }
        self.folder.record_watch("keep_best", record)


def metric_name(task: str) -> str:
    """A task's name as a part of a metric name every tracker takes (MLflow allows letters, digits and `_-. /`)."""
    return re.sub(r"[^\w\-. /]", "_", task)


class ValidationScores:
    """A Trainer mixin: `evaluate` scores each task's validation examples with rlora's scorer (`evaluate_examples`:
    the loss over the trained tokens, from the output head at those positions only; with `accuracy` each multiple-
    choice task's acc too) instead of the Trainer's loop over `eval_dataset` (which would build every position's
    logits), logs them (`eval_<task>_loss`, `eval_loss` their mean) and returns them for the best-checkpoint choice.
    The model is scored in eval mode and put back in the mode it was in; the random number generators are left as
    they were, so the training that follows is the same as without scoring."""

    validation: dict[str, list] | None = None  # per task, its validation examples (set by `watch`)
    validation_settings: dict[str, Any] = {}

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if self.validation is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        model = self.model
        training = model.training
        metrics: dict[str, float] = {}
        with torch.random.fork_rng(devices=rng_devices()):
            try:
                for task, examples in self.validation.items():
                    result = evaluate_examples(model, self.processing_class, examples, **self.validation_settings)
                    name = metric_name(task)
                    if result.loss is not None:
                        metrics[f"{metric_key_prefix}_{name}_loss"] = result.loss
                    if result.acc_ll is not None:
                        metrics[f"{metric_key_prefix}_{name}_acc"] = result.acc_ll
            finally:
                model.train(training)
        losses = [v for k, v in metrics.items() if k.endswith("_loss")]
        metrics[f"{metric_key_prefix}_loss"] = sum(losses) / len(losses) if losses else math.nan
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def scored_examples(cfg: RunConfig, plan) -> dict[str, list]:
    """Per task, the validation examples scored every `training.eval_steps`: the first `training.eval_examples`."""
    return {task: examples[: cfg.training.eval_examples] for task, examples in plan.validation.items()}


def watch(trainer, cfg: RunConfig, plan, folder: RunFolder) -> None:
    """Sets up the watching of `trainer`'s run: the streamed log, the trackers' parameters, the validation scoring
    (`ValidationScores`), the best checkpoint's record and the router telemetry (`telemetry.RouterTelemetry`)."""
    if trainer.is_world_process_zero():
        prepare_local_trackers(cfg, folder)
    trainer.add_callback(StreamedLog(folder))
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ConsoleProgress())
    if trackers(cfg):
        trainer.add_callback(LogParameters(cfg, trainer.callback_handler.callbacks))
    t, d = cfg.training, cfg.data
    if t.eval_steps is not None:
        trainer.validation = scored_examples(cfg, plan)
        trainer.validation_settings = {
            "accuracy": t.eval_accuracy,
            "chat_template": d.chat_template,
            "max_length": d.max_length,
            "batch_size": cfg.eval.batch_size,
            "generate": False,
            "desc": "validation",
        }
    if t.keep_best:
        trainer.add_callback(KeepBest(folder))
    telemetry = router_telemetry(trainer, cfg, plan, folder)
    if telemetry is not None:
        trainer.add_callback(telemetry)
