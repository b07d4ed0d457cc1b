"""The GPU check: what the CPU test command cannot run, in one script, under 10 minutes on one GPU.

For each method (PEFT LoRA, HydraLoRA, R-LoRA) it trains the embedded model (SmolLM2-135M-Instruct) on the demo's
mixture a few hundred steps with rlora's Trainer in bf16 (the Trainer's autocast) and again in fp32 from the same
initial adapter on the same batches, and compares the losses step by step; it times a training step of each method
against PEFT LoRA's (median of the steps after the first 10, bf16), and one adapted layer's forward and backward
(`bench_layer.py`, bf16 weights). It prints markdown tables, and writes them with `--out FILE`.

A method passes when its bf16 loss at step 1 is within 2% of its fp32 loss (the same batch and weights: only
rounding differs; bf16 keeps 8 bits, a relative 2^-8 per operation) and its mean loss over the last tenth of the
steps is within 2% of fp32's (bf16 training follows the same path).

    python benchmarks/gpu_check.py [--steps 300] [--out gpu_check.md]   # one CUDA GPU, under 10 minutes
    python benchmarks/gpu_check.py --cpu                                 # the smoke version: a tiny model, < 1 min
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import machine_line, sync
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

from rlora import models
from rlora.data import IGNORE_INDEX
from rlora.methods import adapter_config
from rlora.reports import markdown_table
from rlora.trainer import RloraTrainer

METHODS = {"lora": "PEFT LoRA", "hydralora": "HydraLoRA", "rlora": "R-LoRA"}
MLP = ["gate_proj", "up_proj", "down_proj"]
TOLERANCE = 0.02  # relative, see the module doc
TINY = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
TINY |= {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


class StepTimes(TrainerCallback):
    """Seconds of each optimizer step (forward, backward, optimizer), the device synchronised at both ends."""

    def __init__(self, dev: torch.device) -> None:
        self.dev, self.times, self.start = dev, [], 0.0

    def on_step_begin(self, *_args, **_kwargs):
        sync(self.dev)
        self.start = time.perf_counter()

    def on_step_end(self, *_args, **_kwargs):
        sync(self.dev)
        self.times.append(time.perf_counter() - self.start)


def base_model(args: argparse.Namespace, dev: torch.device):
    if args.cpu:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**TINY)).to(dev)
    model, _tokenizer = models.load_model_and_tokenizer(models.DEFAULT_MODEL)
    return model.to(dev)


def training_rows(args: argparse.Namespace) -> tuple[list[dict], object]:
    """(features, collator): the demo's mixture on a GPU; random token rows (loss on their second half) with --cpu."""
    if args.cpu:
        gen = torch.Generator().manual_seed(0)
        rows = []
        for _ in range(args.steps * args.batch):
            ids = torch.randint(2, TINY["vocab_size"], (24,), generator=gen)
            labels = ids.clone()
            labels[:12] = IGNORE_INDEX
            rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        return rows, None
    from rlora.data.plan import plan_data
    from rlora.runconfig import load_run_config

    cfg = load_run_config("demo", [f"data.max_train_per_task={args.steps * args.batch // 4 + 1}"])
    tokenizer = models.load_tokenizer(cfg.model, chat_template=cfg.data.chat_template)
    plan = plan_data(cfg)
    return plan.train_dataset(tokenizer), plan.collator(tokenizer)


def train(method: str, precision: str, args, rows, collator, dev: torch.device, out: Path) -> tuple[list, list]:
    """(losses, step seconds) of `args.steps` steps of `method` from the same initial adapter on the same batches."""
    base = base_model(args, dev)
    settings = dict(r=4, lora_alpha=32, num_heads=5, lora_dropout=0.0, target_modules=MLP)
    torch.manual_seed(args.seed)
    model = get_peft_model(base, adapter_config(method, **settings, model=base))  # LoRA: matched parameter count
    training = TrainingArguments(
        output_dir=str(out / f"{method}-{precision}"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        disable_tqdm=True,
        bf16=precision == "bf16",
        use_cpu=dev.type == "cpu",
    )
    times = StepTimes(dev)
    trainer = RloraTrainer(model=model, args=training, train_dataset=rows, data_collator=collator, callbacks=[times])
    trainer.train()
    return [r["loss"] for r in trainer.state.log_history if "loss" in r], times.times


def loss_table(args: argparse.Namespace, dev: torch.device, out: Path) -> tuple[str, bool]:
    rows, collator = training_rows(args)
    lines, passed, step_ms = [], True, {}
    tail = max(1, args.steps // 10)
    for method, name in METHODS.items():
        bf16, times = train(method, "bf16", args, rows, collator, dev, out)
        fp32, _ = train(method, "fp32", args, rows, collator, dev, out)
        first = abs(bf16[0] - fp32[0]) / fp32[0]
        last = abs(statistics.mean(bf16[-tail:]) - statistics.mean(fp32[-tail:])) / statistics.mean(fp32[-tail:])
        ok = first <= TOLERANCE and last <= TOLERANCE
        passed &= ok
        step_ms[method] = 1000 * statistics.median(times[min(10, len(times) - 1) :])
        lines.append([name, f"{fp32[0]:.4f}", f"{bf16[0]:.4f}", f"{first:.2%}", f"{statistics.mean(fp32[-tail:]):.4f}"])
        lines[-1] += [f"{statistics.mean(bf16[-tail:]):.4f}", f"{last:.2%}", f"{step_ms[method]:.1f}"]
        lines[-1] += [f"{step_ms[method] / step_ms['lora']:.2f}", "pass" if ok else "FAIL"]
    header = ["method", "fp32 loss @1", "bf16 loss @1", "rel. diff @1", f"fp32 last {tail}", f"bf16 last {tail}"]
    header += ["rel. diff last", "bf16 step ms", "step / PEFT LoRA", f"within {TOLERANCE:.0%}"]
    return markdown_table(header, lines), passed


def run(args: argparse.Namespace) -> str:
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU on this machine; --cpu runs the smoke version on the CPU")
    dev = torch.device("cpu" if args.cpu else "cuda")
    with tempfile.TemporaryDirectory() as out:  # the Trainer's output folders: nothing is saved there
        losses, passed = loss_table(args, dev, Path(out))
    import bench_layer

    layer = bench_layer.main(["--dtype", "bfloat16", *(["--quick", "--tokens", "8"] if args.cpu else [])])
    what = "smoke version: a tiny Llama from a config, random tokens" if args.cpu else "SmolLM2-135M, the demo mixture"
    text = (
        f"## GPU check ({what})\n\n{machine_line(dev)}; {args.steps} steps of {args.batch} rows, lr 1e-3 constant\n\n"
        f"### Loss in bf16 against fp32, same batches and initial adapter; step time (bf16)\n\n{losses}\n\n"
        f"### One adapted layer, forward + backward, bf16 weights (`bench_layer.py`)\n\n{layer}\n\n"
        f"Result: {'every method within' if passed else 'NOT every method within'} {TOLERANCE:.0%} of fp32.\n"
    )
    if args.out:
        Path(args.out).write_text(text)
    return text


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the smoke version on the CPU: a tiny model, < 1 minute")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: 300; --cpu: 3)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.cpu else 300
    if args.cpu:
        args.batch = min(args.batch, 4)
    text = run(args)
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
