"""Naive reference implementations the tests compare the library against (the library streams, maps and indexes;
these hold every example in a list)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from rlora.data import Example, mixture_counts, mixture_positions
from rlora.data.files import DataFile, iter_examples
from rlora.data.split import DEFAULT_TEST_FRACTION, bad_test_fraction, split_key
from rlora.errors import DataError


def read_jsonl_tasks(paths: Iterable[str | os.PathLike], reserved: Iterable[str] = ()) -> dict[str, list[Example]]:
    """The tasks in the files, by name, every line parsed into a list; a name used twice, or in `reserved`, is an
    error. Each file is read as JSON Lines in rlora's schema, whatever its suffix (as `data.jsonl` is)."""
    reserved = set(reserved)
    tasks: dict[str, list[Example]] = {}
    for path in paths:
        path = Path(path)
        found: dict[str, list[Example]] = {}
        for example in iter_examples(DataFile(path, schema="rlora", kind="jsonl")):
            found.setdefault(example.task, []).append(example)
        for name, examples in found.items():
            if name in reserved:
                raise DataError(f"{path}: task {name!r} has the name of a built-in task; rename it")
            if name in tasks:
                raise DataError(f"{path}: task {name!r} is defined twice (also in an earlier file)")
            tasks[name] = examples
    return tasks


def split_examples(
    examples: Iterable[Example], test_fraction: float = DEFAULT_TEST_FRACTION
) -> tuple[list[Example], list[Example]]:
    """(train, test), each in the input order: an example tests iff its split key is below `test_fraction`."""
    interval = bad_test_fraction(test_fraction)
    if interval is not None:
        raise ValueError(f"test_fraction must be in {interval}, got {test_fraction}")
    train: list[Example] = []
    test: list[Example] = []
    for example in examples:
        (test if split_key(example) < test_fraction else train).append(example)
    return train, test


def build_mixture(
    tasks: Mapping[str, Sequence[Example]],
    strategy: str = "proportional",
    temperature: float = 1.0,
    max_per_task: int | None = None,
    total: int | None = None,
    seed: int = 0,
) -> list[Example]:
    """The shuffled training examples as a list: `mixture_counts` of each task, drawn by `mixture_positions`."""
    sizes = {t: len(x) for t, x in tasks.items()}
    counts = mixture_counts(sizes, strategy, temperature, max_per_task, total)
    names = list(tasks)
    task_of, position = mixture_positions(sizes, counts, seed)
    return [tasks[names[t]][p] for t, p in zip(task_of.tolist(), position.tolist(), strict=True)]
