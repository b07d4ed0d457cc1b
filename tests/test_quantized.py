"""Quantized bases (bitsandbytes 4-bit and 8-bit, its CPU backend): loading from the run config, the fixed-gate merge
against the float merge, and a QLoRA run (4-bit base, gradient checkpointing) through `rlora train`, `eval` and resume.
"""

import json
import shutil

import pytest
import torch
from _tiny import MLP, perturb_adapter, tiny_llama, write_config
from peft import get_peft_model
from peft.utils.integrations import dequantize_bnb_weight
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from rlora import RLoraConfig, RLoraLinear
from rlora.commands.eval import evaluate_run
from rlora.models import BaseLoading, load_model, load_tokenizer
from rlora.run import load_run
from rlora.runconfig import load_run_config
from rlora.train import train

bnb = pytest.importorskip("bitsandbytes")  # the `quant` extra; scripts/setup.sh --dev installs it


def quantized_llama(path, bits: str):
    tiny_llama().save_pretrained(path)
    config = BitsAndBytesConfig(
        load_in_4bit=bits == "4bit",
        load_in_8bit=bits == "8bit",
        bnb_4bit_use_double_quant=False,  # one absmax per block: the rounding bound below reads it directly
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


def requantization_bound(weight, merged: torch.Tensor) -> torch.Tensor:
    """How far quantizing `merged` may move each element. 4-bit: the weight is cut into blocks of `blocksize`
    elements, each scaled by its absmax and rounded to the nearest of 16 code values in [-1, 1], so at most half the
    largest gap between code values times the block's absmax. 8-bit (LLM.int8): each row is cast to float16 (relative
    error 2**-11) and rounded to the nearest multiple of absmax/127, so half of that plus the float16 rounding."""
    if type(weight).__name__ == "Params4bit":
        state = weight.quant_state
        code = state.code.sort().values
        half_gap = (code[1:] - code[:-1]).max() / 2
        blocks = merged.flatten().view(-1, state.blocksize)
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        return (half_gap * absmax * (1 + 2**-10)).expand_as(blocks).reshape(merged.shape) + 1e-7
    absmax = merged.abs().amax(dim=1, keepdim=True)
    return absmax / 127 / 2 * (1 + 2**-9) + merged.abs() * 2**-10 + 1e-7


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_the_fixed_gate_merge_into_a_quantized_base_is_the_float_merge_up_to_requantization(bits, tmp_path):
    model = get_peft_model(quantized_llama(tmp_path / "base", bits), RLoraConfig(target_modules=MLP, num_heads=3))
    perturb_adapter(model)
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, RLoraLinear)}
    expected = {}
    for name, layer in layers.items():
        base = layer.get_base_layer()
        delta = layer.get_delta_weight("default").detach()
        expected[name] = (dequantize_bnb_weight(base.weight, getattr(base, "state", None)).float() + delta, delta)
    merged = model.base_model.merge_with_fixed_gates()
    for name, (float_merge, delta) in expected.items():
        module = merged.get_submodule(name)
        assert type(module).__name__ == ("Linear4bit" if bits == "4bit" else "Linear8bitLt")
        got = dequantize_bnb_weight(module.weight, getattr(module, "state", None)).float()
        bound = requantization_bound(module.weight, float_merge)
        assert ((got - float_merge).abs() <= bound).all(), name
        # the update is far above the rounding on many weights: a merge that dropped or mis-scaled it would fail
        assert (delta.abs() > 2 * bound).float().mean() > 0.1, name


@pytest.mark.parametrize(
    ("loading", "layer", "check"),
    [
        (BaseLoading(quantization="4bit"), "Linear4bit", lambda w: w.quant_state.quant_type == "nf4"),
        (BaseLoading("4bit", "fp4", double_quant=False), "Linear4bit", lambda w: w.quant_state.nested is False),
        (BaseLoading("4bit", compute_dtype="bfloat16"), "Linear4bit", lambda _w: True),
        (BaseLoading(quantization="8bit"), "Linear8bitLt", lambda w: w.dtype == torch.int8),
    ],
    ids=["nf4-double", "fp4", "bf16-compute", "8bit"],
)
def test_the_base_section_loads_the_base_quantized_as_configured(loading, layer, check, workspace):
    tokenizer = load_tokenizer(str(workspace / "model"))
    model = load_model(str(workspace / "model"), tokenizer, loading=loading)
    up = model.model.layers[0].mlp.up_proj
    assert type(up).__name__ == layer and check(up.weight)
    if loading.quantization == "4bit":
        assert up.weight.quant_state.nested is loading.double_quant
        assert up.compute_dtype == getattr(torch, loading.compute_dtype)
        assert up.weight.quant_state.quant_type == loading.quant_type


def test_a_qlora_run_trains_evaluates_and_resumes_to_the_uninterrupted_adapter(workspace, tmp_path):
    overrides = ["base.quantization=4bit", "training.gradient_checkpointing=true"]
    overrides += ["training.max_steps=4", "training.save_steps=2"]
    cfg = load_run_config(write_config(workspace, tmp_path / "run"), overrides)
    run = train(cfg)
    saved = load_run_config(run / "config.yaml")
    assert saved.base.quantization == "4bit" and saved.training.gradient_checkpointing
    loaded = load_run(run)  # the saved config loads the base 4-bit again, the adapter on top
    up = loaded.model.base_model.model.model.layers[0].mlp.up_proj
    assert isinstance(up, RLoraLinear) and type(up.get_base_layer()).__name__ == "Linear4bit"
    readme = (run / "adapter" / "README.md").read_text()  # replaces PEFT's model card template
    assert "loaded 4bit (bitsandbytes)" in readme and "fails with `KeyError: 'RLORA'`" in readme
    assert "import rlora  # registers the RLORA adapter type" in readme
    assert (run / "adapter_init" / "README.md").read_text() == readme
    losses = [r["loss"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 4 and all(0 < loss < 20 for loss in losses)
    results = evaluate_run(run)
    assert results["tasks"]["colors"]["n"] == 6 and 0 <= results["tasks"]["colors"]["acc_ll"] <= 1

    from safetensors.torch import load_file

    uninterrupted = load_file(run / "adapter" / "adapter_model.safetensors")
    shutil.rmtree(run / "adapter")  # as if killed after checkpoint-2: resume runs steps 3 and 4 again
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    for name in ("eval.json", "eval.md"):
        (run / name).unlink()
    train(cfg, resume=True)
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():  # the same float32 steps from the same state and RNG; not bitwise
        torch.testing.assert_close(resumed[key], value, atol=1e-5, rtol=1e-4)  # promised across runs
