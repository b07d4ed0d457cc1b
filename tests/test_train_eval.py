"""The main job on a tiny model and tiny JSONL tasks: train, evaluate, resume, fail well."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from _reference import read_jsonl_tasks
from _tiny import write_config
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlora.cli import main
from rlora.data import render_pairs
from rlora.evaluate import Prediction, normalize_answer, predict
from rlora.runconfig import dump_run_config, load_run_config
from rlora.train import TrainingError, complete_checkpoints, train
from rlora.trainer import HeadOnlyLossTrainer


def run_cli(*args, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "rlora", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def test_train_writes_a_complete_run_folder_and_the_adapter_reloads(workspace, tmp_path):
    cfg = load_run_config(write_config(workspace, tmp_path / "run"))
    run = train(cfg)
    assert sorted(p.name for p in run.iterdir()) == [
        "adapter",
        "adapter_init",
        "checkpoints",
        "config.yaml",
        "data_manifest.json",
        "train_log.jsonl",
        "train_metrics.json",
    ]
    assert (run / "config.yaml").read_text() == dump_run_config(cfg)
    manifest = json.loads((run / "data_manifest.json").read_text())
    assert set(manifest["tasks"]) == {"colors", "letters"}
    assert manifest["train_examples"] == sum(t["train_used"] for t in manifest["tasks"].values())
    assert all(t["test_evaluated"] == 6 for t in manifest["tasks"].values())
    metrics = json.loads((run / "train_metrics.json").read_text())
    assert metrics["global_step"] == 6
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [c.name for c in complete_checkpoints(run / "checkpoints")] == ["checkpoint-4", "checkpoint-6"]

    base = AutoModelForCausalLM.from_pretrained(workspace / "model")
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    init = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace / "model"), run / "adapter_init")
    trained_b = dict(model.named_parameters())["base_model.model.model.layers.0.mlp.up_proj.rlora_B.default"]
    init_b = dict(init.named_parameters())["base_model.model.model.layers.0.mlp.up_proj.rlora_B.default"]
    assert not torch.equal(trained_b, init_b)  # training moved the heads; the init was kept apart

    with pytest.raises(TrainingError, match="already holds a finished run"):
        train(cfg)


def naive_choice_scores(model, tokenizer, example):
    """log P(continuation | context) per choice, one unpadded forward pass each, tokenized here directly."""
    scores = []
    for context, continuation in render_pairs(example):
        prompt = tokenizer(context)["input_ids"]
        answer = tokenizer(" " + continuation, add_special_tokens=False)["input_ids"]
        logprobs = model(input_ids=torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
        scores.append(sum(logprobs[len(prompt) - 1 + t, a].item() for t, a in enumerate(answer)))
    return scores


@pytest.mark.parametrize("fmt", ["rc", "mc"])
@pytest.mark.parametrize("generate", [True, False])
@pytest.mark.numerics
def test_batched_choice_scores_equal_unpadded_one_at_a_time_scoring(workspace, generate, fmt):
    """Padding, batching and the one-pass shortcut change nothing: the same sums in float64."""
    model = AutoModelForCausalLM.from_pretrained(workspace / "model", dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    tasks = read_jsonl_tasks([workspace / "colors.jsonl", workspace / "letters.jsonl"])
    examples = [dataclasses.replace(e, format=fmt) for e in tasks["colors"][:5] + tasks["letters"][:5]]
    predictions = predict(model, tokenizer, examples, max_length=64, batch_size=4, generate=generate)
    with torch.no_grad():
        for p, e in zip(predictions, examples, strict=True):
            naive = naive_choice_scores(model, tokenizer, e)
            # float64 algebra, except where MC scores come from generate(): transformers returns its logits in
            # float32, so there the bound is float32's rounding (eps 1.2e-7) of scores of magnitude ~10.
            tol = 1e-5 if generate and fmt == "mc" else 1e-10
            torch.testing.assert_close(torch.tensor(p.scores), torch.tensor(naive), atol=tol, rtol=tol)
            assert p.chars == [len(c) for _, c in render_pairs(e)]
            assert (p.text is not None) == (generate and fmt == "mc")  # RC is scored, never generated


def test_acc_norm_divides_by_characters_and_ties_go_to_the_first_choice():
    p = Prediction(scores=[-6.0, -9.0, -6.0], chars=[2, 6, 3], text=None)
    assert p.choice() == 0  # -6 ties -6: the first, as numpy's argmax (lm-eval)
    assert p.choice(normalized=True) == 1  # -3, -1.5, -2 per character


def test_normalize_answer_keeps_the_first_line_without_case_or_punctuation():
    assert normalize_answer("  B.\nbecause ...") == "b"
    assert normalize_answer("Yes!") == "yes"
    assert normalize_answer("") == ""
    assert normalize_answer("-5") == "-5" != normalize_answer("5")


def test_eval_command_prints_and_writes_a_table_for_a_run_and_for_the_base(workspace, tmp_path):
    config = write_config(workspace, tmp_path / "run")
    assert main(["train", str(config), "training.max_steps=2"]) == 0
    assert main(["eval", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(results["tasks"]) == {"colors", "letters"}
    assert results["tasks"]["colors"]["n"] == 6
    mean = (results["tasks"]["colors"]["acc_ll"] + results["tasks"]["letters"]["acc_ll"]) / 2
    assert results["average"]["acc_ll"] == pytest.approx(mean)
    assert results["tasks"]["colors"]["format"] == "rc" and results["tasks"]["colors"]["acc_gen"] is None
    table = (tmp_path / "run" / "eval.md").read_text().splitlines()
    assert table[0] == "| task | n | rlora acc | rlora acc_norm | rlora loss ↓ | rlora ppl ↓ |"
    losses = [results["tasks"][t]["loss"] for t in ("colors", "letters")]
    assert all(loss > 0 for loss in losses) and results["average"]["loss"] == pytest.approx(sum(losses) / 2)
    assert table[-1].startswith("| **average** |")
    assert main(["eval", str(config), f"output_dir={tmp_path / 'base'}"]) == 0
    assert json.loads((tmp_path / "base" / "eval_base.json").read_text())["adapter"] is None


def test_free_form_tasks_get_generated_exact_match_only(workspace, tmp_path):
    config = write_config(workspace, tmp_path / "run")
    assert main(["eval", str(config), f"data.jsonl=[{workspace / 'free.jsonl'}]", "data.max_eval_per_task=3"]) == 0
    result = json.loads((tmp_path / "run" / "eval_base.json").read_text())["tasks"]["free"]
    assert result["format"] == "free" and result["acc_ll"] is None and result["acc_norm"] is None
    assert result["acc_gen"] is not None and result["loss"] > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.tasks=[boolqq]"], "unknown task 'boolqq'; did you mean boolq"),
        (["training.lrate=1"], "unknown key 'training.lrate'"),
        (["data.jsonl=[missing.jsonl]"], r"data.jsonl\[0\]: no such file: missing.jsonl"),
        (["method=dora"], "method: expected one of rlora, hydralora"),
    ],
)
def test_bad_input_is_rejected_before_any_model_loads(workspace, tmp_path, overrides, message, monkeypatch, capsys):
    import rlora.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(rlora.models, "load_model_and_tokenizer", refuse)
    config = write_config(workspace, tmp_path / "run")
    code = main(["train", str(config), *overrides])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_cli_errors_are_one_line_on_stderr_with_a_nonzero_exit(tmp_path):
    result = run_cli("train", tmp_path / "nope.yaml")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("rlora: error: ")
    assert "nope.yaml: cannot read the run config" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("eval", tmp_path)
    assert result.returncode == 2 and "not a run folder (no config.yaml)" in result.stderr


def test_a_non_finite_loss_stops_training_naming_the_step_and_keeps_the_last_checkpoint(
    workspace, tmp_path, monkeypatch
):
    original = HeadOnlyLossTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        if self.state.global_step >= 2:
            return (loss * float("nan"), *loss[1:]) if isinstance(loss, tuple) else loss * float("nan")
        return loss

    monkeypatch.setattr(HeadOnlyLossTrainer, "compute_loss", poisoned)
    cfg = load_run_config(write_config(workspace, tmp_path / "run"))
    with pytest.raises(TrainingError, match=r"non-finite training loss \(nan\) at step 3; .*checkpoint-2"):
        train(cfg)
    assert [c.name for c in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint-2"]
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_killed_run_resumes_from_its_last_complete_checkpoint(workspace, tmp_path):
    config = write_config(workspace, tmp_path / "run")
    overrides = ["training.max_steps=40", "training.save_steps=3"]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlora", "train", str(config), *overrides],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and len(complete_checkpoints(checkpoints)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = complete_checkpoints(checkpoints)
    assert done, "no checkpoint was completed before the kill"
    assert not (tmp_path / "run" / "adapter").exists()

    refused = run_cli("train", config, *overrides)
    assert refused.returncode == 1 and "pass --resume" in refused.stderr
    resumed = run_cli("train", config, *overrides, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "train_metrics.json").read_text())
    assert metrics["global_step"] == 40
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # one history, continued, not restarted
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_refuses_a_different_config_and_a_finished_run(workspace, tmp_path):
    config = write_config(workspace, tmp_path / "run")
    assert main(["train", str(config), "training.max_steps=2"]) == 0
    finished = run_cli("train", config, "training.max_steps=2", "--resume")
    assert finished.returncode == 1 and "already holds a finished run" in finished.stderr
    shutil.rmtree(tmp_path / "run" / "adapter")  # as if killed after its last checkpoint
    result = run_cli("train", config, "training.max_steps=4", "--resume")
    assert result.returncode == 2 and "was made with a different config" in result.stderr
