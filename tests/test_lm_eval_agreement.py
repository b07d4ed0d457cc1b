"""Cross-check of cloze ("RC") multiple-choice scoring against lm-eval-harness 0.4.13, per example.

Cloze scoring: for a context and choices c_i, score_i = sum of log p(token) over the tokens of " " + c_i
given the context; "acc" picks argmax score_i, "acc_norm" picks argmax score_i / len(c_i) (characters, as
lm-eval). The docs are 12 examples each of the built-in ARC-Easy and PIQA validation sets (the shortest of
the first 100), in rlora's own cloze rendering ("Question: {question}\\nAnswer:", "Goal: {goal}\\nAnswer:").

Three scorers, kept as separate functions so another can be added side by side:
  * `lm_eval_choices` (tests/_lm_eval.py): lm-eval's HFLM (`--model hf`, float32, CPU, batch 8), read back
    from its logged samples;
  * `naive_choice_logliks` (here): one unpadded forward pass per choice, float64 log-softmax of the float32
    logits, summed over the continuation tokens; tokenised as rlora's scorer does (prompt with
    add_special_tokens=True, " " + choice without special tokens);
  * rlora's own RC scorer (`rlora.evaluate.predict` / `evaluate_examples`, what `rlora eval` runs).

Runs in ~70 s on 2 busy cores (both lm-eval runs are subprocesses; see tests/_lm_eval.py for what lm-eval
does about BOS and the context/continuation token split).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _lm_eval import lm_eval_choices

import rlora
from rlora.data import Example, load_task, render_pairs
from rlora.evaluate import evaluate_examples, predict
from rlora.models import resolve_model

pytestmark = pytest.mark.slow

N_PER_TASK = 12
# Tolerance on a choice's summed log-likelihood, in nats. The scorers run the same float32 weights on the
# same token ids, but lm-eval runs right-padded batches of up to 8 sequences through a float32 log-softmax
# and the naive scorer one unpadded sequence through a float64 one, so the rounding differs: the float32
# log-softmax over the 49,152-token vocabulary alone moves a 2-token score by ~1.4e-5, and the batched
# matmuls add as much per token. Measured max difference: 1.0e-4 on these docs, 4.9e-4 on the first 12
# of each set (PIQA choices of up to 60 tokens). 2e-3 leaves 4x room over the latter and is still far below
# what a scoring bug causes (a token lost or added at the context/choice boundary, or a BOS: 0.1-10 nats)
# and below the smallest gap between the two best choices in these docs (0.066 nats summed, 0.0015 per
# character), so the same-argmax checks never hinge on rounding.
LL_TOL = 2e-3


def cloze_examples(task: str, n: int, pool: int = 100) -> list[Example]:
    """The n shortest of the first `pool` examples of a built-in task, in order, in rlora's cloze rendering.

    The shortest, to keep the test fast on 2 CPU cores (it runs the model on every choice twice).
    """
    examples = [dataclasses.replace(e, format="rc") for e in load_task(task)[:pool]]
    size = {e.uid: sum(len(c) + len(a) for c, a in render_pairs(e)) for e in examples}
    shortest = {e.uid for e in sorted(examples, key=lambda e: size[e.uid])[:n]}
    return [e for e in examples if e.uid in shortest]


def as_doc(example: Example) -> dict:
    """{"context", "choices", "gold"}: the lm-eval doc of an example whose choices share one context."""
    pairs = render_pairs(example)
    (context,) = {c for c, _ in pairs}
    return {"context": context, "choices": [a for _, a in pairs], "gold": example.gold}


def rlora_style_tokens(tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), each encoded on its own, as rlora's RC scorer does."""
    context_ids = tokenizer(context, add_special_tokens=True).input_ids
    return context_ids, tokenizer(" " + choice, add_special_tokens=False).input_ids


def lm_eval_style_tokens(tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's HFLM splits them: encode the whole text, take the tail."""
    continuation = " " + choice
    spaces = len(context) - len(context.rstrip())  # trailing context spaces move into the continuation
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context)
    return context_ids, tokenizer.encode(context + continuation)[len(context_ids) :]


