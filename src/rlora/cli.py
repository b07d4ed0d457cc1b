"""The `rlora` command: the parsers of its verbs, and the mapping of errors to exit codes.

What a verb does lives in `commands/<verb>.py`, as `run(args)` (the parsed arguments; it returns the exit code).
Add a verb with an `_add_<name>(subparsers)` function here that registers its parser and sets
`func=_command("<module>")`, and list it in `SUBCOMMANDS`.

It starts fast: what is imported here at the top loads neither torch nor PEFT nor transformers (a test pins it);
a verb's module is imported when it runs. Errors a user can fix (`errors.RloraError`) print one line and
exit 2 (1 when training stopped); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from .data import DEFAULT_FORMAT, DEFAULT_TEST_FRACTION, FORMATS
from .data.split import bad_test_fraction
from .errors import RloraError, TrainingError, one_line
from .methods import METHOD_SPELLINGS, METHODS
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


def _add_cache(subparsers) -> None:
    parser = subparsers.add_parser(
        "cache", help="list the data cache (your files read into Arrow tables) and remove stale or all tables"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--clear-stale", action="store_true", help="remove the tables of files changed or gone")
    group.add_argument("--clear", action="store_true", help="remove every table (files are read again when used)")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="hash every byte of each table and its source (a run checks only their sizes, times and inodes once a "
        "full check has passed)",
    )
    parser.add_argument(
        "--cache-dir",
        help="rlora's cache, whose data/ folder holds the tables (default: $RLORA_DATA_CACHE, else "
        "$RLORA_CACHE_DIR/data)",
    )
    parser.set_defaults(func=_command("cache"))


def _add_tasks(subparsers) -> None:
    parser = subparsers.add_parser("tasks", help="list the tasks with their sizes (total/train/test)")
    parser.add_argument("--mmlu", action="store_true", help="also list the MMLU subjects")
    _add_data_options(parser)
    parser.set_defaults(func=_command("tasks"))


def _add_show(subparsers) -> None:
    parser = subparsers.add_parser("show", help="print a few examples of a task exactly as the model sees them")
    parser.add_argument("task", help="a task name (see `rlora tasks`) or one defined in a --data file")
    parser.add_argument("-n", type=positive_int, default=3, help="how many examples (default: %(default)s)")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--chat-template", action="store_true", help="wrap in the model's chat template")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=DEFAULT_FORMAT,
        help="multiple choice as cloze (rc: the choice's text) or lettered/word labels (mc) (default: %(default)s)",
    )
    parser.add_argument(
        "--model", help=f"show the tokenized sequence for this model (default with --chat-template: {DEFAULT_MODEL})"
    )
    parser.add_argument("--max-length", type=positive_int, default=512, help="truncation length in tokens")
    _add_cache_dir(parser)
    _add_data_options(parser)
    parser.set_defaults(func=_command("show"))


def _add_cache_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", help="where the embedded model is converted (default: $RLORA_CACHE_DIR)")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="override any config key, e.g. training.lr=1e-4"
    )
    _add_cache_dir(parser)


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train an adapter on a task mixture (Hugging Face Trainer)")
    parser.add_argument("config", help="a run config YAML file, or a preset name (demo, paper-qwen2.5-0.5b)")
    _add_run_options(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    parser.add_argument(
        "--accept-changed-data",
        action="store_true",
        help="with --resume: train on although the task data changed since the checkpoint (refused otherwise)",
    )
    parser.set_defaults(func=_command("train"))


def _add_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="per-task accuracy and loss of a trained run (or a base model) on held-out data"
    )
    parser.add_argument(
        "target", help="a run folder (from `rlora train`), or a config/preset to evaluate its base model"
    )
    parser.add_argument("--base", action="store_true", help="evaluate the run's base model without the adapter")
    parser.add_argument(
        "--adapter",
        metavar="DIR",
        help="evaluate this adapter folder (e.g. from `rlora export`) on the run's held-out data instead of the run's",
    )
    parser.add_argument(
        "--out",
        metavar="FILE.json",
        help="with --adapter: where its results go (default: RUN_DIR/eval_adapter_<its folder name>.json), beside a "
        ".md table; never into the adapter folder",
    )
    _add_run_options(parser)
    parser.set_defaults(func=_command("eval"))


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="R-LoRA on the embedded SmolLM2-135M and 4 real tasks: train, evaluate base and tuned"
    )
    _add_run_options(parser)
    parser.set_defaults(func=_command("demo"))


def _add_compare(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="train and evaluate several methods over seeds, with 95%% CIs; with --lr each at its own best rate",
        description="Trains and evaluates every method at every seed on the same data, split and budget, and writes "
        "OUT/comparison.md/.json/.png (means, 95% CIs, paired differences, router health). With --lr or --sweep, "
        "each method first trains once per value at the first seed on the training examples minus a validation "
        "split carved from them (never the test split), keeps the value with the lowest validation loss, then "
        "runs every seed at it. Finished runs are reused.",
    )
    parser.add_argument("config", help="a run config YAML file or preset: data, budget and adapter settings")
    parser.add_argument(
        "--methods",
        default="hydralora,rlora",
        help=f"comma-separated, from {', '.join(METHODS)}, or {METHOD_SPELLINGS}; differences are taken to the "
        "first (default: %(default)s)",
    )
    parser.add_argument("--seeds", type=positive_int, default=3, help="number of seeds (default: %(default)s)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed+1, ...")
    parser.add_argument("--output", help="comparison folder (default: the config's output_dir)")
    parser.add_argument(
        "--lr",
        metavar="V1,V2,...",
        help="learning rates to choose from per method on the validation split (--sweep training.lr=V1,V2,...)",
    )
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a training.* or adapter.* setting to choose per method the same way (repeat for a grid), e.g. "
        "adapter.r=4,8; the validation split is data.validation_fraction of the training examples",
    )
    _add_run_options(parser)
    parser.set_defaults(func=_command("compare"))


def _add_plan(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="from a finished comparison, the seeds and test examples that would resolve a given effect",
        description="Reads OUT/comparison.json of `rlora compare` (a pilot) and prints, per paired difference, task "
        "and on average, the fewest test examples per task that resolve EFFECT at 95% with 80% power, for each "
        "number of seeds (docs/planning.md).",
    )
    parser.add_argument("comparison", help="a comparison folder (or its comparison.json)")
    parser.add_argument(
        "--effect", type=float, required=True, help="the difference to resolve, in points (accuracies) or nats (loss)"
    )
    parser.add_argument(
        "--metric",
        default="acc_ll",
        choices=["acc_ll", "acc_norm", "acc_gen", "loss"],
        help="the metric (default: %(default)s)",
    )
    parser.set_defaults(func=_command("plan"))


def _add_analyze(subparsers) -> None:
    parser = subparsers.add_parser("analyze", help="head similarity, router usage per task, and plots of a run")
    parser.add_argument("run_dir", help="a run folder of a multi-head method")
    parser.add_argument(
        "--max-prompts", type=positive_int, default=64, help="held-out prompts per task for router usage"
    )
    _add_cache_dir(parser)
    parser.set_defaults(func=_command("analyze"))


def _add_curves(subparsers) -> None:
    parser = subparsers.add_parser(
        "curves", help="draw a run's training loss, validation losses and router telemetry from its train_log.jsonl"
    )
    parser.add_argument("run_dir", help="a run folder, finished or not (a killed run's log is drawn too)")
    parser.set_defaults(func=_command("curves"))


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
    parser.add_argument(
        "--adapter",
        metavar="DIR",
        help="generate with this adapter folder (e.g. an `rlora export`: the fixed-gate model) on the run's base",
    )
    _add_cache_dir(parser)
    parser.set_defaults(func=_command("generate"))


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="a multi-head run as plain PEFT LoRA adapters (exact for fixed gates) that vLLM, TGI, llama.cpp load",
        description="Fixed gates make an R-LoRA/HydraLoRA layer exactly a plain LoRA layer (rank r, 2r with "
        "R-LoRA's offset). The export loses the per-token routing: `rlora eval RUN_DIR --adapter DIR` says what that "
        "costs.",
    )
    parser.add_argument("run_dir", help="a finished run folder of a multi-head method")
    parser.add_argument(
        "--gates",
        default="uniform",
        help="uniform (1/K every head), task:NAME (that task's mean gates per layer on its training examples), "
        "per-task (one export per task, in OUT/<task>/), or a JSON file: K gates, or module name -> K gates "
        "(default: %(default)s)",
    )
    parser.add_argument("--out", required=True, help="the folder to write (per-task: one folder per task inside)")
    parser.add_argument(
        "--merged", action="store_true", help="write a full model (safetensors) with the update merged in instead"
    )
    parser.add_argument(
        "--max-examples",
        type=positive_int,
        default=256,
        help="training examples per task that measure its mean gates (default: %(default)s)",
    )
    parser.add_argument(
        "--format",
        choices=("peft", "gguf"),
        default="peft",
        help="peft: the PEFT LoRA folder; gguf: also a llama.cpp adapter in it (default: %(default)s)",
    )
    parser.add_argument(
        "--outtype", choices=("f32", "f16", "q8_0"), default="f32", help="the GGUF adapter's type (default: f32)"
    )
    parser.add_argument(
        "--as-scales",
        action="store_true",
        help="export the K heads (and R-LoRA's offset) as adapters on a shared A, with a table of each task's scales "
        "for servers that mix adapters per request (llama.cpp)",
    )
    parser.add_argument(
        "--max-loss-rise",
        type=float,
        default=0.05,
        help="warn when a task's held-out loss rises by more than this many nats with fixed gates (default: 0.05)",
    )
    parser.add_argument("--no-fidelity", action="store_true", help="do not score the export against the routed model")
    _add_cache_dir(parser)
    parser.set_defaults(func=_command("export"))


def _add_serve(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve trained runs with their routing behind an OpenAI-compatible API (/v1/chat/completions, ...)",
        description="One base model, each run an adapter on it, chosen by the request's `model` (the run folder's "
        "name). Stop with Ctrl-C or SIGTERM.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run folders sharing one base model")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="(default: %(default)s; 0: any free port)")
    parser.add_argument(
        "--max-model-len", type=positive_int, help="context limit in tokens (default: the model's position limit)"
    )
    parser.add_argument(
        "--api-key",
        help="require `Authorization: Bearer KEY` on /v1 (default: the RLORA_API_KEY environment variable, or none)",
    )
    parser.add_argument(
        "--max-batch", type=positive_int, default=8, help="rows decoded together (default: %(default)s)"
    )
    parser.add_argument(
        "--max-queue",
        type=positive_int,
        default=64,
        help="requests waiting for a row; past it a 503 with Retry-After (default: %(default)s)",
    )
    parser.add_argument(
        "--request-timeout",
        type=positive_int,
        default=600,
        help="seconds from a request's arrival to its last token (default: %(default)s)",
    )
    parser.add_argument("--max-body-bytes", type=positive_int, default=1_000_000, help="(default: %(default)s)")
    parser.add_argument(
        "--max-prompt-chars",
        type=positive_int,
        default=200_000,
        help="characters of a prompt or of all messages together (default: %(default)s)",
    )
    parser.add_argument(
        "--max-messages", type=positive_int, default=256, help="messages in a chat request (default: %(default)s)"
    )
    _add_cache_dir(parser)
    parser.set_defaults(func=_command("serve"))


def _add_lm_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "lm-eval",
        add_help=False,
        help="lm-eval-harness with rlora registered: every argument goes to lm-eval (`rlora lm-eval --help`)",
    )
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    parser.set_defaults(func=_command("lm_eval"))


def _command(module: str) -> Callable[[argparse.Namespace], int]:
    """The verb's work: `run` of `rlora.commands.<module>`, imported only when the verb runs (so that `rlora --help`
    and the data commands load neither torch nor PEFT)."""

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(f"{__package__}.commands.{module}").run(args)

    return run


SUBCOMMANDS = (
    _add_tasks,
    _add_cache,
    _add_show,
    _add_train,
    _add_eval,
    _add_demo,
    _add_compare,
    _add_plan,
    _add_analyze,
    _add_curves,
    _add_generate,
    _add_export,
    _add_serve,
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
        args, extra = argparse.Namespace(command="lm-eval", func=_command("lm_eval"), lm_eval_args=argv[1:]), []
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
        print(f"rlora: training stopped: {one_line(error)}", file=sys.stderr)
        return 1
    except RloraError as error:  # bad input, a missing package or file: what the user can fix
        print(f"rlora: error: {one_line(error)}", file=sys.stderr)
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
