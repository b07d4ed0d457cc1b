"""Watching training on a tiny model: the trackers (TensorBoard, MLflow) get what train_log.jsonl holds, the router
telemetry says inert or active, every task's validation loss is logged and the best checkpoint kept, the test split
is never read, telemetry and scoring leave training unchanged, and the curves are drawn from a killed run's log."""

import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from _reference import read_jsonl_tasks
from _tiny import write_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlora.analysis import COLLAPSED_SHARE, INERT_ENTROPY
from rlora.cli import main
from rlora.data import IGNORE_INDEX, encode_example
from rlora.data.plan import plan_data
from rlora.data.split import split_key
from rlora.errors import ConfigError, MissingPackage
from rlora.runconfig import load_run_config
from rlora.telemetry import STATUS_CODES
from rlora.train import train
from rlora.trainer import RloraTrainer

SCORED = ["training.eval_accuracy=true", "training.eval_examples=2"]
WATCHED = ["training.max_steps=4", "training.eval_steps=2", "training.keep_best=true", "training.save_total_limit=1"]
TRACKED = ["training.report_to=[tensorboard,mlflow]"]
TIMING = ("train_runtime", "train_samples_per_second", "train_steps_per_second")


@pytest.fixture(autouse=True)
def _local_trackers(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "TENSORBOARD_LOGGING_DIR", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


def _train(workspace, out: Path, overrides: list[str], files: dict[str, Path] | None = None) -> tuple[Path, list]:
    path = write_config(workspace, out)
    if files is not None:  # the same tasks from other files
        text = path.read_text()
        for name, file in files.items():
            text = text.replace(str(workspace / f"{name}.jsonl"), str(file))
        path.write_text(text)
    run = train(load_run_config(path, overrides))
    return run, [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def watched(workspace, tmp_path_factory):
    """A run with both trackers, validation scoring every 2 steps, the best checkpoint kept, telemetry every step."""
    mp = pytest.MonkeyPatch()
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "TENSORBOARD_LOGGING_DIR"):
        mp.delenv(name, raising=False)
    try:
        yield _train(workspace, tmp_path_factory.mktemp("watched") / "run", WATCHED + TRACKED)
    finally:
        mp.undo()


def _points(log: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in log if key in r]


def test_tensorboard_event_files_hold_the_logged_loss_lr_validation_losses_and_router_telemetry(watched):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, log = watched
    (folder,) = (run / "tracking" / "tensorboard",)
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    # the Trainer's TensorBoard writer prefixes train/ (eval/ for the scores); values are stored as float32, so they
    # equal the log's float64 values to float32's rounding (relative 2**-24)
    pairs = {
        "train/loss": "loss",
        "train/learning_rate": "learning_rate",
        "eval/colors_loss": "eval_colors_loss",
        "eval/letters_loss": "eval_letters_loss",
        "eval/loss": "eval_loss",
        "train/router/entropy": "router/entropy",
        "train/router/task_jsd": "router/task_jsd",
        "train/router/status": "router/status",
        "train/router/1.up_proj/largest_share": "router/1.up_proj/largest_share",
    }
    for tag, key in pairs.items():
        expected = _points(log, key)
        assert len(expected) >= 2, key
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expected], tag
        for (_, value), (_, want) in zip(got, expected, strict=True):
            assert value == pytest.approx(want, rel=2**-23, abs=1e-30), tag
    assert [s for s, _ in _points(log, "eval_colors_loss")] == [2, 4]
    assert [s for s, _ in _points(log, "router/entropy")] == [1, 2, 3, 4]
    text = events.Tensors("rlora/config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "rlora.method: rlora" in text and "rlora.training.eval_steps: 2" in text


def test_mlflow_local_database_holds_the_logged_metrics_and_the_run_config_as_parameters(watched):
    from mlflow import MlflowClient

    run, log = watched
    client = MlflowClient(f"sqlite:///{run / 'tracking' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlora")
    assert experiment.artifact_location == (run / "tracking" / "mlflow-artifacts").absolute().as_uri()
    (tracked,) = client.search_runs([experiment.experiment_id])
    for key in (
        "loss",
        "learning_rate",
        "eval_colors_loss",
        "eval_loss",
        "router/entropy",
        "router/0.gate_proj/status",
    ):
        history = sorted((m.step, m.value) for m in client.get_metric_history(tracked.info.run_id, key))
        assert history == _points(log, key), key  # MLflow stores float64: the same numbers
    params = tracked.data.params
    assert params["rlora.method"] == "rlora" and params["rlora.adapter.num_heads"] == "3"
    assert params["rlora.training.report_to"] == '["tensorboard", "mlflow"]'


def _checkpoint_model(workspace, checkpoint: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace / "model"), checkpoint).eval()


