"""What the heads and the router learned: head similarity, router usage per task, a 2-D map of the heads.

- Head similarity (the R-LoRA paper's diagnostic): for every adapted layer, the mean cosine similarity over
  all pairs of its K heads B_k (each flattened to a d_out*r vector).
- Router usage: on held-out examples of each task (the gold context and answer, as in training), the
  router's gates g(x) averaged over every real token
  and every adapted layer give a mean gate per head per task; the entropy of g(x) (in nats, at most ln K)
  says how concentrated the routing is.
- Router health (`router_health`, in every multi-head run's eval.json): the gate entropy, the tasks' mean gates and
  how far apart they are (Jensen-Shannon divergence), flagged when the router is inert (uniform) or collapsed.
- Head map: the heads of one module type (e.g. every layer's up_proj), projected on their first two
  principal components, coloured by head index.

Each function takes a model (and token ids) and returns numbers; `commands.analyze.analyze_run` loads a run and
writes them, `reports.py` and `plots.py` render them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .data import pad_ids
from .output_head import forward_hidden
from .tuner import RLoraLinear, task_routing

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

        def hook(module, args, _output, name=name):
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
    """Per task: mean gate per head (averaged over real tokens and layers, and per layer), mean gate entropy,
    per-layer entropy."""
    model.eval()
    device = next(model.parameters()).device
    usage = {}
    for task, prompts in prompts_by_task.items():
        sums: dict[str, torch.Tensor] = {}
        entropy: dict[str, torch.Tensor] = {}
        tokens = 0
        for start in range(0, len(prompts), batch_size):
            ids, mask = pad_ids(prompts[start : start + batch_size], pad_id=0)  # padding is masked out below
            with task_routing(model, task), record_gates(model, adapter_name) as records:  # the layers only
                forward_hidden(model, input_ids=ids.to(device), attention_mask=mask.to(device))
            real = mask.bool().flatten()
            tokens += int(real.sum())
            for name, calls in records.items():
                g = torch.cat(calls).reshape(-1, calls[0].shape[-1])[real]  # (real tokens, K)
                sums[name] = sums.get(name, 0) + g.sum(0)
                h = -(g * g.clamp_min(1e-12).log()).sum(-1)
                entropy[name] = entropy.get(name, 0) + h.sum()
        per_layer = {name: (sums[name] / tokens) for name in sums}
        k = max(g.shape[0] for g in per_layer.values())  # layers with fewer heads (heads_pattern) are left out here
        usage[task] = {
            "mean_gate": torch.stack([g for g in per_layer.values() if g.shape[0] == k]).mean(0).tolist(),
            "mean_gate_per_layer": {name: g.tolist() for name, g in per_layer.items()},
            "entropy": float(sum(entropy.values()) / (tokens * len(entropy))),
            "entropy_per_layer": {name: float(entropy[name] / tokens) for name in entropy},
            "tokens": tokens,
        }
    return usage


# When a router counts as inert (its gates are uniform: the heads act as one averaged update) or collapsed (one head
# takes nearly all of the gate mass); see `router_health`.
INERT_ENTROPY = 0.98  # the token gates' entropy, as a share of its maximum ln K, at least this
COLLAPSED_SHARE = 0.9  # one head's share of a layer's mean gate at least this, in at least half of the layers


def _entropy(p: Sequence[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def router_status(normalized_entropy: float, shares: Sequence[float]) -> str:
    """The one rule (for `router_health` after training and `telemetry` during it): "collapsed" when at least half of
    the layers' largest `shares` are at least `COLLAPSED_SHARE`, else "inert" when `normalized_entropy` (the gates'
    entropy over ln K) is at least `INERT_ENTROPY`, else "active". A layer's status: this rule on its own numbers."""
    collapsed = sum(share >= COLLAPSED_SHARE for share in shares)
    return "collapsed" if 2 * collapsed >= len(shares) else "inert" if normalized_entropy >= INERT_ENTROPY else "active"


