"""Training step with long prompts and short answers: the loss from the output head at the answer's positions only
(rlora's Trainer) against the model's own full-logits loss (a plain HF Trainer), and PEFT LoRA under a plain Trainer.

Each step is the Trainer's own `training_step` (forward, loss, backward) then AdamW's step, on one batch of rows made
of a prompt of `--prompt` random tokens and an answer of 1 to `--answer` tokens, the loss on the answer only (as
`rlora train` puts it on the reply), right-padded. Variants:
- R-LoRA, head at the answers: `rlora.trainer.HeadOnlyLossTrainer` (what `rlora train` runs);
- R-LoRA, full logits: the same model under `transformers.Trainer` (today's path before the change: the model
  computes batch x sequence x vocabulary logits and its own loss);
- PEFT LoRA, full logits: `peft.LoraConfig` (rsLoRA, same r, alpha, dropout, targets) under `transformers.Trainer`.

Time: medians of interleaved steps. Memory: the process's peak resident memory during one step above its resident
memory before it (`_common.process_peak_bytes`), the median of `--memory-repeats` steps: everything the step
allocates, logits and their gradients included, not only what autograd saves.

    python benchmarks/bench_answer_loss.py [--quick] [--threads 1] [--batch 8] [--prompt 512] [--answer 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

import torch
from _common import (
    add_adapter_args,
    bench_main,
    interleaved_median_times,
    machine_line,
    mib,
    process_peak_bytes,
)
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from rlora import RLoraConfig
from rlora.reports import markdown_table
from rlora.trainer import HeadOnlyLossTrainer

MLP = ["gate_proj", "up_proj", "down_proj"]
VARIANTS = ["R-LoRA, head at the answers", "R-LoRA, full logits", "PEFT LoRA, full logits"]


def base_model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    if args.quick:
        shape = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
        return LlamaForCausalLM(LlamaConfig(**shape, vocab_size=4096, num_hidden_layers=2))
    from rlora.models import load_model_and_tokenizer

    return load_model_and_tokenizer("smollm2-135m")[0]


def batch(args: argparse.Namespace, vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed)
    answers = torch.randint(1, args.answer + 1, (args.batch,), generator=gen).tolist()
    width = args.prompt + max(answers)
    ids = torch.zeros(args.batch, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(answers):
        ids[i, : args.prompt + n] = torch.randint(1, vocab, (args.prompt + n,), generator=gen)
        mask[i, : args.prompt + n] = 1
        labels[i, args.prompt : args.prompt + n] = ids[i, args.prompt : args.prompt + n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_step(trainer_class, model: torch.nn.Module, inputs: dict, folder: str):
    targs = TrainingArguments(output_dir=folder, report_to=[], use_cpu=True, learning_rate=1e-4, weight_decay=0.0)
    trainer = trainer_class(model=model, args=targs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    num_items = (inputs["labels"][:, 1:] != -100).sum()

    def step() -> None:
        trainer.training_step(model, inputs, num_items)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run(args: argparse.Namespace) -> str:
    if args.quick:
        args.batch, args.prompt, args.answer = 2, 32, 4
    common = {"r": args.r, "lora_alpha": args.alpha, "lora_dropout": args.dropout, "target_modules": MLP}
    rlora_model = get_peft_model(base_model(args), RLoraConfig(**common, num_heads=args.heads)).train()
    lora_model = get_peft_model(base_model(args), LoraConfig(**common, use_rslora=True)).train()
    inputs = batch(args, rlora_model.get_input_embeddings().num_embeddings)
    with tempfile.TemporaryDirectory() as folder:
        steps = {
            VARIANTS[0]: make_step(HeadOnlyLossTrainer, rlora_model, inputs, folder),
            VARIANTS[1]: make_step(Trainer, rlora_model, inputs, folder),
            VARIANTS[2]: make_step(Trainer, lora_model, inputs, folder),
        }
        times = interleaved_median_times(steps, args.repeats, args.warmup, torch.device("cpu"))
        mems = {name: statistics.median(process_peak_bytes(s) for _ in range(args.memory_repeats))
                for name, s in steps.items()}  # fmt: skip
    ref_t, ref_m = times[VARIANTS[1]], mems[VARIANTS[1]]
    header = ["variant", "step s", "time / R-LoRA full logits", "peak MiB above resident", "memory ratio"]
    rows = [[v, f"{times[v]:.2f}", f"{times[v] / ref_t:.2f}", mib(mems[v]), f"{mems[v] / ref_m:.2f}"] for v in VARIANTS]
    trained = int((inputs["labels"] != -100).sum())
    note = (
        f"\n{args.batch} rows of a {args.prompt}-token prompt and a 1-{args.answer}-token answer ({trained} trained "
        f"tokens, padded width {inputs['input_ids'].shape[1]}); model {'tiny Llama' if args.quick else 'SmolLM2-135M'}"
        f", r={args.r}, K={args.heads}, dropout={args.dropout}, targets {'/'.join(MLP)}, AdamW, float32. Time: "
        f"medians of {args.repeats} interleaved steps after {args.warmup} warm-up. Memory: process peak RSS above the "
        f"RSS before the step, median of {args.memory_repeats}. Machine: {machine_line(torch.device('cpu'))}."
    )
    return markdown_table(header, rows) + "\n" + note


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens per row")
    parser.add_argument("--answer", type=int, default=8, help="at most this many answer tokens per row")
    parser.add_argument("--memory-repeats", type=int, default=2)
    add_adapter_args(parser)


def main(argv: list[str] | None = None) -> str:
    return bench_main(argv, __doc__, add_args, run, repeats=3, warmup=1)


if __name__ == "__main__":
    main(sys.argv[1:])