def _naive_loss(model, tokenizer, examples) -> float:
    """Token-weighted cross-entropy over the trained tokens, from the full logits of one unpadded pass each."""
    total, count = 0.0, 0
    for example in examples:
        feature = encode_example(tokenizer, example, False, 64)
        ids, labels = torch.tensor([feature["input_ids"]]), torch.tensor(feature["labels"])
        logprobs = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
        targets = labels[1:]
        keep = targets != IGNORE_INDEX
        total -= logprobs[keep].gather(1, targets[keep, None]).sum().item()
        count += int(keep.sum())
    return total / count


@pytest.mark.numerics
def test_each_tasks_validation_loss_is_logged_and_the_best_checkpoint_is_the_adapter(watched, workspace):
    run, log = watched
    cfg = load_run_config(run / "config.yaml")
    plan = plan_data(cfg.data, cfg.seed, validation=True)
    assert plan.validation is not None and all(plan.validation.values())
    step, adapter = 4, run / "checkpoints" / "checkpoint-4"  # the last: kept whichever is best
    model = _checkpoint_model(workspace, adapter)
    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    scores = {r["step"]: r for r in log if "eval_loss" in r}
    with torch.no_grad():
        for task, examples in plan.validation.items():
            # float32 passes over at most 64 tokens; the positions-only head and the full logits differ by rounding
            assert scores[step][f"eval_{task}_loss"] == pytest.approx(_naive_loss(model, tokenizer, examples), rel=1e-5)
    assert scores[step]["eval_loss"] == pytest.approx(
        (scores[step]["eval_colors_loss"] + scores[step]["eval_letters_loss"]) / 2, rel=1e-15
    )
    best = min(scores, key=lambda s: scores[s]["eval_loss"])
    record = json.loads((run / "watch.json").read_text())["keep_best"]
    assert record["best_step"] == best and record["checkpoint"] == f"checkpoint-{best}"
    assert record["best_value"] == scores[best]["eval_loss"]
    assert (run / "checkpoints" / f"checkpoint-{best}").is_dir()  # kept through the rotation (save_total_limit 1)
    kept = load_file(run / "checkpoints" / f"checkpoint-{best}" / "adapter_model.safetensors")
    final = load_file(run / "adapter" / "adapter_model.safetensors")
    assert kept.keys() == final.keys() and all(torch.equal(kept[k], final[k]) for k in kept)


def _replace_test_examples(source: Path, target: Path, test_fraction: float = 0.2) -> int:
    """`source` with every example of the test split replaced by another (its prompt changed) that still falls in
    the test split; returns how many were replaced."""
    (examples,) = read_jsonl_tasks([source]).values()
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    replaced = 0
    for i, (row, example) in enumerate(zip(rows, examples, strict=True)):
        if split_key(example) >= test_fraction:
            continue
        for variant in range(1000):
            prompt = f"{row['prompt']} (changed {variant})"
            if split_key(dataclasses.replace(example, prompt=prompt)) < test_fraction:
                rows[i] = row | {"prompt": prompt}
                replaced += 1
                break
    target.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return replaced


def test_the_test_split_is_never_read_while_training(watched, workspace, tmp_path):
    _, log = watched
    files = {name: tmp_path / f"{name}.jsonl" for name in ("colors", "letters")}
    for name, file in files.items():
        assert _replace_test_examples(workspace / f"{name}.jsonl", file) >= 4
        before, after = (read_jsonl_tasks([p])[name] for p in (workspace / f"{name}.jsonl", file))
        assert {e.prompt for e in before if split_key(e) < 0.2}.isdisjoint(e.prompt for e in after)
        assert [e for e in before if split_key(e) >= 0.2] == [e for e in after if split_key(e) >= 0.2]
    _, other = _train(workspace, tmp_path / "run", WATCHED, files)
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in log]
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in other] == strip


