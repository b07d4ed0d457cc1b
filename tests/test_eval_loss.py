"""Held-out loss and perplexity per task: the batched computation against a naive one, the average, the tables."""

import math

import pytest
import torch
from _tiny import F64, tiny_llama

import rlora.output_head
from rlora.commands.compare import summarize
from rlora.data import IGNORE_INDEX, Example, encode_example
from rlora.evaluate import evaluate_examples, evaluate_tasks, held_out_loss, perplexity, predict
from rlora.reports import comparison_markdown, format_metric, gain_line, results_table

pytestmark = pytest.mark.numerics  # run again on other CPU kernel paths by scripts/test.sh


def examples() -> list[Example]:
    """Free-form, RC, MC and a conversation, of different lengths (so a batch of them is padded)."""
    conversation = (("system", "user assistant"), ("user", "What is red ?"), ("assistant", "no"), ("user", "blue ?"))
    return [
        Example("t", "What is two plus four ?", "four", uid="free-1"),
        Example("t", "the sky is blue ?", "yes the sky is blue .", uid="free-2"),
        Example.multiple_choice("t", "the sky is", ["red", "blue"], 1, "rc-1", format="rc"),
        Example.multiple_choice("t", "What is two plus two ?", ["two", "four", "D"], 1, "mc-1", format="mc"),
        Example("t", "blue ?", "the sky", uid="chat-1", turns=conversation),
    ]


def naive_loss(model, tokenizer, examples, chat_template: bool, max_length: int) -> tuple[float, int]:
    """(mean NLL, count) over the trained tokens: one unpadded example at a time, a loop over positions."""
    total, count = 0.0, 0
    for example in examples:
        feature = encode_example(tokenizer, example, chat_template, max_length)
        ids, labels = feature["input_ids"], feature["labels"]
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        for t in range(1, len(ids)):
            if labels[t] != IGNORE_INDEX:
                assert labels[t] == ids[t]
                total -= torch.log_softmax(logits[t - 1], dim=-1)[labels[t]].item()
                count += 1
    return total / count, count


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3, dtype=torch.float64)


@pytest.mark.parametrize("chat_template", [False, True])
@torch.no_grad()
def test_batched_loss_equals_a_naive_sum_over_positions_whatever_the_batch(
    model, tiny_tokenizer, chat_template, monkeypatch
):
    data = examples()
    lengths = {len(encode_example(tiny_tokenizer, e, chat_template, 64)["input_ids"]) for e in data}
    assert len(lengths) > 2  # batches of 3 are padded
    expected, count = naive_loss(model, tiny_tokenizer, data, chat_template, 64)
    assert count > len(data)  # answers of several tokens, the conversation's two assistant turns, EOS
    losses = {}
    for batch_size, rows in ((1, 1024), (3, 1024), (8, 1024), (3, 2)):  # rows: positions the head takes at once
        monkeypatch.setattr(rlora.output_head, "CHUNK_ELEMENTS", rows * model.config.vocab_size)
        losses[batch_size, rows] = held_out_loss(
            model, tiny_tokenizer, data, chat_template=chat_template, max_length=64, batch_size=batch_size
        )
        assert losses[batch_size, rows] == pytest.approx(expected, abs=F64["atol"], rel=F64["rtol"])
    assert losses[1, 1024] == pytest.approx(losses[3, 1024], abs=F64["atol"], rel=F64["rtol"])  # padding: no change


@torch.no_grad()
def test_bfloat16_logits_are_normalised_in_float32(tiny_tokenizer):
    model = tiny_llama(seed=3, dtype=torch.bfloat16)
    data = examples()
    total, count = 0.0, 0
    for example in data:  # the same bf16 logits (one unpadded example a pass, as batch_size=1), then float64
        feature = encode_example(tiny_tokenizer, example, False, 64)
        logprobs = model(input_ids=torch.tensor([feature["input_ids"]])).logits[0].double().log_softmax(-1)
        labels = torch.tensor(feature["labels"][1:])
        trained = labels != IGNORE_INDEX
        total -= logprobs[:-1][trained].gather(-1, labels[trained].unsqueeze(-1)).sum().item()
        count += int(trained.sum())
    loss = held_out_loss(model, tiny_tokenizer, data, max_length=64, batch_size=1)
    # float32's rounding (eps 1.2e-7) of a log-softmax over ~100 logits of magnitude ~1 stays below 1e-5; in bf16
    # (eps 7.8e-3) the loss of ~4.6 nats would be off by ~1e-2
    assert loss == pytest.approx(total / count, abs=1e-5, rel=0)


