"""Reports: every Markdown table and text summary rlora prints or writes, rendered from results already computed.

Nothing here computes a metric or touches a file; the numbers come from `evaluate.py`, `analysis.py` and
`commands/compare.py` (how each metric is shown: `metrics.py`), and `run.py` and the commands (`commands/`) write
the text where it belongs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from .metrics import ACCURACY_METRICS, LOSS_METRICS, METRIC_INFO, METRICS
from .stats import format_ci


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


MARKDOWN_SPECIAL = frozenset("\\|*`[]<>#")


def markdown_cell(text: str) -> str:
    """`text` as one Markdown table cell shows it literally: `|`, `*`, backquotes, brackets, backslashes and an
    underscore that could start or end emphasis (one beside a non-alphanumeric character; `arc_easy` stays) escaped,
    line breaks made spaces. A task may be called anything, "**average**" or "a|b" included."""
    text = " ".join(text.splitlines())
    out = []
    for i, c in enumerate(text):
        inside = 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum()
        out.append("\\" + c if c in MARKDOWN_SPECIAL or (c == "_" and not inside) else c)
    return "".join(out)


def format_metric(metric: str, value: float | None) -> str:
    """A metric's value as tables show it: accuracies in % (one decimal), loss with 3 decimals, perplexity with 2
    (3 significant digits from 1e5 on); "–" where it was not measured (or not in an older results file)."""
    if value is None:
        return "–"
    if metric == "ppl" and value >= 1e5:
        return f"{value:.3g}"
    info = METRIC_INFO[metric]
    return f"{info.scale * value:.{info.digits}f}"


def results_table(columns: dict[str, dict], metric_names: Sequence[str] | None = None) -> str:
    """One row a task, for each results column (e.g. base, tuned) its accuracies in % (by default every accuracy
    that some task of some column has), then its held-out loss and perplexity (lower is better: "loss ↓", "ppl ↓";
    always shown by default, "–" for results written before they were measured)."""
    if metric_names is None:
        metric_names = [
            m
            for m in ACCURACY_METRICS
            if any(r.get(m) is not None for col in columns.values() for r in col["tasks"].values())
        ] + list(LOSS_METRICS)
    header = ["task", "n"] + [f"{col} {METRIC_INFO[m].label}" for col in columns for m in metric_names]
    first = next(iter(columns.values()))
    rows = [
        [markdown_cell(task), str(r["n"])]
        + [format_metric(m, columns[c]["tasks"][task].get(m)) for c in columns for m in metric_names]
        for task, r in first["tasks"].items()
    ]
    rows.append(
        ["**average**", ""] + [format_metric(m, columns[c]["average"].get(m)) for c in columns for m in metric_names]
    )
    return markdown_table(header, rows)


def gain_line(base: dict, tuned: dict, name: str) -> str:
    """One sentence: the tuned model's average against the base model's, per metric both have (accuracies in
    points, higher is better; loss in nats per token and perplexity, lower is better)."""
    parts = []
    for metric in METRICS:
        before, after = base["average"].get(metric), tuned["average"].get(metric)
        if before is None or after is None:
            continue
        label, b, a = METRIC_INFO[metric].label, format_metric(metric, before), format_metric(metric, after)
        if metric in ACCURACY_METRICS:
            parts.append(f"{label} {b} -> {a} ({100 * (after - before):+.1f} points)")
        elif metric == "loss":
            parts.append(f"{label} {b} -> {a} ({after - before:+.3f} nats per token)")
        else:
            parts.append(f"{label} {b} -> {a}")
    return f"Average over the tasks, base -> {name}: " + "; ".join(parts) + "."


def similarity_table(init_rows: Iterable[dict] | None, trained_rows: Iterable[dict]) -> str:
    init = {(r["layer"], r["module"]): r["mean_cosine"] for r in init_rows or []}
    rows = [
        [str(r["layer"]), r["module"], _cosine(init.get((r["layer"], r["module"]))), _cosine(r["mean_cosine"])]
        for r in trained_rows
    ]
    return markdown_table(["layer", "module", "cosine at init", "cosine trained"], rows)


def _cosine(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def analysis_summary(data: dict) -> list[str]:
    """A short text summary of `commands.analyze.analyze_run`'s data for the terminal."""
    lines = []
    for when in ("init", "trained"):
        values = [r["mean_cosine"] for r in data["head_similarity"][when] or [] if not math.isnan(r["mean_cosine"])]
        if values:
            mean = sum(values) / len(values)
            lines.append(f"mean pairwise cosine of heads, {when}: {mean:.3f} over {len(values)} layers")
        elif data["head_similarity"][when]:
            lines.append(f"mean pairwise cosine of heads, {when}: undefined (all-zero heads)")
    for task, u in data["router_usage"].items():
        gates = " ".join(f"{g:.2f}" for g in u["mean_gate"])
        lines.append(f"router {task}: mean gates [{gates}], entropy {u['entropy']:.3f} nats")
    return lines


