"""The router options: the balance and z losses against a naive computation, task routing (each task its own gates,
an unknown task uniform, the per-task export exact), per-layer head counts saved and honoured at load (in a fresh
process), ALoRA's shared up-projection (exact start, trains, reloads), and task routing separating tasks that need
different heads where token routing has nothing to go on."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from _tiny import F64, MLP, adapted_layer_calls, perturb_adapter, tiny_llama
from peft import PeftModel, get_peft_model

from rlora import RLoraConfig
from rlora.errors import ConfigError
from rlora.tuner import task_routing

TASKS = ["colors", "letters", "sums"]


def _model(**settings):
    config = RLoraConfig(r=2, num_heads=3, target_modules=MLP, **settings)
    return get_peft_model(tiny_llama(dtype=torch.float64), config)


def naive_router_losses(logits: torch.Tensor) -> tuple[float, float]:
    """Switch Transformer's balance loss K * sum_k f_k P_k and ST-MoE's z-loss, token by token in Python."""
    tokens, k = logits.shape
    counts, prob_sums, z = [0] * k, [0.0] * k, 0.0
    for t in range(tokens):
        row = [float(v) for v in logits[t]]
        top = max(row)
        exps = [math.exp(v - top) for v in row]
        total = sum(exps)
        probs = [e / total for e in exps]
        counts[probs.index(max(probs))] += 1
        for h in range(k):
            prob_sums[h] += probs[h]
        z += (top + math.log(total)) ** 2
    balance = k * sum((counts[h] / tokens) * (prob_sums[h] / tokens) for h in range(k))
    return balance, z / tokens


@pytest.mark.numerics
def test_balance_and_z_losses_match_a_naive_computation_over_the_real_tokens():
    model = _model(balance_loss_coef=0.3, router_z_loss_coef=0.02)
    perturb_adapter(model, scale=1.0)  # routers far from uniform: the argmax shares differ per head
    model.train()
    ids = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    tuner = model.base_model
    with adapted_layer_calls(model) as calls, tuner.routing(token_mask=mask):
        model(input_ids=ids, attention_mask=mask)
    losses = tuner.router_losses()
    expected = []
    for layer, x, _ in calls:
        logits = (x @ layer.rlora_router["default"].detach().T)[mask.bool()]  # (real tokens, K)
        expected.append(naive_router_losses(logits))
    balance = sum(b for b, _ in expected) / len(expected)  # the mean over the adapted layers
    z = sum(v for _, v in expected) / len(expected)
    # float64 softmax and sums over <= 13 tokens and 6 layers: agree to ~1e-15 relative (F64)
    torch.testing.assert_close(losses["balance"].item(), balance, **F64)
    torch.testing.assert_close(losses["z"].item(), z, **F64)
    torch.testing.assert_close(losses["loss"].item(), 0.3 * balance + 0.02 * z, **F64)
    assert losses["balance"].requires_grad and 1.0 < balance < 3.0  # 1: balanced, K = 3: one head takes all
    assert tuner.router_losses() is None  # collected once
    model.eval()
    model(input_ids=ids)
    assert tuner.router_losses() is None  # nothing is recorded outside training


@pytest.mark.numerics
def test_task_routing_gives_each_task_its_own_gates_and_an_unknown_task_uniform_gates():
    model = _model(routing="task", task_names=TASKS)
    perturb_adapter(model, scale=1.0)
    layers = [m for m in model.modules() if hasattr(m, "rlora_task_logits") and "default" in m.rlora_task_logits]
    assert layers and all("default" not in layer.rlora_router for layer in layers)  # no token router to train
    ids = torch.randint(0, 97, (4, 5), generator=torch.Generator().manual_seed(1))
    task_ids = torch.tensor([0, 2, -1, 1])
    with adapted_layer_calls(model) as calls, model.base_model.routing(task_ids=task_ids):
        model(input_ids=ids)
        gates = [(layer, layer.gates(x, "default")) for layer, x, _ in calls]
    for layer, g in gates:
        table = layer.rlora_task_logits["default"].detach()
        for row, task in enumerate(task_ids.tolist()):
            own = torch.softmax(table[task], -1) if task >= 0 else torch.full((3,), 1 / 3, dtype=torch.float64)
            torch.testing.assert_close(g[row], own.expand(5, 3), **F64)  # every token of the row alike
        assert (g[0, 0] - g[1, 0]).abs().max() > 1e-2
    with task_routing(model, "not a trained task"), adapted_layer_calls(model) as calls:
        model(input_ids=ids[:1])
        uniform = calls[0][0].gates(calls[0][1], "default")
    torch.testing.assert_close(uniform, torch.full_like(uniform, 1 / 3), **F64)


@pytest.mark.numerics
def test_token_plus_task_routing_adds_the_tasks_logits_to_the_token_routers():
    model = _model(routing="token+task", task_names=TASKS)
    perturb_adapter(model, scale=1.0)
    ids = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(2))
    with adapted_layer_calls(model) as calls, model.base_model.routing(task_ids=torch.tensor([1, -1])):
        model(input_ids=ids)
        seen = [(layer, x, layer.gates(x, "default")) for layer, x, _ in calls]
    for layer, x, g in seen:
        token = x @ layer.rlora_router["default"].detach().T  # (2, 4, K)
        task = layer.rlora_task_logits["default"].detach()[1]
        torch.testing.assert_close(g[0], torch.softmax(token[0] + task, -1), **F64)
        torch.testing.assert_close(g[1], torch.softmax(token[1], -1), **F64)  # no task: the token router alone


@pytest.mark.numerics
@pytest.mark.parametrize("share", ["down", "up"])
def test_with_task_routing_a_tasks_fixed_gate_lora_is_the_model_on_that_task(share):
    model = _model(routing="task", task_names=TASKS, share=share).eval()
    perturb_adapter(model, scale=1.0)
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    for task_id in range(len(TASKS)):
        with adapted_layer_calls(model) as calls, model.base_model.routing(task_ids=task_id):
            model(input_ids=ids)
        for layer, x, out in calls:
            B, A = layer.fixed_gate_lora("default", layer.task_gates("default", task_id), torch.float64)
            # the same float64 sums in another order (F64)
            torch.testing.assert_close(out, layer.base_layer(x) + x @ A.T @ B.T, **F64)


def test_task_routing_needs_the_task_names():
    with pytest.raises(ConfigError, match=r"RLoraConfig.task_names: routing 'task' needs the list of task names"):
        RLoraConfig(routing="task")
    with pytest.raises(ConfigError, match=r"RLoraConfig.routing: expected one of 'token', 'task', 'token\+task'"):
        RLoraConfig(routing="tasks", task_names=TASKS)
    with pytest.raises(ConfigError, match=r"RLoraConfig.heads_pattern: '\(' is not a valid regex"):
        RLoraConfig(heads_pattern={"(": 2})
    with pytest.raises(ConfigError, match=r"RLoraConfig.heads_pattern: expected null or a mapping"):
        RLoraConfig(heads_pattern={"up_proj": 0})


FRESH_LOAD = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import rlora  # noqa: F401  (registers the method)
from _tiny import tiny_llama
from peft import PeftModel
model = PeftModel.from_pretrained(tiny_llama(dtype=torch.float64), sys.argv[2]).eval()
heads = {n: m.num_heads["default"] for n, m in model.named_modules() if type(m).__name__ == "RLoraLinear"}
ids = torch.arange(12).view(2, 6)
with model.base_model.routing(task_ids=torch.tensor([2, 0])):
    logits = model(input_ids=ids).logits
torch.save({"heads": heads, "logits": logits}, sys.argv[3])
"""


