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
no batch x sequence x vocabulary tensor is made. A multiple-choice example's held-out loss comes from the pass that
scores its choices (`predict(gold_loss=True)`: the gold choice's sequence with its end tokens appended, which is its
training feature); only examples without choices (free-form, conversations) and generated ones take a second pass.
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
    # (summed NLL, tokens) of the gold choice's answer and end tokens, taken from the scoring pass: the example's
    # share of the held-out loss (`predict(gold_loss=True)`, MC examples that are not generated); else None
    gold_nll: tuple[float, int] | None = None

    def choice(self, normalized: bool = False) -> int:
        values = [s / max(1, c) for s, c in zip(self.scores, self.chars, strict=True)] if normalized else self.scores
        return max(range(len(values)), key=values.__getitem__)  # the first of equal maxima, as numpy's argmax


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
    """One sequence and the (position, target) pairs to score in it: log p(targets[k] | ids[: positions[k] + 1])."""

    ids: list[int]
    positions: list[int]
    targets: list[int]

    @classmethod
    def continuation(cls, spans: Spans, with_end: bool = False) -> ScoreRequest:
        """The answer's tokens after the prompt (and the end tokens, `with_end`): the logits at position t score
        the token at t + 1."""
        tokens = spans.answer + (spans.end if with_end else [])
        start = len(spans.prompt) - 1
        return cls(spans.prompt + tokens, list(range(start, start + len(tokens))), tokens)

    @classmethod
    def labels_and_gold(cls, gold: Spans, labels: list[int]) -> ScoreRequest:
        """One pass over the gold choice's whole sequence for an example whose choices are single tokens after one
        prompt: every label at the prompt's last position (attention is causal: the tokens after it do not change
        it), then the gold answer's and end tokens."""
        tokens = gold.answer + gold.end
        start = len(gold.prompt) - 1
        return cls(gold.input_ids, [start] * len(labels) + list(range(start, start + len(tokens))), labels + tokens)


@torch.no_grad()
def score_requests(model, requests: Sequence[ScoreRequest], pad_id: int, batch_size: int) -> list[torch.Tensor]:
    """The log-probabilities (float64, on the CPU) each `ScoreRequest` asks for, in right-padded batches, longest
    first, from the output head at the requested positions only (`output_head`)."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = [torch.empty(0, dtype=torch.float64)] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].ids))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = pad_ids([requests[i].ids for i in chunk], pad_id)
        rows = [row for row, i in enumerate(chunk) for _ in requests[i].targets]
        positions = [p for i in chunk for p in requests[i].positions]
        targets = [t for i in chunk for t in requests[i].targets]
        logprobs = positions_logprobs(
            model,
            {"input_ids": ids.to(device), "attention_mask": mask.to(device)},
            torch.tensor(rows, device=device),
            torch.tensor(positions, device=device),
            torch.tensor(targets, device=device),
        )
        parts = logprobs.to(device="cpu", dtype=torch.float64).split([len(requests[i].targets) for i in chunk])
        for i, part in zip(chunk, parts, strict=True):
            out[i] = part
    return out


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
    total, count = held_out_nll(
        model, tokenizer, examples, chat_template=chat_template, max_length=max_length, batch_size=batch_size
    )
    return total / count if count else None


def held_out_nll(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    chat_template: bool = False,
    max_length: int = 384,
    batch_size: int = 16,
) -> tuple[float, int]:
    """(summed NLL, trained tokens) of `examples` encoded as in training: `held_out_loss`'s sums."""
    model.eval()
    pad_id = tokenizer.pad_token_id  # `models.load_tokenizer` gives every tokenizer one
    features = [encode_example(tokenizer, e, chat_template, max_length) for e in examples]
    return token_nll(model, features, pad_id, batch_size)


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


def _prompt_pass(
    model, tokenizer, prompts: list[list[int]], generating: bool, max_new_tokens: int
) -> tuple[torch.Tensor, list[str]]:
    """The first answer token's log-probabilities after each prompt (prompts, V), from one pass over the prompts
    padded on the left, and with `generating` their greedy generations (else an empty list)."""
    pad_id = tokenizer.pad_token_id
    device = next(model.parameters()).device
    ids, mask = pad_ids(prompts, pad_id, left=True)
    ids, mask = ids.to(device), mask.to(device)
    decoded: list[str] = []
    if generating:
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
    else:  # the head at the last position only (left padding: every prompt ends there)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden, head = forward_hidden(model, input_ids=ids, attention_mask=mask, position_ids=positions)
        logits = head(hidden[:, -1])
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1), decoded


@dataclasses.dataclass(frozen=True)
class Route:
    """How one example is scored, decided before the model runs.

    `scoring`: None (no choices), "prompt" (every choice is one token after one shared prompt: the scores come from
    the pass over the prompt), "labels" (the same, but also the gold loss: one pass over the gold sequence scores the
    labels at the prompt's end and the gold answer after it) or "choices" (each choice's continuation scored on its
    own). `generate`: a greedy generation from the prompt. `fused`: the gold choice's held-out loss comes from the
    scoring pass (its continuation with the end tokens)."""

    scoring: str | None
    generate: bool
    fused: bool

    @classmethod
    def of(cls, example: Example, spans: list[Spans], generate: bool, gold_loss: bool) -> Route:
        generating = generate and example.formulation != "rc"
        if not example.is_multiple_choice:
            return cls(None, generating, False)
        fused = gold_loss and example.turns is None and not generating
        if _one_pass(spans):
            return cls("labels" if fused else "prompt", generating, fused)
        return cls("choices", generating, fused)

    @property
    def needs_prompt(self) -> bool:
        return self.generate or self.scoring == "prompt"

    def requests(self, example: Example, spans: list[Spans]) -> list[tuple[int | None, ScoreRequest]]:
        """The (choice, or None for the one gold pass) and `ScoreRequest` pairs this example adds to the batch."""
        if self.scoring == "labels":
            return [(None, ScoreRequest.labels_and_gold(spans[example.gold], [s.answer[0] for s in spans]))]
        if self.scoring == "choices":
            return [
                (j, ScoreRequest.continuation(choice, with_end=self.fused and j == example.gold))
                for j, choice in enumerate(spans)
            ]
        return []


