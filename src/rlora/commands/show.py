"""`rlora show`: a few examples of a task exactly as the model sees them (text, or tokens with the trained part)."""

from __future__ import annotations

import argparse

from ..data import check_task_name, encode_example, gold_pair, load_task
from ..data.example import turn_pieces
from ..data.split import split_positions
from ..data.store import ListTask
from ..models import DEFAULT_MODEL, load_tokenizer
from .tasks import user_tasks


def run(args: argparse.Namespace) -> int:
    user = user_tasks(args, args.format)
    if args.task in user:
        examples = user[args.task]
    else:
        examples = ListTask(args.task, load_task(check_task_name(args.task)), args.format)
    train, _, test = split_positions(examples.split_keys(), args.test_fraction)
    chosen = examples.take((test if args.split == "test" else train)[: args.n])
    tokenizer = None
    if args.model or args.chat_template:
        tokenizer = load_tokenizer(args.model or DEFAULT_MODEL, args.cache_dir, chat_template=args.chat_template)
        print("Token sequences as the model sees them; the loss is on the part between [[ and ]].\n")
    for example in chosen:
        print(f"=== {example.uid} ({args.split}) ===")
        if tokenizer is None:
            if example.turns is not None:  # a conversation: every reply is trained
                pieces = turn_pieces(example.turns)
                context = "".join(f"[[{text}]]" if trained else text for text, trained in pieces)
            else:
                context = gold_pair(example)[0]
            print(f"{context} [[{gold_pair(example)[1]}]]\n")
            continue
        feature = encode_example(tokenizer, example, args.chat_template, args.max_length)
        ids, trained = feature["input_ids"], [label >= 0 for label in feature["labels"]]
        runs, start = [], 0
        for i in range(1, len(ids) + 1):  # runs of tokens with and without loss
            if i == len(ids) or trained[i] != trained[start]:
                text = tokenizer.decode(ids[start:i])
                runs.append(f"[[{text}]]" if trained[start] else text)
                start = i
        print("".join(runs))
        print(f"({len(ids)} tokens, {sum(trained)} with loss)\n")
    return 0
