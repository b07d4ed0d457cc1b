"""The YAML run config: defaults, overrides, and every rejection with its message."""

import re

import pytest
from _tiny import MLP, tiny_llama
from peft import LoraConfig

from rlora import RLoraConfig
from rlora.methods import adapter_config, matched_lora_rank
from rlora.runconfig import ConfigError, dump_run_config, load_run_config


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_a_yaml_file_and_overrides_fill_typed_fields(tmp_path):
    path = write(tmp_path, "method: hydralora\ntraining:\n  lr: 1e-4\n  batch_size: 4\ndata:\n  tasks: [piqa]\n")
    cfg = load_run_config(path, ["training.batch_size=2", "data.tasks=[boolq, sst2]", "adapter.num_heads=3"])
    assert cfg.method == "hydralora"
    assert cfg.training.lr == 1e-4 and isinstance(cfg.training.lr, float)
    assert cfg.training.batch_size == 2
    assert cfg.data.tasks == ["boolq", "sst2"]
    assert cfg.adapter.num_heads == 3
    assert cfg.adapter.r == 4  # untouched default


def test_the_dumped_config_loads_back_to_the_same_config(tmp_path):
    cfg = load_run_config(None, ["seed=3", "data.max_train_per_task=10"])
    again = load_run_config(write(tmp_path, dump_run_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (
            "trainng: {}\n",
            [],
            r"run.yaml: unknown key 'trainng' \(did you mean 'training'\?\); valid keys here: model,",
        ),
        ("training:\n  lrate: 1\n", [], r"unknown key 'training.lrate'.*valid keys here: epochs, max_steps"),
        ("training:\n  batch_size: eight\n", [], r"run.yaml: training.batch_size: expected an integer, got 'eight'"),
        ("training:\n  batch_size: 2.5\n", [], r"training.batch_size: expected an integer, got 2.5"),
        ("data:\n  tasks: piqa\n", [], r"data.tasks: expected a list of strings, got 'piqa'"),
        (
            "method: dora\n",
            [],
            r"method: expected one of rlora, hydralora, hydralora\+dropout, hydralora\+init, alora, lora",
        ),
        ("data:\n  mixture: random\n", [], r"data.mixture: expected one of proportional, equal, temperature"),
        ("data:\n  jsonl: [missing.jsonl]\n", [], r"data.jsonl\[0\]: no such file: missing.jsonl"),
        ("training: [1, 2]\n", [], r"training: expected a mapping"),
        ("- a\n- b\n", [], r"expected a mapping of settings at the top level, got list"),
        ("a: [\n", [], r"run.yaml: not valid YAML"),
        ("", ["training.lr"], r"override 'training.lr': expected KEY=VALUE"),
        ("", ["adapter.lora_dropout=1.5"], r"adapter.lora_dropout: expected a number in \[0, 1\), got 1.5"),
        ("", ["adapter.num_heads=0"], r"adapter.num_heads: expected an integer >= 1, got 0"),
        ("", ["adapter.lora_alpha=0"], r"adapter.lora_alpha: expected a finite number > 0, got 0.0"),
        ("", ["adapter.router_init=uniform"], r"adapter.router_init: expected one of 'zeros', 'random', got 'uniform'"),
        ("", ["data.test_fraction=0"], r"data.test_fraction: expected a number in \(0, 1\), got 0.0"),
        ("", ["training.batch_size=0"], r"training.batch_size: expected an integer >= 1, got 0"),
        ("", ["training.warmup_ratio=1"], r"training.warmup_ratio: expected a number in \[0, 1\), got 1.0"),
        ("", ["training.lr=0"], r"training.lr: expected a finite number > 0, got 0.0"),
        ("", ["training.lr=nan"], r"training.lr: expected a finite number > 0, got nan"),
        ("", ["eval.max_new_tokens=0"], r"eval.max_new_tokens: expected an integer >= 1, got 0"),
    ],
)
def test_bad_configs_are_rejected_naming_the_file_and_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(write(tmp_path, text) if text else None, overrides)  # an empty file is an error of its own


def test_a_missing_config_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read the run config \(No such file or directory\)"):
        load_run_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("method", "head_init", "head_dropout"),
    [
        ("rlora", "random", True),
        ("hydralora", "zeros", False),
        ("hydralora+dropout", "zeros", True),
        ("hydralora+init", "random", False),
    ],
)
def test_each_multi_head_method_is_its_ablation_cell(method, head_init, head_dropout):
    cfg = adapter_config(method, r=4, lora_alpha=32, num_heads=5, lora_dropout=0.1, target_modules=MLP)
    assert isinstance(cfg, RLoraConfig)
    assert (cfg.head_init, cfg.head_dropout, cfg.num_heads, cfg.r) == (head_init, head_dropout, 5, 4)


def test_lora_rank_is_matched_to_the_multi_head_parameter_count():
    model = tiny_llama()  # per layer: gate/up 32->64, down 64->32
    multi_head = 2 * (2 * (4 * 32 + 5 * 4 * 64 + 5 * 32) + (4 * 64 + 5 * 4 * 32 + 5 * 64))
    per_rank = 2 * 3 * (32 + 64)
    assert matched_lora_rank(model, MLP, r=4, num_heads=5) == round(multi_head / per_rank) == 15
    cfg = adapter_config("lora", r=4, lora_alpha=32, num_heads=5, lora_dropout=0.1, target_modules=MLP, model=model)
    assert isinstance(cfg, LoraConfig) and cfg.r == 15 and cfg.use_rslora
    explicit = adapter_config("lora", r=4, lora_alpha=32, num_heads=5, lora_dropout=0.1, target_modules=MLP, lora_r=8)
    assert explicit.r == 8


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="method: expected one of rlora, hydralora"):
        adapter_config("dora", r=4, lora_alpha=32, num_heads=5, lora_dropout=0.1, target_modules=MLP)


@pytest.mark.parametrize(
    ("field", "value"), [("r", 0), ("num_heads", 0), ("lora_alpha", 0.0), ("lora_dropout", 1.0), ("init_gamma", -1.0)]
)
def test_the_adapter_section_follows_rloraconfigs_own_rules(field, value):
    """One rule per field: the run config rejects exactly what RLoraConfig rejects, with the same expectation."""
    with pytest.raises(ValueError, match=rf"RLoraConfig.{field}: expected (.*), got") as direct:
        RLoraConfig(**{field: value})
    expected = re.escape(re.search(r"expected (.*), got", str(direct.value)).group(1))
    with pytest.raises(ConfigError, match=rf"adapter.{field}: expected {expected}, got"):
        load_run_config(None, [f"adapter.{field}={value}"])