@dataclasses.dataclass
class BatchOutputs:
    """What one batch's passes returned, per example index: the first answer token's log-probabilities after the
    prompt, the generated text, and the scored requests by (example, choice or None)."""

    first: dict[int, torch.Tensor]
    texts: dict[int, str]
    scored: dict[tuple[int, int | None], torch.Tensor]


def _run_batch(
    model,
    tokenizer,
    batch: Sequence[Example],
    spans: list[list[Spans]],
    routes: list[Route],
    max_new_tokens: int,
    batch_size: int,
) -> BatchOutputs:
    """One pass over the prompts that need one (generation, one-token choices), then the scoring requests in
    right-padded batches."""
    needs_prompt = [i for i, route in enumerate(routes) if route.needs_prompt]
    first, texts = {}, {}
    if needs_prompt:
        generating = any(routes[i].generate for i in needs_prompt)
        prompts = [spans[i][0].prompt for i in needs_prompt]
        logprobs, decoded = _prompt_pass(model, tokenizer, prompts, generating, max_new_tokens)
        first = {i: logprobs[row] for row, i in enumerate(needs_prompt) if routes[i].scoring == "prompt"}
        if generating:
            texts = {i: t for i, t in zip(needs_prompt, decoded, strict=True) if routes[i].generate}
    keys, requests = [], []
    for i, (e, route) in enumerate(zip(batch, routes, strict=True)):
        for choice, request in route.requests(e, spans[i]):
            keys.append((i, choice))
            requests.append(request)
    scored = dict(zip(keys, score_requests(model, requests, tokenizer.pad_token_id, batch_size), strict=True))
    return BatchOutputs(first, texts, scored)


def _fold(i: int, example: Example, spans: list[Spans], route: Route, out: BatchOutputs) -> Prediction:
    """The example's prediction from its batch's outputs: its choices' scores (and the gold loss), its text."""
    if route.scoring is None:
        return Prediction(None, None, out.texts.get(i))
    k = len(spans)
    if route.scoring == "prompt":
        scores = [out.first[i][s.answer[0]].item() for s in spans]
    elif route.scoring == "labels":
        scores, gold_logprobs = out.scored[i, None][:k].tolist(), out.scored[i, None][k:]
    else:
        scores = [out.scored[i, j][: len(spans[j].answer)].sum().item() for j in range(k)]
        gold_logprobs = out.scored[i, example.gold]
    gold_nll = (-gold_logprobs.sum().item(), len(gold_logprobs)) if route.fused else None
    chars = [len(continuation) for _, continuation in render_pairs(example)]
    return Prediction(scores, chars, out.texts.get(i), gold_nll)


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
    gold_loss: bool = False,
) -> list[Prediction]:
    """Choice scores (multiple choice) and greedy generations (MC and free-form, with `generate`) per example.
    With `gold_loss`, an MC example that is not generated also gets its share of the held-out loss
    (`Prediction.gold_nll`) from the same pass as its scores: the gold choice's sequence is the training
    feature (`data.gold_spans` is its entry of `data.example_spans`), scored with its end tokens appended.

    Per batch: each example's `Route` is planned, the batch's passes run (`_run_batch`), and each example's
    prediction is folded from their outputs (`_fold`)."""
    model.eval()
    predictions = []
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False, unit="batch"):
        batch = examples[start : start + batch_size]
        spans = [example_spans(tokenizer, e, chat_template, max_length) for e in batch]
        routes = [Route.of(e, s, generate, gold_loss) for e, s in zip(batch, spans, strict=True)]
        out = _run_batch(model, tokenizer, batch, spans, routes, max_new_tokens, batch_size)
        predictions += [_fold(i, e, spans[i], routes[i], out) for i, e in enumerate(batch)]
    return predictions


ENCODING = ("chat_template", "max_length", "batch_size")  # `predict`'s settings that `held_out_loss` takes too


def evaluate_examples(
    model, tokenizer, examples: Sequence[Example], *, accuracy: bool = True, **settings
) -> TaskResult:
    """The metrics of one task (see the module docstring); `settings` are `predict`'s keyword arguments (the
    encoding, the batch size, generation). Without `accuracy` only the held-out loss (and its perplexity), the
    accuracies None: what choosing settings on a validation split needs, at a fraction of the cost."""
    predictions = predict(model, tokenizer, examples, gold_loss=True, **settings) if accuracy else []
    encoding = {key: settings[key] for key in ENCODING if key in settings}
    fused = [p.gold_nll for p in predictions if p.gold_nll is not None]  # from the scoring passes
    rest = [e for e, p in zip(examples, predictions, strict=True) if p.gold_nll is None] if accuracy else examples
    total, count = held_out_nll(model, tokenizer, rest, **encoding)
    total, count = total + sum(nll for nll, _ in fused), count + sum(n for _, n in fused)
    loss = total / count if count else None
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
