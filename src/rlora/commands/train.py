"""`rlora train`: trains an adapter on a task mixture (`train.train`) into the run config's output_dir."""

from __future__ import annotations

import argparse

from ..run import RunFolder
from ..runconfig import load_run_config
from ..train import train


def run(args: argparse.Namespace) -> int:
    run_dir = train(load_run_config(args.config, args.overrides), resume=args.resume, cache_dir=args.cache_dir)
    print(f"adapter written to {RunFolder(run_dir).adapter}; evaluate it with: rlora eval {run_dir}")
    return 0
