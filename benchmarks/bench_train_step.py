"""Training-step benchmark: tokens/s and memory of forward+backward+AdamW, PEFT LoRA vs HydraLoRA vs R-LoRA.

Rows 1-3 compare the methods on the same model and batch (ratios to PEFT LoRA). Rows 4-5 measure dynamic
padding: one R-LoRA batch of varied lengths padded to the batch maximum vs padded to a fixed 512 (ratios to the
dynamic batch; tokens/s counts the useful, non-pad tokens).

Default model: a 4-layer Llama with SmolLM2-135M's shapes built from a config (random weights, no download).
`--model smollm2-135m` uses the real embedded model through `rlora.models.load_model_and_tokenizer`.

    python benchmarks/bench_train_step.py [--quick] [--model config|smollm2-135m] [--batch 8] [--seq 128]
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import (
    add_adapter_args,
    bench_main,
    default_dtype,
    device,
    interleaved_median_times,
    machine_line,
    memory_kind,
    mib,
    peak_memory_bytes,
)
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from rlora import RLoraConfig
from rlora.reports import markdown_table

MLP = ["gate_proj", "up_proj", "down_proj"]
SMOLLM2_SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
QUICK_SHAPE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}
METHODS = ["PEFT LoRA", "HydraLoRA", "R-LoRA"]


def peft_config(method: str, args: argparse.Namespace):
    common = {"r": args.r, "lora_alpha": args.alpha, "lora_dropout": args.dropout, "target_modules": MLP}
    if method == "PEFT LoRA":
        return LoraConfig(**common, use_rslora=True)
    if method == "HydraLoRA":
        return RLoraConfig(**common, num_heads=args.heads, head_init="zeros", head_dropout=False)
    return RLoraConfig(**common, num_heads=args.heads, head_init="random", head_dropout=True)


def base_model(args: argparse.Namespace, dtype: torch.dtype, dev: torch.device) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    if args.model == "smollm2-135m":
        try:
            from rlora.models import load_model_and_tokenizer
        except ImportError as err:
            raise SystemExit(f"--model smollm2-135m needs rlora.models.load_model_and_tokenizer: {err}") from None
        model = load_model_and_tokenizer()[0]
    else:
        shape = QUICK_SHAPE if args.quick else SMOLLM2_SHAPE
        layers = 2 if args.quick else args.layers
        model = LlamaForCausalLM(LlamaConfig(**shape, num_hidden_layers=layers, max_position_embeddings=1024))
    return model.to(dev, dtype)


def make_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step() -> None:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def batch_of(lengths: list[int], pad_to: int, vocab: int, dev: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded batch: random tokens, attention mask, labels -100 on padding."""
    ids = torch.zeros(len(lengths), pad_to, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab, (n,))
        mask[i, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "labels": labels.to(dev)}


def run(args: argparse.Namespace) -> str:
    if args.quick:
        args.batch, args.seq = min(args.batch, 2), min(args.seq, 16)
    dev = device()
    dtype = getattr(torch, args.dtype or default_dtype(dev))
    models = {m: get_peft_model(base_model(args, dtype, dev), peft_config(m, args)).train() for m in METHODS}
    vocab = models["R-LoRA"].get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    full = batch_of([args.seq] * args.batch, args.seq, vocab, dev)

    # Dynamic padding: lengths like short multiple-choice prompts with their answer.
    lo, hi, pad_to = (8, 24, 32) if args.quick else (40, 200, 512)
    lengths = torch.randint(lo, hi + 1, (args.batch,), generator=gen).tolist()
    dynamic = batch_of(lengths, max(lengths), vocab, dev)
    fixed = {k: torch.nn.functional.pad(v, (0, pad_to - max(lengths)), value=0) for k, v in dynamic.items()}
    fixed["labels"][:, max(lengths) :] = -100

    def timed(steps: dict, exclude_model) -> tuple[dict[str, float], dict[str, int]]:
        times = interleaved_median_times(steps, args.repeats, args.warmup, dev)
        mems = {
            k: peak_memory_bytes(s, dev, exclude=[*exclude_model(k).parameters(), *exclude_model(k).buffers()])
            for k, s in steps.items()
        }
        return times, mems

    m_times, m_mems = timed({m: make_step(models[m], full) for m in METHODS}, models.__getitem__)
    pads = {f"dynamic (to {max(lengths)})": dynamic, f"fixed (to {pad_to})": fixed}
    p_times, p_mems = timed({k: make_step(models["R-LoRA"], b) for k, b in pads.items()}, lambda _: models["R-LoRA"])

    header = ["variant", "batch (rows×padded len)", "step ms", "useful tokens/s", "time ratio", "mem MiB", "mem ratio"]
    rows = []
    useful = args.batch * args.seq
    for m in METHODS:
        t, mem = m_times[m], m_mems[m]
        rows.append([m, f"{args.batch}×{args.seq}", f"{t * 1e3:.0f}", f"{useful / t:.0f}",
                     f"{t / m_times['PEFT LoRA']:.2f}", mib(mem), f"{mem / m_mems['PEFT LoRA']:.2f}"])  # fmt: skip
    ref = next(iter(pads))
    for k, b in pads.items():
        t, mem = p_times[k], p_mems[k]
        padded = b["input_ids"].shape[1]
        rows.append([f"R-LoRA, pad {k}", f"{args.batch}×{padded}", f"{t * 1e3:.0f}", f"{sum(lengths) / t:.0f}",
                     f"{t / p_times[ref]:.2f}", mib(mem), f"{mem / p_mems[ref]:.2f}"])  # fmt: skip
    note = (
        f"\nRows 1-3: ratios to PEFT LoRA; rows 4-5: ratios to dynamic padding ({sum(lengths)} useful tokens, lengths "
        f"{lo}-{hi}). Medians of {args.repeats} interleaved steps after {args.warmup} warm-up; model {args.model}"
        f"{'' if args.model != 'config' else f' ({2 if args.quick else args.layers} layers)'}, r={args.r}, "
        f"K={args.heads}, dropout={args.dropout}, targets {'/'.join(MLP)}, AdamW, {dtype}. Memory: {memory_kind(dev)}. "
        f"Machine: {machine_line(dev)}."
    )
    return markdown_table(header, rows) + "\n" + note


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=["config", "smollm2-135m"], default="config")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the config-built model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    add_adapter_args(parser)


def main(argv: list[str] | None = None) -> str:
    return bench_main(argv, __doc__, add_args, run, repeats=10)


if __name__ == "__main__":
    main(sys.argv[1:])
