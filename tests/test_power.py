"""What a comparison can resolve (`rlora.power`): Student's t quantiles, the noise components against the two-way
mean squares computed here with numpy, the planner's budgets against a simulation with known noise (seeded, about
ten seconds), and `rlora compare`'s tables and `rlora plan` on a comparison with per-example outcomes."""

import json
import math

import numpy as np
import pytest

from rlora.cli import main
from rlora.commands.compare import summarize
from rlora.power import Noise, detect_factor, needed_examples, plan, t_quantile, task_noise
from rlora.reports import comparison_markdown


@pytest.mark.parametrize(
    ("p", "dof", "expected"),  # printed tables of Student's t (4 decimals)
    [(0.8, 1, 1.3764), (0.8, 2, 1.0607), (0.8, 3, 0.9785), (0.8, 5, 0.9195), (0.8, 10, 0.8791), (0.9, 4, 1.5332)]
    + [(0.975, 2, 4.3027), (0.975, 4, 2.7764), (0.95, 3, 2.3534), (0.8, 60, 0.8477)],
)
def test_t_quantiles_match_the_printed_tables(p, dof, expected):
    assert abs(t_quantile(p, dof) - expected) < 2e-3  # the tables' rounding, and the expansion's error at 3 dof


def _mean_squares(d: np.ndarray) -> tuple[float, float, float]:
    """Two-way ANOVA without replication, by numpy: (variance of the seeds' means, of the examples' means, MSr)."""
    s, n = d.shape
    rows, cols = d.mean(1), d.mean(0)
    residual = d - rows[:, None] - cols[None, :] + d.mean()
    return rows.var(ddof=1), cols.var(ddof=1), (residual**2).sum() / ((s - 1) * (n - 1))


def _table(rng, seeds, examples, sd_seed, sd_example, sd_residual, effect=0.0) -> np.ndarray:
    return (
        effect
        + rng.normal(0, sd_seed, (seeds, 1))
        + rng.normal(0, sd_example, (1, examples))
        + rng.normal(0, sd_residual, (seeds, examples))
    )


def test_the_noise_is_the_two_way_mean_squares():
    d = _table(np.random.default_rng(0), 4, 30, 0.2, 0.3, 0.2, effect=0.1)
    noise = task_noise(d.tolist(), d.mean(1).tolist())
    vs, vi, ms = _mean_squares(d)
    s, n = d.shape
    assert vs > ms / n and vi > ms / s  # no component clipped at 0 here, so the identity below holds
    # float64 sums of ~100 terms of size < 1 in another order: agree to ~1e-14
    assert math.isclose(noise.se**2, vs / s + vi / n - ms / (s * n), rel_tol=1e-10)
    assert math.isclose(noise.var_residual, ms, rel_tol=1e-10)
    assert math.isclose(noise.seed_sd, math.sqrt(vs), rel_tol=1e-10)
    assert math.isclose(noise.example_sd, math.sqrt(vi), rel_tol=1e-10)
    assert math.isclose(noise.mde, detect_factor(s) * noise.se, rel_tol=1e-12)
    assert noise.mde_for(s, n) == pytest.approx(noise.mde, rel=1e-10)


def test_a_pilots_components_estimate_the_true_noise():
    rng = np.random.default_rng(1)
    truth = (0.03**2, 0.25**2, 0.2**2)
    found = np.array(
        [
            (n.var_seed, n.var_example, n.var_residual)
            for d in (_table(rng, 3, 100, 0.03, 0.25, 0.2) for _ in range(300))
            for n in [task_noise(d.tolist(), d.mean(1).tolist())]
        ]
    )
    # the mean of 300 pilots' estimates: unbiased up to the clipping at 0 (small here) and Monte Carlo error; the
    # seed part from 3 seeds is the noisiest (its estimate's sd is ~ its size), so 300 pilots leave ~6% of it
    np.testing.assert_allclose(found.mean(0), truth, rtol=0.2)


def _power(rng, seeds, examples, sds, effect, trials) -> float:
    resolved = 0
    for _ in range(trials):
        d = _table(rng, seeds, examples, *sds, effect=effect)
        resolved += task_noise(d.tolist(), d.mean(1).tolist()).resolved
    return resolved / trials