def task_divergence(gates: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(Jensen-Shannon divergence, largest share) of the tasks' mean gate vectors in one layer: the entropy of their
    mean minus the mean of their entropies (nats), and the largest head's share of their mean."""
    k = len(gates[0])
    pooled = [sum(g[h] for g in gates) / len(gates) for h in range(k)]
    return _entropy(pooled) - sum(_entropy(g) for g in gates) / len(gates), max(pooled)


def router_health(usage: dict[str, dict]) -> dict:
    """How the routers route, from `router_usage`'s per-task numbers (every value in nats; each task weighs the same):

    - `entropy`: the gates' entropy per token, averaged over tokens, layers and tasks; `normalized_entropy` the
      same over its maximum ln K (1: uniform gates, 0: one head per token);
    - `mean_gate`: per task, its mean gate per head (over tokens and layers);
    - `task_divergence`: per layer, the Jensen-Shannon divergence of the tasks' mean gate vectors (the entropy of
      their mean minus the mean of their entropies; 0 when every task uses the heads alike, at most
      ln min(tasks, K)), averaged over layers: how far the routing is task-specific;
    - `largest_share`: per layer, the largest head's share of the mean gate over every task, averaged over layers;
      `collapsed_layers`: the layers where it is at least `COLLAPSED_SHARE`;
    - `status`: `router_status` of these numbers ("collapsed" when at least half the layers are, "inert" when
      `normalized_entropy` is at least `INERT_ENTROPY`, else "active")."""
    tasks = list(usage)
    layers = list(usage[tasks[0]]["mean_gate_per_layer"])
    k = len(usage[tasks[0]]["mean_gate"])
    entropy = sum(usage[t]["entropy"] for t in tasks) / len(tasks)
    rows = [task_divergence([usage[t]["mean_gate_per_layer"][layer] for t in tasks]) for layer in layers]
    divergence, shares = [d for d, _ in rows], [s for _, s in rows]
    collapsed = sum(share >= COLLAPSED_SHARE for share in shares)
    normalized = entropy / math.log(k) if k > 1 else math.nan
    status = router_status(normalized, shares)
    return {
        "num_heads": k,
        "entropy": entropy,
        "normalized_entropy": normalized,
        "mean_gate": {t: usage[t]["mean_gate"] for t in tasks},
        "task_divergence": sum(divergence) / len(layers),
        "largest_share": sum(shares) / len(layers),
        "collapsed_layers": collapsed,
        "layers": len(layers),
        "status": status,
        "thresholds": {"inert_entropy": INERT_ENTROPY, "collapsed_share": COLLAPSED_SHARE},
        "tokens": {t: usage[t]["tokens"] for t in tasks},
    }


@torch.no_grad()
def favoured_heads(model: torch.nn.Module, ids: Sequence[int], adapter_name: str = "default") -> dict:
    """Which head the router favours (argmax gate) at every token of `ids` in every adapted layer, from one forward
    pass over the whole sequence: {"layers": ["<index>.<module>", ...], "heads": (tokens, layers) int64 tensor,
    "num_heads": K}."""
    model.eval()
    device = next(model.parameters()).device
    with record_gates(model, adapter_name) as records:  # the layers only: no logits
        forward_hidden(model, input_ids=torch.tensor([list(ids)], device=device))
    names = list(records)
    if not names:
        raise ValueError(f"no adapted layer with the adapter {adapter_name!r}")
    heads = torch.stack([records[name][0].reshape(len(ids), -1).argmax(-1) for name in names], dim=1)
    layers = ["{}.{}".format(*describe(name)) for name in names]
    return {"layers": layers, "heads": heads, "num_heads": records[names[0]][0].shape[-1]}


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
        out[module] = {
            "xy": coords.tolist(),
            "head": [h for _, heads in items for h in range(heads.shape[0])],  # K per layer (heads_pattern)
            "layer": [index for index, heads in items for _ in range(heads.shape[0])],
        }
    return out
