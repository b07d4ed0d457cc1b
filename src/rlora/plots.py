"""Every figure rlora draws, from results already computed, saved atomically as PNG.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`), never through pyplot: drawing one
neither switches the caller's backend nor leaves a figure open in a notebook.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from ._io import atomic_write_bytes
from .metrics import METRIC_INFO


def save_png(fig: Figure, path: str | Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def plot_similarity(init_rows: list[dict] | None, trained_rows: list[dict], path: str | Path) -> None:
    """The mean pairwise cosine of the heads per layer, one line per module, at init (dashed) and trained."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for label, rows, style in (("init", init_rows or [], "--"), ("trained", trained_rows, "-")):
        for module in sorted({r["module"] for r in rows}):
            pts = sorted((r["layer"], r["mean_cosine"]) for r in rows if r["module"] == module)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=f"{module} ({label})")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean pairwise cosine of heads")
    ax.set_title("Head similarity per layer")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=7, ncol=2)
    save_png(fig, path)


def plot_router_usage(usage: dict[str, dict], path: str | Path) -> None:
    """A heatmap of the mean gate per task (rows) and head (columns), the gate entropy beside each task."""
    tasks = list(usage)
    gates = np.array([usage[t]["mean_gate"] for t in tasks])
    fig = Figure(figsize=(1.2 + 0.9 * gates.shape[1], 1.2 + 0.5 * len(tasks)))
    ax = fig.subplots()
    im = ax.imshow(gates, cmap="viridis", aspect="auto")
    ax.set_xticks(range(gates.shape[1]), [f"head {k}" for k in range(gates.shape[1])])
    ax.set_yticks(range(len(tasks)), [f"{t} (H={usage[t]['entropy']:.2f})" for t in tasks])
    for i in range(len(tasks)):
        for k in range(gates.shape[1]):
            ax.text(k, i, f"{gates[i, k]:.2f}", ha="center", va="center", color="white", fontsize=7)
    ax.set_title(f"Mean router gate per task (entropy H in nats, max ln K = {math.log(gates.shape[1]):.2f})")
    fig.colorbar(im, ax=ax)
    save_png(fig, path)


def plot_head_projection(projection: dict[str, dict], path: str | Path) -> None:
    """One panel per module type: every (layer, head) at its first two principal components, coloured by head."""
    fig = Figure(figsize=(4.6 * len(projection), 4.2))
    axes = fig.subplots(1, len(projection), squeeze=False)
    colours = colormaps["tab10"]
    for ax, (module, data) in zip(axes[0], projection.items(), strict=True):
        xy, heads = np.array(data["xy"]), np.array(data["head"])
        for k in sorted(set(data["head"])):
            ax.scatter(xy[heads == k, 0], xy[heads == k, 1], s=14, color=colours(k % 10), label=f"head {k}")
        ax.set_title(f"{module}, all layers")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Heads projected on their first two principal components, coloured by head")
    save_png(fig, path)


