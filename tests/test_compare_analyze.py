"""`rlora compare`, `rlora analyze` and `rlora demo` end to end on a tiny model and tiny JSONL tasks."""

import json

import pytest
from _tiny import write_config

import rlora.train
from rlora.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_compare_trains_every_method_and_seed_then_reuses_finished_runs(workspace, tmp_path, monkeypatch):
    config = write_config(workspace, tmp_path / "cmp")
    args = ["compare", str(config), "--methods", "hydralora,rlora,lora", "--seeds", "2", "training.max_steps=2"]
    assert main(args) == 0
    out = tmp_path / "cmp"
    for method in ("hydralora", "rlora", "lora"):
        for seed in (0, 1):
            run = out / method / f"seed{seed}"
            assert (run / "eval.json").is_file() and (run / "adapter").is_dir()
            cfg_text = (run / "config.yaml").read_text()
            assert f"method: {method}\n" in cfg_text and f"seed: {seed}\n" in cfg_text
    lora_cfg = json.loads((out / "lora" / "seed0" / "adapter" / "adapter_config.json").read_text())
    # matched to 3 heads of rank 4 on the MLP: (2 * (4*32 + 12*64 + 3*32) + (4*64 + 12*32 + 3*64)) / (3 * 96) = 9.8
    assert lora_cfg["peft_type"] == "LORA" and lora_cfg["r"] == 10
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["methods"] == ["hydralora", "rlora", "lora"] and summary["seeds"] == [0, 1]
    per_method = summary["metrics"]["acc_ll"]["per_method"]
    seed_values = [
        json.loads((out / "rlora" / f"seed{s}" / "eval.json").read_text())["tasks"]["colors"]["acc_ll"] for s in (0, 1)
    ]
    assert per_method["rlora"]["tasks"]["colors"]["values"] == seed_values
    assert (out / "comparison.png").read_bytes().startswith(PNG_MAGIC)
    assert "mean ± 95% CI over 2 seeds (0, 1)" in (out / "comparison.md").read_text()

    before = (out / "comparison.json").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(rlora.train, "train", no_training)
    assert main(args) == 0
    assert (out / "comparison.json").read_text() == before
    assert main([*args, "training.lr=5e-4"]) == 2  # finished runs made with another config are not reused


def test_analyze_writes_tables_and_plots_of_a_multi_head_run(workspace, tmp_path):
    config = write_config(workspace, tmp_path / "run")
    assert main(["train", str(config), "training.max_steps=2"]) == 0
    assert main(["analyze", str(tmp_path / "run"), "--max-prompts", "4"]) == 0
    out = tmp_path / "run" / "analysis"
    data = json.loads((out / "analysis.json").read_text())
    assert len(data["head_similarity"]["init"]) == len(data["head_similarity"]["trained"]) == 6
    assert set(data["router_usage"]) == {"colors", "letters"}
    assert sum(data["router_usage"]["colors"]["mean_gate"]) == pytest.approx(1.0)
    for name in ("head_similarity.png", "router_usage.png", "heads_pca.png"):
        png = (out / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 5000, name
    assert (out / "head_similarity.md").read_text().startswith("| layer | module | cosine at init | cosine trained |")


def test_analyze_refuses_a_plain_lora_run(workspace, tmp_path):
    config = write_config(workspace, tmp_path / "run")
    assert main(["train", str(config), "method=lora", "training.max_steps=1"]) == 0
    assert main(["analyze", str(tmp_path / "run")]) == 2


def test_demo_trains_evaluates_base_and_tuned_and_prints_both(workspace, tmp_path, capsys):
    overrides = [
        f"model={workspace / 'model'}",
        f"output_dir={tmp_path / 'demo'}",
        "data.tasks=[]",
        f"data.jsonl=[{workspace / 'colors.jsonl'}, {workspace / 'letters.jsonl'}]",
        "data.max_train_per_task=8",
        "data.max_eval_per_task=4",
        "training.save_steps=100",
    ]
    assert main(["demo", *overrides]) == 0
    printed = capsys.readouterr().out
    base_columns = "| task | n | base acc | base acc_norm | base loss ↓ | base ppl ↓ "
    assert base_columns + "| rlora acc | rlora acc_norm | rlora loss ↓ | rlora ppl ↓ |" in printed
    base = json.loads((tmp_path / "demo" / "eval_base.json").read_text())["average"]
    tuned = json.loads((tmp_path / "demo" / "eval.json").read_text())["average"]
    gain = 100 * (tuned["acc_ll"] - base["acc_ll"])
    assert f"acc {100 * base['acc_ll']:.1f} -> {100 * tuned['acc_ll']:.1f} ({gain:+.1f} points)" in printed
    assert (tmp_path / "demo" / "demo.md").read_text().strip() in printed
    assert main(["demo", *overrides, "data.max_eval_per_task=2"]) == 2  # not the saved run's settings
