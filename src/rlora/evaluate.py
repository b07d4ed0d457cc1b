"""Per-task evaluation on the held-out split.

Two accuracies per multiple-choice task:
- log-likelihood: the choice whose answer label (as the model would write it, through the same encoding as
  training) has the highest log-probability of its answer tokens, end-of-answer token excluded;
- generated exact match: greedy decoding from the prompt, first line, compared to the gold label after
  stripping spaces, case and trailing punctuation.
Free-form tasks get the generated exact match only. The average is the unweighted mean over tasks.

When every choice label is a single token (the usual case: "A"/"B"/..., "yes"/"no"), both come from one pass
over the prompt: the log-probabilities of the first generated position. Otherwise every choice is scored with
its own forward pass.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import IGNORE_INDEX, Example, choice_labels, encode_example, encode_pair, pad_ids


@dataclasses.dataclass
class TaskResult:
    n: int
    acc_ll: float | None  # None for free-form tasks
    acc_gen: float | None  # None when generation was skipped


def normalize_answer(text: str) -> str:
    first_line = text.strip().split("\n", 1)[0]
    return first_line.strip().rstrip(string.punctuation + " ").casefold()


@dataclasses.dataclass
class _Encoded:
    prompt: list[int]
    choices: list[list[int]]  # answer tokens of every choice, end token excluded


def _encode(tokenizer, example: Example, chat: bool, max_length: int) -> _Encoded:
    """The prompt ids, and for multiple choice every choice label's answer ids, as training encodes them."""
    if not example.choices:
        enc = encode_example(tokenizer, example, chat, max_length)
        return _Encoded(enc["input_ids"][: enc["labels"].count(IGNORE_INDEX)], [])
    prompts, answers = [], []
    for label in choice_labels(example):
        enc = encode_pair(tokenizer, example, label, chat, max_length)
        n_prompt = enc["labels"].count(IGNORE_INDEX)
        prompts.append(enc["input_ids"][:n_prompt])
        answers.append(enc["input_ids"][n_prompt:])
    return _Encoded(min(prompts, key=len), _strip_common_suffix(answers))


def _strip_common_suffix(answers: list[list[int]]) -> list[list[int]]:
    """Drops the end-of-answer tokens (EOS, end of turn) that every choice's encoding ends with."""
    while all(len(a) > 1 for a in answers) and len({a[-1] for a in answers}) == 1:
        answers = [a[:-1] for a in answers]
    return answers


@torch.no_grad()
def _continuation_logprob(model, prompt: list[int], answers: list[list[int]], pad_id: int) -> list[float]:
    """Sum of log P(answer tokens | prompt) for each answer, one right-padded batch."""
    ids, mask = pad_ids([prompt + a for a in answers], pad_id)
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1)
    scores = []
    for i, a in enumerate(answers):
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(a), device=device)
        scores.append(logits[i, positions, torch.tensor(a, device=device)].sum().item())
    return scores


@dataclasses.dataclass
class Prediction:
    scores: list[float] | None  # log-likelihood of each choice label (multiple choice only)
    text: str | None  # the greedy generation (when generating)


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
    """Choice scores and generations for every example, in batches of left-padded prompts."""
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    predictions = []
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False, unit="batch"):
        batch = examples[start : start + batch_size]
        encoded = [_encode(tokenizer, e, chat_template, max_length) for e in batch]
        single = all(len(a) == 1 for enc in encoded for a in enc.choices)
        ids, mask = pad_ids([enc.prompt for enc in encoded], pad_id, left=True)
        ids, mask = ids.to(device), mask.to(device)
        first_logprobs, texts = None, [None] * len(batch)
        if generate:
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
            first_logprobs = out.logits[0].float().log_softmax(-1)
            texts = tokenizer.batch_decode(out.sequences[:, ids.shape[1] :], skip_special_tokens=True)
        if single and first_logprobs is None and any(e.choices for e in batch):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            first_logprobs = logits.float().log_softmax(-1)
        for i, (enc, text) in enumerate(zip(encoded, texts, strict=True)):
            scores = None
            if enc.choices and single:
                scores = [first_logprobs[i, a[0]].item() for a in enc.choices]
            elif enc.choices:
                scores = _continuation_logprob(model, enc.prompt, enc.choices, pad_id)
            predictions.append(Prediction(scores, text))
    return predictions


