"""Mixed precision on the GPU user's default path, proven on the CPU: bf16 autocast (torch's CPU autocast, as the
Trainer's `bf16` runs it through accelerate) and models whose weights load in bfloat16 or float16 (`base.dtype`).

The head-only loss (`rlora.output_head`) is compared with the model's own loss computed by the plain Trainer under
the same autocast, at the same weights and on the same batch, at every training step (`record_losses`). Both compute
the same bf16 logits from the same hidden states with the same operations; only the matmul's shape differs (the
trained rows against the whole batch), so a logit may round differently: by at most 2 u per rounding of the logits
(u = 2^-8, bf16's unit round-off; k roundings: the matmul, then one per post-processing operation, 3 for Gemma 2's
softcapping) relative to the largest logit, plus 32 float32 roundings of the matmul's sums in another order. The
cross-entropy moves by at most twice the largest logit difference (its gradient in the logits, softmax minus the
target's one-hot, has an L1 norm of at most 2), hence `bf16_loss_bound`, independent of rlora's own bound.
"""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from _tiny import F64, write_config
from peft import get_peft_model
from safetensors.torch import load_file
from test_output_head import ARCHITECTURES as DENSE
from test_output_head import SHAPE
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Trainer,
    TrainingArguments,
)

import rlora.train
import rlora.trainer
from rlora.cli import main
from rlora.data import IGNORE_INDEX
from rlora.errors import ModelError
from rlora.methods import adapter_config
from rlora.output_head import causal_lm_loss, positions_logprobs
from rlora.run import RunFolder
from rlora.runconfig import TrainingSettings, load_run_config

numerics = pytest.mark.numerics  # run again on other CPU kernel paths by scripts/test.sh

MOE = {"num_experts_per_tok": 2, "output_router_logits": True, "router_aux_loss_coef": 0.02}
MOE |= {"experts_implementation": "eager"}  # a loop over experts: any dtype (torch's grouped matmul: no float64)
ARCHITECTURES = {
    **{name: DENSE[name] for name in ("llama", "qwen2", "gemma2")},  # gemma2 with soft-capping
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**SHAPE, num_local_experts=4, **MOE)),
    "qwen2_moe": lambda: Qwen2MoeForCausalLM(
        Qwen2MoeConfig(**SHAPE, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32, **MOE)
    ),
}
ROUNDINGS = {"llama": 1, "qwen2": 1, "gemma2": 4, "mixtral": 1, "qwen2_moe": 1}  # logits' roundings, see the doc
METHODS = ("lora", "hydralora", "rlora")
TARGETS = ["q_proj", "v_proj"]  # every family has them (the MoE experts are not nn.Linear layers)
BF16_U = 2.0**-8
FP32_U = 2.0**-24


def bf16_loss_bound(roundings: int, largest_logit: float) -> float:
    """The module doc's bound on two cross-entropies of the same bf16 logits computed by matmuls of other shapes."""
    return 2 * (2 * roundings * BF16_U + 32 * FP32_U) * max(1.0, largest_logit)