def plot_comparison(summary: dict, path: str | Path) -> None:
    """`compare.summarize`'s summary: per metric (accuracy in %, loss in nats), the mean per task and method with
    95% CI error bars."""
    metrics = list(summary["metrics"])
    tasks = summary["tasks"]
    labels = [*tasks, "(average)"]
    fig = Figure(figsize=(1.6 + 1.3 * len(labels), 0.6 + 3.0 * len(metrics)), layout="constrained")
    axes = fig.subplots(len(metrics), 1, squeeze=False)
    fig.suptitle(f"mean ± 95% CI over {len(summary['seeds'])} seeds")
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        per_method, scale = summary["metrics"][metric]["per_method"], METRIC_INFO[metric].scale
        width = 0.8 / len(per_method)
        for j, (method, data) in enumerate(per_method.items()):
            cells = [data["tasks"][t] for t in tasks] + [data["average"]]
            means = [scale * c["mean"] for c in cells]
            errs = [0 if c["ci95"] is None else scale * c["ci95"] for c in cells]
            xs = [i + (j - (len(per_method) - 1) / 2) * width for i in range(len(cells))]
            ax.bar(xs, means, width, yerr=errs, capsize=2, label=method)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(METRIC_INFO[metric].title, fontsize=9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", fontsize=7, ncol=min(5, len(labels)))
    save_png(fig, path)


def plot_routing(maps: list[dict], num_heads: int, path: str | Path) -> None:
    """Per prompt, a token (rows) x adapted layer (columns) map of the head the router favours, coloured by head with a
    legend; a line marks where the generated tokens start. `maps` items: tokens, heads (tokens, layers), layers,
    prompt_tokens."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from .reports import head_colour

    colours = [head_colour(k) for k in range(num_heads)]
    heights = [max(1.5, 0.16 * len(m["tokens"])) for m in maps]
    width = max(5.0, 2.5 + 0.16 * max(len(m["layers"]) for m in maps))
    fig = Figure(figsize=(min(width, 40), min(sum(heights) + 1.2, 200)), layout="constrained")
    axes = fig.subplots(len(maps), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for i, (ax, m) in enumerate(zip(axes, maps, strict=True)):
        heads = np.asarray(m["heads"])
        ax.imshow(heads, cmap=ListedColormap(colours), vmin=-0.5, vmax=num_heads - 0.5, aspect="auto")
        ax.set_yticks(range(len(m["tokens"])), [repr(t)[1:-1] for t in m["tokens"]], fontsize=6)
        ax.set_xticks(range(len(m["layers"])), m["layers"], rotation=90, fontsize=6)
        if 0 < m["prompt_tokens"] < len(m["tokens"]):
            ax.axhline(m["prompt_tokens"] - 0.5, color="black", lw=1.5)
        ax.set_title(f"prompt {i + 1}: favoured head (generated tokens below the line)", fontsize=8)
    handles = [Patch(color=c, label=f"head {k}") for k, c in enumerate(colours)]
    fig.legend(handles=handles, loc="outside upper center", fontsize=7, ncol=min(num_heads, 10))
    save_png(fig, path)


def plot_training_curves(series: dict[str, list[tuple[int, float]]], path: str | Path) -> None:
    """The training loss, the learning rate and each task's validation loss over the steps, one panel each (the
    validation panel only when the run scored it): `series` maps a log key to its (step, value) points."""
    val = sorted(k for k in series if k.startswith("eval_") and k.endswith("_loss") and k != "eval_loss")
    panels = [("training loss", ["loss"]), ("learning rate", ["learning_rate"])]
    if val:
        panels.append(("validation loss per task (nats per trained token)", [*val, "eval_loss"]))
    fig = Figure(figsize=(7, 2.6 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            points = series.get(key, [])
            label = "mean" if key == "eval_loss" else key.removeprefix("eval_").removesuffix("_loss")
            style = {"ls": "--", "color": "black"} if key == "eval_loss" else {}
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", ms=2, label=label, **style)
        ax.set_title(title, fontsize=9)
        if len(keys) > 1:
            ax.legend(fontsize=7, ncol=3)
    axes[-1].set_xlabel("step")
    save_png(fig, path)


ROUTER_PANELS = (  # (the telemetry's log name, the panel's title, the threshold line's key in `thresholds`)
    ("entropy", "gate entropy / ln K (1: uniform)", "inert_entropy"),
    ("largest_share", "largest head's share of the mean gate", "collapsed_share"),
    ("task_jsd", "tasks' Jensen-Shannon divergence (nats)", None),
    ("head_cosine", "heads' mean pairwise cosine", None),
)


def plot_router_curves(series: dict[str, list[tuple[int, float]]], thresholds: dict[str, float], path) -> None:
    """The router telemetry over the steps: per panel the average over layers (black) and every layer (thin), with
    the threshold of inert or collapsed (dotted) where it applies."""
    fig = Figure(figsize=(7, 2.4 * len(ROUTER_PANELS)), layout="constrained")
    axes = fig.subplots(len(ROUTER_PANELS), 1, squeeze=False, sharex=True)[:, 0]
    for ax, (name, title, threshold) in zip(axes, ROUTER_PANELS, strict=True):
        layers = [k for k in series if k.startswith("router/") and k.endswith(f"/{name}") and k.count("/") == 2]
        for key in layers:
            points = series[key]
            ax.plot([s for s, _ in points], [v for _, v in points], lw=0.5, alpha=0.4, color="tab:blue")
        points = series.get(f"router/{name}", [])
        ax.plot([s for s, _ in points], [v for _, v in points], color="black", marker="o", ms=2, label="average")
        if threshold is not None:
            ax.axhline(thresholds[threshold], color="tab:red", ls=":", lw=1, label=threshold.replace("_", " "))
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[-1].set_xlabel("step")
    save_png(fig, path)
