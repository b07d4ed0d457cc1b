"""The router's init: HydraLoRA's random router, R-LoRA's zero router, and the saddle of zero heads with a
zero router (pinned here so that nobody re-creates it unknowingly).

Everything runs in float64. A check is exact only where the code guarantees it (zero heads make every product
of the update an exact zero); everything that comes out of a matmul kernel is checked against a rounding bound
derived from the unit round-off and the magnitudes involved, because CPUs (AVX2 vs AVX-512, MKL vs oneDNN, thread
counts) round the columns of one matmul differently.
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

pytestmark = pytest.mark.numerics  # run again on other CPU kernel paths by scripts/test.sh

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
        "alora": "zeros",  # B = 0 and K distinct random A_k: exact start, and no saddle (tests/test_routing.py)
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


U = torch.finfo(torch.float64).eps / 2  # unit round-off of float64


def gamma(n: int) -> float:
    """The classic bound on a length-n dot product in floating point: |fl(a.b) - a.b| <= gamma(n) * |a|.|b|, for
    any order of summation (blocked, vectorised, split over threads) and with or without FMA."""
    return n * U / (1 - n * U)


def saddle_layer(seed: int) -> RLoraLinear:
    """Zero heads, zero router, one mask on x (here p = 0, so that the test can recompute the layer's inputs)."""
    return make_layer(seed, head_init="zeros", router_init="zeros", head_dropout=False, lora_dropout=0.0)


def sgd_steps(layer: RLoraLinear, seed: int, steps: int, check=None) -> None:
    """Plain SGD: a step is proportional to the gradient, so round-off in a gradient stays round-off in the weights
    (AdamW divides each coordinate by its own magnitude, which turns 1e-18 into a full step)."""
    layer.train()
    x, y = task_data(seed, layer.in_features, layer.out_features)
    opt = torch.optim.SGD([p for n, p in layer.named_parameters() if "rlora_" in n], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        delta = layer(x) - layer.base_layer(x)
        F.mse_loss(delta, y).backward()
        if check is not None:
            check(layer, x, (2 * (delta - y) / delta.numel()).detach())  # dL/d(output), (n, d_out)
        opt.step()


def check_the_saddle_gradients(layer: RLoraLinear, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    """In exact arithmetic, on the saddle, every head gets the same gradient and the router none. In floating point
    the K heads' gradients come out of one matmul, grad_B = grad_out^T u with u = [g_1 z, ..., g_K z], whose kernel
    may round each column differently; so they agree up to two dot-product bounds, plus what the gates (equal in
    exact arithmetic, differing by round-off once the router has moved by round-off) make them differ."""
    A, B, W_r = (layer.rlora_A["default"], layer.rlora_B["default"], layer.rlora_router["default"])
    n, d_out, k, r, s = x.shape[0], layer.out_features, 4, 4, layer.scaling["default"]
    a = grad_out.abs()  # (n, d_out)
    z = (x @ A.T).abs()  # (n, r), shared by all heads
    g = torch.softmax(x @ W_r.T, dim=-1)  # (n, K)
    grads = B.grad.view(d_out, k, r)
    heads = B.detach().view(d_out, k, r)
    # What makes it the saddle: gates and heads equal up to round-off (a random router fails both at once)
    assert (g - g[:, :1]).abs().max() < 1e3 * U
    assert (heads - heads[:, :1]).abs().max() <= 1e3 * U * heads.abs().max()
    for h in range(1, k):
        u_max = torch.maximum(g[:, h], g[:, 0])[:, None] * s * z  # (n, r): the larger of the two heads' inputs
        gate_gap = (g[:, h] - g[:, 0]).abs()[:, None] + 4 * U * g[:, h : h + 1]  # (n, 1): plus the gates' rounding
        bound = 2 * (2 * gamma(n) + 4 * U) * (a.T @ u_max) + a.T @ (gate_gap * s * z)  # (d_out, r)
        assert ((grads[:, h] - grads[:, 0]).abs() <= bound).all(), h
    # The router: dL/dg_k = s <grad_out, B_k z> per token, equal across heads in exact arithmetic while the heads
    # are equal; each is one matmul of length d_out then a sum over r (bound gamma(d_out + r)), and the heads differ
    # by what they have drifted apart. The softmax's backward turns those gaps into the router's gradient.
    magnitude = s * ((a @ heads.abs().amax(dim=1)) * z).sum(-1)  # (n,) sum_o,j |grad_out||B||z|
    drift = s * ((a @ (heads - heads[:, :1]).abs().amax(dim=1)) * z).sum(-1)  # (n,)
    gap = 2 * gamma(d_out + r + k) * magnitude + drift  # (n,) bound on max_k,j |dL/dg_k - dL/dg_j|, with rounding
    router_bound = 2 * (g.amax(-1) * gap)[:, None].T @ x.abs()  # (1, d_in)
    assert (W_r.grad.abs() <= router_bound).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_on_the_saddle_the_heads_get_one_gradient_and_the_router_none_up_to_rounding(seed):
    layer = saddle_layer(seed)
    sgd_steps(layer, seed, steps=30, check=check_the_saddle_gradients)
    assert layer.head_weights("default").abs().max() > 0.01  # the heads did learn something


def test_zero_heads_give_the_router_an_exactly_zero_gradient_at_the_first_step():
    """Exact by construction, on any CPU: B = 0 makes every product feeding the gates' gradient an exact zero."""
    layer = saddle_layer(0)
    grads = []
    sgd_steps(layer, 0, steps=1, check=lambda layer, _x, _g: grads.append(layer.rlora_router["default"].grad.clone()))
    assert torch.count_nonzero(grads[0]) == 0


@pytest.mark.parametrize("seed", SEEDS)
def test_without_adams_normalisation_the_saddle_keeps_one_head_and_a_random_router_splits_them(seed):
    """Under SGD round-off stays round-off: after 30 steps the saddle's heads differ by a few units of round-off
    of their size (measured 1.9e-16 to 2.4e-16 relative) and its router by ~1e-17, while HydraLoRA's random router
    makes the heads as different as they are large (measured 1.1 to 1.3 relative)."""
    saddle, hydra = saddle_layer(seed), method_layer("hydralora", seed)
    sgd_steps(saddle, seed, steps=30)
    sgd_steps(hydra, seed, steps=30)

    def spread(layer):
        h = heads(layer)
        return ((h - h[0]).abs().max() / h.abs().max()).item()

    assert spread(saddle) < 1e-12  # 30 steps of ~1e3 roundings each, with a wide margin; still 1e9 below ...
    assert spread(hydra) > 0.1  # ... the spread a random router gives
    assert saddle.rlora_router["default"].abs().max() < 1e-12


@pytest.mark.parametrize("seed", SEEDS)
def test_with_adam_the_saddle_keeps_the_heads_more_alike_than_a_random_router(seed):
    """AdamW normalises each coordinate, so the router's round-off gradient (~1e-18, present on CPUs whose kernels
    round the heads' columns differently) becomes a full-size step: on such a CPU the saddle breaks within ~10
    steps (measured on an AVX2 AMD EPYC: head spread 1e-9 at step 5, 5e-3 at step 10, 0.2 at step 29) and the
    heads reach a cosine of 0.54-0.61 after 30 steps; on CPUs that round the columns alike they stay equal
    (cosine 1). A random router splits them far more from the first step (cosine -0.10 to -0.07 here)."""
    saddle, hydra = saddle_layer(seed), method_layer("hydralora", seed)
    train(saddle, seed, steps=30)
    train(hydra, seed, steps=30)
    assert mean_pairwise_cosine(saddle) > mean_pairwise_cosine(hydra) + 0.3


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
        assert norms[0] == 0 and norms[1] > 0  # step 0 exact by construction: B = 0 zeroes every product


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

    from rlora.trainer import RloraTrainer

    model = get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP))
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, report_to=[], use_cpu=True)
    optimizer = RloraTrainer(model=model, args=args, router_lr_scale=scale).create_optimizer()
    routers = {id(p) for n, p in model.named_parameters() if "rlora_router" in n}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [{id(p) for p in g["params"]} for g in optimizer.param_groups]
    assert set().union(*grouped) == trainable and sum(map(len, grouped)) == len(trainable)  # each once
    if scale == 1.0:
        assert all(g["lr"] == 1e-3 for g in optimizer.param_groups)
    else:
        assert [g["lr"] for g, ids in zip(optimizer.param_groups, grouped, strict=True) if ids == routers] == [5e-2]
        assert all(g["lr"] == 1e-3 for g, ids in zip(optimizer.param_groups, grouped, strict=True) if ids != routers)
