"""Tiny models built from a config and tiny tokenizers, shared by the unit tests."""

from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

MLP = ["gate_proj", "up_proj", "down_proj"]
TINY_WORDS = [
    "What",
    "is",
    "two",
    "plus",
    "four",
    "?",
    "Answer",
    ":",
    "A",
    "B",
    "C",
    "D",
    ".",
    "yes",
    "no",
    "format",
    "/",
    "user",
    "assistant",
    "red",
    "blue",
    "sky",
    "the",
]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m.role }} : {{ m.content }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


TINY_SHAPE = dict(  # the tiny decoders' sizes, shared by the architectures built here
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**TINY_SHAPE)
    return LlamaForCausalLM(config).to(dtype).eval()


def perturb_adapter(model: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Move every trainable adapter parameter away from its init, as training would (router included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("rlora_" in name or "lora_" in name):
                p.add_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))


def word_tokenizer():
    """Word-level, for the tests that spell out token ids: 0 <pad>, 1 <eos>, 2 <unk>, then TINY_WORDS in order from 3;
    splits on spaces and punctuation. Words outside TINY_WORDS encode as <unk>: use `byte_tokenizer` for any text."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(TINY_WORDS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def byte_tokenizer():
    """A byte-level BPE tokenizer trained in milliseconds on a few sentences: every string encodes, and decoding
    gives back the exact text (the tiny model folders' tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Question: is the sky blue? Answer: yes", "Answer format: A/B/C/D. Answer: A", "no yes B C D"] * 5
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def tiny_model_dir(path, seed: int = 0):
    """A complete local model folder (tiny Llama + tokenizer) that `from_pretrained(path)` loads."""
    tokenizer = byte_tokenizer()
    model = tiny_llama(seed)
    model.resize_token_embeddings(len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_config(workspace, out, **sections) -> Path:
    text = f"""
model: {workspace / "model"}
output_dir: {out}
data:
  tasks: []
  jsonl: [{workspace / "colors.jsonl"}, {workspace / "letters.jsonl"}]
  max_eval_per_task: 6
  max_length: 64
training:
  max_steps: 6
  batch_size: 4
  save_steps: 2
  logging_steps: 1
  lr: 1e-3
adapter:
  num_heads: 3
eval:
  batch_size: 4
  max_new_tokens: 3
"""
    path = Path(out).with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# Tolerance for two float64 computations that are equal in exact arithmetic (fused vs per-head loop, save -> load,
# ...): float64 rounding is ~1e-16 relative, the values here are at most ~1e2 and the longest sums ~1e2 terms, so
# any BLAS and any summation order agree to ~1e-12; a real error in the algebra is orders of magnitude above 1e-10.
F64 = {"atol": 1e-10, "rtol": 1e-10}


def update_magnitude(layer, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """Per output element, the sum of |every product| the adapter's update of `layer` adds up for input x (its heads
    times their gates, and the subtracted offset), in float64 (..., d_out): what the update's rounding scales with."""
    ax = x.detach().double().abs()
    gates = layer.gates(x.detach(), name).detach().double()  # (..., K)
    z = ax @ layer.rlora_A[name].detach().double().abs().T  # (..., r)
    heads = layer.head_weights(name).detach().double().abs()  # (K, d_out, r)
    magnitude = layer.scaling[name] * torch.einsum("...k,...r,kor->...o", gates, z, heads)
    if name in layer.rlora_offset_A:
        z0 = ax @ layer.rlora_offset_A[name].double().abs().T
        magnitude = magnitude + z0 @ layer.rlora_offset_B[name].double().abs().T
    return magnitude


def start_bound(layer, x: torch.Tensor, base_out: torch.Tensor, name: str = "default") -> torch.Tensor:
    """How far `layer(x)` may be from `base_out` = its base layer's output at initialisation, element by element.

    In exact arithmetic the update is zero there (B = 0, or random heads minus their offset under uniform gates), so
    what is left is rounding, bounded as in Higham's analysis of sums (|error| <= gamma_n * sum of |terms|,
    gamma_n <= n * eps): n counts the roundings one product can go through in the adapter's accumulation dtype
    (float32 at least; d_in for A x, K + 3 for the softmax or for the offset's mean over K heads, (K+1)*r + 1 for
    the heads' and offset's sum onto the base output), plus 6 roundings to the adapter's own dtype (A x, gates * s,
    their product, the cast offset, the update, the cast update), plus one rounding of the sum in the output dtype.
    """
    d_in, r, k = layer.in_features, layer.r[name], layer.num_heads[name]
    adapter = layer.rlora_A[name].dtype
    eps_acc = torch.finfo(torch.promote_types(adapter, torch.float32)).eps
    n = d_in + (k + 3) + (k + 1) * r + 1
    magnitude = update_magnitude(layer, x, name)
    return (n * eps_acc + 6 * torch.finfo(adapter).eps) * magnitude + torch.finfo(base_out.dtype).eps * (
        base_out.double().abs()
    )


@contextmanager
def adapted_layer_calls(model: torch.nn.Module):
    """Records (layer, input, output) for every forward call of an R-LoRA layer in `model`."""
    from rlora import RLoraLinear

    calls: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: calls.append((mod, args[0].detach(), out.detach())))
        for m in model.modules()
        if isinstance(m, RLoraLinear)
    ]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def fixed_gate_weight_bound(layer, gates: torch.Tensor, dtype: torch.dtype, name: str = "default") -> torch.Tensor:
    """How far `layer.get_delta_weight(name, gates)`, computed in `dtype`, may be from the exact fixed-gate update,
    entry by entry: gamma_n * sum of |terms| as in `start_bound`, n the roundings one product goes through (K in
    the head mixture, r in the product with A, r in the offset's product, a few multiplications and subtractions)."""
    k, r, s = layer.num_heads[name], layer.r[name], layer.scaling[name]
    A, heads = layer.rlora_A[name].detach().double().abs(), layer.head_weights(name).detach().double().abs()
    magnitude = s * torch.einsum("k,kor->or", gates.double(), heads) @ A
    if name in layer.rlora_offset_A:
        magnitude = magnitude + layer.rlora_offset_B[name].double().abs() @ layer.rlora_offset_A[name].double().abs()
    return (k + 2 * r + 4) * torch.finfo(dtype).eps * magnitude


def untrained_runs(workspace, root: Path, perturb_scale: float = 0.1) -> dict[str, Path]:
    """A finished run folder of each kind (R-LoRA, plain LoRA) under `root`, made without training: its config,
    the adapter as initialised, and the adapter moved off its init by `perturb_adapter` (routers included)."""
    from transformers import AutoModelForCausalLM

    from rlora.run import RunFolder
    from rlora.runconfig import load_run_config
    from rlora.train import build_peft_model

    made = {}
    for method in ("rlora", "lora"):
        out = root / method
        cfg = load_run_config(write_config(workspace, out), [f"method={method}"])
        folder = RunFolder(out)
        folder.write_config(cfg)
        model = build_peft_model(cfg, AutoModelForCausalLM.from_pretrained(workspace / "model"))
        model.save_pretrained(folder.adapter_init)
        perturb_adapter(model, scale=perturb_scale)
        model.save_pretrained(folder.adapter)
        made[method] = out
    return made


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32):
    """GPT-2 architecture: its attention and MLP layers are transformers' Conv1D (weight stored d_in x d_out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_phi3(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Phi-3 architecture: q, k, v fused in `qkv_proj`, gate and up in `gate_up_proj`."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    config = Phi3Config(
        **TINY_SHAPE,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return Phi3ForCausalLM(config).to(dtype).eval()
