"""R-LoRA as a PEFT method: every PEFT entry point a LoRA user relies on, after `import rlora`.

Equalities of exact arithmetic are checked on a float64 model (tolerance F64); comparisons of one computation with
itself (disabled adapters, switching adapters back) are exact; what depends on bf16/fp16 rounding is bounded per
adapted layer by that dtype's eps (see _tiny.start_bound).
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from _tiny import F64, MLP, adapted_layer_calls, fixed_gate_weight_bound, perturb_adapter, start_bound, tiny_llama
from peft import (
    LoraConfig,
    NoMatchingPeftModuleError,
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
)
from peft.tuners.lora import LoraLayer
from peft.utils import PeftType

from rlora import RLoraConfig, RLoraLinear
from rlora.errors import ConfigError

numerics = pytest.mark.numerics  # run again on other CPU kernel paths by scripts/test.sh

TOKENS = torch.tensor([[5, 17, 3, 44, 8, 91, 2], [60, 1, 1, 33, 9, 12, 70]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def test_import_registers_a_peft_type_that_behaves_like_a_builtin():
    assert PeftType("RLORA") is PeftType.RLORA
    assert "RLORA" in list(PeftType) and PeftType.RLORA == "RLORA"
    assert RLoraConfig().peft_type is PeftType.RLORA
    assert isinstance(PeftConfig.from_peft_type(peft_type="RLORA", r=2), RLoraConfig)


@pytest.mark.parametrize(
    "first_import",
    [
        "import rlora",  # PEFT is imported afterwards, by the check below
        "import peft; import rlora",
        "from rlora import RLoraModel",
        "from rlora.tuner.config import RLoraConfig",
        "from rlora.tuner.layer import RLoraLinear",
        "import rlora.tuner",
        "import rlora.cli; import rlora.runconfig",
    ],
)
def test_registration_holds_whatever_is_imported_first(first_import):
    """`import rlora` does not load PEFT itself (so the command line starts fast): it registers once PEFT and rlora's
    core are loaded, in any order, and the classes PEFT holds are the ones rlora exports."""
    script = textwrap.dedent(
        f"""
        {first_import}
        import sys
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
        from peft.utils import PeftType
        import rlora
        assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType("RLORA")] is rlora.RLoraConfig
        assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType("RLORA")] is rlora.RLoraModel
        assert not any("Watcher" in type(f).__name__ for f in sys.meta_path)  # done watching
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    ("head_init", "head_dropout"), [("random", True), ("random", False), ("zeros", True), ("zeros", False)]
)
@numerics
def test_get_peft_model_starts_at_the_base_model_without_editing_it(head_init, head_dropout, seed):
    base = tiny_llama(seed, dtype=torch.float64)
    reference = logits(base)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, RLoraConfig(target_modules=MLP, head_init=head_init, head_dropout=head_dropout))
    # zero heads add exact zeros; random heads minus their offset are zero in exact arithmetic: float64 algebra
    exact = {"atol": 0, "rtol": 0} if head_init == "zeros" else F64
    torch.testing.assert_close(logits(model.eval()), reference, **exact)
    base_now = {k.replace("base_layer.", ""): v for k, v in model.get_base_model().state_dict().items()}
    for key, value in weights.items():
        assert torch.equal(base_now[key], value), key


def test_only_adapter_parameters_train_and_the_router_is_counted():
    model = get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP, r=4, num_heads=5))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("rlora_A" in n or "rlora_B" in n or "rlora_router" in n) for n in trainable)
    assert sum("rlora_router" in n for n in trainable) == 6  # 2 layers x 3 modules
    # per layer: gate/up (32->64) and down (64->32): A r*d_in + B d_out*K*r + router K*d_in
    per_layer = 2 * (4 * 32 + 64 * 20 + 5 * 32) + (4 * 64 + 32 * 20 + 5 * 64)
    n_trainable, _ = model.get_nb_trainable_parameters()
    assert n_trainable == 2 * per_layer


def test_target_modules_accepts_a_list_a_regex_and_all_linear():
    def adapted(target):
        model = get_peft_model(tiny_llama(), RLoraConfig(target_modules=target))
        return sorted(n.split("layers.")[1] for n, m in model.named_modules() if isinstance(m, RLoraLinear))

    assert adapted(["up_proj"]) == ["0.mlp.up_proj", "1.mlp.up_proj"]
    assert adapted(r".*layers\.1\.self_attn\.(q|v)_proj") == ["1.self_attn.q_proj", "1.self_attn.v_proj"]
    assert len(adapted("all-linear")) == 14  # 7 linear layers a block, lm_head excluded
    model = get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP, exclude_modules=["down_proj"]))
    assert sum(isinstance(m, RLoraLinear) for m in model.modules()) == 4


@numerics
def test_disable_adapter_gives_the_base_outputs_exactly():
    base = tiny_llama()
    reference = logits(base)
    model = get_peft_model(base, RLoraConfig(target_modules=MLP)).eval()
    perturb_adapter(model)
    assert (logits(model) - reference).abs().max() > 1e-2
    with model.disable_adapter():  # only the base layers run: the base model's own computation, bit for bit
        torch.testing.assert_close(logits(model), reference, atol=0, rtol=0)


