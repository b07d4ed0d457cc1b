"""From the run config's data settings and seed to the run's data: tasks, the hash split, the training mixture and the
test sets.

Everything here is deterministic given the settings and the seed, so every process of a distributed run,
every method of a comparison and a resumed run all see the same data. It runs before any model loads, so
unknown tasks and bad files fail fast.

Nothing here holds a task's examples: user files are memory-mapped Arrow tables (`data/store.py`), the split and
the mixture are index arrays over them, and the training set tokenizes an example when the data loader asks for
it. Only the length of each training example is computed up front (the Trainer groups batches by length): exact
token counts in batched passes, or for very large mixtures a character count read from the table's columns.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from . import (
    CausalLMCollator,
    Example,
    encode_example,
    expand_task_names,
    format_mixture_table,
    load_task,
    mixture_counts,
    mixture_positions,
    token_lengths,
)
from .files import DataFile
from .settings import DataSettings
from .split import SPLIT_SALT, split_positions
from .store import ListTask, TaskData, file_tasks

logger = logging.getLogger(__name__)

# Above this many training examples, batches are grouped by an estimate of length (characters) rather than by
# the exact token length: tokenizing costs about 40-70 µs per example on 2 cores, so 100k take a few seconds.
EXACT_LENGTHS_MAX = 100_000


class MixtureView(Sequence):
    """The training mixture as a sequence of examples, each made when it is read."""

    def __init__(self, plan: DataPlan) -> None:
        self._plan = plan

    def __len__(self) -> int:
        return len(self._plan.mixture[0])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._plan.train_example(int(self._plan.mixture[0][i]), int(self._plan.mixture[1][i]))


@dataclass
class DataPlan:
    data: DataSettings
    seed: int
    tasks: dict[str, TaskData]
    # per task, the held-out examples that are evaluated: of the test split, or of the validation split when the
    # config's data.holdout is validation (then the test split is neither evaluated nor trained on)
    test: dict[str, list[Example]]
    sizes: dict[str, dict[str, int]]  # per task: total, train, test (and validation) before any cap
    counts: dict[str, int]  # per task: examples in the training mixture
    # the shuffled mixture, two arrays: each entry's task (an index into `tasks`) and example (an index into the task)
    mixture: tuple[np.ndarray, np.ndarray]
    # per task, the validation examples scored during training (`training.eval_steps`) and probed by the router
    # telemetry; None when the run carves no validation split (data.holdout test and no eval_steps)
    validation: dict[str, list[Example]] | None = None

    @property
    def train(self) -> MixtureView:
        """The shuffled training mixture."""
        return MixtureView(self)

    def __post_init__(self) -> None:
        self._names = list(self.tasks)

    def train_example(self, task_index: int, index: int) -> Example:
        """The `index`-th example of the `task_index`-th task, in the run's formulation."""
        return self.tasks[self._names[task_index]][index]

    def fingerprint(self) -> str:
        """A digest of the data the run trains on: each task's name and its examples' split keys (each a sha256 of
        the example's content, `split.split_key`), in order, and the mixture. An example changed, added or removed
        changes it; it costs no example made for a file's tasks (their keys are stored with the table)."""
        digest = hashlib.blake2b(digest_size=16)
        for name, task in self.tasks.items():
            digest.update(name.encode() + b"\0")
            digest.update(np.ascontiguousarray(task.split_keys(), dtype=np.float64).tobytes())
        for column in self.mixture:
            digest.update(np.ascontiguousarray(column, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def counts_table(self) -> str:
        return format_mixture_table(self.counts, {t: s["train"] for t, s in self.sizes.items()})

    def manifest(self) -> dict:
        d = self.data
        split = {"method": "sha256 of task, prompt, choices, answer (and a conversation's turns)", "salt": SPLIT_SALT}
        mixture = {"strategy": d.mixture, "temperature": d.temperature, "max_train_per_task": d.max_train_per_task}
        evaluated = f"{d.holdout}_evaluated"
        used = {t: {"train_used": self.counts[t], evaluated: len(self.test[t])} for t in self.sizes}
        if self.validation is not None and d.holdout == "test":  # scored during training (training.eval_steps)
            used = {t: used[t] | {"validation_scored": len(self.validation[t])} for t in used}
        return {
            "split": split | {"test_fraction": d.test_fraction} | self._holdout(),
            "format": d.format,
            "mixture": mixture | {"total_train": d.total_train, "seed": self.seed},
            "tasks": {t: self.sizes[t] | used[t] for t in self.sizes},
            "train_examples": len(self.mixture[0]),
        }

    def _holdout(self) -> dict:
        d = self.data
        if self.validation is None:
            return {"holdout": d.holdout}
        return {"holdout": d.holdout, "validation_fraction": d.validation_fraction}

    def train_dataset(self, tokenizer) -> TrainingSet:
        return TrainingSet(self, tokenizer)

    def collator(self, tokenizer) -> CausalLMCollator:
        return CausalLMCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=8)


class TrainingSet:
    """The training mixture for the Trainer: item i is the i-th example's training feature, tokenized when read;
    `lengths` holds every item's length for `group_by_length` (see `_lengths`), computed up front."""

    def __init__(self, plan: DataPlan, tokenizer) -> None:
        d = plan.data
        self.plan, self.tokenizer = plan, tokenizer
        self.chat_template, self.max_length = d.chat_template, d.max_length
        self.lengths = self._lengths()

    def __len__(self) -> int:
        return len(self.plan.mixture[0])

    def __getitem__(self, i: int) -> dict:
        example = self.plan.train[i]
        feature = encode_example(self.tokenizer, example, self.chat_template, self.max_length)
        return feature | {"task_id": int(self.plan.mixture[0][i])}  # the index of its task in `plan.tasks`

    def _lengths(self) -> np.ndarray:
        """The length of each item, in mixture order: in tokens, exactly, for up to `EXACT_LENGTHS_MAX` items (each
        task's used examples read in row order and tokenized in batches); beyond, in characters of the example's
        texts (`TaskData.text_lengths`, stored when a file is read): a stand-in that costs no tokenizing."""
        task_of, position = self.plan.mixture
        exact = len(task_of) <= EXACT_LENGTHS_MAX
        if not exact:
            logger.info(
                "%d training examples: batches are grouped by length in characters (exact token lengths are "
                "computed for up to %d)", len(task_of), EXACT_LENGTHS_MAX,
            )  # fmt: skip
        lengths = np.zeros(len(task_of), dtype=np.int32)
        for t, task in enumerate(self.plan.tasks.values()):
            entries = np.flatnonzero(task_of == t)
            if not len(entries):
                continue
            rows = position[entries]
            if not exact:
                lengths[entries] = task.text_lengths(rows)
                continue
            order = np.argsort(rows, kind="stable")
            found = []
            for chunk in task.chunks(rows[order]):
                found.append(token_lengths(self.tokenizer, chunk, self.chat_template, self.max_length))
            lengths[entries[order]] = np.concatenate(found)
        return lengths


def load_tasks(data: DataSettings, cache_dir: str | None = None) -> dict[str, TaskData]:
    """Built-in tasks (suites expanded) and the files' tasks; names must not clash."""
    names = expand_task_names(data.tasks)
    fmt = data.format
    tasks = {name: ListTask(name, load_task(name), fmt) for name in names}
    specs = [DataFile(Path(f), schema="rlora", kind="jsonl") for f in data.jsonl]  # any suffix, as ever
    specs += [DataFile.from_config(f, f"data.files[{i}]") for i, f in enumerate(data.files)]
    tasks.update(file_tasks(specs, reserved=names, cache_dir=cache_dir, default_format=fmt))
    return tasks


def plan_data(data: DataSettings, seed: int, cache_dir: str | None = None, validation: bool = False) -> DataPlan:
    """The run's data from its `data` settings and its seed (the run config's `data` and `seed`); with `validation`
    (the run config's `training.eval_steps` is set) a validation split is carved even with `data.holdout` test."""
    d = data
    tasks = load_tasks(data, cache_dir)
    carved = validation or d.holdout == "validation"  # a validation split, also scored during training
    validation = d.holdout == "validation"
    splits, sizes = {}, {}
    for name, task in tasks.items():
        fractions = (d.test_fraction, d.validation_fraction if carved else 0.0)
        train, held_val, held_test = split_positions(task.split_keys(), *fractions)
        held = held_val if validation else held_test  # with validation, no test example is evaluated or trained on
        splits[name] = (train, held, held_val)
        sizes[name] = {"total": len(task), "train": len(train), "test": len(held_test)}
        if carved:
            sizes[name]["validation"] = len(held_val)
    for task, (train, held, held_val) in splits.items():
        if not len(train) or not len(held) or (carved and not len(held_val)):
            side = "training" if not len(train) else d.holdout if not len(held) else "validation"
            fractions = f"test_fraction={d.test_fraction}" + (
                f", validation_fraction={d.validation_fraction}" if carved else ""
            )
            raise DataError(
                f"task {task!r}: its {sizes[task]['total']} examples leave the {side} split empty "
                f"({fractions}); give it more examples"
            )
    train_sizes = {t: len(tr) for t, (tr, _, _) in splits.items()}
    counts = mixture_counts(train_sizes, d.mixture, d.temperature, d.max_train_per_task, d.total_train)
    task_of, position = mixture_positions(train_sizes, counts, seed=seed)
    for t, (train, _, _) in enumerate(splits.values()):  # a position in the training split -> an index into the task
        chosen = task_of == t
        position[chosen] = train[position[chosen]]
    if len(tasks) < 2**15:
        task_of = task_of.astype(np.int16)  # every array here is kept for the whole run: millions of entries
    test = {t: _cap(tasks[t], held, d.max_eval_per_task) for t, (_, held, _) in splits.items()}
    scored = {t: _cap(tasks[t], v, d.max_eval_per_task) for t, (_, _, v) in splits.items()} if carved else None
    return DataPlan(data, seed, tasks, test, sizes, counts, (task_of, position), scored)


def _cap(task: TaskData, positions: np.ndarray, limit: int | None) -> list[Example]:
    """The first `limit` test examples in the task's own order: the same for every seed and method."""
    return task.take(positions if limit is None else positions[:limit])
