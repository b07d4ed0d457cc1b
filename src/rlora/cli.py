"""The `rlora` command. Thin: each subcommand parses its arguments and calls the library.

Add a subcommand with an `_add_<name>(subparsers)` function that registers its parser and sets `func`
(a function of the parsed arguments returning the exit code), and list it in `SUBCOMMANDS`.

It starts fast: what is imported here at the top loads neither torch nor PEFT nor transformers (a test pins it);
a subcommand imports what it needs when it runs. Errors a user can fix (`errors.RloraError`) print one line and
exit 2 (1 when training stopped); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .data import (
    DEFAULT_TEST_FRACTION,
    FORMATS,
    check_task_name,
    encode_example,
    gold_pair,
    list_tasks,
    load_task,
    with_default_format,
)
from .data.example import turn_pieces
from .data.split import bad_test_fraction, split_keys
from .errors import ConfigError, MissingPackage, RloraError, TrainingError
from .methods import METHODS
from .models import DEFAULT_MODEL


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def held_out_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    interval = bad_test_fraction(value)
    if interval is not None:
        raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {value}")
    return value


def _user_tasks(args: argparse.Namespace) -> dict:
    """The --data files' tasks (`data.store.TaskData`: rows of a cached Arrow table, read once)."""
    if not args.data:
        return {}

    from .data.files import DataFile
    from .data.store import file_tasks

    return file_tasks([DataFile.from_config(p, f"--data {p}") for p in args.data], reserved=list_tasks())


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="FILE",
        help="a file of your own tasks (JSONL, JSON, CSV, Parquet or a saved datasets folder; rlora's schema, "
        "Alpaca, ShareGPT or chat messages, detected)",
    )
    parser.add_argument(
        "--test-fraction",
        type=held_out_fraction,
        default=DEFAULT_TEST_FRACTION,
        help="share of each task held out for testing (default: %(default)s)",
    )


def _tasks(args: argparse.Namespace) -> int:
    tasks = {name: load_task(name) for name in list_tasks(include_mmlu=args.mmlu)}
    tasks.update(_user_tasks(args))
    width = max(len(name) for name in tasks)
    print(f"{'task':<{width}}  {'total':>6}  {'train':>6}  {'test':>6}")
    for name, examples in tasks.items():
        n_test = int((_split_keys(examples) < args.test_fraction).sum())
        print(f"{name:<{width}}  {len(examples):>6}  {len(examples) - n_test:>6}  {n_test:>6}")
    if not args.mmlu:
        print("(add --mmlu to list the 57 MMLU subjects, tasks mmlu_<subject>)")
    return 0


def _split_keys(examples):
    """The split key of each example of a task: a built-in task's list, or a file's `TaskData`, which stores them."""
    return examples.split_keys() if hasattr(examples, "split_keys") else split_keys(examples)


def _cache(args: argparse.Namespace) -> int:
    import shutil

    from .data.store import cached_tables, data_cache

    tables = cached_tables(args.cache_dir)
    removed = [t for t in tables if t.state != "building" and (args.clear or (args.clear_stale and t.stale))]
    for table in removed:
        shutil.rmtree(table.folder, ignore_errors=True)
    kept = [t for t in tables if t not in removed]
    print(f"data cache: {data_cache(args.cache_dir)}")
    states = {
        "stale": "stale (its file changed or is gone)",
        "damaged": "damaged (its files are not those it wrote)",
        "partial": "partial (a build that was cut short)",
        "building": "being built by another process",
    }
    for table in kept:
        source = table.source or {}
        state = states.get(table.state, f"{source.get('examples', '?')} examples")
        print(f"  {table.bytes / 1e6:8.1f} MB  {source.get('path', table.folder.name)}: {state}")
    mb = sum(t.bytes for t in kept) / 1e6
    print(f"{len(kept)} tables, {mb:.1f} MB" + (f"; removed {len(removed)}" if removed else ""))
    if any(t.stale for t in kept):
        print("rlora cache --clear-stale removes the stale, damaged and partial ones")
    return 0


