"""The `rlora` command. Thin: each subcommand parses its arguments and calls the library.

Add a subcommand with an `_add_<name>(subparsers)` function that registers its parser and sets `func`
(a function of the parsed arguments returning the exit code), and list it in `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .data import (
    DEFAULT_TEST_FRACTION,
    DataError,
    Example,
    check_task_name,
    encode_example,
    list_tasks,
    load_task,
    read_jsonl_tasks,
    render_prompt,
    split_examples,
)
from .models import DEFAULT_MODEL, EmbeddedModelMissing


def _user_tasks(args: argparse.Namespace) -> dict[str, list[Example]]:
    return read_jsonl_tasks(args.data, reserved=list_tasks())


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", action="append", default=[], metavar="FILE.jsonl", help="a JSONL file of your own tasks"
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=DEFAULT_TEST_FRACTION,
        help="share of each task held out for testing (default: %(default)s)",
    )


def _tasks(args: argparse.Namespace) -> int:
    tasks = {name: load_task(name) for name in list_tasks(include_mmlu=args.mmlu)}
    tasks.update(_user_tasks(args))
    width = max(len(name) for name in tasks)
    print(f"{'task':<{width}}  {'total':>6}  {'train':>6}  {'test':>6}")
    for name, examples in tasks.items():
        train, test = split_examples(examples, args.test_fraction)
        print(f"{name:<{width}}  {len(examples):>6}  {len(train):>6}  {len(test):>6}")
    if not args.mmlu:
        print("(add --mmlu to list the 57 MMLU subjects, tasks mmlu_<subject>)")
    return 0


def _add_tasks(subparsers) -> None:
    parser = subparsers.add_parser("tasks", help="list the tasks with their sizes (total/train/test)")
    parser.add_argument("--mmlu", action="store_true", help="also list the MMLU subjects")
    _add_data_options(parser)
    parser.set_defaults(func=_tasks)


def _show(args: argparse.Namespace) -> int:
    user = _user_tasks(args)
    examples = user[args.task] if args.task in user else load_task(check_task_name(args.task))
    train, test = split_examples(examples, args.test_fraction)
    chosen = (train if args.split == "train" else test)[: args.n]
    tokenizer = None
    if args.model or args.chat_template:
        from transformers import AutoTokenizer

        from .models import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model or DEFAULT_MODEL, args.cache_dir))
        print("Token sequences as the model sees them; the loss is on the part between [[ and ]].\n")
    for example in chosen:
        print(f"=== {example.uid} ({args.split}) ===")
        if tokenizer is None:
            print(f"{render_prompt(example)} {example.answer}\n")
            continue
        feature = encode_example(tokenizer, example, args.chat_template, args.max_length)
        start = next(i for i, label in enumerate(feature["labels"]) if label >= 0)
        ids = feature["input_ids"]
        print(f"{tokenizer.decode(ids[:start])}[[{tokenizer.decode(ids[start:])}]]")
        print(f"({len(ids)} tokens, {len(ids) - start} with loss)\n")
    return 0


def _add_show(subparsers) -> None:
    parser = subparsers.add_parser("show", help="print a few examples of a task exactly as the model sees them")
    parser.add_argument("task", help="a task name (see `rlora tasks`) or one defined in a --data file")
    parser.add_argument("-n", type=int, default=3, help="how many examples (default: %(default)s)")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--chat-template", action="store_true", help="wrap in the model's chat template")
    parser.add_argument(
        "--model", help=f"show the tokenized sequence for this model (default with --chat-template: {DEFAULT_MODEL})"
    )
    parser.add_argument("--max-length", type=int, default=512, help="truncation length in tokens")
    parser.add_argument("--cache-dir", help="where the embedded model is converted (default: $RLORA_CACHE_DIR)")
    _add_data_options(parser)
    parser.set_defaults(func=_show)


SUBCOMMANDS = (_add_tasks, _add_show)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlora", description="R-LoRA multi-task fine-tuning.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("rlora").setLevel(logging.INFO)
    try:
        return args.func(args)
    except (DataError, ValueError, EmbeddedModelMissing) as error:
        print(f"rlora: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
