"""`rlora tasks`: the tasks with their sizes (total, train, test) under the hash split."""

from __future__ import annotations

import argparse

from ..data import list_tasks, load_task
from ..data.split import split_keys


def user_tasks(args: argparse.Namespace) -> dict:
    """The --data files' tasks (`data.store.TaskData`: rows of a cached Arrow table, read once)."""
    if not args.data:
        return {}

    from ..data.files import DataFile
    from ..data.store import file_tasks

    return file_tasks([DataFile.from_config(p, f"--data {p}") for p in args.data], reserved=list_tasks())


def task_split_keys(examples):
    """The split key of each example of a task: a built-in task's list, or a file's `TaskData`, which stores them."""
    return examples.split_keys() if hasattr(examples, "split_keys") else split_keys(examples)


def run(args: argparse.Namespace) -> int:
    tasks = {name: load_task(name) for name in list_tasks(include_mmlu=args.mmlu)}
    tasks.update(user_tasks(args))
    width = max(len(name) for name in tasks)
    print(f"{'task':<{width}}  {'total':>6}  {'train':>6}  {'test':>6}")
    for name, examples in tasks.items():
        n_test = int((task_split_keys(examples) < args.test_fraction).sum())
        print(f"{name:<{width}}  {len(examples):>6}  {len(examples) - n_test:>6}  {n_test:>6}")
    if not args.mmlu:
        print("(add --mmlu to list the 57 MMLU subjects, tasks mmlu_<subject>)")
    return 0
