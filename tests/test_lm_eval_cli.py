"""`rlora lm-eval`: lm-eval-harness's own command line with rlora registered, on a tiny model and rlora adapter."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _lm_eval import TASK_YAML
from _tiny import perturb_adapter

import rlora.models
from rlora import RLoraConfig
from rlora.cli import main
from rlora.commands.lm_eval import lm_eval_argv

TASK = "rlora_cli_tiny"


@pytest.fixture(scope="module")
def tiny_adapter(workspace, tmp_path_factory) -> Path:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(workspace / "model")
    cfg = RLoraConfig(r=2, num_heads=3, target_modules=["gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, cfg)
    perturb_adapter(peft_model)
    path = tmp_path_factory.mktemp("lm_eval_adapter") / "adapter"
    peft_model.save_pretrained(path)
    return path


def test_rlora_lm_eval_evaluates_an_rlora_adapter(workspace, tiny_adapter, tmp_path):
    docs = tmp_path / "docs.jsonl"
    with open(docs, "w") as f:
        for i in range(4):
            row = {"context": f"Question: is the sky blue {i}?\nAnswer:", "choices": ["yes", "no"], "gold": i % 2}
            f.write(json.dumps(row) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data_file=json.dumps(str(docs))))
    model_args = f"pretrained={workspace / 'model'},peft={tiny_adapter},dtype=float32"
    argv = ["lm-eval", "--model", "hf", "--model_args", model_args, "--tasks", TASK]
    argv += ["--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "4"]
    argv += ["--output_path", str(tmp_path / "out")]
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "rlora", *argv], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"|{TASK}" in result.stdout  # lm-eval's own results table
    (found,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(found.read_text())
    assert set(results["results"][TASK]) >= {"acc,none", "acc_norm,none"}
    assert results["config"]["model_args"]["peft"] == str(tiny_adapter)
    assert results["n-samples"][TASK]["effective"] == 4


def test_lm_eval_arguments_pass_through_with_the_embedded_model_name_resolved(monkeypatch):
    seen = []
    monkeypatch.setattr(rlora.models, "resolve_model", lambda _name, cache_dir=None: seen.append(cache_dir) or "/m/x")
    argv = ["--model", "hf", "--model_args", "pretrained=smollm2-135m,peft=run/adapter", "--tasks", "a", "b"]
    assert lm_eval_argv(argv, "/c") == [*argv[:3], "pretrained=/m/x,peft=run/adapter", "--tasks", "a", "b"]
    assert lm_eval_argv(["-a", "pretrained=smollm2-135m", "dtype=float32"]) == [
        "-a",
        "pretrained=/m/x",
        "dtype=float32",
    ]
    assert lm_eval_argv(["--model_args=pretrained=smollm2-135m"]) == ["--model_args=pretrained=/m/x"]
    assert seen == ["/c", None, None]
    other = ["--model_args", "pretrained=/some/folder", "--tasks", "pretrained=smollm2-135m"]
    assert lm_eval_argv(other) == other  # only --model_args, and only the embedded names


def test_lm_eval_not_installed_is_one_line_naming_the_extra(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["lm-eval", "--model", "hf", "--tasks", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "rlora[lm-eval]"' in err, err


def test_lm_eval_errors_are_one_line(workspace, capsys):
    argv = [
        "lm-eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={workspace / 'model'}",
        "--tasks",
        "no_such_task_x",
    ]
    assert main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rlora: error: lm-eval: ") and "no_such_task_x" in err, err
