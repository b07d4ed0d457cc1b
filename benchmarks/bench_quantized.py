"""Training step with a quantized base: time and memory of a 4-bit and an 8-bit base (bitsandbytes) against the float32
base, R-LoRA and PEFT LoRA side by side, gradient checkpointing off and on.

Ratios are to the float32 base with the same method and no checkpointing. Weights: the bytes of every parameter and
buffer (a 4-bit weight's packed storage and its quantization state). Activations: see `_common.peak_memory_bytes`;
with checkpointing, the decoder layers' inputs that the checkpoints keep are counted too (read by a hook: autograd's
saved-tensor hook does not see them).

Default model: a 4-layer Llama with SmolLM2-135M's shapes built from a config (random weights), saved to a temporary
folder and loaded through `rlora.models.load_model` with the run config's `base` settings.

    python benchmarks/bench_quantized.py [--quick] [--batch 4] [--seq 128] [--layers 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from _common import add_adapter_args, bench_main, device, interleaved_median_times, machine_line, memory_kind, mib
from bench_train_step import MLP, QUICK_SHAPE, SMOLLM2_SHAPE, batch_of, make_step
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import LlamaConfig, LlamaForCausalLM

from rlora import RLoraConfig
from rlora.models import BaseLoading, load_model
from rlora.reports import markdown_table

BASES = ["float32", "4bit", "8bit"]
METHODS = ["PEFT LoRA", "R-LoRA"]


def weight_bytes(model: torch.nn.Module) -> int:
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        total += t.untyped_storage().nbytes()
        state = getattr(t, "quant_state", None)  # 4-bit: absmax per block (and its own state when double-quantized)
        if state is not None:
            total += sum(
                v.numel() * v.element_size() for v in state.as_dict(packed=True).values() if torch.is_tensor(v)
            )
        scales = getattr(t, "SCB", None)  # 8-bit: one scale per row
        if scales is not None:
            total += scales.numel() * scales.element_size()
    return total


def activation_bytes(step, model: torch.nn.Module, dev: torch.device, checkpointing: bool) -> int:
    from _common import peak_memory_bytes

    inputs: dict[int, int] = {}
    hooks = []
    if checkpointing:
        for layer in model.base_model.model.model.layers:
            hook = layer.register_forward_pre_hook(
                lambda _m, args, kw: inputs.__setitem__((h := (args or [kw["hidden_states"]])[0]).data_ptr(),
                                                       h.untyped_storage().nbytes()),
                with_kwargs=True,
            )  # fmt: skip
            hooks.append(hook)
    try:
        saved = peak_memory_bytes(step, dev, exclude=[*model.parameters(), *model.buffers()])
    finally:
        for hook in hooks:
            hook.remove()
    return saved + sum(inputs.values())


def build(folder: Path, tokenizer, base: str, method: str, checkpointing: bool, args) -> torch.nn.Module:
    loading = BaseLoading() if base == "float32" else BaseLoading(quantization=base)
    model = load_model(str(folder), tokenizer, loading=loading)
    kwargs = {"use_reentrant": False}
    if base != "float32":
        model = prepare_model_for_kbit_training(model, checkpointing, gradient_checkpointing_kwargs=kwargs)
    elif checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    common = {"r": args.r, "lora_alpha": args.alpha, "lora_dropout": args.dropout, "target_modules": MLP}
    config = (
        LoraConfig(**common, use_rslora=True) if method == "PEFT LoRA" else RLoraConfig(**common, num_heads=args.heads)
    )
    torch.manual_seed(args.seed)
    return get_peft_model(model, config).train()


def run(args: argparse.Namespace) -> str:
    if args.quick:
        args.batch, args.seq, args.layers = min(args.batch, 2), min(args.seq, 16), 2
    dev = device()
    torch.manual_seed(args.seed)
    shape = QUICK_SHAPE if args.quick else SMOLLM2_SHAPE
    config = LlamaConfig(**shape, num_hidden_layers=args.layers, max_position_embeddings=1024)
    variants = [(b, m, c) for b in BASES for m in METHODS for c in (False, True)]
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(config).save_pretrained(tmp)
        pad = argparse.Namespace(pad_token_id=0)  # what load_model reads of a tokenizer
        models = {v: build(Path(tmp), pad, *v, args) for v in variants}
    batch = batch_of([args.seq] * args.batch, args.seq, shape["vocab_size"], dev)
    steps = {v: make_step(models[v], batch) for v in variants}
    times = interleaved_median_times(steps, args.repeats, args.warmup, dev)
    weights = {v: weight_bytes(models[v]) for v in variants}
    acts = {v: activation_bytes(steps[v], models[v], dev, v[2]) for v in variants}

    header = ["base", "method", "checkpointing", "step ms", "time ratio", "weights MiB", "weights ratio"]
    header += ["activations MiB", "activations ratio"]
    rows = []
    for v in variants:
        ref = ("float32", v[1], False)
        row = [v[0], v[1], "on" if v[2] else "off", f"{times[v] * 1e3:.0f}", f"{times[v] / times[ref]:.2f}"]
        row += [mib(weights[v]), f"{weights[v] / weights[ref]:.2f}", mib(acts[v]), f"{acts[v] / acts[ref]:.2f}"]
        rows.append(row)
    note = (
        f"\nRatios to the float32 base with the same method, checkpointing off. Medians of {args.repeats} interleaved "
        f"steps (forward+backward+AdamW) after {args.warmup} warm-up; {args.layers} layers of "
        f"{'a tiny' if args.quick else 'SmolLM2-135M'}'s shape, batch {args.batch}×{args.seq}, r={args.r}, "
        f"K={args.heads}, targets {'/'.join(MLP)}; 4bit = nf4, double quantization, float32 compute. Activations: "
        f"{memory_kind(dev)}. Machine: {machine_line(dev)}."
    )
    return markdown_table(header, rows) + "\n" + note


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the config-built model")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    add_adapter_args(parser)


def main(argv: list[str] | None = None) -> str:
    return bench_main(argv, __doc__, add_args, run, repeats=5)


if __name__ == "__main__":
    main(sys.argv[1:])
