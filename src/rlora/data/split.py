"""A deterministic train/test split of each task by a hash of each example's content, and a validation split carved
from the training side by the same hash.

The built-in sets have no training split. Hashing the content (not the position, not Python's salted
`hash`) makes the split the same on every machine, run and version, keeps duplicates together, and keeps
an example on its side when others are added or removed. Changing `SPLIT_SALT` reshuffles every split:
do it only on purpose.

Each example's key is a number in [0, 1): test is [0, test_fraction), as it always was; validation, when asked for,
is the next stretch [test_fraction, test_fraction + validation_fraction * (1 - test_fraction)), about
`validation_fraction` of the training examples; training is the rest. So validation and test are disjoint by
construction, and whether an example is in the validation split depends on its own content only: no test example
is read to decide it (`split_sides`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

from .example import Example
from .mixture import index_dtype

SPLIT_SALT = "rlora-split-v1"
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_VALIDATION_FRACTION = 0.1
HOLDOUTS = ("test", "validation")  # what a run evaluates (`data.holdout`)


def split_key(example: Example) -> float:
    """A number in [0, 1) fixed by the example's task, prompt, choices and answer (and a conversation's turns)."""
    parts = [SPLIT_SALT, example.task, example.prompt, *(example.choices or ()), example.answer]
    if example.turns is not None:  # appended, so the keys of every other example are what they always were
        parts += [f"{role}\x1e{content}" for role, content in example.turns]
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_keys(examples: Iterable[Example]) -> np.ndarray:
    """`split_key` of each example, as a float64 array (a file's tasks store theirs: `store.TaskData.split_keys`)."""
    return np.array([split_key(e) for e in examples], dtype=np.float64)


def split_sides(
    keys: np.ndarray, test_fraction: float, validation_fraction: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean masks (train, validation, test) of the examples with split `keys` (see the module docstring); the
    validation mask is all False with `validation_fraction` 0."""
    test = keys < test_fraction
    validation = ~test & (keys < test_fraction + validation_fraction * (1 - test_fraction))
    return ~test & ~validation, validation, test


def split_positions(
    keys: np.ndarray, test_fraction: float, validation_fraction: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`split_sides` as positions: (train, validation, test) index arrays into the task, each in the task's order."""
    sides = split_sides(np.asarray(keys), test_fraction, validation_fraction)
    kind = index_dtype(len(sides[0]))
    train, validation, test = (np.flatnonzero(side).astype(kind) for side in sides)
    return train, validation, test


def bad_test_fraction(test_fraction: float, both_sides: bool = False) -> str | None:
    """None if `test_fraction` is a valid test share, else the interval it must be in: [0, 1] for a split (0: every
    example trains, 1: every example tests), (0, 1) with `both_sides` (a run, which both trains and tests)."""
    if both_sides:
        return None if 0 < test_fraction < 1 else "(0, 1)"
    return None if 0 <= test_fraction <= 1 else "[0, 1]"