def test_telemetry_and_validation_scoring_leave_the_trained_adapter_unchanged(watched, workspace, tmp_path):
    run, _ = watched
    # the same validation split carved (holdout validation), nothing scored or probed during training
    quiet, log = _train(
        workspace,
        tmp_path / "quiet",
        ["training.max_steps=4", "data.holdout=validation", "training.router_telemetry_steps=0"],
    )
    assert not any("router/entropy" in r or "eval_loss" in r for r in log)
    watched_adapter = run / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"  # its last step's
    got, want = load_file(quiet / "adapter" / "adapter_model.safetensors"), load_file(watched_adapter)
    # the same kernels on the same inputs in one process: training is deterministic on the CPU, so a probe that
    # consumed a random number (dropout is on in training) or changed the model's mode would show here
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_a_router_that_stays_uniform_is_reported_inert_naming_layers_and_step_and_can_stop_training(
    workspace, tmp_path, caplog
):
    overrides = ["training.max_steps=4", "training.router_lr_scale=1e-12", "training.router_warn_intervals=2"]
    with caplog.at_level(logging.WARNING, logger="rlora.telemetry"):
        run, log = _train(workspace, tmp_path / "inert", [*overrides, "training.router_stop=true"])
    (line,) = [r.getMessage() for r in caplog.records if r.name == "rlora.telemetry"]
    assert line.startswith("router inert at step 2 (2 telemetry intervals in a row, steps 1-2): 6 of 6 layers inert")
    assert "(0.gate_proj, 0.up_proj, 0.down_proj, 1.gate_proj, 1.up_proj, 1.down_proj)" in line
    assert line.endswith("; training stops (training.router_stop)")
    telemetry = [r for r in log if "router/entropy" in r]
    assert [r["step"] for r in telemetry] == [1, 2]  # stopped after step 2
    assert all(r["router/status"] == STATUS_CODES["inert"] and r["router/entropy"] >= INERT_ENTROPY for r in telemetry)
    assert all(r["router/inert_layers"] == 6 for r in telemetry)
    assert json.loads((run / "train_metrics.json").read_text())["global_step"] == 2
    stop = json.loads((run / "watch.json").read_text())["router_stop"]
    assert stop["step"] == 2 and stop["status"] == "inert" and stop["reason"] == line


def test_a_router_that_learns_task_routing_is_reported_active(workspace, tmp_path, caplog):
    overrides = ["training.max_steps=4", "training.router_lr_scale=300", "training.router_telemetry_steps=2"]
    with caplog.at_level(logging.WARNING, logger="rlora.telemetry"):
        _, log = _train(workspace, tmp_path / "active", [*overrides, "training.router_warn_intervals=1"])
    assert not [r for r in caplog.records if r.name == "rlora.telemetry"]
    telemetry = [r for r in log if "router/entropy" in r]
    assert [r["step"] for r in telemetry] == [2, 4]
    last = telemetry[-1]
    assert last["router/status"] == STATUS_CODES["active"]
    assert last["router/entropy"] < INERT_ENTROPY and last["router/largest_share"] < COLLAPSED_SHARE
    assert last["router/task_jsd"] > 1e-3  # the tasks' mean gates moved apart (an untrained router: ~1e-15)
    for name in ("entropy", "largest_share", "task_jsd", "head_cosine", "status"):
        layers = [
            v for k, v in last.items() if k.startswith("router/") and k.endswith(f"/{name}") and k.count("/") == 2
        ]
        assert len(layers) == 6, name
        if name in ("entropy", "largest_share", "task_jsd"):  # the average over layers is logged beside them
            # the entropy's two averages sum float32 per-token terms in different orders: equal to float32 rounding
            assert last[f"router/{name}"] == pytest.approx(sum(layers) / 6, rel=1e-6)