@pytest.mark.parametrize(
    ("sds", "seeds", "effect"),
    [((0.03, 0.2, 0.2), 5, 0.1), ((0.01, 0.3, 0.3), 3, 0.1)],
)
def test_the_planners_budget_resolves_the_effect_in_80_percent_of_simulated_comparisons(sds, seeds, effect):
    truth = Noise(seeds, 1, 0.0, 0.0, 0.0, sds[0] ** 2, sds[1] ** 2, sds[2] ** 2, 0.0, 0.0, False)
    examples = needed_examples(truth, seeds, effect)
    assert truth.mde_for(seeds, examples) <= effect < truth.mde_for(seeds, examples - 1)  # the fewest that do
    rng = np.random.default_rng(2)
    power = _power(rng, seeds, examples, sds, effect, trials=800)
    # 800 trials: Monte Carlo sd 0.014; the (t + t) formula approximates the noncentral t's power to a few points,
    # and t on S-1 dof is conservative when the examples' part of SE dominates (SE is then better known)
    assert 0.74 <= power <= 0.9, power
    assert _power(rng, seeds, examples // 4, sds, effect, trials=400) < 0.6  # a quarter of the budget: far less


def test_with_seed_noise_alone_the_mde_is_the_t_tests():
    rng = np.random.default_rng(3)
    seeds, sd = 5, 0.03
    effect = detect_factor(seeds) * sd / math.sqrt(seeds)
    power = _power(rng, seeds, 4, (sd, 0.0, 0.0), effect, trials=1500)
    assert abs(power - 0.8) < 0.05, power  # Monte Carlo sd 0.010, plus the (t + t) approximation's ~0.01


def test_the_planner_says_never_where_the_seeds_alone_exceed_the_effect():
    noise = Noise(3, 100, 0.0, 0.0, 0.0, 0.05**2, 0.1, 0.1, 0.0, 0.0, False)
    rows = {row["seeds"]: row["examples"] for row in plan(noise, 0.05)}
    # MDE's seed part (t + t) * 0.05 / sqrt(S) exceeds 0.05 up to S = 10 ((2.262 + 0.883) / sqrt 10 = 0.99 < 1 only
    # from there: still > 1 with the examples' part at any finite N until the seed part leaves room)
    assert rows[2] is None and rows[5] is None and rows[15] is not None


def _results(method: str, correct: dict[str, list[int]]) -> dict:
    tasks = {t: {"n": len(v), "acc_ll": sum(v) / len(v), "loss": None} for t, v in correct.items()}
    average = {"acc_ll": sum(t["acc_ll"] for t in tasks.values()) / len(tasks), "loss": None}
    return {
        "method": method,
        "tasks": tasks,
        "average": average,
        "examples": {t: {"acc_ll": v} for t, v in correct.items()},
    }


def test_compare_reports_each_differences_noise_and_rlora_plan_turns_it_into_a_budget(tmp_path, capsys):
    rng = np.random.default_rng(4)
    seeds, tasks = [0, 1, 2], ["boolq", "piqa"]
    runs = {
        m: {s: _results(m, {t: rng.integers(0, 2, 40).tolist() for t in tasks}) for s in seeds}
        for m in ("hydralora", "rlora")
    }
    summary = summarize(runs, ["hydralora", "rlora"], seeds)
    noise = summary["metrics"]["acc_ll"]["differences"]["rlora"]["noise"]
    for task in tasks:
        d = np.array(
            [
                np.subtract(
                    runs["rlora"][s]["examples"][task]["acc_ll"], runs["hydralora"][s]["examples"][task]["acc_ll"]
                )
                for s in seeds
            ]
        )
        vs, vi, ms = _mean_squares(d)
        expected_se = math.sqrt(max(0, vs - ms / 40) / 3 + max(0, vi - ms / 3) / 40 + ms / 120)
        assert math.isclose(noise["tasks"][task]["se"], expected_se, rel_tol=1e-10)
    text = comparison_markdown(summary)
    table = text[text.index("| task | rlora − hydralora |") :].split("\n\n")[0]
    assert table.count("resolved; MDE ") == 3  # every verdict with its detectable difference
    mde = noise["average"]["mde"]
    assert "| rlora | **average** | 3 | 40 |" in text and f"MDE {100 * mde:.1f} |" in text

    (tmp_path / "comparison.json").write_text(json.dumps(summary))
    assert main(["plan", str(tmp_path), "--effect", "0.9"]) == 0
    out = capsys.readouterr().out
    average = Noise(**noise["average"])
    row = next(line for line in out.splitlines() if line.startswith("| **average** |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    expected = [needed_examples(average, s, 0.009) for s in (2, 3, 4, 5, 6, 8, 10, 15, 20)]
    assert cells[2:] == [str(n) if n else "never" for n in expected]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--effect", "-1"], "--effect: expected a finite number > 0, got -1.0"),
        (["--effect", "1", "--metric", "loss"], "--metric loss: .* has no paired differences of it; it has: acc_ll"),
    ],
)
def test_plan_refuses_bad_input_in_one_line(tmp_path, capsys, args, message):
    import re

    summary = {"seeds": [0, 1], "metrics": {"acc_ll": {"differences": {"b": {}}, "difference_to": "a"}}}
    (tmp_path / "comparison.json").write_text(json.dumps(summary))
    assert main(["plan", str(tmp_path), *args]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_plan_of_a_folder_without_a_comparison_is_one_line(tmp_path, capsys):
    assert main(["plan", str(tmp_path), "--effect", "1"]) == 2
    assert "comparison.json: not a readable comparison" in capsys.readouterr().err


def test_methods_that_agree_on_every_seed_and_example_leave_the_noise_not_estimable(tmp_path, capsys):
    same = {"boolq": [1, 0, 1, 1], "piqa": [0, 0, 1, 0]}
    runs = {m: {s: _results(m, same) for s in (0, 1)} for m in ("hydralora", "rlora")}
    summary = summarize(runs, ["hydralora", "rlora"], [0, 1])
    noise = summary["metrics"]["acc_ll"]["differences"]["rlora"]["noise"]
    assert noise["average"]["mde"] is None and not noise["average"]["resolved"]
    text = comparison_markdown(summary)
    assert (
        "| boolq | 0.0 ± 0.0 (not resolved; no paired difference on any seed or example: MDE not estimable) |" in text
    )
    (tmp_path / "comparison.json").write_text(json.dumps(summary))
    assert main(["plan", str(tmp_path), "--effect", "1"]) == 0
    assert "| **average** | not estimable | – |" in capsys.readouterr().out


def test_the_loss_without_per_example_outcomes_is_planned_in_seeds_only(tmp_path, capsys):
    losses = {"hydralora": [2.0, 2.1, 2.05], "rlora": [1.9, 2.05, 1.98]}
    runs = {m: {} for m in losses}
    for m, values in losses.items():
        for s, v in enumerate(values):
            run = _results(m, {"boolq": [1, 0], "piqa": [0, 1]})
            run["tasks"]["boolq"]["loss"] = run["tasks"]["piqa"]["loss"] = run["average"]["loss"] = v
            runs[m][s] = run
    summary = summarize(runs, ["hydralora", "rlora"], [0, 1, 2])
    noise = Noise(**summary["metrics"]["loss"]["differences"]["rlora"]["noise"]["average"])
    assert noise.example_sd is None and noise.var_example == noise.var_residual == 0
    (tmp_path / "comparison.json").write_text(json.dumps(summary))
    assert main(["plan", str(tmp_path), "--effect", "0.05", "--metric", "loss"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| **average** |"))
    cells = [c.strip() for c in row.strip("|").split("|")][2:]
    expected = ["any" if needed_examples(noise, s, 0.05) else "never" for s in (2, 3, 4, 5, 6, 8, 10, 15, 20)]
    assert cells == expected and "never" in cells and "any" in cells  # some seed counts do not suffice, some do


@pytest.mark.parametrize(
    ("seeds", "why"),
    [([0], "under 2 seeds"), ([0, 1, 2], "this comparison.json predates the noise record; rerun the same")],
)
def test_a_difference_without_a_noise_record_says_why(tmp_path, capsys, seeds, why):
    """A comparison of one seed has no noise; one written before `rlora compare` recorded it (the older records in
    docs/results) is told how to add it."""
    summary = {"seeds": seeds, "metrics": {"acc_ll": {"differences": {"rlora": {"tasks": {}}}, "difference_to": "h"}}}
    (tmp_path / "comparison.json").write_text(json.dumps(summary))
    assert main(["plan", str(tmp_path), "--effect", "1"]) == 0
    assert f"rlora − h: no noise measured ({why}" in capsys.readouterr().out