@torch.no_grad()
def test_each_task_has_loss_and_ppl_and_the_average_is_exp_of_the_mean_loss(model, tiny_tokenizer):
    data = examples()
    tasks = {"short": data[:2], "long": data[2:]}
    results = evaluate_tasks(model, tiny_tokenizer, tasks, max_length=64, batch_size=2, generate=False)
    losses = []
    for name, task in results["tasks"].items():
        expected, _ = naive_loss(model, tiny_tokenizer, tasks[name], False, 64)
        assert task["loss"] == pytest.approx(expected, abs=F64["atol"], rel=F64["rtol"])
        assert task["ppl"] == math.exp(task["loss"])
        losses.append(task["loss"])
    average = results["average"]
    assert average["loss"] == sum(losses) / 2  # unweighted over tasks (the tasks' token counts differ)
    assert average["ppl"] == math.exp(average["loss"])
    assert average["ppl"] < sum(math.exp(v) for v in losses) / 2  # not the mean of the perplexities (convexity)
    assert held_out_loss(model, tiny_tokenizer, []) is None


@pytest.mark.parametrize("chat_template", [False, True])
@torch.no_grad()
def test_an_mc_examples_loss_comes_from_its_scoring_pass_and_equals_a_separate_pass(
    model, tiny_tokenizer, chat_template
):
    """`rlora eval` takes a multiple-choice example's held-out loss from the pass that scores its gold choice (the
    end tokens appended; attention is causal, so the choices' scores do not change): no second pass over it."""
    data = examples()  # free-form, RC, MC (one pass over the labels) and a conversation
    settings = {"chat_template": chat_template, "max_length": 64, "batch_size": 3, "generate": False}
    passes = []
    hook = model.register_forward_pre_hook(lambda *_: passes.append(1), with_kwargs=True)
    try:
        plain = predict(model, tiny_tokenizer, data, **settings)
        predict_passes = len(passes)
        fused = predict(model, tiny_tokenizer, data, gold_loss=True, **settings)
        passes.clear()
        result = evaluate_examples(model, tiny_tokenizer, data, **settings)
    finally:
        hook.remove()
    mc = [e.is_multiple_choice for e in data]
    assert [p.gold_nll is not None for p in fused] == mc == [False, False, True, True, False]
    for a, b in zip(plain, fused, strict=True):  # the same scores from sequences one to two tokens longer
        assert b.scores == (None if a.scores is None else pytest.approx(a.scores, abs=F64["atol"], rel=F64["rtol"]))
    for example, prediction in zip(data, fused, strict=True):
        if prediction.gold_nll is not None:
            expected, count = naive_loss(model, tiny_tokenizer, [example], chat_template, 64)
            assert prediction.gold_nll[1] == count
            assert prediction.gold_nll[0] / count == pytest.approx(expected, abs=F64["atol"], rel=F64["rtol"])
    expected, _ = naive_loss(model, tiny_tokenizer, data, chat_template, 64)
    assert result.loss == pytest.approx(expected, abs=F64["atol"], rel=F64["rtol"])
    # the scoring passes, plus one batch (of 3) for the two examples without choices: not one for all 5 examples
    assert len(passes) == predict_passes + 1


def test_perplexity_overflows_to_infinity():
    assert perplexity(None) is None
    assert perplexity(800.0) == math.inf and format_metric("ppl", math.inf) == "inf"
    assert format_metric("ppl", 123456.0) == "1.23e+05"


def results(method: str, loss: tuple[float, float] | None, acc: tuple[float, float] = (0.5, 0.25)) -> dict:
    """An eval.json's results; `loss=None`: written before the loss was measured (no loss, no ppl)."""
    tasks = {
        "colors": {"n": 4, "format": "rc", "acc_ll": acc[0], "acc_norm": 0.75, "acc_gen": None},
        "free": {"n": 2, "format": "free", "acc_ll": None, "acc_norm": None, "acc_gen": acc[1]},
    }
    average = {"acc_ll": None, "acc_norm": None, "acc_gen": None}
    if loss is not None:
        for task, value in zip(tasks.values(), loss, strict=True):
            task |= {"loss": value, "ppl": math.exp(value)}
        average |= {"loss": sum(loss) / 2, "ppl": math.exp(sum(loss) / 2)}
    return {"method": method, "tasks": tasks, "average": average}


def test_results_table_shows_loss_and_ppl_lower_is_better_and_a_dash_for_old_results():
    table = results_table({"base": results("rlora", None), "rlora": results("rlora", (1.0, 3.0))})
    assert table.splitlines() == [
        "| task | n | base acc | base acc_norm | base acc generated | base loss ↓ | base ppl ↓ "
        "| rlora acc | rlora acc_norm | rlora acc generated | rlora loss ↓ | rlora ppl ↓ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| colors | 4 | 50.0 | 75.0 | – | – | – | 50.0 | 75.0 | – | 1.000 | 2.72 |",
        "| free | 2 | – | – | 25.0 | – | – | – | – | 25.0 | 3.000 | 20.09 |",
        "| **average** |  | – | – | – | – | – | – | – | – | 2.000 | 7.39 |",
    ]


