"""`rlora train`: trains an adapter on a task mixture (`train.train`) into the run config's output_dir."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..run import RunFolder
from ..runconfig import load_run_config
from ..train import train


def run(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.overrides)
    if args.accept_changed_data and not args.resume:
        raise ConfigError("--accept-changed-data: goes with --resume (a run resumed on data that changed)")
    run_dir = train(cfg, resume=args.resume, cache_dir=args.cache_dir, accept_changed_data=args.accept_changed_data)
    print(f"adapter written to {RunFolder(run_dir).adapter}; evaluate it with: rlora eval {run_dir}")
    return 0