def adapted(architecture: str, method: str = "rlora", dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    base = ARCHITECTURES[architecture]().to(dtype)
    config = adapter_config(
        method, r=2, lora_alpha=4, num_heads=3, lora_dropout=0.0, target_modules=TARGETS, lora_r=2, model=base
    )
    model = get_peft_model(base, config)
    with torch.no_grad():  # away from the exact start, as training moves it (zero heads would hide the adapter)
        gen = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model.train()


def batch(seed: int = 0, rows: int = 3, length: int = 11) -> dict:
    """Right-padded rows with the loss on a few positions each (as the collator makes them)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, SHAPE["vocab_size"], (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 6:] = ids[0, 6:]
    labels[1, 4:8] = ids[1, 4:8]
    labels[2, 2:5] = ids[2, 2:5]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@numerics
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_the_head_only_loss_under_low_precision_autocast_is_the_models_own_loss(architecture, dtype):
    """bf16 and fp16 autocast (a GPU's fp16 path, run by torch's CPU autocast): fp16's unit round-off is 2^-11, under
    bf16's, so `bf16_loss_bound` holds for both."""
    model, inputs = adapted(architecture), batch()
    with torch.autocast("cpu", dtype):
        own = model(**inputs)
        ours = causal_lm_loss(model, inputs)
    largest = own.logits.abs().max().item()
    assert own.logits.dtype == dtype  # the model's own logits, under autocast: what rlora must match
    assert abs(ours.item() - own.loss.item()) <= bf16_loss_bound(ROUNDINGS[architecture], largest)
    ours.backward()  # the head's chunks are recomputed in the backward pass: under the same autocast
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@numerics
@pytest.mark.parametrize("architecture", ["mixtral", "qwen2_moe"])
def test_a_moe_models_loss_includes_its_router_auxiliary_loss_as_the_model_adds_it(architecture):
    model, inputs = adapted(architecture, dtype=torch.float64), batch()
    own = model(**inputs)
    assert own.aux_loss is not None and own.aux_loss.item() > 0.1
    targets = inputs["labels"][:, 1:]
    nll = F.cross_entropy(
        own.logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    for num_items in (None, torch.tensor(17)):  # the Trainer's count over several accumulated batches
        count = num_items if num_items is not None else (targets != IGNORE_INDEX).sum()
        expected = nll / count + 0.02 * own.aux_loss  # written out in float64: the coefficient times aux_loss, added
        torch.testing.assert_close(causal_lm_loss(model, inputs, num_items), expected, **F64)
        # and the model's own, from float32 logits (`.float()`): rounding of 6e-8 relative, far under 1e-5
        theirs = model(**inputs, num_items_in_batch=num_items).loss
        assert causal_lm_loss(model, inputs, num_items).item() == pytest.approx(theirs.item(), abs=1e-5, rel=0)
    without_aux = own.loss - 0.02 * own.aux_loss  # what dropping it gave: far beyond float64 rounding
    assert abs(causal_lm_loss(model, inputs).item() - without_aux.item()) > 1e-3


def test_the_first_forward_check_in_bf16_catches_a_five_percent_wrong_scale_and_says_what_differed():
    model = adapted("llama")
    with torch.no_grad():
        model.base_model.model.lm_head.weight.mul_(20)  # logits of size ~10, as a trained model's
    model.base_model.model.config.logit_scale = 1.05  # rlora would scale the logits; Llama's forward does not
    with torch.autocast("cpu", torch.bfloat16), pytest.raises(ModelError) as error:
        causal_lm_loss(model, batch())
    message = str(error.value)
    assert message.startswith(
        "LlamaForCausalLM: its logits are not its output head's output after the post-processing rlora knows "
        "(it applied: logit_scale 1.05): they differ by up to "
    )
    assert "that 2 rounding(s) of bfloat16 allow; this architecture is not supported" in message


@numerics
def test_scoring_under_bf16_autocast_and_in_bf16_weights_is_the_models_own_full_logits(architecture="gemma2"):
    """Evaluation's log-probabilities (`positions_logprobs`) in each precision a run evaluates in: the same bf16
    logits as the model's own, normalised in float32; bound as the loss's (a log-probability is minus a loss)."""
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    rows, positions = torch.tensor([0, 0, 2, 1]), torch.tensor([3, 9, 4, 7])
    targets = inputs["input_ids"][rows, positions + 1]
    for dtype, autocast in ((torch.float32, True), (torch.bfloat16, False)):
        model = adapted(architecture, dtype=dtype).eval()
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            logits = model(**inputs).logits
            ours = positions_logprobs(model, inputs, rows, positions, targets)
        assert logits.dtype == torch.bfloat16
        theirs = logits.float().log_softmax(-1)[rows, positions, targets]
        bound = bf16_loss_bound(ROUNDINGS[architecture], logits.abs().max().item())
        assert (ours - theirs).abs().max().item() <= bound, dtype


def record_losses(monkeypatch) -> list[dict]:
    """Makes rlora's Trainer also compute, at every step, the plain Trainer's loss (the model's own, from its full
    logits) at the same weights, on the same batch and under the same autocast, and returns the list it fills."""
    records: list[dict] = []
    compute_loss = rlora.trainer.HeadOnlyLossTrainer.compute_loss

    def recording(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ours = compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        func, self.compute_loss_func = self.compute_loss_func, None
        try:
            with torch.no_grad():
                plain, outputs = Trainer.compute_loss(self, model, dict(inputs), True, num_items_in_batch)
        finally:
            self.compute_loss_func = func
        largest = outputs.logits.abs().max().item()
        logits = outputs.logits.float()  # accelerate hands them back in float32
        in_bf16 = torch.equal(logits.bfloat16().float(), logits)  # ... with bf16 values only: computed in bf16
        records.append({"ours": ours.item(), "plain": plain.item(), "largest": largest, "in_bf16": in_bf16})
        return ours

    monkeypatch.setattr(rlora.trainer.HeadOnlyLossTrainer, "compute_loss", recording)
    return records


def bf16_training(tmp_path, **settings) -> tuple[TrainingArguments, list[dict]]:
    """The Trainer's arguments for a few bf16 steps on the CPU (nothing saved or reported), and 6 rows to train on."""
    args = TrainingArguments(
        output_dir=str(tmp_path),
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=True,
        disable_tqdm=True,
        **settings,
    )
    return args, [{k: v[i] for k, v in batch(seed=s).items()} for s in range(2) for i in range(3)]


def check_records(records: list[dict], steps: int, roundings: int = 1) -> None:
    assert len(records) == steps
    for i, r in enumerate(records):
        assert math.isfinite(r["ours"]), f"step {i + 1}"
        assert r["in_bf16"], f"step {i + 1}"  # the forward ran under bf16 autocast indeed
        assert abs(r["ours"] - r["plain"]) <= bf16_loss_bound(roundings, r["largest"]), f"step {i + 1}: {r}"


@numerics
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_the_trainer_in_bf16_takes_the_models_own_loss_at_every_step(architecture, method, tmp_path, monkeypatch):
    """The Python API: rlora's Trainer with `bf16=True` (torch's CPU autocast, through accelerate), 3 steps of 2
    accumulated batches, on each family and method, against the plain Trainer's loss under the same autocast."""
    records = record_losses(monkeypatch)
    args, rows = bf16_training(
        tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2
    )
    model = adapted(architecture, method)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rlora.trainer.RloraTrainer(model=model, args=args, train_dataset=rows).train()
    check_records(records, steps=6, roundings=ROUNDINGS[architecture])
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_gradient_checkpointing_in_bf16_recomputes_under_the_same_autocast(tmp_path, monkeypatch):
    records = record_losses(monkeypatch)
    args, rows = bf16_training(
        tmp_path,
        per_device_train_batch_size=3,
        max_steps=2,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
    )
    model = adapted("gemma2")
    rlora.trainer.RloraTrainer(model=model, args=args, train_dataset=rows).train()
    check_records(records, steps=2, roundings=ROUNDINGS["gemma2"])


# --- through `rlora train`, on a tiny model folder and tiny JSONL tasks ------------------------------------------

EXACT = ["adapter.lora_dropout=0", "training.logging_steps=1"]  # no dropout: the two forwards of a step agree


def train_log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def precision_choices() -> list[str]:
    """Every `training.precision` the run config accepts, from the field's own range."""
    _check, description = TrainingSettings.__dataclass_fields__["precision"].metadata["range"]
    return description.removeprefix("one of ").split(", ")


def has_accelerator() -> bool:
    return torch.accelerator.current_accelerator() is not None


@numerics
@pytest.mark.parametrize("method", METHODS)
def test_rlora_train_in_bf16_takes_the_models_own_loss_and_evaluates(method, workspace, tmp_path, monkeypatch):
    records = record_losses(monkeypatch)
    config = write_config(workspace, tmp_path / "run")
    overrides = ["training.precision=bf16", f"method={method}", "training.max_steps=3", *EXACT]
    assert main(["train", str(config), *overrides]) == 0
    check_records(records, steps=3)
    history = train_log(tmp_path / "run")
    logged = [r["loss"] for r in history if "loss" in r]
    assert logged == pytest.approx([r["ours"] for r in records], rel=1e-6)  # what the Trainer logged, rounded
    assert main(["eval", str(tmp_path / "run")]) == 0  # the bf16-trained adapter, evaluated
    results = RunFolder(tmp_path / "run").read_results()
    assert all(math.isfinite(task["loss"]) for task in results["tasks"].values())


@pytest.mark.parametrize("precision", precision_choices())
def test_every_precision_the_run_config_accepts_takes_a_step_or_is_refused_first(
    precision, workspace, tmp_path, capsys
):
    """A precision the config accepts either trains here or is refused, before any work, with its reason: only fp16
    without an accelerator, which accelerate would silently run in fp32."""
    config = write_config(workspace, tmp_path / "run")
    code = main(["train", str(config), f"training.precision={precision}", "training.max_steps=1"])
    if precision == "fp16" and not has_accelerator():
        assert code == 2 and not (tmp_path / "run").exists()
        assert capsys.readouterr().err.startswith("rlora: error: training.precision: fp16 needs a GPU")
        return
    assert code == 0
    history = train_log(tmp_path / "run")
    assert history[-1]["step"] == 1


@pytest.mark.parametrize(
    ("dtype", "precision"),
    [("bfloat16", "bf16"), ("bfloat16", "fp32"), ("float16", "fp32")],  # fp16 weights: no fp16 autocast on a CPU
)
def test_a_base_loaded_in_low_precision_weights_trains_evaluates_generates_and_exports(
    dtype, precision, workspace, tmp_path
):
    config = write_config(workspace, tmp_path / "run")
    overrides = [f"base.dtype={dtype}", f"training.precision={precision}", "training.max_steps=2"]
    assert main(["train", str(config), *overrides, "training.logging_steps=1"]) == 0
    history = train_log(tmp_path / "run")
    assert all(math.isfinite(r["loss"]) for r in history if "loss" in r)
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}  # the adapter trains and saves in float32
    assert main(["eval", str(tmp_path / "run")]) == 0  # loads the base in base.dtype again, from the saved config
    results = RunFolder(tmp_path / "run").read_results()
    assert all(math.isfinite(task["loss"]) for task in results["tasks"].values())
    assert main(["generate", str(tmp_path / "run"), "the sky is", "--max-new-tokens", "3"]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "merged"), "--merged"]) == 0
    merged = load_file(next((tmp_path / "merged").glob("*.safetensors")))
    # merged into a float32 base whatever base.dtype: rounding W + update to bf16 would lose what of the update is
    # under half a bf16 step of W
    assert merged["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32


def test_a_bf16_run_resumes_to_the_uninterrupted_adapter_bitwise(workspace, tmp_path):
    overrides = ["training.precision=bf16", "training.max_steps=3", "training.save_steps=1", *EXACT]
    overrides += ["training.save_total_limit=10"]
    whole = rlora.train.train(load_run_config(write_config(workspace, tmp_path / "whole"), overrides))
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "adapter")
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-3")
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-2")
    cfg = load_run_config(write_config(workspace, resumed), overrides)
    RunFolder(resumed).write_config(cfg)  # the copy's own output_dir
    torch.manual_seed(123)  # another global generator state than the uninterrupted run's
    rlora.train.train(cfg, resume=True)
    # Bitwise, legitimately: the same process, ops and data order, under the same autocast, with the optimizer,
    # scheduler and RNG states restored from the checkpoint; a difference is a lost state, not rounding.
    got, expected = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (resumed, whole))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_cross_entropy_moves_by_at_most_twice_its_largest_logit_change():
    """The module doc's step from logits to loss: a cross-entropy moves by at most twice the largest logit change."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(200):
        z = 5 * torch.randn(7, 97, generator=gen, dtype=torch.float64)
        dz = torch.empty_like(z).uniform_(-1, 1, generator=gen) * 1e-3
        t = torch.randint(0, 97, (7,), generator=gen)
        change = (F.cross_entropy(z + dz, t) - F.cross_entropy(z, t)).abs().item()
        worst = max(worst, change / dz.abs().max().item())
    assert worst <= 2.0


@pytest.mark.slow  # compiling the tiny model's forward and backward: ~1 min idle, more on a busy machine
def test_torch_compile_in_bf16_takes_the_models_own_loss(tmp_path, monkeypatch):
    """The Trainer's `torch_compile` (backend aot_eager: the graphs dynamo captures, without a C++ compiler): the
    head's input swap and its autocast state are taken inside the compiled forward."""
    records = record_losses(monkeypatch)
    args, rows = bf16_training(
        tmp_path, per_device_train_batch_size=3, max_steps=2, torch_compile=True, torch_compile_backend="aot_eager"
    )
    rlora.trainer.RloraTrainer(model=adapted("gemma2"), args=args, train_dataset=rows).train()
    check_records(records, steps=2, roundings=ROUNDINGS["gemma2"])


