"""Layer benchmark: forward+backward time and memory of one adapted linear layer, ratios to PEFT LoRA.

Variants, all with the same frozen base layer, rank r and dropout p, in training mode:
- base:           the frozen nn.Linear alone
- PEFT LoRA:      `peft.get_peft_model` with `LoraConfig` (dropout on x)
- HydraLoRA:      our fused `RLoraLinear`, K zero heads, one dropout mask on x shared by the heads
- R-LoRA:         our fused `RLoraLinear`, K random heads with offset, a dropout mask per head on A x
- per-head loop:  the authors' style, written here: for every head its own dropout on x, A x recomputed, B_k
                  applied, the gate multiplying that head's d_out-wide output, summed
- R-LoRA (x read twice): our layer as it was before x was read by one matmul: `A x` with the offset's `A0 x` in
                  one matmul and the router's `W_r x` in another (`TwoReads` below)

The last columns give R-LoRA's time over the frozen base layer's, with one read of x and with two.

The input requires grad (a layer in the middle of a network), the gradient of the output is fixed.

    python benchmarks/bench_layer.py [--quick] [--tokens 512 2048] [--r 4] [--heads 5] [--dropout 0.1]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
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
from torch import nn

from rlora import RLoraConfig, RLoraLinear
from rlora.reports import markdown_table

# (model, d_in, d_out): the MLP projections of SmolLM2-135M and Qwen2.5-0.5B
SHAPES = [
    ("SmolLM2-135M", 576, 1536),
    ("SmolLM2-135M", 1536, 576),
    ("Qwen2.5-0.5B", 896, 4864),
    ("Qwen2.5-0.5B", 4864, 896),
]
QUICK_SHAPES = [("tiny", 32, 64), ("tiny", 64, 32)]
VARIANTS = ["base", "PEFT LoRA", "HydraLoRA (fused)", "R-LoRA (fused)", "per-head loop", "R-LoRA (x read twice)"]


class TwoReads(RLoraLinear):
    """R-LoRA's update with the router reading x in a matmul of its own (the layer before the single read of x)."""

    def delta(self, x: torch.Tensor, adapter_name: str, result: torch.Tensor | None = None) -> torch.Tensor:
        A, B, A0 = self.rlora_A[adapter_name], self.rlora_B[adapter_name], self.rlora_offset_A[adapter_name]
        r, k, p = self.r[adapter_name], self.num_heads[adapter_name], self.dropout_p[adapter_name]
        gates = (self.gates(x, adapter_name) * self.scaling[adapter_name]).to(A.dtype)  # (..., K): W_r x
        z, z0 = F.linear(x, torch.cat([A, A0.to(A.dtype)])).split(r, dim=-1)  # (..., r) each: A x, A0 x
        zk = F.dropout(z.unsqueeze(-2).expand(*z.shape[:-1], k, r), p, self.training)  # (..., K, r)
        u = torch.cat([(zk * gates.unsqueeze(-1)).flatten(-2), z0], dim=-1)  # (..., (K+1)*r)
        B = torch.cat([B, -self.rlora_offset_B[adapter_name].to(A.dtype)], dim=1)  # (d_out, (K+1)*r)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), u.reshape(-1, u.shape[-1]), B.t())
        return out.view(result.shape)