def test_gain_line_gives_the_loss_difference_in_nats_and_skips_what_the_base_lacks():
    base, tuned = results("rlora", (2.0, 2.0)), results("rlora", (1.0, 1.5))
    base["average"]["acc_ll"], tuned["average"]["acc_ll"] = 0.5, 0.625
    assert gain_line(base, tuned, "rlora") == (
        "Average over the tasks, base -> rlora: acc 50.0 -> 62.5 (+12.5 points); "
        "loss ↓ 2.000 -> 1.250 (-0.750 nats per token); ppl ↓ 7.39 -> 3.49."
    )
    old = results("rlora", None)
    old["average"]["acc_ll"] = 0.5
    assert gain_line(old, tuned, "rlora") == "Average over the tasks, base -> rlora: acc 50.0 -> 62.5 (+12.5 points)."


def test_comparison_table_of_the_loss_states_its_direction_and_old_runs_leave_it_out():
    runs = {
        "hydralora": {0: results("hydralora", (2.0, 3.0)), 1: results("hydralora", (2.5, 3.0))},
        "rlora": {0: results("rlora", (1.5, 3.0)), 1: results("rlora", (2.5, 2.0))},
    }
    summary = summarize(runs, ["hydralora", "rlora"], [0, 1])
    # no accuracy here is measured on both tasks (so none has an average); ppl is exp(loss): not compared
    assert list(summary["metrics"]) == ["loss"]
    loss = summary["metrics"]["loss"]
    assert loss["per_method"]["rlora"]["average"]["values"] == [2.25, 2.25]
    assert loss["differences"]["rlora"]["tasks"]["colors"]["mean"] == -0.25  # rlora's loss is lower: better
    text = comparison_markdown(summary)
    section = text[text.index("### held-out loss") :].splitlines()
    # half-widths: t_{0.975, 1} = 12.7062 times |a - b| / 2 (the sd of two values over sqrt 2)
    assert section == [
        "### held-out loss, nats per token (lower is better): mean ± 95% CI over 2 seeds (0, 1)",
        "",
        "| task | hydralora | rlora |",
        "|---|---|---|",
        "| colors | 2.250 ± 3.177 | 2.000 ± 6.353 |",
        "| free | 3.000 ± 0.000 | 2.500 ± 6.353 |",
        "| **average** | 2.625 ± 1.588 | 2.250 ± 0.000 |",
        "",
        "Paired difference to hydralora (same seed), nats per token; negative: lower than hydralora, better, "
        "mean ± 95% CI over seeds on this test set; resolved or not, counting the seeds and the test examples as "
        "samples, with the minimum detectable difference (MDE: 95%, power 80%; `rlora plan` for the budget a given "
        "effect needs):",
        "",
        "| task | rlora − hydralora |",
        "|---|---|",
        # no per-example loss: MDE = (t_{0.975,1} + t_{0.8,1}) * sd / sqrt 2 = (12.7062 + 1.3764) * sd / sqrt 2,
        # sd of the per-seed differences: colors (-0.5, 0) 0.354, free (0, -1) 0.707, average (-0.25, -0.5) 0.177
        "| colors | -0.250 ± 3.177 (not resolved; MDE 3.521) |",
        "| free | -0.500 ± 6.353 (not resolved; MDE 7.041) |",
        "| **average** | -0.375 ± 1.588 (not resolved; MDE 1.760) |",
        "",
        "What the paired differences to hydralora can resolve, nats per token: the standard deviation over seeds of "
        "the paired difference, over test examples of the per-example difference (– : no per-example outcomes, the "
        "MDE then holds this test set fixed), and the minimum detectable difference MDE = (t_0.975 + t_0.80, S-1 "
        "dof) x SE, SE^2 = var_seed/S + var_example/N + var_residual/(S N) (docs/planning.md):",
        "",
        "| method | task | seeds | examples | seed sd | example sd | verdict (MDE) |",
        "|---|---|---|---|---|---|---|",
        "| rlora | colors | 2 | – | 0.354 | – | not resolved; MDE 3.521 |",
        "| rlora | free | 2 | – | 0.707 | – | not resolved; MDE 7.041 |",
        "| rlora | **average** | 2 | – | 0.177 | – | not resolved; MDE 1.760 |",
    ]

    runs["hydralora"][1] = results("hydralora", None)  # an older run, without the loss
    old = summarize(runs, ["hydralora", "rlora"], [0, 1])
    assert list(old["metrics"]["loss"]["per_method"]) == ["rlora"] and old["metrics"]["loss"]["differences"] == {}
    assert "| **average** | 2.250 ± 0.000 |" in comparison_markdown(old)
