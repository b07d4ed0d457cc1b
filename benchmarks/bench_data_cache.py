"""Warm start of the data cache: what a run pays to check and map the cached tables of a large mixture, this checkout
against earlier revisions of the cache, and what a full check (`rlora cache --verify`) costs.

The mixture is `bench_data_scale.py`'s synthetic one (four JSONL task files, N/4 lines each, ~90 bytes a line),
written once under `--workdir` and reused. Each data path (`new`: this checkout's `src/`; each `--baselines`
revision, checked out with `git worktree add --detach` into a temporary folder) gets a data cache folder of its own
(`RLORA_DATA_CACHE`), filled by an untimed process that reads the four files into tables; then, after `RACY_WAIT_S`
(so that no file is recent enough to be checked in full again: `store.RACY_NS`), `--warmup` untimed warm starts (the
first one is this checkout's full check, which records the files' identities), then `--repeats` timed rounds, the
paths in turn, the order rotating every round. A warm start is a fresh process that imports rlora and calls
`store.load_file` on the four files (what `rlora train` does before splitting); measured inside it: the seconds of
those four calls (the check and the map; the imports are the same for every path and not counted), and outside it,
the process's wall time. Then, for this checkout only and interleaved the same way, fresh `python -m rlora cache` and
`python -m rlora cache --verify` processes on its cache: the listing checks identities as a run does, `--verify`
hashes every byte of every table and source. All with the data files and the tables in the page cache (read once
before timing): the cold-cache case reads from disk what the hash reads, which only widens the gap.

Defaults: 1,000,000 examples; baselines 77e8407 (every byte of the source and the table hashed on every start) and
ecf3631 (before the cache checked anything but the file's size and time).

    nice -n 10 python benchmarks/bench_data_cache.py [--size 1000000] [--baselines 77e8407,ecf3631] [--repeats 5]
        [--warmup 1] [--workdir DIR] [--json FILE] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import bench_main, host_line
from bench_data_scale import (
    DATA_CACHE_ENV,
    baseline_worktree,
    check_imports,
    checkout_label,
    child_env,
    mixture_files,
    parse_size,
    read_files,
    write_json_atomically,
)

from rlora.reports import markdown_table

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SIZE = 1_000_000
QUICK_SIZE = 2000
DEFAULT_BASELINES = "77e8407,ecf3631"
RACY_WAIT_S = 2.5  # > store.RACY_NS: the tables' files are then old enough to be trusted by their identity
LOAD = """
import sys, time
from rlora.data.files import DataFile
from rlora.data.store import load_file
start = time.perf_counter()
tables = [load_file(DataFile(path, schema="rlora")) for path in sys.argv[1:]]
seconds = time.perf_counter() - start
print(seconds, sum(len(t) for t in tables))
"""


def warm_start(src: Path, cache: Path, files: list[Path]) -> tuple[float, float, int]:
    """(seconds in load_file, process wall seconds, examples) of one fresh process mapping the tables."""
    env = child_env(src, threads=1) | {DATA_CACHE_ENV: str(cache)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LOAD, *map(str, files)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"warm start with {src} failed:\n{done.stderr[-2000:]}")
    seconds, examples = done.stdout.split()[-2:]
    return float(seconds), wall, int(examples)


def cache_command(src: Path, cache: Path, *flags: str) -> float:
    env = child_env(src, threads=1) | {DATA_CACHE_ENV: str(cache)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "rlora", "cache", *flags], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0 or "damaged" in done.stdout or "stale" in done.stdout:
        raise RuntimeError(f"rlora cache {' '.join(flags)} failed or found a bad table:\n{done.stdout}{done.stderr}")
    return wall


def _rounds(variants: dict, repeats: int) -> dict[str, list]:
    """Each variant's `repeats` results, the variants run round-robin with the order rotating every round."""
    names, results = list(variants), {name: [] for name in variants}
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            results[name].append(variants[name]())
    return results


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "–"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=parse_size, default=DEFAULT_SIZE, help="examples (default %(default)s)")
    parser.add_argument(
        "--baselines", default=DEFAULT_BASELINES, help="git revisions to compare against, comma-separated"
    )
    parser.add_argument("--workdir", type=Path, help="where the data is written and reused (default: a temp folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--json", type=Path, help="also write the measurements to this JSON file")