@numerics
def test_several_adapters_are_added_switched_and_deleted():
    base = tiny_llama()
    reference = logits(base)
    model = get_peft_model(base, RLoraConfig(target_modules=MLP), adapter_name="first").eval()
    perturb_adapter(model, seed=1)
    out_a = logits(model)
    model.add_adapter("second", RLoraConfig(target_modules=MLP, head_init="zeros", num_heads=2))
    model.set_adapter("second")
    perturb_adapter(model, seed=2)  # the trainable ones: the second only
    out_b = logits(model)
    assert (out_b - out_a).abs().max() > 1e-2
    model.set_adapter("first")  # from here on, each output repeats an earlier computation: bit for bit
    torch.testing.assert_close(logits(model), out_a, atol=0, rtol=0)
    model.delete_adapter("first")
    assert list(model.peft_config) == ["second"]
    torch.testing.assert_close(logits(model), out_b, atol=0, rtol=0)
    assert not any("first" in m.rlora_A for m in model.modules() if isinstance(m, RLoraLinear))
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), reference, atol=0, rtol=0)


@numerics
@pytest.mark.parametrize("seed", [0, 1])
def test_merge_and_unload_refuses_and_the_fixed_gate_merge_is_explicit(seed):
    model = get_peft_model(tiny_llama(seed, dtype=torch.float64), RLoraConfig(target_modules=MLP)).eval()
    with pytest.raises(ValueError, match="cannot be merged into the base weights exactly: the router"):
        model.merge_and_unload()
    with torch.no_grad():  # heads trained, router still uniform: the fixed uniform mixture is the layer, exactly
        for name, p in model.named_parameters():
            if "rlora_B" in name:
                p.add_(0.1 * torch.randn_like(p))
    adapted = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, RLoraLinear)}
    expected_weights = {
        n: m.get_base_layer().weight + m.get_delta_weight("default").to(torch.float64) for n, m in adapted.items()
    }
    with adapted_layer_calls(model) as calls:
        logits(model)
    merged = model.base_model.merge_with_fixed_gates()
    assert not any(isinstance(m, RLoraLinear) for m in merged.modules())
    # the merged model is the base model with W0 + delta weight in the adapted layers, every other weight untouched
    reference = tiny_llama(seed, dtype=torch.float64)
    with torch.no_grad():
        for name, weight in expected_weights.items():
            reference.get_submodule(name).weight.copy_(weight)
    merged_state = merged.state_dict()
    assert merged_state.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():  # the same float64 additions: exact
        assert torch.equal(merged_state[key], value), key
    torch.testing.assert_close(logits(merged), logits(reference), atol=0, rtol=0)  # the same weights, bit for bit
    # each merged layer computes what its adapter layer computed, on the inputs it saw: float64 algebra, plus the
    # rounding of the delta weight in the dtype get_delta_weight returns it in
    assert len(calls) == len(adapted) == 6
    for layer, x, y in calls:
        uniform = torch.full((layer.num_heads["default"],), 1 / layer.num_heads["default"])
        dtype = layer.get_delta_weight("default").dtype
        bound = F64["atol"] + F64["rtol"] * y.abs() + x.abs() @ fixed_gate_weight_bound(layer, uniform, dtype).T
        assert ((layer.get_base_layer()(x) - y).abs() <= bound).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_heads": 0}, r"RLoraConfig.num_heads: expected an integer >= 1, got 0"),
        ({"r": 0}, r"RLoraConfig.r: expected an integer >= 1, got 0"),
        ({"lora_dropout": 1.0}, r"RLoraConfig.lora_dropout: expected a number in \[0, 1\), got 1.0"),
        ({"lora_dropout": -0.1}, r"RLoraConfig.lora_dropout: expected a number in \[0, 1\), got -0.1"),
        (
            {"head_init": "orthogonal"},
            r"RLoraConfig.head_init: expected one of 'random', 'zeros', got 'orthogonal'",
        ),
        ({"init_gamma": 0}, r"RLoraConfig.init_gamma: expected a finite number > 0, got 0"),
    ],
)
def test_bad_configuration_fails_at_construction_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RLoraConfig(**kwargs)


def test_target_modules_matching_nothing_lists_the_linear_modules():
    with pytest.raises(ValueError) as err:
        get_peft_model(tiny_llama(), RLoraConfig(target_modules=["c_attn"]))
    assert str(err.value) == (
        "RLoraConfig.target_modules: ['c_attn'] matches no linear layer of LlamaForCausalLM; its linear modules "
        "are named: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
    )


def test_a_config_error_is_rloras_own_and_still_a_value_error():
    with pytest.raises(ConfigError) as err:
        RLoraConfig(r=0)
    assert isinstance(err.value, ValueError)
    with pytest.raises(ConfigError):
        get_peft_model(tiny_llama(), RLoraConfig(target_modules=["c_attn"]))
    with pytest.raises(ConfigError, match="'model.embed_tokens' is a Embedding; R-LoRA adapts torch.nn.Linear layers"):
        get_peft_model(tiny_llama(), RLoraConfig(target_modules=["embed_tokens"]))


