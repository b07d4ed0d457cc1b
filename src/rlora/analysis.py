"""What the heads and the router learned: head similarity, router usage per task, a 2-D map of the heads.

- Head similarity (the R-LoRA paper's diagnostic): for every adapted layer, the mean cosine similarity over
  all pairs of its K heads B_k (each flattened to a d_out*r vector).
- Router usage: on held-out examples of each task (the gold context and answer, as in training), the
  router's gates g(x) averaged over every real token
  and every adapted layer give a mean gate per head per task; the entropy of g(x) (in nats, at most ln K)
  says how concentrated the routing is.
- Head map: the heads of one module type (e.g. every layer's up_proj), projected on their first two
  principal components, coloured by head index.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ._plot import pyplot, save_png
from .data import pad_ids
from .layer import RLoraLinear

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def adapted_layers(model: torch.nn.Module, adapter_name: str = "default") -> list[tuple[str, RLoraLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RLoraLinear) and adapter_name in m.rlora_A]


def describe(name: str) -> tuple[int, str]:
    """(layer index, module name) of a module path like `...layers.3.mlp.up_proj`; index -1 when there is none."""
    found = _LAYER_INDEX.findall(name)
    return (int(found[-1]) if found else -1), name.rsplit(".", 1)[-1]


def mean_pairwise_cosine(heads: torch.Tensor) -> float:
    """Mean cosine similarity over the K*(K-1)/2 pairs of heads (K, ...); NaN for a single head, and for
    all-zero heads (HydraLoRA at init: identical, but the cosine of zero vectors is undefined)."""
    flat = heads.flatten(1).float()
    k = flat.shape[0]
    if k < 2 or (flat.norm(dim=1) == 0).any():
        return math.nan
    cos = F.cosine_similarity(flat[:, None], flat[None, :], dim=-1)
    return cos[torch.triu(torch.ones(k, k, dtype=torch.bool), diagonal=1)].mean().item()


def head_similarity(model: torch.nn.Module, adapter_name: str = "default") -> list[dict]:
    """One row per adapted layer: layer index, module name, mean pairwise cosine of its heads."""
    rows = []
    for name, layer in adapted_layers(model, adapter_name):
        index, module = describe(name)
        heads = layer.head_weights(adapter_name).detach()
        rows.append({"layer": index, "module": module, "mean_cosine": mean_pairwise_cosine(heads)})
    return rows


@contextmanager
def record_gates(model: torch.nn.Module, adapter_name: str = "default"):
    """Collects every adapted layer's gates (tokens, K) during forward passes, keyed by module name."""
    records: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, layer in adapted_layers(model, adapter_name):

        def hook(module, args, output, name=name):
            records.setdefault(name, []).append(module.gates(args[0].detach(), adapter_name).cpu())

        hooks.append(layer.register_forward_hook(hook))
    try:
        yield records
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def router_usage(
    model: torch.nn.Module,
    prompts_by_task: dict[str, Sequence[list[int]]],
    adapter_name: str = "default",
    batch_size: int = 16,
) -> dict[str, dict]:
    """Per task: mean gate per head (averaged over real tokens and layers), mean gate entropy, per-layer entropy."""
    model.eval()
    device = next(model.parameters()).device
    usage = {}
    for task, prompts in prompts_by_task.items():
        sums: dict[str, torch.Tensor] = {}
        entropy: dict[str, torch.Tensor] = {}
        tokens = 0
        for start in range(0, len(prompts), batch_size):
            ids, mask = pad_ids(prompts[start : start + batch_size], pad_id=0)  # padding is masked out below
            with record_gates(model, adapter_name) as records:
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
            real = mask.bool().flatten()
            tokens += int(real.sum())
            for name, calls in records.items():
                g = torch.cat(calls).reshape(-1, calls[0].shape[-1])[real]  # (real tokens, K)
                sums[name] = sums.get(name, 0) + g.sum(0)
                h = -(g * g.clamp_min(1e-12).log()).sum(-1)
                entropy[name] = entropy.get(name, 0) + h.sum()
        per_layer = {name: (sums[name] / tokens) for name in sums}
        usage[task] = {
            "mean_gate": torch.stack(list(per_layer.values())).mean(0).tolist(),
            "entropy": float(sum(entropy.values()) / (tokens * len(entropy))),
            "entropy_per_layer": {name: float(entropy[name] / tokens) for name in entropy},
            "tokens": tokens,
        }
    return usage


def head_projection(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, dict]:
    """Per module type: the 2-D PCA coordinates of every (layer, head), with the head and layer indices."""
    groups: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, layer in adapted_layers(model, adapter_name):
        index, module = describe(name)
        groups.setdefault(module, []).append((index, layer.head_weights(adapter_name).detach().flatten(1).float()))
    out = {}
    for module, items in groups.items():
        points = torch.cat([h for _, h in items])  # (layers*K, d_out*r)
        centred = points - points.mean(0, keepdim=True)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        coords = centred @ v[:2].T if v.shape[0] >= 2 else torch.cat([centred @ v.T, torch.zeros(len(points), 1)], 1)
        k = items[0][1].shape[0]
        out[module] = {
            "xy": coords.tolist(),
            "head": [h for _ in items for h in range(k)],
            "layer": [index for index, heads in items for _ in range(heads.shape[0])],
        }
    return out


