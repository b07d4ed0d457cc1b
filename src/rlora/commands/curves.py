"""`rlora curves`: the training curves of a run (training loss, learning rate, each task's validation loss, router
telemetry) drawn from RUN_DIR/train_log.jsonl alone, into RUN_DIR/curves/: a finished run's, or a killed one's."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..analysis import COLLAPSED_SHARE, INERT_ENTROPY
from ..plots import plot_router_curves, plot_training_curves
from ..run import RunFolder


def series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Every numeric key of the log's records as its (step, value) points, in the log's order (non-finite values and
    the end-of-training summary left out)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        step = record.get("step")
        if not isinstance(step, int) or "train_runtime" in record:
            continue
        for key, value in record.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if key not in ("step", "epoch") and number and math.isfinite(value):
                out.setdefault(key, []).append((step, float(value)))
    return out


def draw_curves(run_dir: str | Path) -> list[Path]:
    """Writes RUN_DIR/curves/training.png and, when the log holds router telemetry, router.png; returns their paths."""
    folder = RunFolder(run_dir)
    points = series(folder.read_train_log())
    written = [folder.curves / "training.png"]
    plot_training_curves(points, written[0])
    if "router/entropy" in points:
        written.append(folder.curves / "router.png")
        thresholds = {"inert_entropy": INERT_ENTROPY, "collapsed_share": COLLAPSED_SHARE}
        plot_router_curves(points, thresholds, written[-1])
    return written


def run(args: argparse.Namespace) -> int:
    for path in draw_curves(args.run_dir):
        print(path)
    return 0