def _add_cache(subparsers) -> None:
    parser = subparsers.add_parser(
        "cache", help="list the data cache (your files read into Arrow tables) and remove stale or all tables"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--clear-stale", action="store_true", help="remove the tables of files changed or gone")
    group.add_argument("--clear", action="store_true", help="remove every table (files are read again when used)")
    parser.add_argument(
        "--cache-dir",
        help="rlora's cache, whose data/ folder holds the tables (default: $RLORA_DATA_CACHE, else "
        "$RLORA_CACHE_DIR/data)",
    )
    parser.set_defaults(func=_cache)


def _add_tasks(subparsers) -> None:
    parser = subparsers.add_parser("tasks", help="list the tasks with their sizes (total/train/test)")
    parser.add_argument("--mmlu", action="store_true", help="also list the MMLU subjects")
    _add_data_options(parser)
    parser.set_defaults(func=_tasks)


def _show(args: argparse.Namespace) -> int:
    user = _user_tasks(args)
    examples = user[args.task] if args.task in user else load_task(check_task_name(args.task))
    in_test = _split_keys(examples) < args.test_fraction
    positions = [i for i, t in enumerate(in_test) if t == (args.split == "test")][: args.n]
    chosen = [with_default_format(examples[i], args.format) for i in positions]
    tokenizer = None
    if args.model or args.chat_template:
        from .models import load_tokenizer

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


def _add_show(subparsers) -> None:
    parser = subparsers.add_parser("show", help="print a few examples of a task exactly as the model sees them")
    parser.add_argument("task", help="a task name (see `rlora tasks`) or one defined in a --data file")
    parser.add_argument("-n", type=positive_int, default=3, help="how many examples (default: %(default)s)")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--chat-template", action="store_true", help="wrap in the model's chat template")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="rc",
        help="multiple choice as cloze (rc: the choice's text) or lettered/word labels (mc) (default: %(default)s)",
    )
    parser.add_argument(
        "--model", help=f"show the tokenized sequence for this model (default with --chat-template: {DEFAULT_MODEL})"
    )
    parser.add_argument("--max-length", type=positive_int, default=512, help="truncation length in tokens")
    _add_cache_dir(parser)
    _add_data_options(parser)
    parser.set_defaults(func=_show)


def _add_cache_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", help="where the embedded model is converted (default: $RLORA_CACHE_DIR)")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="override any config key, e.g. training.lr=1e-4"
    )
    _add_cache_dir(parser)


def _train(args: argparse.Namespace) -> int:
    from .run import RunFolder
    from .runconfig import load_run_config
    from .train import train

    run_dir = train(load_run_config(args.config, args.overrides), resume=args.resume, cache_dir=args.cache_dir)
    print(f"adapter written to {RunFolder(run_dir).adapter}; evaluate it with: rlora eval {run_dir}")
    return 0


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train an adapter on a task mixture (Hugging Face Trainer)")
    parser.add_argument("config", help="a run config YAML file, or a preset name (demo, paper-qwen2.5-0.5b)")
    _add_run_options(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    parser.set_defaults(func=_train)


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .reports import results_table
    from .run import RunFolder, evaluate_config, evaluate_run
    from .runconfig import load_run_config

    if not Path(args.target).is_dir():  # a config: evaluate its base model alone, into its output_dir
        cfg = load_run_config(args.target, args.overrides)
        folder, args.base = RunFolder(cfg.output_dir), True
        results = evaluate_config(cfg, args.cache_dir)
    elif args.overrides:
        raise ConfigError("overrides apply to a config file; a run folder is evaluated with its own config")
    else:
        folder = RunFolder(args.target)
        results = evaluate_run(folder.root, args.cache_dir, base=args.base)
    print(results_table({"base" if args.base else results["method"]: results}))
    print(f"written to {folder.results(args.base)} and {folder.results(args.base, '.md')}")
    return 0


def _add_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="per-task accuracy and loss of a trained run (or a base model) on held-out data"
    )
    parser.add_argument(
        "target", help="a run folder (from `rlora train`), or a config/preset to evaluate its base model"
    )
    parser.add_argument("--base", action="store_true", help="evaluate the run's base model without the adapter")
    _add_run_options(parser)
    parser.set_defaults(func=_eval)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    print(run_demo(args.overrides, args.cache_dir))
    return 0


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="R-LoRA on the embedded SmolLM2-135M and 4 real tasks: train, evaluate base and tuned"
    )
    _add_run_options(parser)
    parser.set_defaults(func=_demo)


