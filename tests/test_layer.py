"""The multi-head layer on its own: init, offset, fused forward against a naive per-head loop, dropout."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rlora import RLoraConfig, RLoraLinear

VARIANTS = list(itertools.product(["random", "zeros"], [True, False]))


def make_layer(d_in=24, d_out=40, bias=True, seed=0, **cfg) -> RLoraLinear:
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias)
    cfg = {"r": 4, "num_heads": 3, "lora_dropout": 0.0} | cfg
    return RLoraLinear(base, "default", RLoraConfig(**cfg))


def naive_forward(layer: RLoraLinear, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """Per-head loop straight from the paper's formula, independent of the fused code (no dropout)."""
    W0, b0 = layer.base_layer.weight, layer.base_layer.bias
    A, B, Wr = layer.rlora_A[name], layer.rlora_B[name], layer.rlora_router[name]
    r, k, s = layer.r[name], layer.num_heads[name], layer.scaling[name]
    out = x @ W0.T + (b0 if b0 is not None else 0)
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


@pytest.mark.parametrize(("head_init", "head_dropout"), VARIANTS)
def test_start_is_exactly_the_base_layer(head_init, head_dropout):
    layer = make_layer(head_init=head_init, head_dropout=head_dropout, lora_dropout=0.1).eval()
    x = torch.randn(5, 7, 24)
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=1e-5, rtol=0)


def test_random_init_has_the_stable_scale_and_the_offset_is_the_initial_update():
    layer = make_layer(d_in=512, d_out=1024, r=8, num_heads=4, init_gamma=64.0, lora_alpha=16)
    f = 1024**0.25 / math.sqrt(64.0)
    assert layer.rlora_A["default"].std().item() == pytest.approx(f / math.sqrt(512), rel=0.03)
    assert layer.rlora_B["default"].std().item() == pytest.approx(f / math.sqrt(1024), rel=0.03)
    assert layer.scaling["default"] == pytest.approx(16 / math.sqrt(8))
    A, heads = layer.rlora_A["default"], layer.head_weights("default")
    torch.testing.assert_close(layer.rlora_offset_A["default"], A, atol=0, rtol=0)
    torch.testing.assert_close(layer.rlora_offset_B["default"], 16 / math.sqrt(8) * heads.mean(0))
    assert not layer.rlora_offset_A["default"].requires_grad
    assert torch.count_nonzero(layer.rlora_router["default"]) == 0


def test_random_heads_are_diverse_and_zero_heads_identical():
    cos = heads_cosine(make_layer(d_in=256, d_out=1536, r=4, num_heads=5))
    off_diagonal = cos[~torch.eye(5, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.05  # independent Gaussians in 6144 dims: |cos| ~ 0.013

    zero_heads = make_layer(head_init="zeros").head_weights("default")
    assert torch.count_nonzero(zero_heads) == 0
    assert all(torch.equal(zero_heads[0], h) for h in zero_heads)


def test_zeros_init_stores_no_offset_and_uses_plain_lora_scaling_without_rslora():
    layer = make_layer(head_init="zeros", use_rslora=False, lora_alpha=8, r=4)
    assert "default" not in layer.rlora_offset_A
    assert layer.scaling["default"] == 2.0


@pytest.mark.parametrize(("head_init", "head_dropout"), VARIANTS)
@pytest.mark.parametrize("shape", [(6, 24), (2, 5, 24)])
def test_fused_forward_and_gradients_equal_a_naive_per_head_loop(head_init, head_dropout, shape):
    layer = make_layer(head_init=head_init, head_dropout=head_dropout)
    with torch.no_grad():  # leave the init: non-uniform gates, distinct heads
        for p in (layer.rlora_A["default"], layer.rlora_B["default"], layer.rlora_router["default"]):
            p.add_(0.3 * torch.randn_like(p))
    layer.train()  # dropout 0: training mode must still match
    x1 = torch.randn(shape, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    fused, naive = layer(x1), naive_forward(layer, x2)
    torch.testing.assert_close(fused, naive, atol=1e-5, rtol=1e-5)

    params = [layer.rlora_A["default"], layer.rlora_B["default"], layer.rlora_router["default"]]
    weights = torch.randn_like(fused)
    g_fused = torch.autograd.grad((fused * weights).sum(), [x1, *params])
    g_naive = torch.autograd.grad((naive * weights).sum(), [x2, *params])
    for a, b in zip(g_fused, g_naive, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def identity_probe(head_dropout: bool, p: float = 0.5, r: int = 16, k: int = 4) -> tuple[RLoraLinear, torch.Tensor]:
    """A layer whose output shows each head's dropped A·x separately: A = I, B = I, d_out = K*r."""
    layer = make_layer(d_in=r, d_out=k * r, bias=False, r=r, num_heads=k, head_init="zeros", lora_dropout=p,
                       head_dropout=head_dropout, use_rslora=False, lora_alpha=r)  # fmt: skip
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.rlora_A["default"].copy_(torch.eye(r))
        layer.rlora_B["default"].copy_(torch.eye(k * r))
    return layer, torch.ones(3, r)


def test_per_head_dropout_draws_an_independent_mask_for_each_head():
    layer, x = identity_probe(head_dropout=True)
    torch.manual_seed(0)
    out = layer.train()(x).view(3, 4, 16)  # (tokens, heads, r): gate 1/4 times the mask scaled by 1/(1-p)
    assert set(out.unique().tolist()) <= {0.0, 0.5}
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
    assert (out == 0).any() and (out != 0).any()
    for h in range(1, 4):
        torch.testing.assert_close(out[:, h], out[:, 0], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_base_layers_run_and_keep_the_output_dtype(dtype):
    torch.manual_seed(0)
    base = nn.Linear(24, 40).to(dtype)
    layer = RLoraLinear(base, "default", RLoraConfig(r=4, num_heads=3)).eval()
    x = torch.randn(2, 3, 24).to(dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, 3, 40)
    # adapter weights in the low dtype too (no PEFT autocast): the update and its offset cancel up to rounding
    tolerance = 0 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, base(x), atol=max(tolerance, 1e-5), rtol=0)


def test_fixed_gate_delta_weight_reproduces_the_layer_when_the_router_is_uniform():
    layer = make_layer(head_init="random")
    with torch.no_grad():
        layer.rlora_B["default"].add_(0.3 * torch.randn_like(layer.rlora_B["default"]))
    x = torch.randn(4, 24)
    merged = layer.base_layer(x) + x @ layer.get_delta_weight("default").T
    torch.testing.assert_close(merged, layer.eval()(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="gates: expected 3 non-negative weights summing to 1"):
        layer.get_delta_weight("default", torch.tensor([0.5, 0.6, 0.1]))
