"""Per-task evaluation on the held-out split.

Multiple-choice tasks, in either formulation (see `data/example.py`):
- `acc_ll`: the choice whose continuation (RC: the choice's text; MC: its label) has the highest summed
  log-probability after its context, through exactly the encoding used in training, end-of-answer token
  excluded (lm-eval-harness's and OLMES's `acc`);
- `acc_norm` (RC only): the same with each sum divided by the number of characters of the choice's
  continuation, as lm-eval-harness and OLMES normalise (`acc_norm`);
- `acc_gen` (MC and free-form, when generating): exact match of the greedy generation's first line with the
  gold label or answer, ignoring spaces, case and trailing punctuation.
Every task, whatever its format:
- `loss`: the held-out loss, the mean token cross-entropy (nats) over the tokens that training puts a loss on
  (labels != IGNORE_INDEX: the gold choice's or the answer's continuation and its end token; every assistant
  turn of a conversation), each example encoded exactly as in training (`data.encode_example`); token-weighted
  within the task (summed NLL / trained tokens), as the Trainer's eval loss;
- `ppl`: the perplexity, exp(`loss`).
Accuracies are fractions, higher is better; `loss` and `ppl` are lower-is-better (`LOWER_IS_BETTER`).
The average is the unweighted mean over tasks of each metric that every averaged task has, except `ppl`:
the average's `ppl` is exp(average `loss`), the perplexity of the mean loss, not the mean of the perplexities.

Scoring is pure: examples and a model in, scores out; nothing here loads a model or writes a file (`run.py` and
`commands/eval.py` do, and `reports.py` renders the tables). When an MC example's labels are single tokens after one
shared prompt (the usual "A"/"B"/..., "yes"/"no"), all its choices come from one pass over the prompt; every other
continuation is scored in right-padded batches. The output head runs only at the positions scored (`output_head`):
no batch x sequence x vocabulary tensor is made.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .data import IGNORE_INDEX, Example, Spans, encode_example, example_spans, pad_ids, render_pairs
from .errors import ConfigError
from .metrics import METRICS
from .output_head import forward_hidden, positions_logprobs


@dataclasses.dataclass
class TaskResult:
    n: int
    format: str  # rc | mc | free | mixed
    acc_ll: float | None  # None for free-form tasks
    acc_norm: float | None  # None unless every example is RC
    acc_gen: float | None  # None when generation was skipped (or every example is RC)
    loss: float | None  # held-out loss, nats per trained token; None without trained tokens
    ppl: float | None  # exp(loss), inf if that overflows


def normalize_answer(text: str) -> str:
    first_line = text.strip().split("\n", 1)[0]
    return first_line.strip().rstrip(string.punctuation + " ").casefold()


@dataclasses.dataclass
class Prediction:
    scores: list[float] | None  # summed log-likelihood of each choice's continuation (multiple choice only)
    chars: list[int] | None  # characters of each choice's continuation (the acc_norm denominator)
    text: str | None  # the greedy generation (when generating)

    def choice(self, normalized: bool = False) -> int:
        values = [s / max(1, c) for s, c in zip(self.scores, self.chars, strict=True)] if normalized else self.scores
        return max(range(len(values)), key=values.__getitem__)  # the first of equal maxima, as numpy's argmax


@torch.no_grad()
def score_continuations(model, spans: Sequence[Spans], pad_id: int, batch_size: int) -> list[float]:
    """Sum of log P(answer tokens | prompt) for each `Spans`, in right-padded batches (end tokens excluded), from the
    output head at the answers' positions only (`output_head`)."""
    device = next(model.parameters()).device
    scores = [0.0] * len(spans)
    order = sorted(range(len(spans)), key=lambda i: -len(spans[i].prompt) - len(spans[i].answer))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = pad_ids([spans[i].prompt + spans[i].answer for i in chunk], pad_id)
        rows, positions, targets = [], [], []  # the logits at position t score the answer token at t + 1
        for row, i in enumerate(chunk):
            n_prompt, answer = len(spans[i].prompt), spans[i].answer
            rows += [row] * len(answer)
            positions += range(n_prompt - 1, n_prompt - 1 + len(answer))
            targets += answer
        logprobs = positions_logprobs(
            model,
            {"input_ids": ids.to(device), "attention_mask": mask.to(device)},
            torch.tensor(rows, device=device),
            torch.tensor(positions, device=device),
            torch.tensor(targets, device=device),
        )
        for i, row_logprobs in zip(chunk, logprobs.split([len(spans[i].answer) for i in chunk]), strict=True):
            scores[i] = row_logprobs.sum().item()
    return scores


