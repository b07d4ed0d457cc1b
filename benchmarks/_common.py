"""Shared helpers for the benchmarks: one command line (`bench_main`) and one place for how we measure.

Timing: every variant is warmed up, then the variants run round-robin (the order rotates every round) so that
noise on a shared machine hits all of them alike; we report the median of the repeats. On CUDA the clock reads
after `torch.cuda.synchronize()`.

Memory: on CUDA, the peak `torch.cuda.max_memory_allocated()` during one call minus what was allocated before it
(the memory the call adds on top of resident weights and optimizer state). On CPU there is no allocator peak to
read, so we measure the activation memory autograd keeps for the backward pass: the bytes of every tensor saved
during the forward (`torch.autograd.graph.saved_tensors_hooks`), deduplicated by storage, parameters and buffers
excluded. That is the term that scales with tokens and differs between adapter methods.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable

import torch


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def default_dtype(dev: torch.device) -> str:
    return "bfloat16" if dev.type == "cuda" else "float32"


def bench_main(
    argv: list[str] | None,
    doc: str,
    add_args: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], str],
    *,
    repeats: int,
    warmup: int = 2,
    torch_options: bool = True,
) -> str:
    """Every benchmark's `main`: parses the common options and its own (`add_args`), runs it, prints its table.

    `--quick` (a smoke run, seconds) cuts the repeats and warm-up to one; the benchmark shrinks its own sizes."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat (a smoke run, seconds)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed repeats per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed calls per variant before timing")
    if torch_options:
        parser.add_argument(
            "--dtype", choices=["float32", "bfloat16"], default=None, help="default: float32 on CPU, bfloat16 on CUDA"
        )
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument(
            "--threads",
            type=int,
            default=None,
            help="torch CPU threads (default: torch's; 1 is steadier on a busy host)",
        )
    add_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 1), min(args.warmup, 1)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    table = run(args)
    print(table)
    return table


def add_adapter_args(parser: argparse.ArgumentParser) -> None:
    """The adapter settings every PEFT-method benchmark takes (R-LoRA's defaults)."""
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--heads", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--dropout", type=float, default=0.1)


def interleaved_median_times(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, dev: torch.device
) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin with a rotating order."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(dev)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            sync(dev)
            start = time.perf_counter()
            fns[name]()
            sync(dev)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_memory_bytes(fn: Callable[[], object], dev: torch.device, exclude: Iterable[torch.Tensor] = ()) -> int:
    """CUDA: peak allocated during `fn` above what was allocated before. CPU: bytes autograd saved (see module doc)."""
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        fn()
        sync(dev)
        return torch.cuda.max_memory_allocated(dev) - before
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def memory_kind(dev: torch.device) -> str:
    return "CUDA peak allocated" if dev.type == "cuda" else "autograd-saved activations"


def machine_line(dev: torch.device) -> str:
    if dev.type == "cuda":
        what = torch.cuda.get_device_name(dev)
    else:
        what = f"{_cpu_model()}, {torch.get_num_threads()} threads"
    return f"{what}; torch {torch.__version__}; {python_line()}"


def host_line() -> str:
    """The CPU and Python, for benchmarks that do not run torch."""
    return f"{_cpu_model()}, {os.cpu_count()} cores; {python_line()}"


def python_line() -> str:
    return f"{platform.python_implementation()} {platform.python_version()}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def process_peak_bytes(fn: Callable[[], object]) -> int:
    """CPU: how far the process's resident memory rises above where it was, at its highest, during `fn`.

    Linux keeps the resident high-water mark (VmHWM); writing 5 to /proc/self/clear_refs resets it to the current
    resident size. Before that, freed heap memory is handed back to the system (glibc's `malloc_trim`), so that
    `fn` cannot reuse memory that a previous call left mapped and hide its own peak. Large tensors are mapped and
    unmapped one by one (glibc's mmap threshold), so the high-water mark sees each of them."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - before


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {key}")