class PerHeadLoop(nn.Module):
    """The multi-head layer as the authors' code computes it: a Python loop over heads, A x recomputed per head."""

    def __init__(self, base: nn.Linear, r: int, k: int, p: float, scaling: float) -> None:
        super().__init__()
        self.base, self.scaling = base, scaling
        self.A = nn.Linear(base.in_features, r, bias=False)
        self.heads = nn.ModuleList(nn.Linear(r, base.out_features, bias=False) for _ in range(k))
        self.router = nn.Linear(base.in_features, k, bias=False)
        self.drops = nn.ModuleList(nn.Dropout(p) for _ in range(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        gates = torch.softmax(F.linear(x.float(), self.router.weight.float()), dim=-1).to(x.dtype)  # in float32
        for i, (head, drop) in enumerate(zip(self.heads, self.drops, strict=True)):
            out = out + gates[..., i : i + 1] * head(self.A(drop(x))) * self.scaling
        return out


class _Wrap(nn.Module):
    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build_variants(d_in: int, d_out: int, args: argparse.Namespace, dtype: torch.dtype, dev: torch.device):
    def base() -> nn.Linear:
        torch.manual_seed(args.seed)
        layer = nn.Linear(d_in, d_out, bias=False).to(dev, dtype)
        layer.requires_grad_(False)
        return layer

    rcfg = {"r": args.r, "num_heads": args.heads, "lora_dropout": args.dropout, "lora_alpha": args.alpha}
    lora = get_peft_model(
        _Wrap(base()),
        LoraConfig(
            r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=["proj"], use_rslora=True
        ),
    )
    hydra = RLoraLinear(base(), "default", RLoraConfig(**rcfg, head_init="zeros", head_dropout=False))
    rlora = RLoraLinear(base(), "default", RLoraConfig(**rcfg, head_init="random", head_dropout=True))
    loop = PerHeadLoop(base(), args.r, args.heads, args.dropout, rlora.scaling["default"])
    loop.base.requires_grad_(False)
    two_reads = TwoReads(base(), "default", RLoraConfig(**rcfg, head_init="random", head_dropout=True))
    two_reads.load_state_dict(rlora.state_dict())
    modules = [base(), lora, hydra, rlora, loop, two_reads]
    return {name: m.to(dev, dtype).train() for name, m in zip(VARIANTS, modules, strict=True)}


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        torch.autograd.backward(module(x), grad)

    return step


def run(args: argparse.Namespace) -> str:
    dev = device()
    dtype = getattr(torch, args.dtype or default_dtype(dev))
    shapes = QUICK_SHAPES if args.quick else SHAPES
    tokens = args.tokens or ([16] if args.quick else [512, 2048])
    header = ["model", "d_in→d_out", "tokens", "LoRA fwd+bwd ms"]
    header += [f"{v} time" for v in VARIANTS if v != "PEFT LoRA"]
    header += ["LoRA mem MiB"] + [f"{v} mem" for v in VARIANTS if v != "PEFT LoRA"]
    header += ["loop / R-LoRA time", "R-LoRA / base time", "x read twice / base time"]
    rows = []
    for model, d_in, d_out in shapes:
        variants = build_variants(d_in, d_out, args, dtype, dev)
        for n in tokens:
            torch.manual_seed(args.seed)
            x = torch.randn(n, d_in, device=dev, dtype=dtype, requires_grad=True)
            grad = torch.randn(n, d_out, device=dev, dtype=dtype)
            steps = {name: fwd_bwd(m, x, grad) for name, m in variants.items()}
            times = interleaved_median_times(steps, args.repeats, args.warmup, dev)
            mems = {
                name: peak_memory_bytes(steps[name], dev, exclude=[*m.parameters(), *m.buffers()])
                for name, m in variants.items()
            }
            ref_t, ref_m = times["PEFT LoRA"], mems["PEFT LoRA"]
            row = [model, f"{d_in}→{d_out}", str(n), f"{ref_t * 1e3:.2f}"]
            row += [f"{times[v] / ref_t:.2f}" for v in VARIANTS if v != "PEFT LoRA"]
            row += [mib(ref_m)] + [f"{mems[v] / ref_m:.2f}" for v in VARIANTS if v != "PEFT LoRA"]
            row += [f"{times['per-head loop'] / times['R-LoRA (fused)']:.2f}"]
            row += [f"{times[v] / times['base']:.2f}" for v in ("R-LoRA (fused)", "R-LoRA (x read twice)")]
            rows.append(row)
    note = (
        f"\nRatios to PEFT LoRA (medians of {args.repeats} interleaved repeats after {args.warmup} warm-up; "
        f"r={args.r}, K={args.heads}, dropout={args.dropout}, {dtype}). Memory: {memory_kind(dev)}. "
        f"Machine: {machine_line(dev)}."
    )
    return markdown_table(header, rows) + "\n" + note


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts (default: 512 2048)")
    add_adapter_args(parser)


def main(argv: list[str] | None = None) -> str:
    return bench_main(argv, __doc__, add_args, run, repeats=15)


if __name__ == "__main__":
    main(sys.argv[1:])