@pytest.mark.numerics
def test_head_counts_per_layer_and_task_routing_are_saved_and_honoured_in_a_fresh_process(tmp_path):
    pattern = {r"layers\.0\.mlp\.up_proj": 2, "down_proj": 5}
    model = _model(heads_pattern=pattern, routing="token+task", task_names=TASKS).eval()
    perturb_adapter(model, scale=0.5)
    model.save_pretrained(tmp_path / "adapter")
    saved = RLoraConfig.from_pretrained(tmp_path / "adapter")
    assert saved.heads_pattern == pattern and saved.routing == "token+task" and saved.task_names == TASKS
    ids = torch.arange(12).view(2, 6)
    with model.base_model.routing(task_ids=torch.tensor([2, 0])):
        expected = model(input_ids=ids).logits
    out = tmp_path / "loaded.pt"
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FRESH_LOAD), str(Path_tests()), str(tmp_path / "adapter"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,  # a fresh interpreter loading torch on 2 busy cores
    )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = torch.load(out, weights_only=True)
    prefix = "base_model.model.model.layers."
    assert loaded["heads"] == {
        f"{prefix}{i}.mlp.{m}": {"up_proj": 2 if i == 0 else 3, "gate_proj": 3, "down_proj": 5}[m]
        for i in range(2)
        for m in MLP
    }
    torch.testing.assert_close(loaded["logits"], expected, **F64)  # the same float64 model, reloaded


