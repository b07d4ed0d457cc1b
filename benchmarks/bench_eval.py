"""`rlora eval`'s scoring on multiple-choice examples with long prompts: this checkout against rlora before the output
head was applied at the scored positions only (a git worktree of `--baseline-rev`), and against lm-eval-harness
(0.4.13, `--model hf`) on the same examples at the same batch size, each in a fresh process.

Examples: the first `--examples` ARC-Easy validation questions (built in), in the lettered "MC" formulation, each
prompt led by earlier ARC-Easy questions with their answers until it holds about `--prompt-tokens` tokens (a few-shot
prompt). Every answer is one letter after the same prompt, so every scorer runs one forward pass per example: rlora
scores all letters from the prompt's last position, lm-eval from its one-token-continuation cache.

What each process times, after loading the model and one untimed forward pass (`warm_up`; torch threads:
`--threads`):
- rlora (this checkout, and the baseline): `evaluate.predict` (the choice scores, what lm-eval computes), then
  `evaluate.evaluate_examples`, what `rlora eval` runs per task: the scores and the held-out loss over the gold
  answer and its end token, which lm-eval does not compute (the baseline: a second forward pass per example; this
  checkout: from the scoring pass, over the prompt and the gold answer with its end token);
- lm-eval: `lm_eval.evaluator.evaluate` on a local task (`output_type: multiple_choice`) holding the same contexts
  and letters, with an `HFLM` made before the clock starts.
Memory: the process's peak resident memory during that work above its resident memory before it
(`_common.process_peak_bytes`). Each process also reports its predicted letter per example; the table says how
many agree with this checkout's.

    python benchmarks/bench_eval.py [--quick] [--examples 100] [--prompt-tokens 512] [--batch 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import bench_main, host_line, process_peak_bytes
from bench_data_scale import baseline_worktree, checkout_label, child_env, git

from rlora.reports import markdown_table

REPO = Path(__file__).resolve().parents[1]
TASK = "rlora_bench_eval"
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
VARIANTS = ("lm-eval", "rlora", "rlora baseline")


def make_examples(n: int, prompt_tokens: int) -> list[dict]:
    """{"prompt", "choices", "gold", "uid", "context"} per example; context: the rendered MC prompt (lm-eval's)."""
    from rlora.data import Example, load_task, render_pairs
    from rlora.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    pool = load_task("arc_easy")
    shots = [f"Question: {e.prompt}\nAnswer: {e.choices[e.gold]}" for e in pool[n:]]
    docs = []
    for i, e in enumerate(pool[:n]):
        lead: list[str] = []
        while len(tokenizer("\n\n".join([*lead, e.prompt])).input_ids) < prompt_tokens:
            lead.append(shots[(i * 7 + len(lead)) % len(shots)])
        prompt = "\n\n".join([*lead, e.prompt])
        example = Example.multiple_choice("bench", prompt, e.choices, e.gold, f"bench-{i}", format="mc")
        (context,) = {c for c, _ in render_pairs(example)}
        docs.append({"prompt": prompt, "choices": list(e.choices), "gold": e.gold, "uid": example.uid})
        docs[-1] |= {"context": context, "labels": list(example.labels)}
    return docs


def warm_up(model, spec: dict) -> None:
    """One untimed forward pass over a batch of prompt-sized sequences before the clock starts, in every scorer's
    process alike: it pages the model's memory-mapped weights in (which a first timed call would otherwise count in
    its time and peak memory) and lets the kernels see the shapes."""
    import torch

    with torch.no_grad():
        model(input_ids=torch.randint(1, 1000, (spec["batch"], spec["max_length"] // 4)))


def child_rlora(spec: dict) -> dict:
    import torch

    from rlora.data import Example
    from rlora.evaluate import evaluate_examples, predict
    from rlora.models import load_model_and_tokenizer

    torch.set_num_threads(spec["threads"])
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    model.eval()
    docs = json.loads(Path(spec["docs"]).read_text())
    examples = [Example.multiple_choice("bench", d["prompt"], d["choices"], d["gold"], d["uid"], format="mc")
                for d in docs]  # fmt: skip
    encoding = {"batch_size": spec["batch"], "max_length": spec["max_length"], "generate": False}
    warm_up(model, spec)
    out: dict = {}

    def scores() -> None:
        start = time.perf_counter()
        predictions = predict(model, tokenizer, examples, **encoding)
        out["scores_s"] = time.perf_counter() - start
        out["choices"] = [p.choice() for p in predictions]

    def evaluation() -> None:
        start = time.perf_counter()
        out["loss"] = evaluate_examples(model, tokenizer, examples, **encoding).loss
        out["eval_s"] = time.perf_counter() - start

    out["scores_peak"] = process_peak_bytes(scores)
    out["eval_peak"] = process_peak_bytes(evaluation)
    return out


def child_lm_eval(spec: dict) -> dict:
    import torch
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    from rlora.models import resolve_model

    torch.set_num_threads(spec["threads"])
    lm = HFLM(pretrained=resolve_model("smollm2-135m"), batch_size=spec["batch"], dtype="float32", device="cpu")
    tasks = get_task_dict([TASK], TaskManager(include_path=spec["tasks"]))
    warm_up(lm.model, spec)
    out: dict = {}

    def scores() -> None:
        start = time.perf_counter()
        result = evaluate(lm=lm, task_dict=tasks, log_samples=True, bootstrap_iters=0)
        out["scores_s"] = time.perf_counter() - start
        samples = sorted(result["samples"][TASK], key=lambda s: s["doc_id"])
        lls = [[float(ll) for ll, _ in s["filtered_resps"]] for s in samples]
        out["choices"] = [max(range(len(x)), key=x.__getitem__) for x in lls]

    out["scores_peak"] = process_peak_bytes(scores)
    return out


def run_child(variant: str, spec: dict, src: Path, threads: int) -> dict:
    env = child_env(src, threads) | {
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(Path(spec["work"]) / f"hf_datasets_{time.monotonic_ns()}"),  # never a stale copy
        "TOKENIZERS_PARALLELISM": "false",
    }
    child = {**spec, "variant": variant}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(child)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> str:
    if args.quick:
        args.examples, args.prompt_tokens, args.batch = 4, 48, 2
    rev = args.baseline_rev or git("merge-base", "HEAD", "main")
    with tempfile.TemporaryDirectory() as work, baseline_worktree(rev) as (baseline_src, short):
        docs = make_examples(args.examples, args.prompt_tokens)
        (Path(work) / "docs.json").write_text(json.dumps(docs))
        with open(Path(work) / "docs.jsonl", "w") as f:
            for i, d in enumerate(docs):
                row = {"id": i, "context": d["context"], "choices": d["labels"], "gold": d["gold"]}
                f.write(json.dumps(row) + "\n")
        (Path(work) / "tasks").mkdir()
        (Path(work) / "tasks" / f"{TASK}.yaml").write_text(
            TASK_YAML.format(task=TASK, data_file=json.dumps(str(Path(work) / "docs.jsonl")))
        )
        spec = {"docs": str(Path(work) / "docs.json"), "tasks": str(Path(work) / "tasks"), "work": work,
                "batch": args.batch, "max_length": args.prompt_tokens * 4, "threads": args.threads}  # fmt: skip
        srcs = {"rlora": REPO / "src", "rlora baseline": baseline_src, "lm-eval": REPO / "src"}
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for i in range(args.repeats):
            shift = i % len(VARIANTS)
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                runs[variant].append(run_child(variant, spec, srcs[variant], args.threads))
                done = {k: v for k, v in runs[variant][-1].items() if k != "choices"}
                print(f"{variant}: {json.dumps(done)}", file=sys.stderr, flush=True)
    n_tokens = statistics.median(len(d["context"]) for d in docs)

    def med(variant: str, key: str) -> float | None:
        values = [r[key] for r in runs[variant] if key in r]
        return statistics.median(values) if values else None

    ref = runs["rlora"][0]["choices"]
    lm_eval_s = med("lm-eval", "scores_s")
    header = ["scorer", "scores s", "scores peak MiB", "scores + held-out loss s", "its peak MiB",
              "same choices as rlora", "scores time / lm-eval", "scores + loss time / lm-eval",
              "scores peak / lm-eval"]  # fmt: skip
    rows = []
    for variant in VARIANTS:
        label = {"rlora": f"rlora {checkout_label()}", "rlora baseline": f"rlora {short} (full logits)",
                 "lm-eval": "lm-eval-harness"}[variant]  # fmt: skip
        scores_s, eval_s = med(variant, "scores_s"), med(variant, "eval_s")
        peak, eval_peak = med(variant, "scores_peak"), med(variant, "eval_peak")
        same = sum(a == b for a, b in zip(runs[variant][0]["choices"], ref, strict=True))
        rows.append([
            label, f"{scores_s:.1f}", f"{peak / 2**20:.0f}",
            "–" if eval_s is None else f"{eval_s:.1f}", "–" if eval_peak is None else f"{eval_peak / 2**20:.0f}",
            f"{same}/{len(ref)}", f"{scores_s / lm_eval_s:.2f}",
            "–" if eval_s is None else f"{eval_s / lm_eval_s:.2f}", f"{peak / med('lm-eval', 'scores_peak'):.2f}",
        ])  # fmt: skip
    note = (
        f"\n{args.examples} ARC-Easy questions, lettered (MC), few-shot prompts of ~{args.prompt_tokens} tokens "
        f"(median {n_tokens:.0f} characters), batch {args.batch}, float32, SmolLM2-135M, {args.threads} torch "
        f"thread(s) per process; medians of {args.repeats} run(s) per scorer, interleaved. Peak: process RSS above "
        f"the RSS before the timed work. Machine: {host_line()}; load average {os.getloadavg()[0]:.1f} at the end."
    )
    return markdown_table(header, rows) + "\n" + note


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each scoring process")
    parser.add_argument("--baseline-rev", default=None, help="rlora before the change (default: merge-base with main)")


def main(argv: list[str] | None = None) -> str:
    return bench_main(argv, __doc__, add_args, run, repeats=1, warmup=0, torch_options=False)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        spec = json.loads(sys.argv[2])
        result = (child_lm_eval if spec["variant"] == "lm-eval" else child_rlora)(spec)
        print(json.dumps(result))
    else:
        main(sys.argv[1:])