@torch.no_grad()
def token_nll(model, features: Sequence[dict], pad_id: int, batch_size: int) -> tuple[float, int]:
    """(summed negative log-likelihood, count) of the trained tokens (labels != IGNORE_INDEX) of training features
    (`input_ids`, `labels`), in right-padded batches: the logits at position t predict the label at t + 1. The output
    head runs at the trained positions only, normalised in float32 at least (`output_head`); the sum is accumulated
    in float64."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))  # less padding
    for start in range(0, len(order), batch_size):
        chunk = [features[i] for i in order[start : start + batch_size]]
        ids, mask = pad_ids([f["input_ids"] for f in chunk], pad_id)
        labels, _ = pad_ids([f["labels"] for f in chunk], IGNORE_INDEX)
        targets = labels[:, 1:]
        rows, positions = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
        if not len(rows):
            continue
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        logprobs = positions_logprobs(model, inputs, rows.to(device), positions.to(device), targets[rows, positions])
        total -= logprobs.to(torch.float64).sum().item()
        count += len(rows)
    return total, count


def perplexity(loss: float | None) -> float | None:
    """exp(loss); inf where that overflows a float (a loss above ~709 nats)."""
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@torch.no_grad()
def held_out_loss(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    chat_template: bool = False,
    max_length: int = 384,
    batch_size: int = 16,
) -> float | None:
    """The mean token cross-entropy (nats) of `examples` encoded as in training (`encode_example`), over their
    trained tokens, token-weighted (summed NLL / trained tokens); None when they have no trained token."""
    model.eval()
    pad_id = tokenizer.pad_token_id  # `models.load_tokenizer` gives every tokenizer one
    features = [encode_example(tokenizer, e, chat_template, max_length) for e in examples]
    total, count = token_nll(model, features, pad_id, batch_size)
    return total / count if count else None


def _one_pass(spans: list[Spans]) -> bool:
    """Every choice is one token after the same prompt: one forward pass over the prompt scores them all."""
    return all(len(s.answer) == 1 and s.prompt == spans[0].prompt for s in spans)


def _check_context(model, prompt_tokens: int, max_new_tokens: int) -> None:
    from .models import context_length

    context = context_length(model)
    if context is not None and prompt_tokens + max_new_tokens > context:
        raise ConfigError(
            f"eval: a prompt of {prompt_tokens} tokens and eval.max_new_tokens {max_new_tokens} exceed the model's "
            f"context of {context} tokens; lower eval.max_new_tokens or data.max_length"
        )


@torch.no_grad()
def predict(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    chat_template: bool = False,
    max_length: int = 384,
    batch_size: int = 16,
    generate: bool = True,
    max_new_tokens: int = 8,
    desc: str = "eval",
) -> list[Prediction]:
    """Choice scores (multiple choice) and greedy generations (MC and free-form, with `generate`) per example."""
    model.eval()
    pad_id = tokenizer.pad_token_id  # `models.load_tokenizer` gives every tokenizer one
    device = next(model.parameters()).device
    predictions = []
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False, unit="batch"):
        batch = examples[start : start + batch_size]
        pairs = [render_pairs(e) for e in batch]
        spans = [example_spans(tokenizer, e, chat_template, max_length) for e in batch]
        one_pass = [e.is_multiple_choice and _one_pass(s) for e, s in zip(batch, spans, strict=True)]
        to_generate = [generate and e.formulation != "rc" for e in batch]
        needs_prompt = [i for i in range(len(batch)) if to_generate[i] or one_pass[i]]
        first_logprobs, texts = {}, {}
        if needs_prompt:
            ids, mask = pad_ids([spans[i][0].prompt for i in needs_prompt], pad_id, left=True)
            ids, mask = ids.to(device), mask.to(device)
            if any(to_generate[i] for i in needs_prompt):
                _check_context(model, ids.shape[1], max_new_tokens)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
                logits = out.logits[0]
                decoded = tokenizer.batch_decode(out.sequences[:, ids.shape[1] :], skip_special_tokens=True)
                texts = {i: t for i, t in zip(needs_prompt, decoded, strict=True) if to_generate[i]}
            else:  # the head at the last position only (left padding: every prompt ends there)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                hidden, head = forward_hidden(model, input_ids=ids, attention_mask=mask, position_ids=positions)
                logits = head(hidden[:, -1])  # (prompts, V)
            first = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
            first_logprobs = {i: first[row] for row, i in enumerate(needs_prompt) if one_pass[i]}
        rest = [
            (i, j)
            for i, e in enumerate(batch)
            if e.is_multiple_choice and not one_pass[i]
            for j in range(len(spans[i]))
        ]
        scored = score_continuations(model, [spans[i][j] for i, j in rest], pad_id, batch_size)
        rest_scores = dict(zip(rest, scored, strict=True))
        for i, e in enumerate(batch):
            scores = chars = None
            if e.is_multiple_choice:
                if one_pass[i]:
                    scores = [first_logprobs[i][s.answer[0]].item() for s in spans[i]]
                else:
                    scores = [rest_scores[i, j] for j in range(len(spans[i]))]
                chars = [len(continuation) for _, continuation in pairs[i]]
            predictions.append(Prediction(scores, chars, texts.get(i)))
    return predictions


ENCODING = ("chat_template", "max_length", "batch_size")  # `predict`'s settings that `held_out_loss` takes too


def evaluate_examples(
    model, tokenizer, examples: Sequence[Example], *, accuracy: bool = True, **settings
) -> TaskResult:
    """The metrics of one task (see the module docstring); `settings` are `predict`'s keyword arguments (the
    encoding, the batch size, generation). Without `accuracy` only the held-out loss (and its perplexity), the
    accuracies None: what choosing settings on a validation split needs, at a fraction of the cost."""
    predictions = predict(model, tokenizer, examples, **settings) if accuracy else []
    encoding = {key: value for key, value in settings.items() if key in ENCODING}
    loss = held_out_loss(model, tokenizer, examples, **encoding)
    n = len(examples)
    formats = {e.formulation for e in examples}
    fmt = formats.pop() if len(formats) == 1 else "mixed"
    pairs = list(zip(predictions, examples, strict=True)) if accuracy else []
    is_mc = accuracy and n > 0 and all(e.is_multiple_choice for e in examples)
    generated = [normalize_answer(p.text) == normalize_answer(e.answer) for p, e in pairs if p.text is not None]
    return TaskResult(
        n=n,
        format=fmt,
        acc_ll=sum(p.choice() == e.gold for p, e in pairs) / n if is_mc else None,
        acc_norm=sum(p.choice(normalized=True) == e.gold for p, e in pairs) / n if is_mc and fmt == "rc" else None,
        acc_gen=sum(generated) / n if generated and len(generated) == n else None,
        loss=loss,
        ppl=perplexity(loss),
    )


def evaluate_tasks(model, tokenizer, tasks: dict[str, Sequence[Example]], **kwargs) -> dict:
    """Evaluates every task; returns {"tasks": {name: TaskResult as dict}, "average": {...}}."""
    results = {}
    for name, examples in tqdm(list(tasks.items()), desc="tasks", unit="task"):
        results[name] = evaluate_examples(model, tokenizer, list(examples), desc=name, **kwargs)
    return {"tasks": {k: dataclasses.asdict(v) for k, v in results.items()}, "average": _average(results.values())}


def _average(results: Iterable[TaskResult]) -> dict[str, float | None]:
    """The unweighted mean over tasks of each metric every task has; `ppl` is exp(mean `loss`)."""
    results = list(results)
    out: dict[str, float | None] = {}
    for key in METRICS:
        if key == "ppl":
            out[key] = perplexity(out["loss"])
            continue
        values = [getattr(r, key) for r in results]
        out[key] = sum(values) / len(values) if values and None not in values else None
    return out


def evaluate_plan(model, tokenizer, cfg, plan, accuracy: bool = True) -> dict:
    """`evaluate_tasks` on a run's held-out sets (`plan.test`) with the run's encoding and evaluation settings."""
    e, d = cfg.eval, cfg.data
    return evaluate_tasks(
        model,
        tokenizer,
        plan.test,
        chat_template=d.chat_template,
        max_length=d.max_length,
        batch_size=e.batch_size,
        generate=e.generate,
        max_new_tokens=e.max_new_tokens,
        accuracy=accuracy,
    )
