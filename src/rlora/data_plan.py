"""From a run config to the run's data: tasks, the hash split, the training mixture and the test sets.

Everything here is deterministic given the config (and its seed), so every process of a distributed run,
every method of a comparison and a resumed run all see the same data. It runs before any model loads, so
unknown tasks and bad files fail fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .data import (
    CausalLMCollator,
    Example,
    build_mixture,
    encode_examples,
    expand_task_names,
    format_mixture_table,
    load_task,
    mixture_counts,
    read_jsonl_tasks,
    split_examples,
    with_default_format,
)
from .data.split import SPLIT_SALT
from .errors import DataError
from .runconfig import RunConfig


@dataclass
class DataPlan:
    cfg: RunConfig
    train: list[Example]  # the shuffled training mixture
    test: dict[str, list[Example]]  # per task, the held-out examples that are evaluated
    sizes: dict[str, dict[str, int]]  # per task: total, train, test (before any cap)
    counts: dict[str, int]  # per task: examples in the training mixture

    def counts_table(self) -> str:
        return format_mixture_table(self.counts, {t: s["train"] for t, s in self.sizes.items()})

    def manifest(self) -> dict:
        d = self.cfg.data
        split = {"method": "sha256 of task, prompt, choices, answer", "salt": SPLIT_SALT}
        mixture = {"strategy": d.mixture, "temperature": d.temperature, "max_train_per_task": d.max_train_per_task}
        used = {t: {"train_used": self.counts[t], "test_evaluated": len(self.test[t])} for t in self.sizes}
        return {
            "split": split | {"test_fraction": d.test_fraction},
            "format": d.format,
            "mixture": mixture | {"total_train": d.total_train, "seed": self.cfg.seed},
            "tasks": {t: self.sizes[t] | used[t] for t in self.sizes},
            "train_examples": len(self.train),
        }

    def train_dataset(self, tokenizer) -> list[dict]:
        d = self.cfg.data
        return encode_examples(tokenizer, self.train, d.chat_template, d.max_length)

    def collator(self, tokenizer) -> CausalLMCollator:
        return CausalLMCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=8)


def load_tasks(cfg: RunConfig) -> dict[str, list[Example]]:
    """Built-in tasks (suites expanded) and the JSONL files' tasks; names must not clash. Multiple-choice
    examples that do not name their formulation get the run's (`data.format`)."""
    names = expand_task_names(cfg.data.tasks)
    tasks = {name: load_task(name) for name in names}
    tasks.update(read_jsonl_tasks(cfg.data.jsonl, reserved=names))
    fmt = cfg.data.format
    return {name: [with_default_format(e, fmt) for e in examples] for name, examples in tasks.items()}


def plan_data(cfg: RunConfig) -> DataPlan:
    d = cfg.data
    splits = {name: split_examples(examples, d.test_fraction) for name, examples in load_tasks(cfg).items()}
    sizes = {t: {"total": len(tr) + len(te), "train": len(tr), "test": len(te)} for t, (tr, te) in splits.items()}
    for task, (train, test) in splits.items():
        if not train or not test:
            side = "training" if not train else "test"
            raise DataError(
                f"task {task!r}: its {sizes[task]['total']} examples leave the {side} split empty "
                f"(test_fraction={d.test_fraction}); give it more examples"
            )
    train_sets = {t: tr for t, (tr, _) in splits.items()}
    strategy_args = (d.mixture, d.temperature, d.max_train_per_task, d.total_train)
    counts = mixture_counts({t: len(x) for t, x in train_sets.items()}, *strategy_args)
    train = build_mixture(train_sets, *strategy_args, seed=cfg.seed)
    test = {t: _cap(te, d.max_eval_per_task) for t, (_, te) in splits.items()}
    return DataPlan(cfg, train, test, sizes, counts)


def _cap(examples: Sequence[Example], limit: int | None) -> list[Example]:
    """The first `limit` test examples in the task's own order: the same for every seed and method."""
    return list(examples if limit is None else examples[:limit])
