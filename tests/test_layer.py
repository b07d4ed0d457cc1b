"""The multi-head layer on its own: init, offset, fused forward against a naive per-head loop, dropout.

What holds in exact arithmetic (fused = per-head loop, the start = the base layer, fixed-gate merge = the layer) is
checked in float64 at the F64 tolerance, which holds on any BLAS. What depends on a dtype's rounding is checked
separately, against a bound derived from that dtype's eps and the magnitudes involved.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from _tiny import F64, fixed_gate_weight_bound, start_bound
from torch import nn

from rlora import RLoraConfig, RLoraLinear
from rlora.tuner.layer import reuse_fused_weights

pytestmark = pytest.mark.numerics  # run again on other CPU kernel paths by scripts/test.sh

VARIANTS = list(itertools.product(["random", "zeros"], [True, False]))
# (seed, d_in, d_out, r, K, bias): several draws and shapes, a single head and a layer without bias among them
CASES = [(0, 24, 40, 4, 3, True), (1, 9, 5, 2, 4, False), (2, 16, 16, 8, 1, True)]
CASE_IDS = [f"seed{s}-{i}x{o}-r{r}-K{k}{'' if b else '-nobias'}" for s, i, o, r, k, b in CASES]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def make_layer(d_in=24, d_out=40, bias=True, seed=0, dtype=torch.float64, **cfg) -> RLoraLinear:
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    cfg = {"r": 4, "num_heads": 3, "lora_dropout": 0.0} | cfg
    return RLoraLinear(base, "default", RLoraConfig(**cfg))  # the adapter takes the base layer's dtype


def case_layer(case, dtype=torch.float64, **cfg) -> RLoraLinear:
    seed, d_in, d_out, r, k, bias = case
    return make_layer(d_in, d_out, bias=bias, seed=seed, dtype=dtype, r=r, num_heads=k, **cfg)


def leave_the_init(layer: RLoraLinear, seed: int) -> None:
    """Move A, the heads and the router away from their init, as training would: non-uniform gates, distinct heads."""
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in (layer.rlora_A["default"], layer.rlora_B["default"], layer.rlora_router["default"]):
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def naive_forward(layer: RLoraLinear, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """Per-head loop straight from the paper's formula, in x's dtype, independent of the fused code (no dropout)."""
    W0, b0 = layer.base_layer.weight, layer.base_layer.bias
    A, B, Wr = layer.rlora_A[name], layer.rlora_B[name], layer.rlora_router[name]
    r, k, s = layer.r[name], layer.num_heads[name], layer.scaling[name]
    out = x @ W0.T if b0 is None else x @ W0.T + b0
    gates = torch.softmax(x @ Wr.T, dim=-1)
    for i in range(k):
        Bi = B[:, i * r : (i + 1) * r]
        out = out + s * gates[..., i : i + 1] * ((x @ A.T) @ Bi.T)
    if name in layer.rlora_offset_A:
        out = out - (x @ layer.rlora_offset_A[name].T) @ layer.rlora_offset_B[name].T
    return out


def heads_cosine(layer: RLoraLinear) -> torch.Tensor:
    heads = layer.head_weights("default").flatten(1)  # (K, d_out*r)
    return F.cosine_similarity(heads[:, None], heads[None, :], dim=-1)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("head_dropout", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_heads_start_exactly_at_the_base_layer(dtype, head_dropout, case):
    layer = case_layer(case, dtype, head_init="zeros", head_dropout=head_dropout, lora_dropout=0.1).eval()
    x = torch.randn(5, 7, case[1]).to(dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (5, 7, case[2])
    # B = 0 makes every product of the update an exact zero, and base + 0 is the base: exact in any dtype
    torch.testing.assert_close(out, layer.base_layer(x), atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("head_dropout", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_heads_start_at_the_base_layer_up_to_rounding(dtype, head_dropout, case):
    layer = case_layer(case, dtype, head_init="random", head_dropout=head_dropout, lora_dropout=0.1).eval()
    x = torch.randn(5, 7, case[1]).to(dtype)
    out, base = layer(x), layer.base_layer(x)
    assert out.dtype == dtype and out.shape == (5, 7, case[2])
    # the heads' update minus the offset is zero in exact arithmetic; what is left is rounding (float64: ~1e-14)
    bound = start_bound(layer, x, base)
    assert ((out.double() - base.double()).abs() <= bound).all()
    # and the bound is tight enough to see the offset: without it the update (exact, in float64) exceeds it
    heads = layer.head_weights("default").double()
    update = layer.scaling["default"] * (x.double() @ layer.rlora_A["default"].double().T) @ heads.mean(0).T
    assert (update.abs() > bound).any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_init_has_the_stable_scale_and_the_offset_is_the_initial_update(seed):
    layer = make_layer(d_in=512, d_out=1024, seed=seed, r=8, num_heads=4, init_gamma=64.0, lora_alpha=16)
    f = 1024**0.25 / math.sqrt(64.0)
    A, heads = layer.rlora_A["default"], layer.head_weights("default")
    # sample std of N Gaussians: relative standard error 1/sqrt(2N); 5 standard errors
    assert A.std().item() == pytest.approx(f / math.sqrt(512), rel=5 / math.sqrt(2 * A.numel()))
    assert heads.std().item() == pytest.approx(f / math.sqrt(1024), rel=5 / math.sqrt(2 * heads.numel()))
    assert layer.scaling["default"] == pytest.approx(16 / math.sqrt(8), rel=1e-15)  # 8**0.5 vs sqrt: last bit
    assert layer.rlora_offset_A["default"].dtype == A.dtype == torch.float64
    torch.testing.assert_close(layer.rlora_offset_A["default"], A, atol=0, rtol=0)  # a copy: exact
    torch.testing.assert_close(layer.rlora_offset_B["default"], 16 / math.sqrt(8) * heads.mean(0), **F64)
    assert not layer.rlora_offset_A["default"].requires_grad and not layer.rlora_offset_B["default"].requires_grad
    assert torch.count_nonzero(layer.rlora_router["default"]) == 0
    gates = layer.gates(torch.randn(3, 512, dtype=torch.float64), "default")
    assert torch.equal(gates, gates[:1, :1].expand(3, 4))  # softmax of zeros: K identical gates, exactly


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_heads_are_diverse_and_zero_heads_identical(seed):
    cos = heads_cosine(make_layer(d_in=256, d_out=1536, seed=seed, r=4, num_heads=5))
    off_diagonal = cos[~torch.eye(5, dtype=torch.bool)]
    # independent Gaussians in D = 6144 dims: cosine ~ N(0, 1/D), sd 0.0128; 6 sd over 10 pairs
    assert off_diagonal.abs().max() < 6 / math.sqrt(1536 * 4)

    zero_heads = make_layer(seed=seed, head_init="zeros").head_weights("default")
    assert zero_heads.shape == (3, 40, 4) and torch.count_nonzero(zero_heads) == 0


def test_zeros_init_stores_no_offset_and_uses_plain_lora_scaling_without_rslora():
    layer = make_layer(head_init="zeros", use_rslora=False, lora_alpha=8, r=4)
    assert "default" not in layer.rlora_offset_A and "default" not in layer.rlora_offset_B
    assert layer.scaling["default"] == 2.0


@pytest.mark.parametrize("shape", [(6,), (2, 5)], ids=["tokens", "batch-tokens"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("head_init", "head_dropout"), VARIANTS)
def test_fused_forward_and_gradients_equal_a_naive_per_head_loop(head_init, head_dropout, case, shape):
    layer = case_layer(case, head_init=head_init, head_dropout=head_dropout)
    leave_the_init(layer, case[0])
    layer.train()  # dropout 0: training mode must still match
    x1 = torch.randn(*shape, case[1], dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    fused, naive = layer(x1), naive_forward(layer, x2)
    assert fused.dtype == torch.float64
    torch.testing.assert_close(fused, naive, **F64)

    params = [layer.rlora_A["default"], layer.rlora_B["default"], layer.rlora_router["default"]]
    weights = torch.randn_like(fused)
    g_fused = torch.autograd.grad((fused * weights).sum(), [x1, *params])
    g_naive = torch.autograd.grad((naive * weights).sum(), [x2, *params])
    for a, b in zip(g_fused, g_naive, strict=True):
        torch.testing.assert_close(a, b, **F64)
    router_grad = g_fused[-1]
    if case[4] == 1:  # one gate, always 1 whatever the router: its gradient is exactly zero
        assert torch.count_nonzero(router_grad) == 0
    else:
        assert router_grad.abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gates_of_low_precision_inputs_are_computed_in_float32(seed, dtype):
    layer = make_layer(seed=seed, dtype=dtype)
    leave_the_init(layer, seed)
    d_in, k = layer.in_features, layer.num_heads["default"]
    x = torch.randn(5, d_in).to(dtype)
    gates = layer.gates(x, "default")
    assert gates.dtype == torch.float32
    # x and the router are exact in float32; float64 gives the exact softmax to compare with
    logits = x.double() @ layer.rlora_router["default"].double().T
    exact = torch.softmax(logits, dim=-1)
    # float32 logits: error <= d_in * eps * sum |x_i w_i|; a softmax moves by at most 2 max|logit error| relative,
    # plus K + 3 roundings in exp, sum and division
    eps = torch.finfo(torch.float32).eps
    logit_error = d_in * eps * (x.double().abs() @ layer.rlora_router["default"].double().abs().T).max()
    bound = exact * (2 * logit_error + (k + 3) * eps)
    assert ((gates.double() - exact).abs() <= bound).all()
    assert not torch.allclose(exact, torch.full_like(exact, 1 / k))  # non-uniform gates: the test sees the router


def identity_probe(head_dropout: bool, p: float = 0.5, r: int = 16, k: int = 4) -> tuple[RLoraLinear, torch.Tensor]:
    """A layer whose output shows each head's dropped A·x separately: A = I, B = I, d_out = K*r.

    Every value is a power of two (gates 1/4, s = 1, masks 0 or 1/(1-p) = 2), so float32 computes them exactly."""
    layer = make_layer(d_in=r, d_out=k * r, bias=False, dtype=torch.float32, r=r, num_heads=k, head_init="zeros",
                       lora_dropout=p, head_dropout=head_dropout, use_rslora=False, lora_alpha=r)  # fmt: skip
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.rlora_A["default"].copy_(torch.eye(r))
        layer.rlora_B["default"].copy_(torch.eye(k * r))
    return layer, torch.ones(3, r)


def test_per_head_dropout_draws_an_independent_mask_for_each_head():
    layer, x = identity_probe(head_dropout=True)
    torch.manual_seed(0)
    out = layer.train()(x).view(3, 4, 16)  # (tokens, heads, r): gate 1/4 times the mask scaled by 1/(1-p)
    assert set(out.unique().tolist()) == {0.0, 0.5}
    for t in range(3):
        masks = [tuple(out[t, h].tolist()) for h in range(4)]
        assert len(set(masks)) == 4, "heads share a dropout mask"
    assert not torch.equal(out[0], out[1]), "tokens share a dropout mask"

    evaluated = layer.eval()(x)
    torch.testing.assert_close(evaluated, torch.full((3, 64), 0.25), atol=0, rtol=0)
    torch.testing.assert_close(layer(x), evaluated, atol=0, rtol=0)


def test_shared_dropout_applies_one_mask_on_x_to_all_heads():
    layer, x = identity_probe(head_dropout=False)
    torch.manual_seed(0)
    out = layer.train()(x).view(3, 4, 16)
    assert set(out.unique().tolist()) == {0.0, 0.5}
    for h in range(1, 4):
        torch.testing.assert_close(out[:, h], out[:, 0], atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("head_init", ["random", "zeros"])
def test_fixed_gate_delta_weight_reproduces_the_layer_when_the_router_is_uniform(head_init, case):
    layer = case_layer(case, head_init=head_init).eval()
    with torch.no_grad():  # trained heads and A, router still zero: the uniform mixture is the layer, exactly
        layer.rlora_A["default"].add_(0.3 * torch.randn_like(layer.rlora_A["default"]))
        layer.rlora_B["default"].add_(0.3 * torch.randn_like(layer.rlora_B["default"]))
    x = torch.randn(4, case[1], dtype=torch.float64)
    delta_weight = layer.get_delta_weight("default")
    merged = layer.base_layer(x) + x @ delta_weight.double().T
    uniform = torch.full((case[4],), 1 / case[4], dtype=torch.float64)
    # float64 algebra, plus the rounding of the weight in the dtype get_delta_weight returns it in
    bound = F64["atol"] + x.abs() @ fixed_gate_weight_bound(layer, uniform, delta_weight.dtype).T
    assert ((merged - layer(x)).abs() <= bound).all()
    assert (x @ delta_weight.double().T).abs().max() > 1e-2  # a non-trivial update


@pytest.mark.parametrize("case", CASES[:2], ids=CASE_IDS[:2])
def test_fixed_gate_delta_weight_is_the_gate_weighted_head_mixture(case):
    layer = case_layer(case, head_init="random")
    leave_the_init(layer, case[0])
    k, r, s = case[4], case[3], layer.scaling["default"]
    gates = torch.softmax(torch.randn(k, dtype=torch.float64), dim=0)
    A, B = layer.rlora_A["default"], layer.rlora_B["default"]
    expected = sum(s * gates[i] * B[:, i * r : (i + 1) * r] @ A for i in range(k))
    expected = expected - layer.rlora_offset_B["default"] @ layer.rlora_offset_A["default"]
    delta_weight = layer.get_delta_weight("default", gates)
    assert ((delta_weight.double() - expected).abs() <= fixed_gate_weight_bound(layer, gates, delta_weight.dtype)).all()
    with pytest.raises(ValueError, match=f"gates: expected {k} non-negative weights summing to 1"):
        layer.get_delta_weight("default", torch.full((k,), 0.5))
    with pytest.raises(ValueError, match=f"gates: expected {k} non-negative weights summing to 1"):
        layer.get_delta_weight("default", torch.full((k + 1,), 1 / (k + 1)))


def fixed_masks(monkeypatch, seed: int = 5) -> None:
    """Replace the layer's dropout by a fixed function of the input's shape (entries 0 or 2, p = 0.5), so that a
    reference computation can apply the very same masks."""

    def dropout(t: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
        if not training or p == 0:
            return t
        gen = torch.Generator().manual_seed(seed + t.dim() * 100 + t.shape[-1])
        return t * (torch.rand(t.shape, generator=gen) < 0.5).to(t.dtype) * 2

    monkeypatch.setattr("rlora.tuner.layer.F.dropout", dropout)


@pytest.mark.parametrize("case", CASES[:2], ids=CASE_IDS[:2])
@pytest.mark.parametrize(("head_init", "head_dropout"), VARIANTS)
def test_with_dropout_a_reads_the_dropped_input_and_the_router_and_offset_the_undropped_one(
    head_init, head_dropout, case, monkeypatch
):
    """The single matmul over x keeps where each dropout applies: per head on A x (R-LoRA), or one mask on x for A
    only (HydraLoRA); the router's gates and the offset's A^0 x always read x itself."""
    layer = case_layer(case, head_init=head_init, head_dropout=head_dropout, lora_dropout=0.5)
    leave_the_init(layer, case[0])
    fixed_masks(monkeypatch)
    from rlora.tuner.layer import F as layer_F

    x1 = torch.randn(2, 5, case[1], dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    fused = layer.train()(x1)

    A, B, Wr = layer.rlora_A["default"], layer.rlora_B["default"], layer.rlora_router["default"]
    r, k, s = layer.r["default"], layer.num_heads["default"], layer.scaling["default"]
    naive = layer.base_layer(x2)
    gates = torch.softmax(x2 @ Wr.T, dim=-1)  # the undropped x
    if head_dropout:  # the mask of head i: slice i of one (..., K, r) draw
        masks = layer_F.dropout(torch.ones(2, 5, k, r, dtype=torch.float64), 0.5)
        inputs = [masks[..., i, :] * (x2 @ A.T) for i in range(k)]
    else:
        inputs = [layer_F.dropout(x2, 0.5) @ A.T] * k
    for i in range(k):
        naive = naive + s * gates[..., i : i + 1] * (inputs[i] @ B[:, i * r : (i + 1) * r].T)
    if "default" in layer.rlora_offset_A:
        naive = naive - (x2 @ layer.rlora_offset_A["default"].T) @ layer.rlora_offset_B["default"].T
    torch.testing.assert_close(fused, naive, **F64)
    assert not torch.allclose(fused, layer.eval()(x1))  # the masks did change something

    weights = torch.randn_like(fused)
    g_fused = torch.autograd.grad((fused * weights).sum(), [x1, A, B, Wr])
    g_naive = torch.autograd.grad((naive * weights).sum(), [x2, A, B, Wr])
    for a, b in zip(g_fused, g_naive, strict=True):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.numerics
def test_weights_kept_between_decoding_steps_follow_every_change_of_the_adapter():
    """Without autograd the layer keeps its concatenated weights from call to call; a weight changed in place (an
    optimizer step, `load_state_dict`) or replaced must be seen by the next call. float64: both sides are the same
    algebra in different orders, equal to F64's bound."""
    layer = make_layer(head_init="random").eval()
    leave_the_init(layer, seed=3)
    x = torch.randn(5, 24, dtype=torch.float64)
    with torch.no_grad(), reuse_fused_weights(layer):
        torch.testing.assert_close(layer(x), naive_forward(layer, x), **F64)  # kept from here on
        layer.rlora_B["default"].mul_(2.0)
        layer.rlora_offset_B["default"].add_(0.5)
        torch.testing.assert_close(layer(x), naive_forward(layer, x), **F64)
        layer.rlora_router["default"].data = torch.randn(3, 24, dtype=torch.float64)
        layer.rlora_A["default"].add_(0.1)
        torch.testing.assert_close(layer(x), naive_forward(layer, x), **F64)
        assert len(layer._inference_weights) == 1  # one entry per adapter, replaced, not accumulated
    assert layer._inference_weights is None  # dropped on leaving


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (2, 5)], ids=["one-token", "batch-of-tokens", "prompt"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("head_init", "head_dropout"), VARIANTS)
def test_the_decoding_path_is_the_layers_algebra(head_init, head_dropout, case, shape):
    """Inside `reuse_fused_weights`, in eval mode without autograd, the layer takes its decoding path (fewer small
    operations, the scaling folded into the kept B): the same function as the per-head formula. float64: the same
    algebra in another order, equal to F64's bound."""
    layer = case_layer(case, head_init=head_init, head_dropout=head_dropout, lora_dropout=0.1).eval()
    leave_the_init(layer, case[0])
    x = torch.randn(*shape, case[1], dtype=torch.float64)
    with torch.no_grad(), reuse_fused_weights(layer):
        out = layer(x)
        assert set(layer._inference_weights) == {("decode", "default")} and layer._decode_weights("default") is not None
        torch.testing.assert_close(out, naive_forward(layer, x), **F64)
        torch.testing.assert_close(layer(x), out, **F64)  # from the kept weights
    with torch.no_grad():  # outside: the general path, which keeps nothing
        torch.testing.assert_close(layer(x), out, **F64)


def test_outside_reuse_fused_weights_a_write_that_bumps_no_version_counter_is_seen():
    """Fused AdamW (the Trainer's default optimizer) updates weights without bumping their version counters: a
    validation pass between training steps must see the new weights, so nothing is kept outside the context."""
    layer = make_layer(head_init="random").eval()
    leave_the_init(layer, seed=3)
    x = torch.randn(5, 24, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), naive_forward(layer, x), **F64)
        version = layer.rlora_B["default"]._version
        layer.rlora_B["default"].data.mul_(2.0)  # as fused AdamW writes: no version bump
        assert layer.rlora_B["default"]._version == version
        torch.testing.assert_close(layer(x), naive_forward(layer, x), **F64)
    assert layer._inference_weights is None
