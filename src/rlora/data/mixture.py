"""Mixing tasks into one training set: how many examples each task gives, and the sampled mixture.

Each task first offers `a_i = min(n_i, max_per_task)` examples. Its share is p_i ∝ a_i^(1/T):
"proportional" is T = 1, "equal" is T → ∞ (every task the same share), "temperature" any T > 0.
Without a `total`, the mixture is the largest one that keeps those shares without exceeding any task
(for proportional: everything available). With a `total`, tasks that would need more than they have
give all they have and the rest is shared among the others (water-filling). Counts are integers from
largest-remainder rounding, so they sum exactly to the total.
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..errors import DataError

STRATEGIES = ("proportional", "equal", "temperature")
# The mixture settings' ranges, by their name in a run config's `data` section: (valid?, what is expected).
MIXTURE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "mixture": (lambda v: v in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
    "temperature": (lambda v: 0 < v < math.inf, "a finite number > 0"),
    "max_train_per_task": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "total_train": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
}


def mixture_problem(name: str, value: Any) -> str | None:
    """None if `value` is in the range of the mixture setting `name` (a key of `MIXTURE_RULES`), else what is
    expected."""
    valid, expected = MIXTURE_RULES[name]
    return None if valid(value) else expected


def mixture_counts(
    sizes: Mapping[str, int],
    strategy: str = "proportional",
    temperature: float = 1.0,
    max_per_task: int | None = None,
    total: int | None = None,
) -> dict[str, int]:
    """How many examples to draw from each task (in the order of `sizes`)."""
    if mixture_problem("mixture", strategy) is not None:
        raise DataError(f"unknown mixing strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "temperature" and mixture_problem("temperature", temperature) is not None:
        raise DataError(f"temperature must be > 0 and finite, got {temperature}")
    if mixture_problem("max_train_per_task", max_per_task) is not None:
        raise DataError(f"max_per_task must be >= 1, got {max_per_task}")
    if any(n < 0 for n in sizes.values()):
        raise DataError(f"task sizes must be >= 0, got {dict(sizes)}")
    available = {t: n if max_per_task is None else min(n, max_per_task) for t, n in sizes.items()}
    if strategy == "proportional":
        weights = {t: float(a) for t, a in available.items()}
    elif strategy == "equal":
        weights = {t: 1.0 if a else 0.0 for t, a in available.items()}
    else:
        weights = {t: a ** (1.0 / temperature) for t, a in available.items()}
    if total is None:
        total = _largest_total(available, weights)
    elif total < 0 or total > sum(available.values()):
        raise DataError(
            f"total={total} examples asked for, but the tasks offer {sum(available.values())} "
            f"(after max_per_task={max_per_task})"
        )
    return _water_fill(available, weights, total)


def _largest_total(available: Mapping[str, int], weights: Mapping[str, float]) -> int:
    if all(float(a) == w for a, w in zip(available.values(), weights.values(), strict=True)):
        return sum(available.values())  # proportional: exact, no float division
    norm = sum(weights.values())
    ratios = [a * norm / w for a, w in zip(available.values(), weights.values(), strict=True) if w > 0]
    return math.floor(min(ratios) + 1e-6) if ratios else 0


def _water_fill(available: Mapping[str, int], weights: Mapping[str, float], total: int) -> dict[str, int]:
    quotas: dict[str, float] = {}
    free = {t for t, w in weights.items() if w > 0}
    remaining = float(total)
    while free:
        norm = sum(weights[t] for t in free)
        full = {t for t in free if remaining * weights[t] / norm >= available[t]}
        if not full:
            quotas.update({t: remaining * weights[t] / norm for t in free})
            break
        for t in full:
            quotas[t] = float(available[t])
            remaining -= available[t]
        free -= full
    counts = {t: min(math.floor(quotas.get(t, 0.0) + 1e-9), available[t]) for t in available}
    order = sorted(available, key=lambda t: (-(quotas.get(t, 0.0) - counts[t]), list(available).index(t)))
    missing = total - sum(counts.values())
    for t in order:
        if missing == 0:
            break
        if counts[t] < available[t]:
            counts[t] += 1
            missing -= 1
    return counts


def index_dtype(n: int) -> type:
    """The integer type for indices below `n`: 4 bytes while they fit (index arrays over millions of examples are
    kept for a whole run), else 8."""
    return np.int32 if n < 2**31 else np.int64


def mixture_positions(
    sizes: Mapping[str, int], counts: Mapping[str, int], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The shuffled mixture as index arrays: (the task of each entry, as an index into `sizes`; its position in
    that task). Each task gives `counts[task]` positions sampled without replacement, then the whole is shuffled.

    Only the sizes enter the draw, so a task given as a list of examples or as rows of a table draws the same
    examples for the same seed; the draws are `random.Random.sample` and `shuffle`'s, on 8-byte arrays instead of
    lists of Python integers (a few times less memory for millions of examples)."""
    offsets = np.cumsum([0, *sizes.values()])
    picks = array("q")
    for i, (task, n) in enumerate(sizes.items()):
        # A string seed is hashed with SHA-512 by `random`, so this is the same on every run and machine.
        chosen = np.frombuffer(sample_range(random.Random(f"{seed}:{task}"), n, counts[task]), dtype=np.int64)
        picks.frombytes((chosen + offsets[i]).tobytes())
    random.Random(seed).shuffle(picks)
    flat = np.frombuffer(picks, dtype=np.int64)
    task_of = np.searchsorted(offsets, flat, side="right") - 1
    position = flat - offsets[task_of]
    return task_of.astype(np.int32), position.astype(index_dtype(max(sizes.values(), default=0)))


def sample_range(rng: random.Random, n: int, k: int) -> array:
    """`rng.sample(range(n), k)` as an array of 8-byte integers: the same draws, in the same order.

    `random.sample` copies its population into a list first; this follows its two strategies (a shrinking pool
    when n is small against the set it would otherwise keep, else rejection against a set of the chosen) on an
    array. `tests/test_data_mixture.py` checks it against `random.sample` on both strategies."""
    if not 0 <= k <= n:
        raise ValueError("Sample larger than population or is negative")
    randbelow = rng._randbelow  # what `sample` itself draws with
    result = array("q", bytes(8 * k))
    setsize = 21 + (4 ** math.ceil(math.log(k * 3, 4)) if k > 5 else 0)
    if n <= setsize:
        pool = array("q", range(n))
        for i in range(k):
            j = randbelow(n - i)
            result[i] = pool[j]
            pool[j] = pool[n - i - 1]
    else:
        selected: set[int] = set()
        for i in range(k):
            j = randbelow(n)
            while j in selected:
                j = randbelow(n)
            selected.add(j)
            result[i] = j
    return result


def format_mixture_table(counts: Mapping[str, int], sizes: Mapping[str, int]) -> str:
    """A text table of each task's available and sampled examples and its share of the mixture."""
    total = sum(counts.values()) or 1
    width = max([len("total"), *(len(t) for t in counts)])
    lines = [f"{'task':<{width}}  {'available':>9}  {'sampled':>7}  {'share':>6}"]
    for task, count in counts.items():
        lines.append(f"{task:<{width}}  {sizes[task]:>9}  {count:>7}  {100 * count / total:>5.1f}%")
    lines.append(f"{'total':<{width}}  {sum(sizes[t] for t in counts):>9}  {sum(counts.values()):>7}  100.0%")
    return "\n".join(lines)