def similarity_table(init_rows: Iterable[dict] | None, trained_rows: Iterable[dict]) -> str:
    trained = list(trained_rows)
    init = {(r["layer"], r["module"]): r["mean_cosine"] for r in init_rows or []}
    lines = ["| layer | module | cosine at init | cosine trained |", "|---|---|---|---|"]
    for r in trained:
        before = init.get((r["layer"], r["module"]))
        lines.append(f"| {r['layer']} | {r['module']} | {_cell(before)} | {_cell(r['mean_cosine'])} |")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def plot_similarity(init_rows: list[dict] | None, trained_rows: list[dict], path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
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


def plot_router_usage(usage: dict[str, dict], path) -> None:
    plt = pyplot()
    tasks = list(usage)
    gates = torch.tensor([usage[t]["mean_gate"] for t in tasks])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * gates.shape[1], 1.2 + 0.5 * len(tasks)))
    im = ax.imshow(gates, cmap="viridis", aspect="auto")
    ax.set_xticks(range(gates.shape[1]), [f"head {k}" for k in range(gates.shape[1])])
    ax.set_yticks(range(len(tasks)), [f"{t} (H={usage[t]['entropy']:.2f})" for t in tasks])
    for i in range(len(tasks)):
        for k in range(gates.shape[1]):
            ax.text(k, i, f"{gates[i, k]:.2f}", ha="center", va="center", color="white", fontsize=7)
    ax.set_title(f"Mean router gate per task (entropy H in nats, max ln K = {math.log(gates.shape[1]):.2f})")
    fig.colorbar(im, ax=ax)
    save_png(fig, path)


def plot_head_projection(projection: dict[str, dict], path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(projection), figsize=(4.6 * len(projection), 4.2), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, (module, data) in zip(axes[0], projection.items(), strict=True):
        xy = torch.tensor(data["xy"])
        heads = torch.tensor(data["head"])
        for k in sorted(set(data["head"])):
            ax.scatter(xy[heads == k, 0], xy[heads == k, 1], s=14, color=colours(k % 10), label=f"head {k}")
        ax.set_title(f"{module}, all layers")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Heads projected on their first two principal components, coloured by head")
    save_png(fig, path)


def analyze_run(run_dir, cache_dir: str | None = None, max_prompts_per_task: int = 64) -> dict:
    """Writes RUN_DIR/analysis/: head similarity (init and trained) as table, JSON and line plot; router
    usage per task on held-out prompts as JSON and heatmap; the heads' PCA map. Returns the JSON data."""
    from pathlib import Path

    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    from ._io import atomic_write_json, atomic_write_text
    from .data import encode_spans, gold_pair
    from .data_plan import plan_data
    from .models import load_model_and_tokenizer
    from .runconfig import load_run_config

    run_dir = Path(run_dir)
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no trained adapter (adapter/adapter_config.json); train the run first")
    cfg = load_run_config(run_dir / "config.yaml")
    if cfg.method == "lora":
        raise ValueError(f"{run_dir}: a plain LoRA run has one head and no router; analyze a multi-head run")
    plan = plan_data(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cache_dir=cache_dir)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()

    trained = head_similarity(model)
    init = None
    init_weights = run_dir / "adapter_init" / "adapter_model.safetensors"
    if init_weights.is_file():
        trained_state = {k: v.clone() for k, v in model.state_dict().items() if "rlora_" in k}
        set_peft_model_state_dict(model, load_file(str(init_weights)))
        init = head_similarity(model)
        model.load_state_dict(trained_state, strict=False)
    d = cfg.data
    sequences = {  # what the model reads in training: the gold context and answer (RC or MC, as configured)
        task: [encode_spans(tokenizer, *gold_pair(e), d.chat_template, d.max_length, e.uid) for e in examples]
        for task, examples in plan.test.items()
    }
    prompts = {task: [s.prompt + s.answer for s in spans] for task, spans in sequences.items()}
    usage = router_usage(
        model, {t: p[:max_prompts_per_task] for t, p in prompts.items()}, batch_size=cfg.eval.batch_size
    )
    projection = head_projection(model)

    out = run_dir / "analysis"
    data = {"head_similarity": {"init": init, "trained": trained}, "router_usage": usage, "head_projection": projection}
    atomic_write_json(out / "analysis.json", data)
    atomic_write_text(out / "head_similarity.md", similarity_table(init, trained) + "\n")
    plot_similarity(init, trained, out / "head_similarity.png")
    plot_router_usage(usage, out / "router_usage.png")
    plot_head_projection(projection, out / "heads_pca.png")
    return data


def summary_lines(data: dict) -> list[str]:
    """A short text summary of `analyze_run`'s data for the terminal."""
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