@pytest.mark.slow  # the embedded model in bf16: minutes on a CPU without AVX-512 BF16 or AMX
def test_the_demo_trains_in_bf16_with_the_models_own_loss_and_evaluates(model_cache_dir, tmp_path, monkeypatch):
    """The GPU user's first command, on the CPU: `rlora train demo training.precision=bf16` (one step of 2 rows)."""
    records = record_losses(monkeypatch)
    run = tmp_path / "demo"
    overrides = ["training.precision=bf16", "training.max_steps=1", "training.batch_size=2", *EXACT]
    overrides += ["data.max_train_per_task=8", "data.max_eval_per_task=2", f"output_dir={run}"]
    assert main(["train", "demo", *overrides, "--cache-dir", str(model_cache_dir)]) == 0
    check_records(records, steps=1)
    assert main(["eval", str(run), "--cache-dir", str(model_cache_dir)]) == 0
    assert all(math.isfinite(task["loss"]) for task in RunFolder(run).read_results()["tasks"].values())


@pytest.mark.parametrize("method", METHODS)
def test_adapters_kept_in_bf16_weights_train_with_dropout(method):
    """PEFT keeps adapter weights in the base's bf16 with `autocast_adapter_dtype=False`: every method takes a
    training step there too, with dropout on (HydraLoRA's single mask on x leaves no fused matmul of x)."""
    torch.manual_seed(0)
    base = ARCHITECTURES["llama"]().to(torch.bfloat16)
    config = adapter_config(method, r=2, lora_alpha=4, num_heads=3, lora_dropout=0.1, target_modules=TARGETS, lora_r=2)
    model = get_peft_model(base, config, autocast_adapter_dtype=False).train()
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    loss = causal_lm_loss(model, batch())
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
