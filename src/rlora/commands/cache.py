"""`rlora cache`: the data cache (files read into Arrow tables), checking it in full (`--verify`), and removing its
stale or all tables."""

from __future__ import annotations

import argparse
import shutil

from ..data.store import cached_tables, data_cache

STATES = {
    "stale": "stale (its file changed or is gone)",
    "damaged": "damaged (its files are not those it wrote)",
    "partial": "partial (a build that was cut short)",
    "building": "being built by another process",
}


def run(args: argparse.Namespace) -> int:
    tables = cached_tables(args.cache_dir, verify=args.verify)
    removed = [t for t in tables if t.state != "building" and (args.clear or (args.clear_stale and t.stale))]
    for table in removed:
        shutil.rmtree(table.folder, ignore_errors=True)
    kept = [t for t in tables if t not in removed]
    print(f"data cache: {data_cache(args.cache_dir)}")
    for table in kept:
        source = table.source or {}
        state = STATES.get(table.state, f"{source.get('examples', '?')} examples")
        print(f"  {table.bytes / 1e6:8.1f} MB  {source.get('path', table.folder.name)}: {state}")
    mb = sum(t.bytes for t in kept) / 1e6
    verified = "; every byte verified" if args.verify else ""
    print(f"{len(kept)} tables, {mb:.1f} MB" + (f"; removed {len(removed)}" if removed else "") + verified)
    if any(t.stale for t in kept):
        print("rlora cache --clear-stale removes the stale, damaged and partial ones")
    return 0
