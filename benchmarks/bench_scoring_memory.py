"""Peak memory of scoring one batch (default 32 x 512 tokens, the last token of each row scored): the output head at
the scored positions only (`rlora.output_head.positions_logprobs`, what `rlora eval` runs) against today's path
before it (the model's full logits, upcast and log-softmaxed over the whole batch, then the scored entries taken).

The model is built from a config with SmolLM2-135M's shapes (hidden 576, vocabulary 49,152, tied embeddings) and
`--layers` decoder layers, random weights (memory does not depend on their values). Without gradients a layer's
activations are freed as the next one runs, so the depth changes the peak only through the KV cache the forward
builds (about 25 MB per layer for 32 x 512 tokens); `--layers 30` is the real depth, at 30x the forward's time.

    python benchmarks/bench_scoring_memory.py [--quick] [--batch 32] [--seq 512] [--layers 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from _common import bench_main, interleaved_median_times, machine_line, mib, process_peak_bytes
from transformers import LlamaConfig, LlamaForCausalLM

from rlora.output_head import positions_logprobs
from rlora.reports import markdown_table

SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
         "vocab_size": 49152, "tie_word_embeddings": True}  # fmt: skip


@torch.no_grad()
def full_logits(model, inputs, rows, positions, targets) -> torch.Tensor:
    """Today's path before the change (evaluate.score_continuations then): every position's logits, normalised."""
    logprobs = model(**inputs).logits.float().log_softmax(-1)  # (B, T, V), twice over with the log-softmax
    return logprobs[rows, positions, targets]


@torch.no_grad()
def head_at_positions(model, inputs, rows, positions, targets) -> torch.Tensor:
    return positions_logprobs(model, inputs, rows, positions, targets)


def run(args: argparse.Namespace) -> str:
    if args.quick:
        args.batch, args.seq, args.layers = 2, 16, 1
    torch.manual_seed(args.seed)
    shape = SHAPE | ({"vocab_size": 4096, "hidden_size": 72, "intermediate_size": 128} if args.quick else {})
    model = LlamaForCausalLM(LlamaConfig(**shape, num_hidden_layers=args.layers, max_position_embeddings=2048)).eval()
    ids = torch.randint(1, shape["vocab_size"], (args.batch, args.seq))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows, positions = torch.arange(args.batch), torch.full((args.batch,), args.seq - 2)
    targets = ids[:, -1]
    variants = {"head at the scored positions": head_at_positions, "full logits (before)": full_logits}
    torch.testing.assert_close(  # the same scores (float32 rounding of a 49,152-way log-softmax)
        *(fn(model, inputs, rows, positions, targets) for fn in variants.values()), atol=1e-4, rtol=0
    )
    calls = {name: (lambda fn=fn: fn(model, inputs, rows, positions, targets)) for name, fn in variants.items()}
    times = interleaved_median_times(calls, args.repeats, args.warmup, torch.device("cpu"))
    mems = {name: statistics.median(process_peak_bytes(c) for _ in range(args.repeats)) for name, c in calls.items()}
    ref = "full logits (before)"
    header = ["scoring", "s", "time ratio", "peak MiB above resident", "memory ratio"]
    body = [[n, f"{times[n]:.2f}", f"{times[n] / times[ref]:.2f}", mib(mems[n]), f"{mems[n] / mems[ref]:.2f}"]
            for n in variants]  # fmt: skip
    note = (
        f"\nOne batch of {args.batch} x {args.seq} tokens, one position per row scored; a {args.layers}-layer Llama "
        f"with SmolLM2-135M's shapes, float32, no gradients. Medians of {args.repeats} interleaved calls after "
        f"{args.warmup} warm-up; memory: process peak RSS above the RSS before the call. Machine: "
        f"{machine_line(torch.device('cpu'))}."
    )
    return markdown_table(header, body) + "\n" + note


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--layers", type=int, default=1)


def main(argv: list[str] | None = None) -> str:
    return bench_main(argv, __doc__, add_args, run, repeats=2, warmup=0)


if __name__ == "__main__":
    main(sys.argv[1:])