def test_targets_all_excluded_keep_pefts_own_error():
    """Our message is for target names that match nothing; excluded matches are PEFT's to explain."""
    with pytest.raises(NoMatchingPeftModuleError) as err:
        get_peft_model(tiny_llama(), RLoraConfig(target_modules=["up_proj"], exclude_modules=["up_proj"]))
    assert not isinstance(err.value, ConfigError) and "matches no linear layer" not in str(err.value)


def test_lora_and_rlora_coexist_in_one_process():
    rlora = get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP))
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=MLP))
    assert lora.peft_config["default"].peft_type is PeftType.LORA
    assert rlora.peft_config["default"].peft_type is PeftType.RLORA
    assert sum(isinstance(m, LoraLayer) for m in lora.modules()) == 6
    assert not any(isinstance(m, RLoraLinear) for m in lora.modules())
    assert sum(isinstance(m, RLoraLinear) for m in rlora.modules()) == 6


@numerics
def test_a_saved_adapter_reloads_in_a_fresh_process_to_the_same_function(tmp_path):
    base = tiny_llama(dtype=torch.float64)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, RLoraConfig(target_modules=MLP, num_heads=3)).eval()
    perturb_adapter(model)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "RLORA" and saved["num_heads"] == 3 and saved["head_init"] == "random"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    torch.save(TOKENS, tmp_path / "tokens.pt")

    script = textwrap.dedent(
        f"""
        import torch, rlora
        from peft import PeftModel, PeftConfig
        from transformers import AutoModelForCausalLM
        torch.manual_seed(12345)  # a different RNG state: nothing may depend on replaying the init
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r}, dtype=torch.float64)
        assert type(PeftConfig.from_pretrained({str(tmp_path / "adapter")!r})).__name__ == "RLoraConfig"
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            out = model(torch.load({str(tmp_path / "tokens.pt")!r})).logits
        torch.save(out, {str(tmp_path / "out.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, **F64)


def test_a_random_init_adapter_loads_with_low_cpu_mem_usage(tmp_path):
    base = tiny_llama(dtype=torch.float64)
    model = get_peft_model(base, RLoraConfig(target_modules=MLP)).eval()
    perturb_adapter(model)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(tiny_llama(dtype=torch.float64), tmp_path, low_cpu_mem_usage=True).eval()
    assert not any(t.is_meta for t in again.state_dict().values())
    torch.testing.assert_close(logits(again), expected, **F64)


@numerics
def test_saved_state_holds_the_offset_and_no_base_weight():
    model = get_peft_model(tiny_llama(), RLoraConfig(target_modules=["up_proj"], num_heads=2))
    keys = sorted(get_peft_model_state_dict(model))
    assert keys == sorted(
        f"base_model.model.model.layers.{i}.mlp.up_proj.rlora_{p}"
        for i in range(2)
        for p in ("A", "B", "router", "offset_A", "offset_B")
    )


@numerics
@pytest.mark.parametrize("head_dropout", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_models_with_zero_heads_start_exactly_at_the_base(dtype, head_dropout):
    base = tiny_llama(dtype=dtype)
    reference = logits(base)
    model = get_peft_model(base, RLoraConfig(target_modules=MLP, head_init="zeros", head_dropout=head_dropout))
    # B = 0: every adapted layer adds exact zeros to its base output, in any dtype, so the logits are the base's
    torch.testing.assert_close(logits(model.eval()), reference, atol=0, rtol=0)


@numerics
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_models_with_random_heads_start_at_the_base_up_to_rounding(dtype, seed):
    base = tiny_llama(seed, dtype=dtype)
    model = get_peft_model(base, RLoraConfig(target_modules=MLP)).eval()
    with adapted_layer_calls(model) as calls:
        logits(model)
    assert len(calls) == 6
    # the heads minus their offset cancel only up to rounding (PEFT keeps the adapter in float32, the output is
    # rounded to the model's dtype): each adapted layer is within that bound of its base layer on its own input.
    # The logits are not compared: where a residue survives one output's rounding it changes one ulp there, and
    # how that moves the logits is the network's sensitivity, not the adapter's.
    for layer, x, y in calls:
        base_out = layer.get_base_layer()(x)
        assert y.dtype == dtype
        assert ((y.double() - base_out.double()).abs() <= start_bound(layer, x, base_out)).all()


@pytest.mark.parametrize("head_init", ["random", "zeros"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_models_train(dtype, head_init):
    model = get_peft_model(tiny_llama(dtype=dtype), RLoraConfig(target_modules=MLP, head_init=head_init)).train()
    loss = model(TOKENS, labels=TOKENS).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "rlora_B" in n]
    assert len(grads) == 6
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_modules_to_save_are_trained_and_saved_beside_the_adapter():
    model = get_peft_model(tiny_llama(), RLoraConfig(target_modules=["up_proj"], modules_to_save=["lm_head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head.modules_to_save.default.weight" in n for n in trainable)
    saved = get_peft_model_state_dict(model)
    assert "base_model.model.lm_head.weight" in saved
