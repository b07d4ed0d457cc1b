"""Conv1D targets (the GPT-2 family) adapt as nn.Linear ones do, and every architecture gets default targets.

transformers' Conv1D computes x @ W + b with W stored (d_in, d_out), the transpose of nn.Linear's (PEFT's LoRA calls it
`fan_in_fan_out`). The adapter reads x only, so its forward is the same; the layout matters where a weight is written
(the fixed-gate merge). Equalities of exact arithmetic are checked in float64 at the F64 tolerance.
"""

import subprocess
import sys
import textwrap

import pytest
import torch
from _tiny import F64, perturb_adapter, tiny_gpt2, tiny_llama, tiny_phi3
from peft import LoraConfig, get_peft_model
from transformers.pytorch_utils import Conv1D

from rlora import RLoraConfig, RLoraLinear
from rlora.errors import ConfigError
from rlora.methods import adapter_config

TOKENS = torch.tensor([[5, 17, 3, 44, 8, 91, 2], [60, 1, 1, 33, 9, 12, 70]])
GPT2_TARGETS = ["c_attn", "c_fc", "c_proj"]  # c_proj: the attention's and the MLP's output


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def naive_update(layer: RLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """The adapter's update by the paper's formula, a loop over heads (no dropout)."""
    A, B, Wr = (p["default"] for p in (layer.rlora_A, layer.rlora_B, layer.rlora_router))
    r, k, s = layer.r["default"], layer.num_heads["default"], layer.scaling["default"]
    gates = torch.softmax(x @ Wr.T, dim=-1)
    out = sum(s * gates[..., i : i + 1] * ((x @ A.T) @ B[:, i * r : (i + 1) * r].T) for i in range(k))
    if "default" in layer.rlora_offset_A:
        out = out - (x @ layer.rlora_offset_A["default"].T) @ layer.rlora_offset_B["default"].T
    return out


@pytest.mark.parametrize("head_init", ["random", "zeros"])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_gpt2_model_starts_exactly_at_the_base_model(head_init, seed):
    base = logits(tiny_gpt2(seed, torch.float64))
    model = get_peft_model(
        tiny_gpt2(seed, torch.float64), RLoraConfig(target_modules=GPT2_TARGETS, head_init=head_init)
    )
    adapted = [m for m in model.modules() if isinstance(m, RLoraLinear)]
    assert len(adapted) == 2 * 4 and all(isinstance(m.get_base_layer(), Conv1D) for m in adapted)
    assert {(m.in_features, m.out_features) for m in adapted} == {(32, 96), (32, 128), (128, 32), (32, 32)}
    torch.testing.assert_close(logits(model.eval()), base, **F64)


@pytest.mark.parametrize("head_dropout", [True, False])
def test_the_fused_forward_of_a_conv1d_layer_and_its_gradients_equal_a_per_head_loop(head_dropout):
    torch.manual_seed(0)
    base = Conv1D(40, 24).double()  # d_out 40, d_in 24: weight (24, 40)
    layer = RLoraLinear(base, "default", RLoraConfig(r=4, num_heads=3, lora_dropout=0.0, head_dropout=head_dropout))
    with torch.no_grad():
        for p in (layer.rlora_A["default"], layer.rlora_B["default"], layer.rlora_router["default"]):
            p.add_(0.3 * torch.randn_like(p))
    layer.train()
    x1 = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    fused, naive = layer(x1), base(x2) + naive_update(layer, x2)
    torch.testing.assert_close(fused, naive, **F64)
    params = [layer.rlora_A["default"], layer.rlora_B["default"], layer.rlora_router["default"]]
    weights = torch.randn_like(fused)
    g_fused = torch.autograd.grad((fused * weights).sum(), [x1, *params])
    g_naive = torch.autograd.grad((naive * weights).sum(), [x2, *params])
    for a, b in zip(g_fused, g_naive, strict=True):
        torch.testing.assert_close(a, b, **F64)


def test_the_fixed_gate_merge_writes_the_transposed_update_into_a_conv1d_weight():
    model = get_peft_model(tiny_gpt2(0, torch.float64), RLoraConfig(target_modules=GPT2_TARGETS)).eval()
    perturb_adapter(model)
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, RLoraLinear)}
    for layer in layers.values():  # uniform gates: the adapted model is then exactly the merged one
        torch.nn.init.zeros_(layer.rlora_router["default"])
    expected_logits = logits(model)
    expected = {n: m.get_base_layer().weight + m.get_delta_weight("default").T for n, m in layers.items()}
    merged = model.base_model.merge_with_fixed_gates()
    for name, weight in expected.items():  # the same float64 addition: exact
        assert torch.equal(merged.get_submodule(name).weight, weight), name
    torch.testing.assert_close(logits(merged), expected_logits, **F64)


def test_a_gpt2_adapter_reloads_in_a_fresh_process_to_the_same_function(tmp_path):
    base = tiny_gpt2(0, torch.float64)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, RLoraConfig(target_modules=GPT2_TARGETS, num_heads=3)).eval()
    perturb_adapter(model)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    torch.save(TOKENS, tmp_path / "tokens.pt")
    script = textwrap.dedent(
        f"""
        import torch, rlora
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        torch.manual_seed(12345)
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r}, dtype=torch.float64)
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "tokens.pt")!r})).logits, {str(tmp_path / "out.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, **F64)


@pytest.mark.parametrize(
    ("make", "targets"),
    [(tiny_gpt2, {"c_attn"}), (tiny_llama, {"q_proj", "v_proj"}), (tiny_phi3, {"qkv_proj"})],
    ids=["gpt2", "llama", "phi3"],
)
def test_target_modules_none_adapts_the_architectures_default_layers(make, targets):
    model = get_peft_model(make(), RLoraConfig())
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, RLoraLinear)}
    assert adapted == targets
    lora = adapter_config("lora", r=4, lora_alpha=32, num_heads=5, lora_dropout=0.0, target_modules=None, model=make())
    assert set(lora.target_modules) == targets  # plain LoRA adapts the same layers (PEFT itself has no phi3 entry)


def test_target_modules_none_for_an_unknown_architecture_names_its_linear_layers():
    model = tiny_llama()
    model.config.model_type = "mystery"
    with pytest.raises(ConfigError) as err:
        get_peft_model(model, RLoraConfig())
    assert str(err.value) == (
        "RLoraConfig.target_modules: no default for model type 'mystery'; give target_modules (its linear modules are "
        "named: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj, or 'all-linear')"
    )


def test_lora_at_matched_parameters_counts_conv1d_layers():
    """Per adapted layer: multi-head r*d_in + K*r*d_out + K*d_in, LoRA r'*(d_in + d_out); c_attn is 32 -> 96."""
    config = adapter_config(
        "lora", r=4, lora_alpha=32, num_heads=5, lora_dropout=0.0, target_modules=["c_attn"], model=tiny_gpt2()
    )
    assert config.r == round((4 * 32 + 5 * 4 * 96 + 5 * 32) / (32 + 96))
    lora = get_peft_model(tiny_gpt2(), LoraConfig(r=config.r, target_modules=["c_attn"]))
    rlora = get_peft_model(tiny_gpt2(), RLoraConfig(target_modules=["c_attn"]))
    trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (lora, rlora)]
    assert abs(trainable[0] - trainable[1]) <= 2 * (32 + 96) / 2  # rounding r' moves LoRA by at most half a rank