def comparison_markdown(summary: dict) -> str:
    """`compare.compare`'s summary: with a sweep, each method's chosen settings and the whole sweep; per metric, mean
    ± 95% CI per task and method, and the paired differences (method − reference: positive is better for accuracies,
    negative for the loss; each heading says which); the routers' health."""
    seeds, tasks = summary["seeds"], summary["tasks"]
    names = [*map(markdown_cell, tasks), "**average**"]
    parts = [selection_markdown(summary["selection"]), ""] if summary.get("selection") else []
    for metric, data in summary["metrics"].items():
        info = METRIC_INFO[metric]
        per_method, diffs = data["per_method"], data["differences"]
        parts += [
            f"### {info.title}: mean ± 95% CI over {len(seeds)} seeds ({', '.join(map(str, seeds))})",
            "",
            markdown_table(["task", *per_method], _ci_rows(metric, names, tasks, per_method.values())),
        ]
        if diffs:
            ref = data["difference_to"]
            better = f"; negative: lower than {ref}, better" if info.lower_is_better else ""
            parts += [
                "",
                f"Paired difference to {ref} (same seed), {info.difference_unit}{better}, mean ± 95% CI over seeds "
                "on this test set; resolved or not, counting the seeds and the test examples as samples, with the "
                "minimum detectable difference (MDE: 95%, power 80%; `rlora plan` for the budget a given effect "
                "needs):",
                "",
                markdown_table(
                    ["task", *(f"{m} − {ref}" for m in diffs)], _difference_rows(metric, names, tasks, diffs)
                ),
                "",
                resolution_markdown(metric, diffs, ref),
            ]
        parts.append("")
    if summary.get("router_health"):
        parts += [router_health_markdown(summary["router_health"], seeds), ""]
    return "\n".join(parts)


def _verdict(metric: str, noise: dict | None) -> str:
    info = METRIC_INFO[metric]
    if noise is None:
        return "–"
    if noise["mde"] is None:
        return "not resolved; no paired difference on any seed or example: MDE not estimable"
    mde = f"MDE {info.scale * noise['mde']:.{info.digits}f}"
    return f"resolved; {mde}" if noise["resolved"] else f"not resolved; {mde}"


def _difference_rows(metric: str, names: list[str], tasks: list[str], diffs: dict) -> list[list[str]]:
    """Each paired difference's mean ± CI, and its verdict with the MDE ("not resolved" never without it)."""
    scale, digits = METRIC_INFO[metric].scale, METRIC_INFO[metric].digits
    rows = []
    for name, task in zip(names, [*tasks, None], strict=True):
        row = [name]
        for d in diffs.values():
            cell = d["tasks"][task] if task is not None else d["average"]
            noise = (
                d.get("noise", {}).get("tasks", {}).get(task) if task is not None else d.get("noise", {}).get("average")
            )
            verdict = f" ({_verdict(metric, noise)})" if noise is not None else ""
            row.append(format_ci(cell["mean"], cell["ci95"], scale, digits) + verdict)
        rows.append(row)
    return rows


def resolution_markdown(metric: str, diffs: dict, reference: str) -> str:
    """Per method and task (and the average): the seed-to-seed and example-to-example noise of the paired difference
    and the minimum detectable difference for this comparison's seeds and test examples (`power`)."""
    info = METRIC_INFO[metric]

    def value(v: float | None) -> str:
        return "–" if v is None else f"{info.scale * v:.{info.digits}f}"

    rows = []
    for method, d in diffs.items():
        noise = d.get("noise") or {}
        for task, n in [*(noise.get("tasks") or {}).items(), ("**average**", noise.get("average"))]:
            if n is None:
                rows.append([method, markdown_cell(task) if task != "**average**" else task, "–", "–", "–", "–", "–"])
                continue
            name = markdown_cell(task) if task != "**average**" else task
            examples = str(n["examples"]) if n["example_sd"] is not None else "–"
            rows.append(
                [
                    method,
                    name,
                    str(n["seeds"]),
                    examples,
                    value(n["seed_sd"]),
                    value(n["example_sd"]),
                    _verdict(metric, n),
                ]
            )
    header = ["method", "task", "seeds", "examples", "seed sd", "example sd", "verdict (MDE)"]
    return "\n".join(
        [
            f"What the paired differences to {reference} can resolve, {info.difference_unit}: the standard deviation "
            "over seeds of the paired difference, over test examples of the per-example difference (– : no "
            "per-example outcomes, the MDE then holds this test set fixed), and the minimum detectable difference "
            "MDE = (t_0.975 + t_0.80, S-1 dof) x SE, SE^2 = var_seed/S + var_example/N + var_residual/(S N) "
            "(docs/planning.md):",
            "",
            markdown_table(header, rows),
        ]
    )


