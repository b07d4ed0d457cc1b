r"""What fixed gates cost: the routed model and a fixed-gate export scored on the same held-out examples, paired.

For every held-out example both models get their scores exactly as `rlora eval` computes them (`evaluate.predict`
with the run's encoding and settings): its summed NLL over its trained tokens, and whether each accuracy's choice
(or generation) is right. Per task and metric:

- accuracies: the paired difference fixed - routed of the 0/1 outcomes, mean and 95% CI over the examples
  (`stats.mean_ci`);
- the loss, token-weighted as `evaluate` (summed NLL / trained tokens T): both models score the same tokens, so the
  rise loss_fixed - loss_routed is exactly the mean over the n examples of d_i = n (nll_fixed_i - nll_routed_i) / T,
  and its CI is `mean_ci` of those d_i.

The fixed-gate model is the R-LoRA model with every adapted layer's output replaced by its base layer's plus the
exported factors' update, x A^T B^T (`fixed_gate_model`): the export's function, computed on the run's own model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from .evaluate import ENCODING, held_out_nll, normalize_answer, predict
from .stats import format_ci, mean_ci

logger = logging.getLogger(__name__)

DEFAULT_MAX_LOSS_RISE = 0.05  # nats per trained token: the rise past which an export is flagged


@dataclasses.dataclass
class ExampleScores:
    nll: list[float]  # summed NLL of each example's trained tokens
    tokens: list[int]  # its trained tokens
    correct: dict[str, list[float]]  # accuracy metric -> 1.0 / 0.0 per example (only metrics every example has)


def example_scores(model, tokenizer, examples: Sequence, settings: dict) -> ExampleScores:
    """Each example's NLL and outcomes, as `evaluate.evaluate_examples` computes the task's (`settings`: `predict`'s
    keyword arguments)."""
    predictions = predict(model, tokenizer, examples, gold_loss=True, **settings)
    encoding = {key: settings[key] for key in ENCODING if key in settings}
    nll, tokens = [], []
    for example, p in zip(examples, predictions, strict=True):
        total, count = p.gold_nll if p.gold_nll is not None else held_out_nll(model, tokenizer, [example], **encoding)
        nll.append(total)
        tokens.append(count)
    correct: dict[str, list[float]] = {}
    if examples and all(e.is_multiple_choice for e in examples):
        correct["acc_ll"] = [float(p.choice() == e.gold) for p, e in zip(predictions, examples, strict=True)]
        if all(e.formulation == "rc" for e in examples):
            correct["acc_norm"] = [float(p.choice(True) == e.gold) for p, e in zip(predictions, examples, strict=True)]
    if examples and all(p.text is not None for p in predictions):
        correct["acc_gen"] = [
            float(normalize_answer(p.text) == normalize_answer(e.answer))
            for p, e in zip(predictions, examples, strict=True)
        ]
    return ExampleScores(nll, tokens, correct)


def paired(routed: ExampleScores, fixed: ExampleScores) -> dict:
    """Per metric {"routed", "fixed", "diff" (fixed - routed), "ci" (95% half-width, None under 2 examples)}."""
    n, total = len(routed.nll), sum(routed.tokens)
    out: dict = {"n": n}
    if total:
        d = [n * (f - r) / total for f, r in zip(fixed.nll, routed.nll, strict=True)]
        out["loss"] = _entry(sum(routed.nll) / total, sum(fixed.nll) / total, d)
    for metric, outcomes in routed.correct.items():
        other = fixed.correct[metric]
        d = [f - r for f, r in zip(other, outcomes, strict=True)]
        out[metric] = _entry(sum(outcomes) / n, sum(other) / n, d)
    return out


def _entry(routed: float, fixed: float, d: list[float]) -> dict:
    mean, half = mean_ci(d)
    return {"routed": routed, "fixed": fixed, "diff": mean, "ci": None if half != half else half}


def flag(tasks: dict[str, dict], max_loss_rise: float) -> list[str]:
    """A warning per task whose loss rises by more than `max_loss_rise` nats with the fixed gates."""
    warnings = []
    for task, scores in tasks.items():
        loss = scores.get("loss")
        if loss is not None and loss["diff"] > max_loss_rise:
            rise = format_ci(loss["diff"], loss["ci"], scale=1.0, digits=3)
            warnings.append(
                f"{task}: the loss rises by {rise} nats with fixed gates (more than {max_loss_rise}); the routed "
                "model (`rlora serve`) serves this task better"
            )
    return warnings


@contextlib.contextmanager
def fixed_gate_model(layers: dict, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Within the block, each adapted layer `layers[name]` computes its base layer's output plus the plain LoRA
    update of `factors[name]` = (B, A), x A^T B^T: the model is the export's fixed-gate model."""

    def hook(module, args, _output, B, A):
        x = args[0]
        base = module.get_base_layer()(x)
        return base + F.linear(F.linear(x.to(A.dtype), A), B).to(base.dtype)

    handles = []
    try:
        for name, layer in layers.items():
            B, A = factors[name]
            handles.append(layer.register_forward_hook(lambda m, a, o, B=B, A=A: hook(m, a, o, B, A)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def eval_settings(cfg) -> dict:
    """`predict`'s keyword arguments from a run config, as `evaluate.evaluate_plan` passes them."""
    e, d = cfg.eval, cfg.data
    return {
        "chat_template": d.chat_template,
        "max_length": d.max_length,
        "batch_size": e.batch_size,
        "generate": e.generate,
        "max_new_tokens": e.max_new_tokens,
    }


class Fidelity:
    """Scores a run's routed model once per task, and any fixed-gate export against it (`measure`)."""

    def __init__(self, run, layers: dict, max_loss_rise: float = DEFAULT_MAX_LOSS_RISE) -> None:
        self.run, self.layers, self.max_loss_rise = run, layers, max_loss_rise
        self.settings = eval_settings(run.cfg)
        self._routed: dict[str, ExampleScores] = {}

    def _scores(self, task: str) -> ExampleScores:
        return example_scores(self.run.model, self.run.tokenizer, list(self.run.plan.test[task]), self.settings)

    def measure(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], tasks: Sequence[str]) -> dict:
        """{"tasks": {task: `paired` scores}, "max_loss_rise", "warnings"} of the export `factors` on `tasks`'
        held-out examples; the warnings are logged too."""
        self.run.model.eval()
        out = {}
        for task in tasks:
            if task not in self._routed:
                self._routed[task] = self._scores(task)
            with fixed_gate_model(self.layers, factors):
                fixed = self._scores(task)
            out[task] = paired(self._routed[task], fixed)
        warnings = flag(out, self.max_loss_rise)
        for warning in warnings:
            logger.warning("fixed gates: %s", warning)
        return {"tasks": out, "max_loss_rise": self.max_loss_rise, "warnings": warnings}