@torch.no_grad()
def naive_choice_logliks(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Summed log-likelihood of each choice after the context: one forward pass per choice, no padding."""
    scores = []
    for choice in choices:
        context_ids, continuation_ids = rlora_style_tokens(tokenizer, context, choice)
        ids = torch.tensor([context_ids + continuation_ids])
        # Position t predicts token t+1: the continuation is predicted by the last len(continuation) + 1 positions
        # but the very last one. (logits_to_keep only skips the vocabulary projection of the context positions.)
        logits = model(input_ids=ids, logits_to_keep=len(continuation_ids) + 1).logits[0, :-1].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        scores.append(logprobs.gather(1, torch.tensor(continuation_ids)[:, None]).sum().item())
    return scores


def chosen(lls: list[float], choices: list[str]) -> tuple[int, int]:
    """(acc choice, acc_norm choice): argmax of the summed log-likelihood, and of it per character."""
    best = max(range(len(lls)), key=lambda i: lls[i])
    best_norm = max(range(len(lls)), key=lambda i: lls[i] / len(choices[i]))
    return best, best_norm


def assert_scores_agree(docs: list[dict], reference: list[list[float]], other: list[list[float]], what: str) -> None:
    """Every choice's log-likelihood within LL_TOL, and the same acc and acc_norm choice, for every doc."""
    for i, (doc, ref, got) in enumerate(zip(docs, reference, other, strict=True)):
        where = f"{what}, doc {i} ({doc['context'][:60]!r})"
        assert got == pytest.approx(ref, abs=LL_TOL), where
        assert chosen(got, doc["choices"]) == chosen(ref, doc["choices"]), where


def max_abs_difference(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On 2 cores shared with other work, 2 OpenMP threads made each small forward pass 5-10x slower than 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(model_cache_dir) -> str:
    return resolve_model("smollm2-135m", cache_dir=model_cache_dir)


@pytest.fixture(scope="module")
def model_and_tokenizer(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return cloze_examples("arc_easy", N_PER_TASK) + cloze_examples("piqa", N_PER_TASK)


@pytest.fixture(scope="module")
def docs(examples) -> list[dict]:
    return [as_doc(e) for e in examples]


@pytest.fixture(scope="module")
def lm_eval_base(model_dir, docs, tmp_path_factory) -> list[dict]:
    return lm_eval_choices(model_dir, docs, tmp_path_factory.mktemp("lm_eval_base"))


def test_rlora_and_lm_eval_split_context_and_choice_into_the_same_tokens(model_and_tokenizer, docs):
    _, tokenizer = model_and_tokenizer
    assert tokenizer.encode("Question:") == tokenizer("Question:", add_special_tokens=False).input_ids  # no BOS
    for doc in docs:
        for choice in doc["choices"]:
            rlora_split = rlora_style_tokens(tokenizer, doc["context"], choice)
            assert lm_eval_style_tokens(tokenizer, doc["context"], choice) == rlora_split, (doc["context"], choice)


def test_lm_eval_agrees_with_naive_scoring_per_example(model_and_tokenizer, docs, lm_eval_base):
    model, tokenizer = model_and_tokenizer
    lm_eval = lm_eval_base
    naive = [naive_choice_logliks(model, tokenizer, d["context"], d["choices"]) for d in docs]

    assert_scores_agree(docs, [r["lls"] for r in lm_eval], naive, "naive vs lm-eval")
    for doc, result in zip(docs, lm_eval, strict=True):  # lm-eval's own metrics are these choices
        choices = chosen(result["lls"], doc["choices"])
        assert (result["acc"], result["acc_norm"]) == tuple(float(choice == doc["gold"]) for choice in choices)
    assert any(r["pred"] != r["pred_norm"] for r in lm_eval)  # the docs tell acc_norm from acc
    print(f"max |naive - lm-eval| = {max_abs_difference(naive, [r['lls'] for r in lm_eval]):.2e} nats")


def test_rlora_eval_makes_lm_evals_choice_on_every_example(model_and_tokenizer, examples, docs, lm_eval_base):
    """rlora's RC scorer (batched, padded, as `rlora eval` runs it) against lm-eval-harness: the same
    log-likelihoods within LL_TOL, the same acc and acc_norm choice per example, the same accuracies."""
    model, tokenizer = model_and_tokenizer
    predictions = predict(model, tokenizer, examples, generate=False, batch_size=8, max_length=384)
    assert_scores_agree(docs, [r["lls"] for r in lm_eval_base], [p.scores for p in predictions], "rlora vs lm-eval")
    result = evaluate_examples(model, tokenizer, examples, generate=False, batch_size=8, max_length=384)
    assert result.acc_ll == pytest.approx(sum(r["acc"] for r in lm_eval_base) / len(docs), abs=1e-12)
    assert result.acc_norm == pytest.approx(sum(r["acc_norm"] for r in lm_eval_base) / len(docs), abs=1e-12)
    print(f"rlora acc {result.acc_ll:.3f} acc_norm {result.acc_norm:.3f} on {len(docs)} docs, same as lm-eval")


def test_lm_eval_scores_an_rlora_adapter_as_the_model_it_was_saved_from(
    model_dir, model_and_tokenizer, examples, docs, tmp_path
):
    """lm-eval's `peft=ADAPTER_DIR` loads an rlora adapter (rlora imported first) and scores the adapted model."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base_model, tokenizer = model_and_tokenizer
    examples = examples[:4] + examples[N_PER_TASK : N_PER_TASK + 2]
    docs = docs[:4] + docs[N_PER_TASK : N_PER_TASK + 2]
    torch.manual_seed(0)  # the adapter's random init
    adapted = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        rlora.RLoraConfig(target_modules=["gate_proj", "up_proj", "down_proj"]),
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the heads off their initial values, which the frozen offset cancels exactly
        for name, param in adapted.named_parameters():
            if "rlora_B" in name:
                param.add_(torch.randn(param.shape, generator=generator) * param.std())
    adapted.eval()
    adapted.save_pretrained(tmp_path / "adapter")

    lm_eval = lm_eval_choices(model_dir, docs, tmp_path, adapter_dir=tmp_path / "adapter")
    naive = [naive_choice_logliks(adapted, tokenizer, d["context"], d["choices"]) for d in docs]
    base = [naive_choice_logliks(base_model, tokenizer, d["context"], d["choices"]) for d in docs]

    assert max_abs_difference(naive, base) > 100 * LL_TOL  # the adapter changes the scores
    assert_scores_agree(docs, [r["lls"] for r in lm_eval], naive, "adapter: naive vs lm-eval")
    rlora_scores = [p.scores for p in predict(adapted, tokenizer, examples, generate=False, batch_size=8)]
    assert_scores_agree(docs, [r["lls"] for r in lm_eval], rlora_scores, "adapter: rlora vs lm-eval")
    print(f"adapter: max |naive - lm-eval| = {max_abs_difference(naive, [r['lls'] for r in lm_eval]):.2e} nats, "
          f"max |adapted - base| = {max_abs_difference(naive, base):.2f} nats")  # fmt: skip
