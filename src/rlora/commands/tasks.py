"""`rlora tasks`: the tasks with their sizes (total, train, test) under the hash split."""

from __future__ import annotations

import argparse

from ..data import DEFAULT_FORMAT, list_tasks, load_task
from ..data.split import split_positions
from ..data.store import ListTask


def user_tasks(args: argparse.Namespace, default_format: str = DEFAULT_FORMAT) -> dict:
    """The --data files' tasks (`data.store.TableTask`: rows of a cached Arrow table, read once)."""
    if not args.data:
        return {}

    from ..data.files import DataFile
    from ..data.store import file_tasks

    specs = [DataFile.from_config(p, f"--data {p}") for p in args.data]
    return file_tasks(specs, reserved=list_tasks(), default_format=default_format)


def run(args: argparse.Namespace) -> int:
    tasks = {name: ListTask(name, load_task(name)) for name in list_tasks(include_mmlu=args.mmlu)}
    tasks.update(user_tasks(args))
    width = max(len(name) for name in tasks)
    print(f"{'task':<{width}}  {'total':>6}  {'train':>6}  {'test':>6}")
    for name, examples in tasks.items():
        train, _, test = split_positions(examples.split_keys(), args.test_fraction)
        print(f"{name:<{width}}  {len(examples):>6}  {len(train):>6}  {len(test):>6}")
    if not args.mmlu:
        print("(add --mmlu to list the 57 MMLU subjects, tasks mmlu_<subject>)")
    return 0
