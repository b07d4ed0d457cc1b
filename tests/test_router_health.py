"""Router health (gate entropy, per-task gates, the tasks' Jensen-Shannon divergence, inert/collapsed), against a
naive implementation written here and hand-computed cases."""

import math

import pytest
import torch
from _tiny import MLP, perturb_adapter, tiny_llama
from peft import get_peft_model

from rlora import RLoraConfig
from rlora.analysis import adapted_layers, router_health, router_usage
from rlora.commands.compare import summarize
from rlora.reports import comparison_markdown


def _usage(per_layer_by_task, entropy_by_task, tokens=10):
    """`router_usage`'s shape from given per-layer mean gates and entropies."""
    return {
        task: {
            "mean_gate": [
                sum(g[h] for g in layers.values()) / len(layers) for h in range(len(next(iter(layers.values()))))
            ],
            "mean_gate_per_layer": layers,
            "entropy": entropy_by_task[task],
            "tokens": tokens,
        }
        for task, layers in per_layer_by_task.items()
    }


def test_tasks_on_disjoint_heads_diverge_by_ln2_and_a_uniform_router_is_inert():
    # two tasks, each sending every token to its own head: JSD = H(1/2, 1/2) - 0 = ln 2; pooled share 1/2
    usage = _usage({"a": {"l0": [1.0, 0.0]}, "b": {"l0": [0.0, 1.0]}}, {"a": 0.0, "b": 0.0})
    health = router_health(usage)
    assert health["task_divergence"] == pytest.approx(math.log(2), rel=1e-15)
    assert health["largest_share"] == 0.5 and health["status"] == "active" and health["normalized_entropy"] == 0
    uniform = _usage({"a": {"l0": [0.25] * 4}, "b": {"l0": [0.25] * 4}}, {"a": math.log(4), "b": math.log(4)})
    health = router_health(uniform)
    assert health["status"] == "inert" and health["normalized_entropy"] == pytest.approx(1.0, rel=1e-15)
    assert health["task_divergence"] == pytest.approx(0.0, abs=1e-15)


def test_one_head_in_half_the_layers_is_collapsed():
    layers = {"l0": [0.95, 0.05], "l1": [0.5, 0.5]}  # l0 collapsed (0.95 >= 0.9), l1 not: half the layers
    health = router_health(_usage({"a": layers}, {"a": 0.1}))
    assert health["collapsed_layers"] == 1 and health["layers"] == 2 and health["status"] == "collapsed"
    assert health["largest_share"] == pytest.approx((0.95 + 0.5) / 2, rel=1e-15)
    health = router_health(_usage({"a": {"l0": [0.85, 0.15], "l1": [0.5, 0.5]}}, {"a": 0.1}))
    assert health["status"] == "active"


def _entropy(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def _naive_health(model, prompts_by_task):
    """One prompt at a time, every token's gates captured per layer, everything summed in Python floats."""
    layers = adapted_layers(model)
    per_task, captured = {}, {}
    for task, prompts in prompts_by_task.items():
        gates = {name: [] for name, _ in layers}
        for ids in prompts:
            captured.clear()
            hooks = [
                layer.register_forward_hook(
                    lambda m, args, _out, name=name: captured.__setitem__(name, m.gates(args[0], "default"))
                )
                for name, layer in layers
            ]
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]))
            for h in hooks:
                h.remove()
            for name, _ in layers:
                gates[name] += captured[name].reshape(len(ids), -1).tolist()
        per_task[task] = gates
    k = len(next(iter(per_task.values()))[layers[0][0]][0])
    entropy = sum(
        sum(_entropy(g) for name in gates for g in gates[name]) / sum(len(gates[name]) for name in gates)
        for gates in per_task.values()
    ) / len(per_task)
    mean = {
        task: {name: [sum(g[h] for g in rows) / len(rows) for h in range(k)] for name, rows in gates.items()}
        for task, gates in per_task.items()
    }
    divergence, shares = [], []
    for name, _ in layers:
        vectors = [mean[task][name] for task in per_task]
        pooled = [sum(v[h] for v in vectors) / len(vectors) for h in range(k)]
        divergence.append(_entropy(pooled) - sum(_entropy(v) for v in vectors) / len(vectors))
        shares.append(max(pooled))
    task_gates = {task: [sum(m[name][h] for name in m) / len(m) for h in range(k)] for task, m in mean.items()}
    return {
        "entropy": entropy,
        "task_divergence": sum(divergence) / len(divergence),
        "largest_share": sum(shares) / len(shares),
        "mean_gate": task_gates,
    }


@pytest.mark.parametrize("seed", [0, 1])
def test_router_health_of_a_model_matches_the_naive_implementation(seed):
    # float64 model: the batched, padded pass and the one-prompt passes agree in exact arithmetic; what is left is
    # float64 rounding of sums of a few hundred terms of size <= ln K, far below 1e-10
    model = get_peft_model(tiny_llama(seed, dtype=torch.float64), RLoraConfig(target_modules=MLP, num_heads=3))
    perturb_adapter(model, seed=seed, scale=2.0)  # routers far from zero: gates far from uniform
    model.eval()
    prompts = {"a": [[5, 6, 7, 8, 9], [10, 11]], "b": [[40, 41, 42], [43, 44, 45, 46, 47, 48, 49]]}
    health = router_health(router_usage(model, prompts, batch_size=4))
    naive = _naive_health(model, prompts)
    for key in ("entropy", "task_divergence", "largest_share"):
        assert health[key] == pytest.approx(naive[key], rel=1e-10, abs=1e-12), key
    for task in prompts:
        assert health["mean_gate"][task] == pytest.approx(naive["mean_gate"][task], rel=1e-10)
    assert health["normalized_entropy"] == pytest.approx(naive["entropy"] / math.log(3), rel=1e-10)
    assert health["tokens"] == {"a": 7, "b": 10} and health["layers"] == 6 and health["num_heads"] == 3
    assert health["task_divergence"] > 1e-4  # the perturbed routers do tell the tasks apart a little


def test_the_comparison_summarises_router_health_over_seeds():
    def run(entropy, status):
        health = {
            "num_heads": 2,
            "entropy": entropy,
            "normalized_entropy": entropy / math.log(2),
            "task_divergence": 0.01,
            "largest_share": 0.6,
            "mean_gate": {"a": [0.6, 0.4]},
            "status": status,
            "thresholds": {"inert_entropy": 0.98, "collapsed_share": 0.9},
        }
        return {"tasks": {"a": {"loss": 1.0}}, "average": {"loss": 1.0}, "router": health}

    runs = {"rlora": {0: run(0.60, "active"), 1: run(0.68, "inert")}, "lora": {0: run(0, "x"), 1: run(0, "x")}}
    for results in runs["lora"].values():
        del results["router"]
    summary = summarize(runs, ["rlora", "lora"], [0, 1])
    health = summary["router_health"]
    assert list(health) == ["rlora"] and health["rlora"]["status"] == ["active", "inert"]
    assert health["rlora"]["entropy"]["mean"] == pytest.approx(0.64, rel=1e-12)
    assert health["rlora"]["entropy"]["ci95"] == pytest.approx(12.7062 * 0.04 * math.sqrt(2) / math.sqrt(2), rel=1e-6)
    text = comparison_markdown(summary)
    assert "| rlora | 0.640 ± 0.508 | 0.923 ± 0.733 | 0.010 ± 0.000 | 0.600 ± 0.000 | active, inert |" in text
    assert "| rlora | a | 0.600 0.400 |" in text
