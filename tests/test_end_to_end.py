"""The real thing, small: the embedded SmolLM2-135M trained a few steps on real tasks, then evaluated."""

import json
import math

import pytest

from rlora.cli import main


@pytest.mark.slow
def test_the_embedded_model_trains_on_real_tasks_and_evaluates(model_cache_dir, tmp_path):
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "data.tasks=[arc_easy, winogrande]",
        "data.max_train_per_task=8",
        "data.max_eval_per_task=4",
        "data.max_length=128",
        "training.max_steps=2",
        "training.batch_size=4",
        "training.save_steps=100",
        "eval.batch_size=4",
        "eval.max_new_tokens=2",
    ]
    assert main(["train", "demo", *overrides, "--cache-dir", str(model_cache_dir)]) == 0
    run = tmp_path / "run"
    metrics = json.loads((run / "train_metrics.json").read_text())
    assert metrics["global_step"] == 2 and math.isfinite(metrics["train_loss"])
    assert main(["eval", str(run), "--cache-dir", str(model_cache_dir)]) == 0
    results = json.loads((run / "eval.json").read_text())
    assert set(results["tasks"]) == {"arc_easy", "winogrande"}
    for task in results["tasks"].values():  # the demo preset scores the cloze formulation, not generations
        assert task["n"] == 4 and task["format"] == "rc" and task["acc_gen"] is None
        assert 4 * task["acc_ll"] in {0, 1, 2, 3, 4} and 4 * task["acc_norm"] in {0, 1, 2, 3, 4}
    mean = sum(t["acc_ll"] for t in results["tasks"].values()) / 2
    assert results["average"]["acc_ll"] == pytest.approx(mean, abs=1e-12)  # two quarters' mean: exact in binary
