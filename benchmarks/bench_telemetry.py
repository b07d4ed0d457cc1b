"""What watching training costs: the router telemetry and the validation scoring, as ratios of the training step.

The run config (default: the CPU demo, `rlora train demo`) gives the model, the data, the adapter and the batch,
built as `rlora train` builds them: its plan's training batches, its telemetry probe (`telemetry.probe_sequences`:
`training.router_probe_examples` validation examples per task) and its validation examples (`data.max_eval_per_task`
per task, or `training.eval_examples`, carved as `training.eval_steps` carves them). Timed round-robin, medians of
the repeats:

- a training step: the head-only loss (`output_head.causal_lm_loss`), backward, AdamW, on the plan's batches in turn;
- one telemetry measurement (`telemetry.measure`), and what it adds per step at `training.logging_steps` (the
  telemetry's default interval): measurement / (interval x step);
- one validation scoring of every task (`evaluate.evaluate_examples`, the loss only, as `training.eval_steps` does),
  in training steps, and what it adds per step at `--eval-steps`.

    python benchmarks/bench_telemetry.py [--config demo] [--eval-steps 32] [--repeats 5] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
from _common import bench_main, interleaved_median_times, machine_line

from rlora import models
from rlora.data.plan import plan_data
from rlora.evaluate import evaluate_examples
from rlora.output_head import causal_lm_loss
from rlora.reports import markdown_table
from rlora.runconfig import load_run_config
from rlora.telemetry import measure, probe_sequences
from rlora.train import build_peft_model
from rlora.watch import scored_examples


def run(args: argparse.Namespace) -> str:
    cfg = load_run_config(args.config, [*args.overrides, f"training.eval_steps={args.eval_steps}"])
    if args.quick:
        cfg.data.max_eval_per_task = min(cfg.data.max_eval_per_task or 4, 4)
    t, d = cfg.training, cfg.data
    plan = plan_data(cfg.data, cfg.seed, args.cache_dir, validation=True)
    tokenizer = models.load_tokenizer(cfg.model, args.cache_dir, chat_template=d.chat_template)
    model = build_peft_model(cfg, models.load_model(cfg.model, tokenizer, cache_dir=args.cache_dir, loading=cfg.base))
    dataset, collate = plan.train_dataset(tokenizer), plan.collator(tokenizer)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    batches = [collate([dataset[i] for i in order[s : s + t.batch_size]]) for s in range(0, len(order), t.batch_size)]
    batches = itertools.cycle(batches[: max(1, args.batches)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr)

    def step() -> None:
        model.train()
        causal_lm_loss(model, next(batches)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sizes = [int(n) for n in args.probe.split(",")] if args.probe else [t.router_probe_examples]
    probes = {}
    for n in sizes:
        cfg.training.router_probe_examples = n
        probes[n] = probe_sequences(cfg, plan, tokenizer)

    scored_sets = scored_examples(cfg, plan)

    def validation() -> None:
        for examples in scored_sets.values():
            evaluate_examples(model, tokenizer, examples, accuracy=False, **_encoding(cfg))

    fns = {"step": step, "validation": validation}
    for n, (probe, _) in probes.items():
        fns[f"telemetry {n}"] = lambda probe=probe, n=n: measure(model, probe, max(1, min(cfg.eval.batch_size, n)))
    times = interleaved_median_times(fns, args.repeats, args.warmup, torch.device("cpu"))
    interval = t.logging_steps if t.router_telemetry_steps is None else t.router_telemetry_steps
    val, one = times["validation"], times["step"]
    scored = sum(len(v) for v in scored_sets.values())
    header = ["measured", "median s", "/ training step", "interval (steps)", "added per step"]
    rows = [[f"training step ({t.batch_size} sequences)", f"{one:.3f}", "1.00", "", ""]]
    for n, (probe, source) in probes.items():
        tel, probed = times[f"telemetry {n}"], sum(len(p) for p in probe.values())
        rows.append([f"router telemetry ({probed} {source} sequences: {n} per task)", f"{tel:.3f}", f"{tel / one:.3f}",
                     str(interval), f"{100 * tel / (interval * one):.1f}%"])  # fmt: skip
    rows.append([f"validation loss ({scored} examples, {len(plan.validation)} tasks)", f"{val:.3f}", f"{val / one:.2f}",
                 str(args.eval_steps), f"{100 * val / (args.eval_steps * one):.1f}%"])  # fmt: skip
    note = (
        f"\nConfig {args.config} ({cfg.model}, {cfg.method}, r={cfg.adapter.r}, K={cfg.adapter.num_heads}); "
        f"medians of {args.repeats} interleaved repeats after {args.warmup} warm-up, the training step on "
        f"{min(args.batches, len(order) // t.batch_size or 1)} of the plan's batches in turn. Machine: "
        f"{machine_line(torch.device('cpu'))}."
    )
    return markdown_table(header, rows) + "\n" + note


def _encoding(cfg) -> dict:
    return {
        "chat_template": cfg.data.chat_template,
        "max_length": cfg.data.max_length,
        "batch_size": cfg.eval.batch_size,
    }


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="demo", help="a run config or preset (default: the CPU demo)")
    parser.add_argument("--eval-steps", type=int, default=32, help="the training.eval_steps the cost is given at")
    parser.add_argument("--batches", type=int, default=4, help="training batches the step cycles through")
    parser.add_argument("--probe", default=None, help="probe sizes to time, e.g. 1,2,4 (default: the config's)")
    parser.add_argument("--cache-dir", default=None, help="where the embedded model is converted (rlora's default)")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE run config overrides")


def main(argv: list[str] | None = None) -> str:
    return bench_main(argv, __doc__, add_args, run, repeats=5, warmup=1, torch_options=False)


if __name__ == "__main__":
    main(sys.argv[1:])
