"""The routers' health while training: every `training.router_telemetry_steps` (null: every `logging_steps`), on a
fixed probe of each task's first `training.router_probe_examples` validation examples (their gold context and
answer, as training reads them), the numbers `rlora analyze` gives after training, per adapted layer and averaged:

- `entropy`: the gates' entropy per token over its maximum ln K (1: uniform gates, the heads act as one);
- `largest_share`: the largest head's share of the layer's mean gate over every task;
- `task_jsd`: the Jensen-Shannon divergence of the tasks' mean gates (nats; 0: every task routes alike);
- `head_cosine`: the mean pairwise cosine of the layer's heads (left out while the heads are zero);
- `status`: `analysis.router_status` (inert, collapsed or active, the thresholds `analyze` uses), logged as
  `STATUS_CODES`' number so that every tracker takes it; `inert_layers` and `collapsed_layers` count the layers.

The numbers are logged with `Trainer.log` as `router/<name>` and `router/<layer>/<name>` (layer `<index>.<module>`),
so every tracker and RUN_DIR/train_log.jsonl get them. When the status is inert or collapsed for
`training.router_warn_intervals` intervals in a row, one warning line names the layers and the step; with
`training.router_stop` training then stops (the adapter so far is the run's, RUN_DIR/watch.json says why).

A run without a validation split (data.holdout test and no training.eval_steps) probes each task's first training
examples of the mixture instead: the router's gates need inputs, not held-out labels; the test split is never read.
The probe runs under no_grad, in eval mode (the model is put back in its mode), and leaves the random number
generators as they were: a run trains to the same adapter with telemetry as without it.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from transformers import TrainerCallback

from .analysis import (
    adapted_layers,
    describe,
    head_similarity,
    router_health,
    router_status,
    router_usage,
    task_divergence,
)
from .data import Example, gold_spans
from .run import RunFolder
from .runconfig import RunConfig

logger = logging.getLogger(__name__)

STATUS_CODES = {"active": 0, "inert": 1, "collapsed": 2}  # `router/status` as a number every tracker logs
NAMED_LAYERS = 6  # layers named in a warning line; the rest are counted


def probe_examples(plan, count: int) -> tuple[dict[str, list[Example]], str]:
    """Per task, the probe's examples and where they come from: the first `count` validation examples, or without a
    validation split the task's first `count` training examples in the mixture's order."""
    if plan.validation is not None:
        return {task: examples[:count] for task, examples in plan.validation.items()}, "validation"
    task_of, position = plan.mixture
    probe = {}
    for t, task in enumerate(plan.tasks):
        rows = position[np.flatnonzero(task_of == t)[:count]]
        probe[task] = [plan.train_example(t, int(row)) for row in rows]
    return probe, "training"


def probe_sequences(cfg: RunConfig, plan, tokenizer) -> tuple[dict[str, list[list[int]]], str]:
    """The probe's token ids per task (gold context and answer, as training encodes them) and its source."""
    examples, source = probe_examples(plan, cfg.training.router_probe_examples)
    d = cfg.data
    spans = {
        task: [gold_spans(tokenizer, e, d.chat_template, d.max_length) for e in items]
        for task, items in examples.items()
    }
    return {task: [s.prompt + s.answer for s in items] for task, items in spans.items() if items}, source


def is_layer_metric(key: str) -> bool:
    """A per-layer telemetry number (`router/<layer>/<name>`), which the progress bar leaves out."""
    return key.startswith("router/") and key.count("/") == 2


def layer_label(name: str) -> str:
    return "{}.{}".format(*describe(name))


def measure(model: torch.nn.Module, probe: dict[str, list[list[int]]], batch_size: int) -> tuple[dict, dict]:
    """(the metrics to log, each layer's status) of the routers of `model` on `probe`. The model is measured in eval
    mode and put back in its mode; the random number generators are left as they were."""
    training = model.training
    with torch.random.fork_rng(devices=rng_devices()):
        try:
            usage = router_usage(model, probe, batch_size=batch_size)  # no_grad, eval mode
        finally:
            model.train(training)
    health = router_health(usage)
    k, tasks = health["num_heads"], list(usage)
    cosines = {f"{r['layer']}.{r['module']}": r["mean_cosine"] for r in head_similarity(model)}
    metrics: dict[str, float] = {}
    statuses: dict[str, str] = {}
    for name in usage[tasks[0]]["mean_gate_per_layer"]:
        label = layer_label(name)
        entropy = sum(usage[t]["entropy_per_layer"][name] for t in tasks) / len(tasks) / math.log(k)
        jsd, share = task_divergence([usage[t]["mean_gate_per_layer"][name] for t in tasks])
        statuses[label] = router_status(entropy, [share])
        layer = {"entropy": entropy, "largest_share": share, "task_jsd": jsd, "head_cosine": cosines.get(label)}
        layer["status"] = STATUS_CODES[statuses[label]]
        metrics |= {f"router/{label}/{key}": v for key, v in layer.items() if v is not None and math.isfinite(v)}
    finite = [c for c in cosines.values() if math.isfinite(c)]
    overall = {
        "entropy": health["normalized_entropy"],
        "largest_share": health["largest_share"],
        "task_jsd": health["task_divergence"],
        "head_cosine": sum(finite) / len(finite) if finite else math.nan,
        "status": STATUS_CODES[health["status"]],
        "inert_layers": sum(s == "inert" for s in statuses.values()),
        "collapsed_layers": sum(s == "collapsed" for s in statuses.values()),
    }
    metrics |= {f"router/{key}": v for key, v in overall.items() if math.isfinite(v)}
    return metrics, statuses | {"": health["status"]}