def _compare(args: argparse.Namespace) -> int:
    from .compare import compare, parse_methods
    from .reports import comparison_markdown
    from .runconfig import load_run_config

    methods = parse_methods(args.methods)
    base = load_run_config(args.config, args.overrides)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    summary = compare(base, methods, seeds, args.output or base.output_dir, cache_dir=args.cache_dir)
    print(comparison_markdown(summary))
    return 0


def _add_compare(subparsers) -> None:
    parser = subparsers.add_parser("compare", help="train and evaluate several methods over seeds, with 95%% CIs")
    parser.add_argument("config", help="a run config YAML file or preset: data, budget and adapter settings")
    parser.add_argument(
        "--methods",
        default="hydralora,rlora",
        help=f"comma-separated, from {', '.join(METHODS)} (default: %(default)s)",
    )
    parser.add_argument("--seeds", type=positive_int, default=3, help="number of seeds (default: %(default)s)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed+1, ...")
    parser.add_argument("--output", help="comparison folder (default: the config's output_dir)")
    _add_run_options(parser)
    parser.set_defaults(func=_compare)


def _analyze(args: argparse.Namespace) -> int:
    from .reports import analysis_summary
    from .run import RunFolder, analyze_run

    data = analyze_run(args.run_dir, args.cache_dir, max_prompts_per_task=args.max_prompts)
    print("\n".join(analysis_summary(data)))
    print(f"tables and plots written to {RunFolder(args.run_dir).analysis}/")
    return 0