def Path_tests():
    from pathlib import Path

    return Path(__file__).parent


@pytest.mark.numerics
@pytest.mark.parametrize("head_init", ["zeros", "random"])
def test_alora_starts_at_the_base_model_trains_and_reloads(tmp_path, head_init):
    from rlora.methods import adapter_config

    base = tiny_llama(dtype=torch.float64)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        start = base(input_ids=ids).logits
    config = adapter_config("alora", r=2, lora_alpha=8, num_heads=3, lora_dropout=0.0, target_modules=MLP)
    config.head_init = head_init  # zeros: the method's (B = 0); random: R-LoRA's init, with its offset
    model = get_peft_model(base, config)
    layer = next(m for m in model.modules() if type(m).__name__ == "RLoraLinear")
    assert layer.rlora_A["default"].shape == (3 * 2, layer.in_features)  # K down-projections
    assert layer.rlora_B["default"].shape == (layer.out_features, 2)  # one shared up-projection
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, start, **F64)  # exact start (uniform gates)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert layer.rlora_router["default"].abs().max() > 0  # the zero router is no saddle with K distinct A_k
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "alora")
    reloaded = PeftModel.from_pretrained(tiny_llama(dtype=torch.float64), tmp_path / "alora").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, **F64)


# Tasks that need different heads: the same inputs x ~ N(0, I) for every task, task t's target W0 x + D_t x with its
# own rank-2 map D_t; one adapted layer with K = 3 heads of rank 2. Token routing cannot tell the tasks apart from
# x; task routing can. JSD: the Jensen-Shannon divergence (nats) of the tasks' mean gates.
SEPARATION_STEPS = 150
SEPARATION_JSD = 0.05  # of at most ln 2 = 0.693 for two tasks


def _jsd(p: torch.Tensor, q: torch.Tensor) -> float:
    def entropy(v):
        return -(v * v.clamp_min(1e-12).log()).sum().item()

    return entropy((p + q) / 2) - (entropy(p) + entropy(q)) / 2


def _separation_run(routing: str, router_init: str, head_init: str) -> float:
    torch.manual_seed(0)
    d = 16
    module = torch.nn.Sequential(torch.nn.Linear(d, d, bias=False))
    targets = [torch.randn(d, 2) @ torch.randn(2, d) / d for _ in range(2)]  # D_t, rank 2 each
    config = RLoraConfig(
        r=2,
        num_heads=3,
        lora_alpha=2,
        use_rslora=False,
        lora_dropout=0.0,
        target_modules=["0"],
        head_init=head_init,
        router_init=router_init,
        routing=routing,
        task_names=["one", "two"] if routing != "token" else None,
    )
    model = get_peft_model(module, config)
    layer = model.base_model.model[0]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(SEPARATION_STEPS):
        x = torch.randn(2, 16, d, generator=gen)  # row t: 16 tokens of task t
        with model.base_model.routing(task_ids=torch.tensor([0, 1])):
            out = model(x)
        want = torch.stack([layer.base_layer(x[t]) + x[t] @ targets[t].T for t in range(2)])
        loss = (out - want).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    x = torch.randn(2, 64, d, generator=gen)
    with torch.no_grad(), model.base_model.routing(task_ids=torch.tensor([0, 1])):
        gates = layer.gates(x, "default")
    return _jsd(gates[0].mean(0), gates[1].mean(0))


def test_task_routing_separates_tasks_that_need_different_heads_token_routing_reported():
    for head_init, router_init in (("random", "zeros"), ("zeros", "random")):
        jsd = _separation_run("task", router_init, head_init)  # zero heads need a random table: no saddle
        assert jsd > SEPARATION_JSD, (head_init, jsd)
        token = _separation_run("token", router_init, head_init)
        print(
            f"after {SEPARATION_STEPS} steps, heads {head_init}: task routing JSD {jsd:.3f} nats; "
            f"token routing from a {router_init} router: JSD {token:.4f} nats"
        )