def run(args: argparse.Namespace) -> str:
    size = QUICK_SIZE if args.quick else args.size
    revs = [r.strip() for r in args.baselines.split(",") if r.strip()]
    load_start = os.getloadavg()
    with contextlib.ExitStack() as stack:
        workdir = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="rlora-data-cache-"))
        if args.workdir is None:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        workdir.mkdir(parents=True, exist_ok=True)
        caches = Path(tempfile.mkdtemp(prefix=".caches-", dir=workdir))
        stack.callback(shutil.rmtree, caches, ignore_errors=True)
        srcs, labels = {"new": REPO / "src"}, {"new": f"this checkout {checkout_label()}"}
        for rev in revs:
            srcs[rev], sha = stack.enter_context(baseline_worktree(rev))
            labels[rev] = f"{sha}"
        for src in srcs.values():
            check_imports(src)
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], check=True, stdout=subprocess.DEVNULL)
        files, data_bytes = mixture_files(workdir, size, args.seed)
        read_files(files)
        for name, src in srcs.items():  # the tables, built untimed
            start = time.perf_counter()
            warm_start(src, caches / name, files)
            print(f"{name}: tables built in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        time.sleep(RACY_WAIT_S)
        for name, src in srcs.items():
            for _ in range(args.warmup):
                warm_start(src, caches / name, files)
            read_files(p for p in (caches / name).rglob("*"))
        table_bytes = sum(p.stat().st_size for p in (caches / "new").rglob("*") if p.is_file())
        starts = _rounds(
            {name: (lambda s=src, n=name: warm_start(s, caches / n, files)) for name, src in srcs.items()}, args.repeats
        )
        new_cache = caches / "new"
        commands = _rounds(
            {
                "rlora cache": lambda: cache_command(srcs["new"], new_cache),
                "rlora cache --verify": lambda: cache_command(srcs["new"], new_cache, "--verify"),
            },
            args.repeats,
        )
    load_end = os.getloadavg()
    medians = {
        name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for name, rs in starts.items()
    }
    assert len({r[2] for rs in starts.values() for r in rs}) == 1, "the paths served different numbers of examples"
    hashing = medians[revs[0]][0] if revs else None
    header = ["path", "load_file s (median)", "process wall s (median)"]
    header += [f"load_file / {labels[r]}" for r in revs]
    body = []
    for name in srcs:
        row = [
            labels[name] if name == "new" else f"rlora {labels[name]}",
            f"{medians[name][0]:.4f}",
            f"{medians[name][1]:.3f}",
        ]
        body.append(row + [_ratio(medians[name][0], medians[r][0]) for r in revs])
    out = markdown_table(header, body)
    listing = statistics.median(commands["rlora cache"])
    verify = statistics.median(commands["rlora cache --verify"])
    verify_body = [
        ["rlora cache (identities, as a run)", f"{listing:.3f}", "1.00"]
        + ([_ratio(listing, medians[revs[0]][1])] if revs else []),
        ["rlora cache --verify (every byte)", f"{verify:.3f}", _ratio(verify, listing)]
        + ([_ratio(verify, medians[revs[0]][1])] if revs else []),
    ]
    verify_header = ["command (this checkout)", "process wall s (median)", "/ rlora cache"]
    if revs:
        verify_header.append(f"/ a warm start's process at {labels[revs[0]]}")
    out += "\n\n" + markdown_table(verify_header, verify_body)
    note = (
        f"\n\n{size:,} examples in 4 JSONL files ({data_bytes / 1e6:.0f} MB; this checkout's tables "
        f"{table_bytes / 1e6:.0f} MB), page cache warm; medians of {args.repeats} interleaved fresh processes after "
        f"{args.warmup} untimed; OMP_NUM_THREADS=1. Machine: {host_line()}; load average "
        f"{load_start[0]:.1f} at start, {load_end[0]:.1f} at end."
    )
    if args.json is not None:
        write_json_atomically(
            args.json,
            {
                "benchmark": "data_cache",
                "size": size,
                "labels": labels,
                "warm_starts": starts,
                "commands": commands,
                "data_bytes": data_bytes,
                "table_bytes": table_bytes,
                "load_average": {"start": load_start, "end": load_end},
                "hashing_rev_load_s": hashing,
            },
        )
    return out + note


def main(argv: list[str] | None = None) -> str:
    return bench_main(argv, __doc__, add_args, run, repeats=5, warmup=1, torch_options=False)


if __name__ == "__main__":
    main(sys.argv[1:])
