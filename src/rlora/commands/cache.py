"""`rlora cache`: the data cache (files read into Arrow tables), and removing its stale or all tables."""

from __future__ import annotations

import argparse
import shutil

from ..data.store import cached_tables, data_cache


def run(args: argparse.Namespace) -> int:
    tables = cached_tables(args.cache_dir)
    removed = [t for t in tables if args.clear or (args.clear_stale and t.stale)]
    for table in removed:
        shutil.rmtree(table.folder, ignore_errors=True)
    kept = [t for t in tables if t not in removed]
    print(f"data cache: {data_cache(args.cache_dir)}")
    for table in kept:
        source = table.source or {}
        state = "stale (its file changed or is gone)" if table.stale else f"{source.get('examples', '?')} examples"
        print(f"  {table.bytes / 1e6:8.1f} MB  {source.get('path', table.folder.name)}: {state}")
    mb = sum(t.bytes for t in kept) / 1e6
    print(f"{len(kept)} tables, {mb:.1f} MB" + (f"; removed {len(removed)}" if removed else ""))
    if any(t.stale for t in kept):
        print("rlora cache --clear-stale removes the stale ones")
    return 0
