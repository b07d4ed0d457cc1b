"""Startup benchmark: wall time of `rlora --help` and `rlora tasks` in fresh processes, against `python -c pass`.

Each command runs as its own process, the commands round-robin (the order rotating every round) after an untimed
warm-up run each (file cache); we report the median. The last row, a process that imports PEFT (and so torch and
transformers), is what every `rlora` command paid before the command line learned to start without them.

    python benchmarks/bench_startup.py [--quick] [--repeats 10]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from _common import bench_main, host_line, interleaved_median_times

from rlora.reports import markdown_table

TARGET_S = 1.0


def commands() -> dict[str, list[str]]:
    script = Path(sys.executable).parent / "rlora"  # the console script beside this interpreter, as installed
    rlora = [str(script)] if script.is_file() else [sys.executable, "-m", "rlora"]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "rlora --help": [*rlora, "--help"],
        "rlora tasks": [*rlora, "tasks"],
        "python -c 'import rlora, peft' (for comparison)": [sys.executable, "-c", "import rlora, peft"],
    }


def run(args: argparse.Namespace) -> str:
    cmds = commands()
    if args.quick:
        cmds.pop("python -c 'import rlora, peft' (for comparison)")
    calls = {
        name: lambda cmd=cmd: subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True) for name, cmd in cmds.items()
    }
    times = interleaved_median_times(calls, args.repeats, args.warmup, torch.device("cpu"))
    base = times["python -c pass"]
    rows = [
        [name, f"{t:.3f}", f"{t - base:.3f}", "–" if name.startswith("python") else ("yes" if t < TARGET_S else "no")]
        for name, t in times.items()
    ]
    header = ["command", "median s", "s above `python -c pass`", f"under {TARGET_S:.0f} s"]
    note = f"\nMedians of {args.repeats} interleaved runs after {args.warmup} warm-up, each a fresh process."
    note += f" Machine: {host_line()}."
    return markdown_table(header, rows) + "\n" + note


def main(argv: list[str] | None = None) -> str:
    return bench_main(argv, __doc__, lambda _parser: None, run, repeats=10, warmup=1, torch_options=False)


if __name__ == "__main__":
    main(sys.argv[1:])
