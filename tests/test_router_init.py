"""The router's init: HydraLoRA's random router, R-LoRA's zero router, and the saddle of zero heads with a
zero router (pinned here so that nobody re-creates it unknowingly).

Everything runs in float64: the checks are either exact (bitwise) or algebraic identities.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rlora import RLoraConfig, RLoraLinear
from rlora.methods import MULTI_HEAD, adapter_config
from rlora.tuner.config import RANDOM_START_WARNING

SEEDS = [0, 1, 2]


def make_layer(seed: int, d_in=16, d_out=24, **cfg) -> RLoraLinear:
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out).double()
    cfg = {"r": 4, "num_heads": 4, "lora_dropout": 0.1} | cfg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-start warning has its own test
        config = RLoraConfig(**cfg)
    return RLoraLinear(base, "default", config).double()


def method_layer(method: str, seed: int, d_in=16, d_out=24) -> RLoraLinear:
    cfg = adapter_config(method, r=4, lora_alpha=32, num_heads=4, lora_dropout=0.1, target_modules=["x"])
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out).double()
    return RLoraLinear(base, "default", cfg).double()


def task_data(seed: int, d_in=16, d_out=24, n=64):
    """An input-dependent target: two clusters of inputs, each with its own linear map."""
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    maps = torch.randn(2, d_out, d_in, generator=gen, dtype=torch.float64) * 0.3
    side = (x[:, 0] > 0).long()
    y = torch.einsum("noi,ni->no", maps[side], x)
    return x, y


def train(layer: RLoraLinear, seed: int, steps: int) -> None:
    layer.train()
    x, y = task_data(seed, layer.in_features, layer.out_features)
    params = [p for n, p in layer.named_parameters() if "rlora_" in n]
    opt = torch.optim.AdamW(params, lr=1e-2)
    torch.manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(layer(x) - layer.base_layer(x), y).backward()
        opt.step()


def heads(layer: RLoraLinear) -> torch.Tensor:
    return layer.head_weights("default").flatten(1)  # (K, d_out*r)


def mean_pairwise_cosine(layer: RLoraLinear) -> float:
    h = heads(layer)
    sim = F.cosine_similarity(h[:, None], h[None, :], dim=-1)
    k = h.shape[0]
    return ((sim.sum() - sim.diagonal().sum()) / (k * (k - 1))).item()


def test_the_methods_use_their_papers_router_init():
    assert {m: s["router_init"] for m, s in MULTI_HEAD.items()} == {
        "rlora": "zeros",
        "hydralora": "random",
        "hydralora+dropout": "random",
        "hydralora+init": "zeros",
    }
    assert RLoraConfig().router_init == "zeros"
    overridden = adapter_config(
        "hydralora", r=4, lora_alpha=32, num_heads=4, lora_dropout=0.1, target_modules=["x"], router_init="zeros"
    )
    assert overridden.router_init == "zeros" and overridden.head_init == "zeros"


@pytest.mark.parametrize("seed", SEEDS)
def test_random_router_is_a_default_linear_layers_init(seed):
    layer = make_layer(seed, router_init="random", head_init="zeros")
    router = layer.rlora_router["default"]
    bound = 1 / math.sqrt(16)  # nn.Linear's kaiming_uniform(a=sqrt(5)) on fan_in 16 is U(-1/4, 1/4)
    assert router.shape == (4, 16)
    assert router.abs().max().item() <= bound and router.abs().max().item() > bound / 2
    assert router.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.35)  # 64 draws: std within ~35%


def test_zero_router_and_zero_heads_stay_one_head_forever():
    """The saddle: every head gets exactly the same gradient and the router none, so the heads stay equal."""
    layer = make_layer(0, head_init="zeros", router_init="zeros", head_dropout=False)
    train(layer, 0, steps=30)
    h = heads(layer)
    assert h.abs().max().item() > 0.01  # the heads did learn something ...
    for k in range(1, h.shape[0]):
        assert torch.equal(h[k], h[0])  # ... but bitwise the same thing
    assert torch.count_nonzero(layer.rlora_router["default"]) == 0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("method", ["hydralora", "hydralora+dropout"])
def test_hydralora_heads_differentiate_with_its_random_router(method, seed):
    layer = method_layer(method, seed)
    assert torch.count_nonzero(heads(layer)) == 0  # zero heads: an exact start ...
    train(layer, seed, steps=150)
    # ... and after training the heads are distinct directions, not one head (the saddle gives exactly 1.0).
    # Measured -0.23..0.07 over these seeds; 0.9 leaves a wide margin on any CPU and still fails the saddle.
    assert mean_pairwise_cosine(layer) < 0.9


def router_grad_norms(layer: RLoraLinear, seed: int, steps: int) -> list[float]:
    layer.train()
    x, y = task_data(seed, layer.in_features, layer.out_features)
    opt = torch.optim.AdamW([p for n, p in layer.named_parameters() if "rlora_" in n], lr=1e-2)
    norms = []
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(layer(x) - layer.base_layer(x), y).backward()
        norms.append(layer.rlora_router["default"].grad.abs().max().item())
        opt.step()
    return norms


@pytest.mark.parametrize("method", list(MULTI_HEAD))
def test_every_method_trains_its_router_from_the_first_steps(method):
    """Random heads give the router a gradient at step 0. Zero heads all output zero at step 0, so the router's
    gradient there is exactly zero for every router init; with a random router the heads' first gradients
    differ (each is scaled by its own gate), the heads then differ, and the router's gradient at step 1 is not
    zero."""
    norms = router_grad_norms(method_layer(method, 0), 0, steps=2)
    if MULTI_HEAD[method]["head_init"] == "random":
        assert norms[0] > 0
    else:
        assert norms[0] == 0 and norms[1] > 0


def test_the_saddle_never_gives_the_router_a_gradient():
    layer = make_layer(0, head_init="zeros", router_init="zeros", head_dropout=False)
    assert router_grad_norms(layer, 0, steps=5) == [0.0] * 5


@pytest.mark.parametrize("head_dropout", [True, False])
def test_zero_heads_start_exactly_at_the_base_layer_whatever_the_router(head_dropout):
    layer = make_layer(0, head_init="zeros", router_init="random", head_dropout=head_dropout).eval()
    x = torch.randn(5, 16, dtype=torch.float64)
    assert torch.equal(layer(x), layer.base_layer(x))  # B_k = 0: the update is exactly zero


@pytest.mark.parametrize("seed", SEEDS)
def test_random_heads_with_a_random_router_do_not_start_at_the_base_and_the_error_is_measured(seed):
    """The R-LoRA authors' setting: the offset assumes uniform gates, so the start error is
    s * sum_k (g_k(x) - 1/K) B_k A x, computed here independently of the fused code."""
    layer = make_layer(seed, head_init="random", router_init="random").eval()
    x = torch.randn(7, 16, dtype=torch.float64)
    A, B = layer.rlora_A["default"], layer.rlora_B["default"]
    r, k, s = 4, 4, layer.scaling["default"]
    g = torch.softmax(x @ layer.rlora_router["default"].T, dim=-1)
    expected = sum(s * (g[:, i : i + 1] - 1 / k) * (x @ A.T @ B[:, i * r : (i + 1) * r].T) for i in range(k))
    error = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(error, expected, atol=1e-12, rtol=1e-10)  # float64 algebra
    relative = (error.norm() / layer.base_layer(x).norm()).item()
    assert relative > 1e-4  # a real, visible departure from the pretrained function


def test_random_heads_with_a_random_router_warn_where_chosen():
    with pytest.warns(UserWarning, match="does NOT start at the pretrained function"):
        RLoraConfig(head_init="random", router_init="random")
    assert "does NOT start" in RANDOM_START_WARNING


def test_a_bad_router_init_is_rejected_naming_the_field():
    with pytest.raises(
        ValueError, match=r"^RLoraConfig.router_init: expected one of 'zeros', 'random', got 'uniform'$"
    ):
        RLoraConfig(router_init="uniform")


@pytest.mark.parametrize("scale", [1.0, 50.0])
def test_router_lr_scale_gives_the_routers_their_own_optimizer_group(tmp_path, scale):
    from _tiny import MLP, tiny_llama
    from peft import get_peft_model
    from transformers import TrainingArguments

    from rlora.train import _FiniteLossTrainer

    model = get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP))
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, report_to=[], use_cpu=True)
    optimizer = _FiniteLossTrainer(model=model, args=args, router_lr_scale=scale).create_optimizer()
    routers = {id(p) for n, p in model.named_parameters() if "rlora_router" in n}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [{id(p) for p in g["params"]} for g in optimizer.param_groups]
    assert set().union(*grouped) == trainable and sum(map(len, grouped)) == len(trainable)  # each once
    if scale == 1.0:
        assert all(g["lr"] == 1e-3 for g in optimizer.param_groups)
    else:
        assert [g["lr"] for g, ids in zip(optimizer.param_groups, grouped, strict=True) if ids == routers] == [5e-2]
        assert all(g["lr"] == 1e-3 for g, ids in zip(optimizer.param_groups, grouped, strict=True) if ids != routers)
