"""The run folder: its layout, its config guard, its results, what `load_run` refuses before loading a model, and
`Run`: a run opened once, each part loaded once when first used."""

import json

import pytest
from _tiny import untrained_runs, write_config

import rlora.models
import rlora.run
from rlora.errors import ConfigError, RunFolderError
from rlora.run import Run, RunFolder, load_run
from rlora.runconfig import load_run_config


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(rlora.models, "load_model_and_tokenizer", refuse)


def test_the_layout_is_spelled_in_one_place(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.config == tmp_path / "config.yaml"
    assert folder.adapter == tmp_path / "adapter" and folder.adapter_init == tmp_path / "adapter_init"
    assert folder.checkpoints == tmp_path / "checkpoints"
    assert folder.results() == tmp_path / "eval.json" and folder.results(base=True, suffix=".md") == (
        tmp_path / "eval_base.md"
    )
    assert not folder.is_finished() and folder.complete_checkpoints() == []


def test_a_folder_made_with_another_config_is_refused(workspace, tmp_path):
    cfg = load_run_config(write_config(workspace, tmp_path / "run"))
    folder = RunFolder(cfg.output_dir)
    folder.check_config(cfg)  # nothing written yet: fine
    folder.write_config(cfg)
    folder.check_config(cfg)  # the same config: fine
    other = load_run_config(write_config(workspace, tmp_path / "run"), ["training.lr=5e-4"])
    with pytest.raises(ConfigError, match="was made with a different config"):
        folder.check_config(other)


def test_a_saved_config_without_a_key_added_since_is_the_same_config(workspace, tmp_path):
    """A run saved before `data.files` (or any later key) existed: its missing key has the default, what it ran."""
    cfg = load_run_config(write_config(workspace, tmp_path / "run"))
    folder = RunFolder(cfg.output_dir)
    folder.write_config(cfg)
    text = folder.config.read_text()
    assert "  files: []\n" in text
    folder.config.write_text(text.replace("  files: []\n", ""))
    folder.check_config(cfg)
    (tmp_path / "x.csv").write_text("instruction,output\ni,o\n")
    other = load_run_config(write_config(workspace, tmp_path / "run"), [f"data.files=[{tmp_path / 'x.csv'}]"])
    with pytest.raises(ConfigError, match="was made with a different config"):
        folder.check_config(other)


def test_results_are_written_as_json_and_markdown_and_read_back(tmp_path):
    results = {"method": "rlora", "tasks": {"t": {"n": 2, "acc_ll": 0.5, "acc_norm": None, "acc_gen": 1.0}}}
    results["average"] = {"acc_ll": 0.5, "acc_norm": None, "acc_gen": 1.0}
    folder = RunFolder(tmp_path)
    assert folder.read_results() is None
    folder.write_results(results)
    assert folder.read_results() == results == json.loads((tmp_path / "eval.json").read_text())
    assert (tmp_path / "eval.md").read_text().startswith("| task | n | rlora acc | rlora acc generated |")
    folder.write_results(results, base=True)
    assert (tmp_path / "eval_base.md").read_text().startswith("| task | n | base acc |")


@pytest.mark.usefixtures("no_model_loads")
def test_load_run_refuses_what_it_cannot_use_before_any_model_loads(workspace, tmp_path):
    with pytest.raises(RunFolderError, match=r"not a run folder \(no config.yaml\)"):
        load_run(tmp_path)
    cfg = load_run_config(write_config(workspace, tmp_path / "run"), ["method=lora"])
    RunFolder(cfg.output_dir).write_config(cfg)
    with pytest.raises(RunFolderError, match="the run has no adapter yet"):
        load_run(cfg.output_dir)
    (tmp_path / "run" / "adapter").mkdir()
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(RunFolderError, match="a plain LoRA run has one head and no router"):
        load_run(cfg.output_dir, multi_head=True)


def test_a_run_is_opened_once_and_loads_each_part_once_when_first_used(workspace, tmp_path, monkeypatch):
    runs = untrained_runs(workspace, tmp_path)
    calls = {"config": 0, "check": 0, "load": []}
    read, check, load = rlora.run.load_run_config, rlora.run.check_adapter, rlora.models.load_model_and_tokenizer

    def counted_read(*args, **kwargs):
        calls["config"] += 1
        return read(*args, **kwargs)

    def counted_check(*args, **kwargs):
        calls["check"] += 1
        return check(*args, **kwargs)

    def recorded_load(*args, **kwargs):
        calls["load"].append(kwargs["loading"])
        return load(*args, **kwargs)

    monkeypatch.setattr(rlora.run, "load_run_config", counted_read)
    monkeypatch.setattr(rlora.run, "check_adapter", counted_check)
    monkeypatch.setattr(rlora.models, "load_model_and_tokenizer", recorded_load)
    run = Run.open(runs["rlora"])
    assert (run.multi_head, run.peft_type) == (True, "RLORA") and calls["load"] == []  # facts without a model
    assert run.load() is run and run.model is run.model and run.tokenizer is run.tokenizer
    assert run.context_length == run.model.config.max_position_embeddings
    assert list(run.plan.test) == list(run.plan.tasks) and run.plan is run.plan
    assert run.model.peft_config["default"].peft_type == "RLORA"  # the run's adapter, on the base
    assert calls == {"config": 1, "check": 1, "load": [run.cfg.base]}  # the base loads as the run's `base` says
    lora = Run.open(runs["lora"])
    assert (lora.multi_head, lora.peft_type) == (False, "LORA")
    with pytest.raises(RunFolderError, match=r"a plain LoRA run has one head and no router; --routing needs"):
        lora.require_multi_head("--routing needs a multi-head run")
    bare = Run.open(runs["rlora"], adapter=False)
    assert bare.model is bare.base_model and not hasattr(bare.model, "peft_config")
