"""Confidence intervals and the comparison summary, against values computed by hand."""

import math

import pytest

from rlora.commands.compare import parse_methods, summarize
from rlora.reports import comparison_markdown, results_table
from rlora.stats import format_ci, mean_ci, paired_difference, t_quantile_975


def test_t_quantiles_match_published_values():
    # published tables give 3 decimals: agreement to their last digit
    assert t_quantile_975(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile_975(2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile_975(30) == pytest.approx(2.042, abs=1e-3)
    assert t_quantile_975(40) == pytest.approx(2.021, abs=1e-3)
    assert t_quantile_975(120) == pytest.approx(1.980, abs=1e-3)
    with pytest.raises(ValueError, match="dof: expected >= 1, got 0"):
        t_quantile_975(0)


def test_mean_ci_by_hand():
    # values 0.70, 0.74, 0.72: mean 0.72, sd 0.02, half-width 4.3027 * 0.02 / sqrt(3) = 0.049683 (4.3027: the
    # table's t_{0.975, 2}); pytest.approx's default rel=1e-6 leaves room for float64 rounding of a few operations
    mean, half = mean_ci([0.70, 0.74, 0.72])
    assert mean == pytest.approx(0.72)
    assert half == pytest.approx(4.3027 * 0.02 / math.sqrt(3))
    single_mean, single_half = mean_ci([0.5])
    assert single_mean == 0.5 and math.isnan(single_half)
    assert format_ci(0.72, half) == "72.0 ± 5.0"
    assert format_ci(0.5, math.nan) == "50.0"


def test_paired_difference_uses_per_seed_differences():
    # differences 0.02, 0.04, 0.00: mean 0.02, sd 0.02
    mean, half = paired_difference([0.72, 0.74, 0.70], [0.70, 0.70, 0.70])
    assert mean == pytest.approx(0.02)
    assert half == pytest.approx(4.3027 * 0.02 / math.sqrt(3))
    with pytest.raises(ValueError, match="2 values against 3"):
        paired_difference([1, 2], [1, 2, 3])


def run(acc_a, acc_b):
    """An eval.json's results, as `evaluate` writes them: metrics not measured are None."""
    unmeasured = {"acc_norm": None, "acc_gen": None}
    tasks = {"a": {"n": 10, "acc_ll": acc_a, **unmeasured}, "b": {"n": 10, "acc_ll": acc_b, **unmeasured}}
    return {"tasks": tasks, "average": {"acc_ll": (acc_a + acc_b) / 2, **unmeasured}}


def test_summary_has_means_cis_and_differences_to_the_first_method():
    runs = {
        "hydralora": {0: run(0.5, 0.6), 1: run(0.7, 0.6)},
        "rlora": {0: run(0.6, 0.6), 1: run(0.9, 0.7)},
    }
    summary = summarize(runs, ["hydralora", "rlora"], [0, 1])
    assert list(summary["metrics"]) == ["acc_ll"]  # acc_norm and acc_gen were not measured
    hydra = summary["metrics"]["acc_ll"]["per_method"]["hydralora"]
    assert hydra["tasks"]["a"]["mean"] == pytest.approx(0.6)
    assert hydra["tasks"]["a"]["ci95"] == pytest.approx(12.7062 * math.sqrt(0.02) / math.sqrt(2))
    assert hydra["average"]["values"] == pytest.approx([0.55, 0.65])
    diff = summary["metrics"]["acc_ll"]["differences"]["rlora"]
    assert diff["tasks"]["a"]["mean"] == pytest.approx(0.15)  # (0.1 + 0.2) / 2
    assert diff["tasks"]["b"]["mean"] == pytest.approx(0.05)
    text = comparison_markdown(summary)
    assert "| task | hydralora | rlora |" in text
    assert "| a | 60.0 ± 127.1 | 75.0 ± 190.6 |" in text
    assert "| **average** | rlora − hydralora |" not in text and "| task | rlora − hydralora |" in text


def test_methods_are_parsed_and_checked():
    assert parse_methods("lora, rlora") == ["lora", "rlora"]
    with pytest.raises(
        ValueError, match="--methods: unknown method .dora.; choose from rlora, hydralora.* or lora@r=N"
    ):
        parse_methods("rlora,dora")
    with pytest.raises(ValueError, match="names a method twice"):
        parse_methods("rlora,rlora")


def test_a_task_may_be_called_anything_average_and_table_breakers_included():
    tasks = {"average": 0.2, "a|b\nc": 0.4, "**average**": 0.6}
    unmeasured = {"acc_norm": None, "acc_gen": None, "loss": None, "ppl": None}
    results = {"tasks": {t: {"n": 2, "acc_ll": v, **unmeasured} for t, v in tasks.items()}}
    results["average"] = {"acc_ll": 0.4, **unmeasured}
    summary = summarize({"rlora": {0: results}}, ["rlora"], [0])
    rlora = summary["metrics"]["acc_ll"]["per_method"]["rlora"]
    assert {t: c["mean"] for t, c in rlora["tasks"].items()} == tasks  # the task "average" keeps its own value
    assert rlora["average"]["mean"] == 0.4
    lines = comparison_markdown(summary).splitlines()
    assert lines[4:8] == [
        "| average | 20.0 |",
        "| a\\|b c | 40.0 |",
        "| \\*\\*average\\*\\* | 60.0 |",
        "| **average** | 40.0 |",
    ]
    table = results_table({"rlora": results}, ["acc_ll"]).splitlines()
    assert table[2:] == [
        "| average | 2 | 20.0 |",
        "| a\\|b c | 2 | 40.0 |",
        "| \\*\\*average\\*\\* | 2 | 60.0 |",
        "| **average** |  | 40.0 |",
    ]