def evaluate_examples(model, tokenizer, examples: Sequence[Example], *, generate: bool = True, **kwargs) -> TaskResult:
    """Accuracies of one task: log-likelihood choice (multiple choice) and generated exact match."""
    predictions = predict(model, tokenizer, examples, generate=generate, **kwargs)
    n = len(examples)
    is_mc = n > 0 and all(e.choices for e in examples)
    correct_ll = sum(
        max(range(len(p.scores)), key=p.scores.__getitem__) == e.gold
        for p, e in zip(predictions, examples, strict=True)
        if p.scores is not None
    )
    correct_gen = sum(
        normalize_answer(p.text) == normalize_answer(e.answer)
        for p, e in zip(predictions, examples, strict=True)
        if p.text is not None
    )
    return TaskResult(
        n=n,
        acc_ll=correct_ll / n if is_mc else None,
        acc_gen=correct_gen / n if generate and n else None,
    )


def evaluate_tasks(model, tokenizer, tasks: dict[str, Sequence[Example]], **kwargs) -> dict:
    """Evaluates every task; returns {"tasks": {name: TaskResult as dict}, "average": {...}}."""
    results = {}
    for name, examples in tqdm(list(tasks.items()), desc="tasks", unit="task"):
        results[name] = evaluate_examples(model, tokenizer, list(examples), desc=name, **kwargs)
    return {"tasks": {k: dataclasses.asdict(v) for k, v in results.items()}, "average": _average(results.values())}


def _average(results: Iterable[TaskResult]) -> dict[str, float | None]:
    results = list(results)
    out: dict[str, float | None] = {}
    for key in ("acc_ll", "acc_gen"):
        values = [getattr(r, key) for r in results if getattr(r, key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def results_table(columns: dict[str, dict], metric_names: Sequence[str] = ("acc_ll", "acc_gen")) -> str:
    """A Markdown table: one row a task, for each results column (e.g. base, tuned) its accuracies in %."""
    titles = {"acc_ll": "acc log-lik", "acc_gen": "acc generated"}
    header = ["task", "n"] + [f"{col} {titles[m]}" for col in columns for m in metric_names]
    first = next(iter(columns.values()))
    rows = []
    for task, r in first["tasks"].items():
        cells = [task, str(r["n"])]
        cells += [_pct(columns[c]["tasks"][task][m]) for c in columns for m in metric_names]
        rows.append(cells)
    rows.append(["**average**", ""] + [_pct(columns[c]["average"][m]) for c in columns for m in metric_names])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def evaluate_model_on_plan(model, tokenizer, cfg, plan) -> dict:
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
    )


def evaluate_run(run_dir: str | Path, cache_dir: str | None = None, base: bool = False) -> dict:
    """Evaluates a trained run (or, with `base`, its base model alone) on its held-out split; writes
    RUN_DIR/eval.json and eval.md (eval_base.* for the base model) and returns the results."""
    from peft import PeftModel

    from .data_plan import plan_data
    from .models import load_model_and_tokenizer
    from .runconfig import load_run_config

    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml); train one with `rlora train`")
    if not base and not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{run_dir}: the run has no adapter yet; finish it with `rlora train ... --resume`")
    cfg = load_run_config(config_file)
    plan = plan_data(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cache_dir=cache_dir)
    if not base:
        model = PeftModel.from_pretrained(model, str(run_dir / "adapter"))
    results = evaluate_model_on_plan(model, tokenizer, cfg, plan)
    results = {
        "model": cfg.model,
        "adapter": None if base else str(run_dir / "adapter"),
        "method": cfg.method,
    } | results
    write_results(results, run_dir / ("eval_base" if base else "eval"), "base" if base else cfg.method)
    return results


def write_results(results: dict, stem: Path, column: str) -> None:
    from ._io import atomic_write_json, atomic_write_text

    atomic_write_json(stem.with_suffix(".json"), results)
    atomic_write_text(stem.with_suffix(".md"), results_table({column: results}) + "\n")