def test_a_killed_runs_log_is_streamed_and_its_curves_are_drawn(workspace, tmp_path, monkeypatch, capsys, caplog):
    step = RloraTrainer.training_step

    def killed_at_step_3(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(RloraTrainer, "training_step", killed_at_step_3)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        _train(workspace, out, ["training.max_steps=4", "training.eval_steps=1", *SCORED])
    log = out / "train_log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted({r["step"] for r in records}) == [1, 2]
    assert {"loss", "eval_loss", "eval_colors_acc", "eval_letters_acc", "router/entropy"} <= set().union(*records)
    assert all(r["eval_colors_acc"] in (0, 0.5, 1) for r in records if "eval_colors_acc" in r)  # of 2 examples
    model = _checkpoint_model(workspace, out / "checkpoints" / "checkpoint-2")
    cfg = load_run_config(out / "config.yaml")
    (scored,) = [r for r in records if r["step"] == 2 and "eval_loss" in r]
    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    with torch.no_grad():
        for task, examples in plan_data(
            cfg.data, cfg.seed, validation=True
        ).validation.items():  # the first 2 of each task (training.eval_examples)
            # float32 passes over at most 64 tokens; the positions-only head and the full logits differ by rounding
            assert scored[f"eval_{task}_loss"] == pytest.approx(_naive_loss(model, tokenizer, examples[:2]), rel=1e-5)
    text = log.read_text()
    log.write_text(text[: len(text) - 20])  # the last record cut short, as a kill while writing it leaves it
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="rlora.run"):
        assert main(["curves", str(out)]) == 0
    assert f"line {len(records)} is cut" in caplog.text
    for name in ("training.png", "router.png"):
        assert (out / "curves" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.split() == [str(out / "curves" / "training.png"), str(out / "curves" / "router.png")]
    log.write_text('{"loss": 1.0, "step": 1}\nnot json\n{"loss": 1.0, "step": 2}\n')
    assert main(["curves", str(out)]) == 2
    assert capsys.readouterr().err == f"rlora: error: {log}: line 2: expected a JSON object (one log record)\n"


def test_curves_series_take_every_numeric_value_at_its_step():
    from rlora.commands.curves import series

    records = [
        {"loss": 2.0, "learning_rate": 1e-3, "epoch": 0.1, "step": 1},
        {"router/entropy": 0.99, "router/0.up_proj/entropy": math.nan, "step": 1},
        {"eval_a_loss": 3.0, "eval_loss": 3.0, "step": 2},
        {"train_runtime": 1.0, "train_loss": 2.0, "step": 2},
    ]
    assert series(records) == {
        "loss": [(1, 2.0)],
        "learning_rate": [(1, 1e-3)],
        "router/entropy": [(1, 0.99)],
        "eval_a_loss": [(2, 3.0)],
        "eval_loss": [(2, 3.0)],
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.report_to=[comet]"], "training.report_to: expected a list of tensorboard, mlflow, trackio, wandb"),
        (["training.report_to=[mlflow,mlflow]"], "training.report_to: a tracker is named twice"),
        (["training.keep_best=true"], "training.keep_best: only with training.eval_steps"),
        (["training.eval_accuracy=true"], "training.eval_accuracy: only with training.eval_steps"),
        (["training.eval_examples=5"], "training.eval_examples: only with training.eval_steps"),
        (
            ["training.eval_steps=3", "training.keep_best=true"],
            r"training.keep_best: save_steps \(2\) must be a multiple of eval_steps \(3\)",
        ),
        (["training.router_telemetry_steps=-1"], "training.router_telemetry_steps: expected an integer >= 0 or null"),
        (["training.eval_steps=0"], "training.eval_steps: expected an integer >= 1 or null"),
    ],
)
def test_bad_watch_settings_are_refused_naming_the_key(workspace, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(write_config(workspace, tmp_path / "run"), overrides)


def test_a_tracker_that_is_not_installed_is_refused_before_the_model_loads(workspace, tmp_path, monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find(name, *a))
    monkeypatch.setattr("rlora.models.load_model", lambda *a, **k: pytest.fail("the model loaded"))
    cfg = load_run_config(write_config(workspace, tmp_path / "run"), ["training.report_to=[wandb]"])
    with pytest.raises(
        MissingPackage, match=r"training.report_to: wandb needs wandb, not installed; pip install 'rlora\[wandb\]'"
    ):
        train(cfg)


def test_a_resumed_run_streams_its_log_from_the_checkpoint_on(workspace, tmp_path, monkeypatch):
    step = RloraTrainer.training_step

    def killed_at_step_4(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    out = tmp_path / "run"
    cfg = load_run_config(write_config(workspace, out), ["training.max_steps=4"])
    with monkeypatch.context() as patch:
        patch.setattr(RloraTrainer, "training_step", killed_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    streamed = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in streamed if "loss" in r] == [1, 2, 3]  # step 3 logged; the last checkpoint is step 2
    with monkeypatch.context() as patch:  # resumed from step 2, killed at step 4 again
        patch.setattr(RloraTrainer, "training_step", killed_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, resume=True)
    again = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again if "loss" in r] == [1, 2, 3]  # step 3 once: the first run's went at the resume
    assert [r["step"] for r in again if "router/entropy" in r] == [1, 2, 3]
    assert again[:4] == streamed[:4]  # steps 1 and 2 (telemetry, loss) as the first run logged them
    train(cfg, resume=True)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]


def test_the_checkpoint_rotation_keeps_the_best_checkpoint(tmp_path):
    from types import SimpleNamespace

    from rlora._io import mark_complete
    from rlora.train import _MarkComplete

    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        mark_complete(tmp_path / f"checkpoint-{step}")
    state = SimpleNamespace(
        global_step=6, is_world_process_zero=True, best_model_checkpoint=str(tmp_path / "checkpoint-2")
    )
    args = SimpleNamespace(distributed_state=None, output_dir=str(tmp_path))
    _MarkComplete(keep=1, data_fingerprint="data").on_save(args, state, SimpleNamespace())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-6"]
    state.best_model_checkpoint = None
    _MarkComplete(keep=1, data_fingerprint="data").on_save(args, state, SimpleNamespace())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6"]
