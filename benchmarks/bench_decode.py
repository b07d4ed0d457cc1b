"""Decode benchmark: tokens/s of generation with an R-LoRA adapter, against the base model and PEFT's LoRA
(unmerged) with as many trainable parameters, at batch 1 and batch 8.

The model has the embedded default's shape (SmolLM2-135M: 30 layers, hidden 576) with random weights, built from
its config (decoding speed depends on the shapes, not the values); the adapters adapt the default target modules of
a Llama (q_proj, v_proj: 60 layers), R-LoRA with --r and --heads, LoRA with the rank whose parameter count is
closest. Each variant generates --tokens new tokens (end-of-sequence ignored) after a short prompt, with the adapter
made active (`set_adapter`) and, as `rlora serve` runs it, named per row (`adapter_names`). Rounds are interleaved,
the median of --repeats reported; the last columns are each variant's tokens/s over the base model's.

    python benchmarks/bench_decode.py [--quick] [--tokens 32] [--batches 1 8] [--r 4] [--heads 5]
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import bench_main, device, interleaved_median_times, machine_line
from peft import LoraConfig, get_peft_model

import rlora  # noqa: F401  (registers the R-LoRA type with PEFT)
from rlora import RLoraConfig
from rlora.tuner.layer import reuse_fused_weights

SMOLLM2_135M = dict(  # the embedded default's config (its shapes)
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)
QUICK = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
TARGETS = ["q_proj", "v_proj"]
VARIANTS = ("base", "PEFT LoRA", "PEFT LoRA (adapter_names)", "R-LoRA", "R-LoRA (adapter_names)")


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build(shape: dict, args: argparse.Namespace, dev: torch.device):
    """The base model, and the same base under each adapter (fresh copies, so that none wraps another's layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def base():
        torch.manual_seed(args.seed)
        return LlamaForCausalLM(LlamaConfig(**shape)).to(dev, getattr(torch, args.dtype)).eval()

    rlora_config = RLoraConfig(r=args.r, num_heads=args.heads, target_modules=TARGETS, head_init="random")
    adapted = get_peft_model(base(), rlora_config, adapter_name="run")
    params = trainable(adapted)
    per_rank = trainable(get_peft_model(base(), LoraConfig(r=1, target_modules=TARGETS)))
    lora_r = max(1, round(params / per_rank))
    lora = get_peft_model(base(), LoraConfig(r=lora_r, target_modules=TARGETS), adapter_name="run")
    for model in (adapted, lora):
        with torch.no_grad():  # off zero, as trained adapters are (the arithmetic does not depend on it)
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.01)
        model.eval()
    return base(), lora, adapted, params, trainable(lora), lora_r


def generate_fn(model, batch: int, tokens: int, dev: torch.device, named: bool):
    ids = torch.randint(3, 90, (batch, 8), generator=torch.Generator().manual_seed(0)).to(dev)
    extra = {"adapter_names": ["run"] * batch} if named else {}

    def run():
        with torch.inference_mode(), reuse_fused_weights(model):  # as the server's worker runs
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
                **extra,
            )

    return run


def run(args: argparse.Namespace) -> str:
    dev = device()
    args.dtype = args.dtype or "float32"
    shape = QUICK if args.quick else SMOLLM2_135M
    tokens = 2 if args.quick else args.tokens
    base, lora, adapted, params, lora_params, lora_r = build(shape, args, dev)
    models = {"base": (base, False), "PEFT LoRA": (lora, False), "PEFT LoRA (adapter_names)": (lora, True)}
    models |= {"R-LoRA": (adapted, False), "R-LoRA (adapter_names)": (adapted, True)}
    lines = [
        f"Decode tokens/s, {tokens} new tokens after 8, {args.dtype}; R-LoRA r={args.r} K={args.heads} "
        f"({params:,} parameters), PEFT LoRA r={lora_r} ({lora_params:,}), on {', '.join(TARGETS)}; median of "
        f"{args.repeats} interleaved rounds. {machine_line(dev)}",
        "",
        "| batch | " + " | ".join(VARIANTS) + " | " + " | ".join(f"{v} / base" for v in VARIANTS[1:]) + " |",
        "|---" * (2 * len(VARIANTS)) + "|",
    ]
    for batch in args.batches:
        fns = {name: generate_fn(m, batch, tokens, dev, named) for name, (m, named) in models.items()}
        times = interleaved_median_times(fns, args.repeats, args.warmup, dev)
        rate = {name: batch * tokens / t for name, t in times.items()}
        cells = [f"{rate[v]:.1f}" for v in VARIANTS] + [f"{rate[v] / rate['base']:.2f}x" for v in VARIANTS[1:]]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--heads", type=int, default=5)


def main(argv: list[str] | None = None) -> str:
    return bench_main(argv, __doc__, add_args, run, repeats=5, warmup=1)


if __name__ == "__main__":
    main(sys.argv[1:])
