"""`rlora analyze`: head similarity (init and trained), router usage per task and the heads' map of a multi-head run,
written into RUN_DIR/analysis/ as tables, JSON and plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from .._io import atomic_write_json, atomic_write_text, check_writable, writing
from ..adapters import load_adapter
from ..analysis import head_projection, head_similarity, router_usage
from ..plots import plot_head_projection, plot_router_usage, plot_similarity
from ..reports import analysis_summary, similarity_table
from ..run import Run, RunFolder, check_adapter, gold_sequences


def analyze_run(run_dir: str | Path, cache_dir: str | None = None, max_prompts_per_task: int = 64) -> dict:
    """Writes RUN_DIR/analysis/: head similarity (init and trained) as table, JSON and line plot; router usage per
    task on held-out examples as JSON and heatmap; the heads' PCA map. Returns the JSON data."""
    run = Run.open(run_dir, cache_dir, multi_head=True)
    folder = run.folder
    has_init = folder.adapter_init.is_dir()
    if has_init:  # checked before any model loads, like the trained adapter
        check_adapter(folder.adapter_init, run.cfg)
    check_writable(folder.root, "nothing was analyzed (its results go there): make it writable, or analyze a copy")
    model = run.load().model.eval()
    trained = head_similarity(model)
    init = None
    if has_init:
        load_adapter(model, folder.adapter_init, "init", run.peft_type)
        init = head_similarity(model, "init")
    usage = router_usage(model, gold_sequences(run, max_prompts_per_task), batch_size=run.cfg.eval.batch_size)
    projection = head_projection(model)

    out = run.folder.analysis
    data = {"head_similarity": {"init": init, "trained": trained}, "router_usage": usage, "head_projection": projection}
    with writing(out):
        atomic_write_json(out / "analysis.json", data)
        atomic_write_text(out / "head_similarity.md", similarity_table(init, trained) + "\n")
        plot_similarity(init, trained, out / "head_similarity.png")
        plot_router_usage(usage, out / "router_usage.png")
        plot_head_projection(projection, out / "heads_pca.png")
    return data


def run(args: argparse.Namespace) -> int:
    data = analyze_run(args.run_dir, args.cache_dir, max_prompts_per_task=args.max_prompts)
    print("\n".join(analysis_summary(data)))
    print(f"tables and plots written to {RunFolder(args.run_dir).analysis}/")
    return 0