def rng_devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []


class RouterTelemetry(TrainerCallback):
    """Measures the routers every `interval` optimizer steps (`measure`), logs the numbers through the trainer, and
    warns (and with `stop`, stops training) when the status stays inert or collapsed for `warn_after` intervals."""

    def __init__(self, trainer, probe, interval: int, batch_size: int, warn_after: int, stop: bool, folder) -> None:
        self.trainer, self.probe, self.interval, self.batch_size = trainer, probe, interval, batch_size
        self.warn_after, self.stop, self.folder = warn_after, stop, folder
        self.streak: list[int] = []  # the steps of the current run of inert or collapsed intervals

    def on_step_end(self, _args, state, control, model=None, **kwargs):
        if state.global_step % self.interval:
            return control
        metrics, statuses = measure(model if model is not None else self.trainer.model, self.probe, self.batch_size)
        should_log = control.should_log  # logging clears it, and the Trainer logs the loss after this callback
        self.trainer.log(metrics)
        control.should_log = should_log
        status = statuses.pop("")
        self.streak = [*self.streak, state.global_step] if status != "active" else []
        if len(self.streak) == self.warn_after:
            line = warning_line(status, statuses, metrics, self.streak, self.stop)
            if state.is_world_process_zero:
                logger.warning("%s", line)
            if self.stop:
                control.should_training_stop = True
                if state.is_world_process_zero:
                    record = {"step": state.global_step, "status": status, "reason": line}
                    self.folder.record_watch("router_stop", record)
        return control


def warning_line(status: str, statuses: dict[str, str], metrics: dict, steps: list[int], stop: bool) -> str:
    """One line: the status, for how long, which layers, the numbers behind it."""
    layers = [label for label, s in statuses.items() if s == status]
    named = ", ".join(layers[:NAMED_LAYERS])
    if len(layers) > NAMED_LAYERS:
        named += f" and {len(layers) - NAMED_LAYERS} more"
    span = f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"
    entropy, share = metrics.get("router/entropy", math.nan), metrics.get("router/largest_share", math.nan)
    jsd = metrics.get("router/task_jsd", math.nan)
    numbers = f"gate entropy {entropy:.3f} of ln K, largest head's share {share:.2f}, tasks' JSD {jsd:.4f} nats"
    then = "; training stops (training.router_stop)" if stop else ""
    return (
        f"router {status} at step {steps[-1]} ({len(steps)} telemetry intervals in a row, {span}): {len(layers)} of "
        f"{len(statuses)} layers {status} ({named}); {numbers}{then}"
    )


def router_telemetry(trainer, cfg: RunConfig, plan, folder: RunFolder) -> RouterTelemetry | None:
    """The telemetry callback of the run, or None when there is nothing to measure: a plain LoRA run (no router),
    telemetry switched off (router_telemetry_steps 0), or a model sharded over processes (DeepSpeed, FSDP), where a
    probe outside the engine's own forward cannot gather the weights."""
    t = cfg.training
    interval = t.logging_steps if t.router_telemetry_steps is None else t.router_telemetry_steps
    layers = adapted_layers(trainer.model)
    if not interval or not layers or layers[0][1].num_heads.get("default", 1) < 2:
        return None
    if t.deepspeed is not None or t.fsdp:
        logger.info("router telemetry: off with training.deepspeed or training.fsdp (the model is sharded)")
        return None
    probe, source = probe_sequences(cfg, plan, trainer.processing_class)
    logger.info("router telemetry every %d steps on %d %s examples per task", interval, t.router_probe_examples, source)
    batch = max(1, min(cfg.eval.batch_size, t.router_probe_examples))
    return RouterTelemetry(trainer, probe, interval, batch, t.router_warn_intervals, t.router_stop, folder)