def _add_analyze(subparsers) -> None:
    parser = subparsers.add_parser("analyze", help="head similarity, router usage per task, and plots of a run")
    parser.add_argument("run_dir", help="a run folder of a multi-head method")
    parser.add_argument(
        "--max-prompts", type=positive_int, default=64, help="held-out prompts per task for router usage"
    )
    _add_cache_dir(parser)
    parser.set_defaults(func=_analyze)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def probability(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def _generate(args: argparse.Namespace) -> int:
    from .generate import Sampling, check_routing_path, generate_run

    check_routing_path(args.routing)
    prompts = args.prompts or [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
    sampling = Sampling(args.max_new_tokens, args.do_sample, args.temperature, args.top_p)
    generate_run(
        args.run_dir,
        prompts,
        sampling=sampling,
        chat_template=args.chat_template,
        routing=args.routing,
        cache_dir=args.cache_dir,
    )
    if args.routing:
        print(f"routing map written to {args.routing}")
    return 0


def _add_generate(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate text with a trained run, optionally mapping its routing")
    parser.add_argument("run_dir", help="a run folder (from `rlora train`)")
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (default: one per line from stdin)")
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap each prompt in the model's chat template (default: as the run was trained)",
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="(default: %(default)s)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=positive_float, default=1.0, help="with --do-sample (default: 1.0)")
    parser.add_argument("--top-p", type=probability, default=1.0, help="with --do-sample (default: 1.0)")
    parser.add_argument(
        "--routing",
        metavar="FILE.png|FILE.html",
        help="also draw the head each adapted layer's router favours at every token (multi-head runs)",
    )
    _add_cache_dir(parser)
    parser.set_defaults(func=_generate)


LM_EVAL_HINT = 'pip install "rlora[lm-eval]"'


def lm_eval_argv(argv: Sequence[str], cache_dir: str | None = None) -> list[str]:
    """lm-eval's own arguments with `pretrained=<embedded model name>` in --model_args (-a) replaced by the model's
    converted folder (`models.resolve_model`, converting it on first use); every other argument unchanged."""
    from .models import EMBEDDED_MODELS, resolve_model

    def resolve(value: str) -> str:
        parts = value.split(",")
        for i, part in enumerate(parts):
            key, sep, name = part.partition("=")
            if sep and key.strip() == "pretrained" and name.strip() in EMBEDDED_MODELS:
                parts[i] = f"{key}={resolve_model(name.strip(), cache_dir)}"
        return ",".join(parts)

    out, in_model_args = [], False
    for arg in argv:
        if arg.startswith("--model_args="):
            out.append("--model_args=" + resolve(arg.partition("=")[2]))
            in_model_args = False
            continue
        if arg.startswith("-"):
            in_model_args = arg in ("--model_args", "-a")
        elif in_model_args:
            arg = resolve(arg)
        out.append(arg)
    return out


def _split_cache_dir(argv: Sequence[str]) -> tuple[list[str], str | None]:
    """rlora's --cache-dir taken out of lm-eval's arguments (lm-eval spells its options with underscores)."""
    rest, cache_dir, args = [], None, iter(argv)
    for arg in args:
        if arg == "--cache-dir":
            cache_dir = next(args, None)
            if cache_dir is None:
                raise ConfigError("--cache-dir: expected a folder")
        elif arg.startswith("--cache-dir="):
            cache_dir = arg.partition("=")[2]
        else:
            rest.append(arg)
    return rest, cache_dir


def run_lm_eval(argv: Sequence[str]) -> int:
    """lm-eval-harness's command line (`lm_eval.__main__.cli_evaluate`) with rlora registered with PEFT first, so that
    `--model_args pretrained=MODEL,peft=RUN_DIR/adapter` loads an rlora adapter; `argv` is passed through."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise MissingPackage(f"lm-eval-harness is not installed; install it with: {LM_EVAL_HINT}")
    argv, cache_dir = _split_cache_dir(argv)
    argv = lm_eval_argv(argv, cache_dir)
    check_lm_eval_paths(argv)
    import peft  # noqa: F401  (rlora is imported: loading PEFT registers the rlora PEFT type with it)
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as done:  # lm-eval's argparse (--help, bad arguments) exits; keep its code
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except (ValueError, OSError, KeyError) as error:  # lm-eval's (and transformers') errors for what it was given
        raise ConfigError(f"lm-eval: {' '.join(str(error).split())}") from None
    finally:
        sys.argv = saved
    return 0


def check_lm_eval_paths(argv: Sequence[str]) -> None:
    """A local `pretrained=` model folder or `peft=` adapter folder in --model_args that does not exist, or is not a
    model (config.json) or adapter (adapter_config.json) folder: one line before lm-eval starts. A value that is
    not a local path is a Hub id, left to lm-eval."""
    from pathlib import Path

    needs = {"pretrained": "config.json", "peft": "adapter_config.json"}
    kinds = {"pretrained": "a model folder", "peft": "an adapter folder"}
    values = [arg.partition("=")[2] if arg.startswith("--model_args=") else arg for arg in argv]
    for value in values:
        for part in value.split(","):
            key, sep, name = part.partition("=")
            key, name = key.strip(), name.strip()
            if not sep or key not in needs:
                continue
            path = Path(name).expanduser()
            local = path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1
            if local and not (path / needs[key]).is_file():
                what = "no such folder" if not path.exists() else f"no {needs[key]} in it"
                raise ConfigError(f"lm-eval: --model_args {key}={name}: {what}; give {kinds[key]} ({needs[key]})")


def _lm_eval(args: argparse.Namespace) -> int:
    return run_lm_eval(args.lm_eval_args)


def _add_lm_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "lm-eval",
        add_help=False,
        help="lm-eval-harness with rlora registered: every argument goes to lm-eval (`rlora lm-eval --help`)",
    )
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    parser.set_defaults(func=_lm_eval)


SUBCOMMANDS = (
    _add_tasks,
    _add_cache,
    _add_show,
    _add_train,
    _add_eval,
    _add_demo,
    _add_compare,
    _add_analyze,
    _add_generate,
    _add_lm_eval,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlora", description="R-LoRA multi-task fine-tuning.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # every argument is lm-eval's, options included: argparse must not read them
        args, extra = argparse.Namespace(command="lm-eval", func=_lm_eval, lm_eval_args=argv[1:]), []
    else:
        args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may follow options too (`rlora compare c.yaml --seeds 2 training.lr=1e-4`)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("rlora").setLevel(logging.INFO)
    try:
        return args.func(args)
    except TrainingError as error:
        print(f"rlora: training stopped: {error}", file=sys.stderr)
        return 1
    except RloraError as error:  # bad input, a missing package or file: what the user can fix
        print(f"rlora: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = "; `rlora train CONFIG --resume` continues from the last checkpoint" if args.command == "train" else ""
        print(f"rlora: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left early (`rlora tasks | head`): stop quietly, as other commands do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush cannot fail
        return 141


if __name__ == "__main__":
    sys.exit(main())