@pytest.mark.numerics
def test_a_task_routed_run_trains_with_the_balance_loss_logs_it_and_exports_each_task_exactly(
    workspace, tmp_path, capsys
):
    import json

    from _tiny import write_config
    from transformers import AutoModelForCausalLM

    from rlora.cli import main
    from rlora.commands.eval import evaluate_run
    from rlora.run import load_run
    from rlora.runconfig import load_run_config
    from rlora.train import train

    overrides = ["adapter.routing=task", "adapter.balance_loss_coef=0.05", "adapter.router_z_loss_coef=0.001"]
    run = train(load_run_config(write_config(workspace, tmp_path / "run"), overrides))
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    logged = [r for r in log if "loss" in r]
    assert len(logged) == 6 and all(r["router_balance_loss"] >= 1.0 - 1e-6 for r in logged)  # uniform: exactly 1
    assert all(r["router_z_loss"] > 0 for r in logged)
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (saved["routing"], saved["task_names"]) == ("task", ["colors", "letters"])  # the data plan's order
    assert "router" in evaluate_run(run)  # evaluated per task, with that task's gates

    capsys.readouterr()
    assert main(["export", str(run), "--gates", "per-task", "--out", str(tmp_path / "tasks")]) == 0
    assert "exact: the adapter routes by task" in capsys.readouterr().out
    model = load_run(run).model.double().eval()
    ids = torch.tensor([[5, 9, 14, 3, 7, 11]])
    for task in ("colors", "letters"):
        gates = json.loads((tmp_path / "tasks" / task / "gates.json").read_text())
        for name, layer in ((n.removeprefix("base_model.model."), m) for n, m in model.named_modules()):
            if name in gates:
                own = layer.task_gates("default", ["colors", "letters"].index(task))
                torch.testing.assert_close(torch.tensor(gates[name], dtype=torch.float64), own, **F64)
        export = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(workspace / "model").double(), tmp_path / "tasks" / task
        ).eval()
        with torch.no_grad(), task_routing(model, task):
            routed = model(input_ids=ids).logits
        with torch.no_grad():
            fixed = export(input_ids=ids).logits
        # the export stores B in float32 (one rounding, relative 6e-8, of updates of size < 1), carried through two
        # tiny layers to logits of size ~1: differences ~1e-6; 1e-4 leaves room and is far below a routing error
        torch.testing.assert_close(fixed, routed, atol=1e-4, rtol=0)


def test_a_method_label_carries_adapter_settings_into_its_runs(workspace, tmp_path):
    from _tiny import write_config

    from rlora.commands.compare import parse_methods, run_config_for
    from rlora.methods import parse_method
    from rlora.runconfig import load_run_config

    spec = parse_method("rlora@routing=token+task@balance_loss_coef=0.01")
    assert (spec.method, spec.adapter) == ("rlora", (("routing", "token+task"), ("balance_loss_coef", "0.01")))
    base = load_run_config(write_config(workspace, tmp_path / "base"))
    cfg = run_config_for(base, tmp_path / "out", spec, seed=1)
    assert (cfg.method, cfg.adapter.routing, cfg.adapter.balance_loss_coef, cfg.seed) == (
        "rlora",
        "token+task",
        0.01,
        1,
    )
    assert base.adapter.routing == "token"  # the base config is left as it was
    with pytest.raises(ConfigError, match=r"--methods rlora@routing=tasks: .*adapter.routing: expected one of"):
        run_config_for(base, tmp_path / "out", parse_method("rlora@routing=tasks"), seed=0)
    for bad in ("rlora@routing=../x", "lora@routing=task", "rlora@"):
        with pytest.raises(ConfigError, match=r"--methods: unknown method"):
            parse_methods(bad)


def test_the_router_losses_are_refused_with_the_reentrant_checkpoint(workspace, tmp_path):
    from _tiny import write_config

    from rlora.runconfig import load_run_config

    overrides = [
        "adapter.balance_loss_coef=0.01",
        "training.gradient_checkpointing=true",
        "training.gradient_checkpointing_reentrant=true",
    ]
    with pytest.raises(ConfigError, match=r"adapter.balance_loss_coef: the router losses need gradients"):
        load_run_config(write_config(workspace, tmp_path / "run"), overrides)
