"""Serving benchmark: tokens/s of `rlora serve` at 1 and at 4 concurrent clients, against HF `generate` of the same
R-LoRA model 4 rows at a time, and (with --transformers-serve) `transformers serve` with continuous batching on the
base model alone.

A run of the embedded model (SmolLM2-135M-Instruct, R-LoRA r=4 K=5 on its default targets, the adapter moved off its
init as training would, made without training) is served by `rlora serve` on 127.0.0.1. Every variant produces the
same work: --requests completions of up to --tokens greedy tokens, each prompt different; a client sends its share
of them one after another. tokens/s = completion tokens (as `usage` counts them) / wall time. HF generate runs the
same prompts in this process, left-padded, batches of 4. Rounds are interleaved (the order rotates), the median of
--repeats reported, and the server and this process use --threads torch threads each.

    python benchmarks/bench_serve.py [--quick] [--tokens 32] [--requests 8] [--repeats 3] [--transformers-serve]

--transformers-serve needs transformers' serving extras in this environment: `pip install "transformers[serving]"`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from _common import bench_main, machine_line

CLIENTS = 4
STARTUP = 600  # seconds a server may take to load


def make_run(root: Path, model: str) -> Path:
    """A finished R-LoRA run of `model` (its adapter moved off its init), made without training."""
    from rlora.run import RunFolder
    from rlora.runconfig import load_run_config
    from rlora.train import build_peft_model

    data = root / "task.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "answer": f"{i}"}) + "\n" for i in range(20)))
    config = root / "run.yaml"
    config.write_text(f"model: {model}\noutput_dir: {root / 'run'}\ndata:\n  tasks: []\n  jsonl: [{data}]\n")
    cfg = load_run_config(config)
    folder = RunFolder(root / "run")
    folder.write_config(cfg)
    from rlora.run import load_base_model

    base, _ = load_base_model(cfg)
    peft_model = build_peft_model(cfg, base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn(p.shape, generator=generator))
    peft_model.save_pretrained(folder.adapter)
    return folder.root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], port: int, threads: int, log: Path) -> subprocess.Popen | None:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + STARTUP
    while process.poll() is None and time.monotonic() < deadline:  # polled every 0.5 s
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    return None


def prompts(n: int) -> list[str]:
    return [f"Question: what is {i} plus {i + 3}? Explain your answer step by step." for i in range(n)]


def serve_fn(port: int, model: str, clients: int, args):
    """Tokens and seconds of the requests sent by `clients` clients at once."""

    def client(share: list[str]) -> int:
        tokens = 0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as c:
            for prompt in share:
                body = {"model": model, "prompt": prompt, "max_tokens": args.tokens, "temperature": 0}
                answer = c.post("/v1/completions", json=body)
                answer.raise_for_status()
                tokens += answer.json()["usage"]["completion_tokens"]
        return tokens

    def run() -> tuple[int, float]:
        work = prompts(args.requests)
        shares = [work[i::clients] for i in range(clients)]
        start_time = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            tokens = sum(pool.map(client, shares))
        return tokens, time.perf_counter() - start_time

    return run


def generate_fn(served, args):
    """HF generate of the same prompts with the run's adapter, 4 rows at a time (left padding)."""
    tokenizer, model = served.tokenizer, served.model
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id

    def run() -> tuple[int, float]:
        work, tokens = prompts(args.requests), 0
        start_time = time.perf_counter()
        for i in range(0, len(work), CLIENTS):
            batch = tokenizer(work[i : i + CLIENTS], return_tensors="pt", padding=True)
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=args.tokens, do_sample=False, pad_token_id=eos)
            for row in out[:, batch["input_ids"].shape[1] :].tolist():
                tokens += next((j for j, t in enumerate(row) if t == eos), len(row))
        return tokens, time.perf_counter() - start_time

    return run


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median tokens/s of each variant over `repeats` rounds, the order rotating every round (after one warm-up)."""
    names = list(fns)
    for name in names:
        fns[name]()
    rates: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            tokens, seconds = fns[name]()
            rates[name].append(tokens / seconds)
    return {name: statistics.median(r) for name, r in rates.items()}


def run(args: argparse.Namespace) -> str:
    from rlora.models import DEFAULT_MODEL, resolve_model
    from rlora.serving.runs import load_served

    torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens, args.requests = 4, 4
    root = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    model = args.model or DEFAULT_MODEL
    run_dir = make_run(root, model)
    port = free_port()
    command = [sys.executable, "-m", "rlora", "serve", str(run_dir), "--port", str(port)]
    server = start(command, port, args.threads, root / "serve.log")
    if server is None:
        raise SystemExit(f"rlora serve did not start:\n{(root / 'serve.log').read_text()[-2000:]}")
    others = []
    try:
        fns = {
            "rlora serve, 1 client": serve_fn(port, "run", 1, args),
            f"rlora serve, {CLIENTS} clients": serve_fn(port, "run", CLIENTS, args),
            f"HF generate, batches of {CLIENTS}": generate_fn(load_served([run_dir]), args),
        }
        if args.transformers_serve:
            hf_port = free_port()
            path = resolve_model(model)
            cli = str(Path(sys.executable).with_name("transformers"))  # the venv's, beside this Python
            command = [cli, "serve", path, "--continuous-batching", "--port", str(hf_port)]
            hf = start(command, hf_port, args.threads, root / "hf.log")
            if hf is None:
                others.append(
                    f"`transformers serve` did not start: see {root / 'hf.log'} (it needs the extras of "
                    '`pip install "transformers[serving]"`)'
                )
            else:
                fns["transformers serve (base), 1 client"] = serve_fn(hf_port, path, 1, args)
                fns[f"transformers serve (base), {CLIENTS} clients"] = serve_fn(hf_port, path, CLIENTS, args)
                others.append(hf)
        rates = interleaved(fns, args.repeats)
    finally:
        for process in [server, *[o for o in others if isinstance(o, subprocess.Popen)]]:
            process.terminate()
            process.wait(timeout=60)
    one, many = rates["rlora serve, 1 client"], rates[f"rlora serve, {CLIENTS} clients"]
    lines = [
        f"Serving tokens/s: {args.requests} completions of up to {args.tokens} greedy tokens, {model} with an R-LoRA "
        f"adapter; median of {args.repeats} interleaved rounds, {args.threads} torch thread(s) per process. "
        f"{machine_line(torch.device('cpu'))}",
        "",
        "| variant | tokens/s | over rlora serve, 1 client |",
        "|---|---|---|",
        *[f"| {name} | {rate:.1f} | {rate / one:.2f}x |" for name, rate in rates.items()],
        "",
        f"rlora serve at {CLIENTS} clients over HF generate batched {CLIENTS}: "
        f"{many / rates[f'HF generate, batches of {CLIENTS}']:.2f}x",
        *[o for o in others if isinstance(o, str)],
    ]
    return "\n".join(lines)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of each completion")
    parser.add_argument("--requests", type=int, default=8, help="completions per variant and round")
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--transformers-serve", action="store_true", help="also time `transformers serve`")
    parser.add_argument("--server-threads", dest="threads", type=int, default=1)


def main(argv: list[str] | None = None) -> str:
    return bench_main(argv, __doc__, add_args, run, repeats=3, warmup=1, torch_options=False)


if __name__ == "__main__":
    main(sys.argv[1:])