def selection_markdown(selection: dict) -> str:
    """The sweep of `compare.select_settings`: each method's validation loss at every point, the chosen one in bold."""
    names = [row["name"] for row in next(iter(selection["per_method"].values()))["points"]]
    rows = []
    for method, s in selection["per_method"].items():
        cells = [
            "stopped"
            if row["validation"] is None
            else f"**{row['validation']:.4f}**"
            if row["name"] == s["chosen_name"]
            else f"{row['validation']:.4f}"
            for row in s["points"]
        ]
        rows.append([method, *cells, s["chosen_name"]])
    return "\n".join(
        [
            f"### Settings chosen per method on the validation split ({100 * selection['validation_fraction']:g}% of "
            f"the training examples, by hash; never the test split): validation loss, nats per token, mean over "
            f"tasks, seed {selection['seed']}; the lowest (bold) is chosen (stopped: training stopped, a non-finite "
            "loss)",
            "",
            markdown_table(["method", *names, "chosen"], rows),
        ]
    )


ROUTER_COLUMNS = {
    "entropy": "gate entropy (nats)",
    "normalized_entropy": "entropy / ln K",
    "task_divergence": "task JSD (nats)",
    "largest_share": "largest head share",
}


def router_health_markdown(health: dict, seeds: Sequence[int]) -> str:
    """`compare.summarize`'s router health: per multi-head method its measures (mean ± 95% CI over seeds) and each
    seed's status (`analysis.router_health`), then its mean gate per task and head."""
    rows = [
        [method, *(format_ci(h[m]["mean"], h[m]["ci95"], 1.0, 3) for m in ROUTER_COLUMNS), ", ".join(h["status"])]
        for method, h in health.items()
    ]
    limits = next(iter(health.values()))["thresholds"]
    parts = [
        f"### Router health on the evaluated examples: mean ± 95% CI over {len(seeds)} seeds "
        f"({', '.join(map(str, seeds))})",
        "",
        "Gate entropy per token (at most ln K: uniform gates); task JSD: the Jensen-Shannon divergence of the tasks' "
        "mean gates per layer, averaged over layers (0: every task routed alike); largest head share: of the mean "
        f"gate per layer. Status per seed: inert (entropy at least {100 * limits['inert_entropy']:g}% of ln K), "
        f"collapsed (one head at least {100 * limits['collapsed_share']:g}% of the gate in half the layers or more), "
        "else active.",
        "",
        markdown_table(["method", *ROUTER_COLUMNS.values(), "status per seed"], rows),
        "",
        "Mean gate per head and task (over tokens, layers and seeds):",
        "",
    ]
    gate_rows = [
        [method, task, " ".join(f"{g:.3f}" for g in gates)]
        for method, h in health.items()
        for task, gates in h["mean_gate"].items()
    ]
    parts.append(markdown_table(["method", "task", "mean gate per head"], gate_rows))
    return "\n".join(parts)


def _ci_rows(metric: str, names: list[str], tasks: list[str], columns: Iterable[dict]) -> list[list[str]]:
    columns = list(columns)
    scale, digits = METRIC_INFO[metric].scale, METRIC_INFO[metric].digits
    cells = [[col["tasks"][task] for task in tasks] + [col["average"]] for col in columns]
    return [
        [name] + [format_ci(col[i]["mean"], col[i]["ci95"], scale, digits) for col in cells]
        for i, name in enumerate(names)
    ]


# One colour per router head (matplotlib's tab10, then tab20's lighter shades), shared by the PNG and HTML maps.
HEAD_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#c7c7c7",
    "#dbdb8d",
    "#9edae5",
)


def head_colour(head: int) -> str:
    return HEAD_COLOURS[head % len(HEAD_COLOURS)]


def routing_html(maps: Sequence[dict], num_heads: int) -> str:
    """A self-contained HTML page: per prompt, a table of tokens (rows) by adapted layer (columns), each cell coloured
    by the head the router favours there (its number in the cell); generated tokens in bold; a legend of heads."""
    from html import escape

    legend = " ".join(
        f'<span style="background:{head_colour(k)};padding:0 6px">head {k}</span>' for k in range(num_heads)
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>rlora routing</title><style>"
        "table{border-collapse:collapse;font:11px monospace}td,th{border:1px solid #fff;padding:1px 3px}"
        "th{writing-mode:vertical-rl}td.t{white-space:pre;text-align:right}</style></head><body>",
        f"<p>Favoured head (argmax gate) per token and adapted layer. {legend}</p>",
    ]
    for i, m in enumerate(maps):
        parts.append(f"<h3>prompt {i + 1}</h3><table><tr><th>token</th>")
        parts += [f"<th>{escape(layer)}</th>" for layer in m["layers"]]
        parts.append("</tr>")
        for t, token in enumerate(m["tokens"]):
            text = escape(repr(token)[1:-1])
            label = f"<b>{text}</b>" if t >= m["prompt_tokens"] else text
            parts.append(f"<tr><td class='t'>{label}</td>")
            parts += [f'<td style="background:{head_colour(int(k))}">{int(k)}</td>' for k in m["heads"][t]]
            parts.append("</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
