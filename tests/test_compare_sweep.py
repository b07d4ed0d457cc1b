"""`rlora compare --lr/--sweep`: each method's setting chosen on a validation split carved from the training examples,
never the test split; plain LoRA at other ranks as methods."""

import json

import numpy as np
import pytest
from _reference import read_jsonl_tasks
from _tiny import write_config

import rlora.train
from rlora.cli import main
from rlora.commands.compare import parse_sweep, point_name, select_settings
from rlora.data.plan import plan_data
from rlora.data.split import split_key, split_sides
from rlora.errors import ConfigError, TrainingError
from rlora.methods import parse_method
from rlora.runconfig import load_run_config

TEST_FRACTION, VALIDATION_FRACTION = 0.2, 0.3


def test_split_sides_by_hand():
    # test [0, 0.2); validation [0.2, 0.2 + 0.3 * 0.8) = [0.2, 0.44); training the rest
    keys = np.array([0.0, 0.1999, 0.2, 0.3, 0.4399, 0.44, 0.9])
    train, validation, test = split_sides(keys, TEST_FRACTION, VALIDATION_FRACTION)
    assert test.tolist() == [True, True, False, False, False, False, False]
    assert validation.tolist() == [False, False, True, True, True, False, False]
    assert train.tolist() == [False, False, False, False, False, True, True]
    train, validation, test = split_sides(keys, TEST_FRACTION)  # no validation: the split it always was
    assert not validation.any() and (train == ~test).all() and test.tolist() == (keys < 0.2).tolist()


