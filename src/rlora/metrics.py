"""The metrics of an evaluation, one table: each one's key in results files, its direction and how tables, headings
and plots show it. `evaluate.py` computes them, `reports.py` and `plots.py` show them, `commands/compare.py`
compares them; none of them restates a fact kept here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    label: str  # a table column's name; lower-is-better ones state their direction (accuracies keep plain names)
    title: str  # headings and plot axes
    scale: float  # what tables and plots show is scale x the stored value (accuracies are stored as fractions)
    digits: int  # decimals shown
    difference_unit: str  # the unit of a difference between two runs' values
    lower_is_better: bool = False


METRIC_INFO: dict[str, Metric] = {
    "acc_ll": Metric("acc", "accuracy by log-likelihood (%)", 100.0, 1, "points"),
    "acc_norm": Metric("acc_norm", "accuracy by log-likelihood per character (%)", 100.0, 1, "points"),
    "acc_gen": Metric("acc generated", "accuracy by generated exact match (%)", 100.0, 1, "points"),
    "loss": Metric("loss ↓", "held-out loss, nats per token (lower is better)", 1.0, 3, "nats per token", True),
    "ppl": Metric("ppl ↓", "held-out perplexity (lower is better)", 1.0, 2, "perplexity", True),
}
METRICS = tuple(METRIC_INFO)
ACCURACY_METRICS = tuple(m for m, info in METRIC_INFO.items() if not info.lower_is_better)  # fractions in [0, 1]
LOSS_METRICS = tuple(m for m, info in METRIC_INFO.items() if info.lower_is_better)  # nats per token and its exp
LOWER_IS_BETTER = frozenset(LOSS_METRICS)
