"""`rlora lm-eval`: lm-eval-harness's own command line with rlora registered with PEFT, and the embedded model's name
resolved to its converted folder."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError, MissingPackage

LM_EVAL_HINT = 'pip install "rlora[lm-eval]"'


def lm_eval_argv(argv: Sequence[str], cache_dir: str | None = None) -> list[str]:
    """lm-eval's own arguments with `pretrained=<embedded model name>` in --model_args (-a) replaced by the model's
    converted folder (`models.resolve_model`, converting it on first use); every other argument unchanged."""
    from ..models import EMBEDDED_MODELS, resolve_model

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


def run(args: argparse.Namespace) -> int:
    return run_lm_eval(args.lm_eval_args)