def _quiz(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def _rows(n=80):
    return [
        {"task": "quiz", "prompt": f"question {i}: the sky is", "choices": ["red", "blue"], "gold": i % 2}
        for i in range(n)
    ]


def _keys(path):
    return [split_key(e) for e in read_jsonl_tasks([path])["quiz"]]


def _with_other_test_examples(tmp_path, rows):
    """`rows` with every test example replaced by another one that also hashes into the test split."""
    keys = _keys(_quiz(tmp_path / "quiz.jsonl", rows))
    candidates = [
        {**row, "prompt": f"changed {i} {j}: the sky is"} for i, row in enumerate(rows) for j in range(40)
    ]  # each falls in the test split with probability 0.2: one of 40 misses with probability 0.8**40 ~ 1e-4
    candidate_keys = _keys(_quiz(tmp_path / "candidates.jsonl", candidates))
    changed = list(rows)
    for i, key in enumerate(keys):
        if key < TEST_FRACTION:
            j = next(j for j in range(40) if candidate_keys[40 * i + j] < TEST_FRACTION)
            changed[i] = candidates[40 * i + j]
    return changed


def _config(workspace, tmp_path, data, name="run"):
    overrides = [
        "data.tasks=[]",
        f"data.jsonl=[{data}]",
        "data.max_eval_per_task=null",
        f"data.validation_fraction={VALIDATION_FRACTION}",
        "training.max_steps=2",
    ]
    return load_run_config(write_config(workspace, tmp_path / name), overrides)


def test_the_validation_split_is_carved_from_training_and_disjoint_from_test(workspace, tmp_path):
    data = _quiz(tmp_path / "quiz.jsonl", _rows())
    test_cfg = _config(workspace, tmp_path, data)
    test_plan = plan_data(test_cfg.data, test_cfg.seed)
    cfg = _config(workspace, tmp_path, data)
    cfg.data.holdout = "validation"
    plan = plan_data(cfg.data, cfg.seed)
    test_keys = {split_key(e) for e in test_plan.test["quiz"]}
    validation_keys = {split_key(e) for e in plan.test["quiz"]}
    training_keys = {split_key(e) for e in plan.train}
    assert test_keys and validation_keys and training_keys
    assert all(k < TEST_FRACTION for k in test_keys)
    assert all(TEST_FRACTION <= k < TEST_FRACTION + VALIDATION_FRACTION * (1 - TEST_FRACTION) for k in validation_keys)
    assert not test_keys & validation_keys and not test_keys & training_keys and not validation_keys & training_keys
    assert training_keys < {split_key(e) for e in test_plan.train}  # the test run trains on validation's too
    sizes = plan.manifest()["tasks"]["quiz"]
    assert sizes["validation"] == sizes["validation_evaluated"] == len(validation_keys)
    assert plan.manifest()["split"]["holdout"] == "validation"


def test_changing_the_test_examples_cannot_change_the_chosen_rate(workspace, tmp_path):
    rows = _rows()
    changed = _with_other_test_examples(tmp_path, rows)
    original_keys, changed_keys = _keys(_quiz(tmp_path / "a.jsonl", rows)), _keys(_quiz(tmp_path / "b.jsonl", changed))
    test_a = {json.dumps(r) for r, k in zip(rows, original_keys, strict=True) if k < TEST_FRACTION}
    test_b = {json.dumps(r) for r, k in zip(changed, changed_keys, strict=True) if k < TEST_FRACTION}
    rest_a = [r for r, k in zip(rows, original_keys, strict=True) if k >= TEST_FRACTION]
    rest_b = [r for r, k in zip(changed, changed_keys, strict=True) if k >= TEST_FRACTION]
    assert test_a and not test_a & test_b and rest_a == rest_b  # every test example differs, nothing else does

    sweep = parse_sweep(["training.lr=1e-5,3e-2"])
    specs = [parse_method("hydralora")]
    chosen = {}
    for name in ("a", "b"):
        base = _config(workspace, tmp_path, tmp_path / f"{name}.jsonl", name)
        chosen[name] = select_settings(base, specs, sweep, 0, tmp_path / f"out-{name}")["per_method"]["hydralora"]
        for point in sweep.points():  # the selection runs evaluated the validation split, and only that
            run = tmp_path / f"out-{name}" / "sweep" / "hydralora" / point_name(point)
            manifest = json.loads((run / "data_manifest.json").read_text())
            assert manifest["split"]["holdout"] == "validation" and "test_evaluated" not in manifest["tasks"]["quiz"]
    # the same training and validation examples, seed and machine: the same computation, so the losses agree to
    # float rounding (rel 1e-6 is far below the loss differences between the two rates, which are ~1e-2 or more)
    for row_a, row_b in zip(chosen["a"]["points"], chosen["b"]["points"], strict=True):
        assert row_a["validation"] == pytest.approx(row_b["validation"], rel=1e-6)
    assert chosen["a"]["chosen"] == chosen["b"]["chosen"]
    losses = [row["validation"] for row in chosen["a"]["points"]]
    assert chosen["a"]["chosen"] == list(sweep.points()[int(np.argmin(losses))]) and losses[0] != pytest.approx(
        losses[1]
    )


def test_compare_with_a_sweep_chooses_per_method_then_runs_every_seed_there(workspace, tmp_path, monkeypatch):
    config = write_config(workspace, tmp_path / "cmp")
    args = ["compare", str(config), "--methods", "hydralora,lora@x2", "--seeds", "2", "--lr", "1e-5,3e-2"]
    assert main([*args, "training.max_steps=2"]) == 0
    out = tmp_path / "cmp"
    summary = json.loads((out / "comparison.json").read_text())
    selection = summary["selection"]
    assert json.loads((out / "selection.json").read_text()) == selection
    assert selection["keys"] == ["training.lr"] and selection["seed"] == 0 and selection["holdout"] == "validation"
    assert summary["matched_lora_rank"] == 10  # as in test_compare_analyze: 3 heads of rank 4 on the MLP
    for method in ("hydralora", "lora@x2"):
        rows = selection["per_method"][method]["points"]
        losses = [row["validation"] for row in rows]
        chosen = selection["per_method"][method]["chosen"]
        assert chosen == rows[int(np.argmin(losses))]["point"]
        for row in rows:
            sweep_run = out / "sweep" / method / row["name"]
            results = json.loads((sweep_run / "eval.json").read_text())  # the validation loss only
            assert results["average"]["loss"] == row["validation"] and results["average"]["acc_ll"] is None
            assert "router" not in results
            assert "holdout: validation" in (sweep_run / "config.yaml").read_text()
        for seed in (0, 1):
            run = out / method / chosen[0] / f"seed{seed}"
            cfg = load_run_config(run / "config.yaml")
            assert cfg.data.holdout == "test" and cfg.seed == seed
            assert cfg.training.lr == float(chosen[0].split("=")[1])
    for seed in (0, 1):
        adapter = out / "lora@x2" / selection["per_method"]["lora@x2"]["chosen"][0] / f"seed{seed}" / "adapter"
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 20
    router = json.loads(
        (out / "hydralora" / selection["per_method"]["hydralora"]["chosen"][0] / "seed0" / "eval.json").read_text()
    )["router"]
    assert router["status"] in ("inert", "collapsed", "active") and router["num_heads"] == 3
    assert set(summary["router_health"]) == {"hydralora"}  # plain LoRA has no router
    text = (out / "comparison.md").read_text()
    assert "### Settings chosen per method on the validation split (10% of the training examples" in text
    assert "| method | training.lr=1e-5 | training.lr=3e-2 | chosen |" in text
    assert "### Router health on the evaluated examples" in text
    before = (out / "comparison.json").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(rlora.train, "train", no_training)
    assert main([*args, "training.max_steps=2"]) == 0  # every sweep and seed run reused
    assert (out / "comparison.json").read_text() == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sweep", "training.lrr=1e-3,1e-2"], "unknown key 'training.lrr' (did you mean 'lr'?)"),
        (["--sweep", "data.max_length=32,64"], "only training.* and adapter.* settings can be swept"),
        (["--lr", "1e-3,1e-3"], "a value is given twice"),
        (["--lr", "1e-3,x"], "training.lr: expected a number, got 'x'"),
        (["--lr", "1e-3", "training.lr=1e-3"], "training.lr is both swept and set with training.lr=...; give it one"),
        (["--lr", "1e-3", "--sweep", "training.lr=1e-2"], "training.lr is swept twice"),
        (["--methods", "lora@r=0"], "unknown method 'lora@r=0'"),
    ],
)
def test_a_bad_sweep_is_a_one_line_error(workspace, tmp_path, capsys, extra, message):
    config = write_config(workspace, tmp_path / "cmp")
    assert main(["compare", str(config), "--seeds", "1", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlora: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "cmp").exists()  # refused before anything trains


def test_compare_help_shows_the_sweep(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lr V1,V2,..." in text and "--sweep KEY=V1,V2,..." in text and "lora@xK" in text
    assert "never the test split" in text


def test_methods_and_sweeps_are_parsed():
    assert parse_method("lora@r=60").lora_r == 60 and parse_method("lora@r=60").method == "lora"
    assert parse_method("lora@x4").rank(15) == 60 and parse_method("lora").rank(15) is None
    with pytest.raises(ConfigError, match="unknown method 'lora@y2'"):
        parse_method("lora@y2")
    sweep = parse_sweep(["training.lr=3e-4, 1e-3", "adapter.target_modules=[q_proj,v_proj],all-linear"])
    assert sweep.values == (("3e-4", "1e-3"), ("[q_proj,v_proj]", "all-linear"))
    assert len(sweep.points()) == 4 and sweep.points()[1] == ("training.lr=3e-4", "adapter.target_modules=all-linear")
    assert point_name(["training.lr=3e-4", "training.deepspeed=a/b"]) == "training.lr=3e-4,training.deepspeed=a%2Fb"


def test_a_value_whose_training_stops_loses_and_is_not_trained_again(workspace, tmp_path, monkeypatch):
    base = load_run_config(write_config(workspace, tmp_path / "run"), ["training.max_steps=1"])
    trained = []
    real = rlora.train.ensure_trained

    def diverging(cfg, cache_dir=None):
        trained.append(cfg.training.lr)
        if cfg.training.lr > 1:  # as the Trainer stops at a non-finite loss
            raise TrainingError("non-finite training loss (nan) at step 1; training stopped")
        return real(cfg, cache_dir)

    monkeypatch.setattr(rlora.train, "ensure_trained", diverging)
    sweep, specs = parse_sweep(["training.lr=1e-3,5"]), [parse_method("rlora")]
    first = select_settings(base, specs, sweep, 0, tmp_path / "out")["per_method"]["rlora"]
    assert trained == [1e-3, 5.0] and first["chosen"] == ["training.lr=1e-3"]
    assert first["points"][1]["validation"] is None and "non-finite training loss" in first["points"][1]["failed"]
    again = select_settings(base, specs, sweep, 0, tmp_path / "out")["per_method"]["rlora"]
    assert trained == [1e-3, 5.0] and again == first  # reused: the finished run and the recorded failure
    with pytest.raises(TrainingError, match=r"rlora: no value of the sweep trained to a finite validation loss"):
        select_settings(base, specs, parse_sweep(["training.lr=5,7"]), 0, tmp_path / "out")
