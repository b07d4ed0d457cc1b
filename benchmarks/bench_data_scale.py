"""Data-path scale benchmark: time to the first training step and peak memory of `rlora train` on a large mixture.

For each mixture size and each data path, one fresh process runs

    python -m rlora train demo data.tasks=[] data.jsonl=[<4 synthetic task files>] training.max_steps=1
        training.logging_steps=1 training.save_steps=1000 output_dir=<fresh folder> data.max_train_per_task=null

on the embedded model (offline, CPU). The last override lifts the demo preset's cap of 128 training examples per
task, so that the training mixture is the whole mixture (about 0.8 N after the 20% test split), every example of it
tokenized by the old path; `--set KEY=VALUE` replaces it or adds any other override
(`--set data.max_train_per_task=128`: the demo's 512-example mixture, which measures only reading and splitting).
Measured per run:

- **time to first step**: from just before the process is started to the moment its output shows the first logged
  loss. With `training.logging_steps=1` the Trainer logs `{'loss': ...}` at the end of step 1 (after the optimizer
  step), and prints it (its progress callback); the child runs with `PYTHONUNBUFFERED=1` and its output is read line
  by line as it comes, so the timestamp is taken within a pipe read of the print. It includes interpreter start,
  imports, reading and splitting the data, mixing, tokenizing, loading the model and the step itself.
- **to mixture table**: the same clock when the run prints its training-mixture table (logged once the data plan is
  built: files read, split, mixed; before tokenizing and before the model loads). **to model load**: when
  transformers starts loading the model's weights (its "Loading weights" progress bar): the old path has tokenized
  the whole training mixture by then, so up to here is its data path; a lazy path tokenizes later, inside the
  step's data loading. Both informational, "–" where a run does not print the line.
- **total**: until the process has exited (the adapter written).
- **peak RSS**: the child's `ru_maxrss` from `os.wait4` (the high-water mark of its resident memory over the whole
  run; rlora trains in one process here, no data-loader workers). Also the child's VmHWM from /proc at the moment of
  the first step ("RSS at first step"; in the JSON also its anonymous and file-backed resident memory then), and its
  CPU time (user + system). RSS counts the model's weights and the libraries too: the row of a small size (e.g.
  `--sizes 10000,1000000`) shows that floor.

The training step itself (the embedded model, 8 short sequences) takes about 1 s on 2 idle cores, but 20 s and more
when another job shares the cores: torch's two OpenMP threads spin waiting for each other (user CPU time grows with
wall time then). On a shared machine use `--threads 1` (OMP_NUM_THREADS=1 in the runs; note that it also caps
pyarrow's CPU thread pool), or compare the "to model load" column, and repeat.

Data paths: `new` is the rlora of this checkout (`<repo>/src`); `baseline` is rlora at `--baseline-rev` (default
36ae910, the last commit before the data-path rewrite), checked out with `git worktree add --detach` into a temporary
folder. Both run with this interpreter (the same venv and packages) and `PYTHONPATH=<that src>`; PYTHONPATH comes
before the venv's editable install (a `.pth` path entry) on `sys.path`, and a probe process checks that `import rlora`
resolves into the intended folder before anything is timed (the run stops otherwise). Both source trees are
byte-compiled first, the model is converted (if not yet) and its files and the data files are read once, and torch,
transformers and PEFT are imported once, so that no path pays a cold cache the other does not.

The new path reads each user file once into an Arrow table in its data cache (`RLORA_DATA_CACHE`) and maps it in
later runs. `--data-cache cold` (the default) gives every run an empty cache folder of its own: a first run, which
reads and converts the files (what the target is about). `--data-cache warm` gives each path and size one folder,
filled by an untimed run first: what later runs of the same files pay (every method and seed of a comparison). The
folders are removed afterwards (the user's cache is never touched); the JSON keeps the bytes each run left there.

The synthetic mixture (`--seed`, deterministic): four task files of N/4 lines each in rlora's JSONL schema; three
free-form tasks (`{"prompt", "answer"}`) and one multiple-choice task (`{"prompt", "choices", "gold"}`, 4 choices),
prompts of 3 to 25 words (most under 12), answers of 1 to 12 words: about 90 bytes a line. A size's files are written
once under `--workdir` (into a temporary folder, renamed into place when whole) and reused when present. Without
`--workdir` a temporary folder is used and removed at the end; run folders and the worktree are always removed.

The baseline is skipped above `--baseline-max-size` (default 1,000,000): the old path keeps every example as Python
objects, several GB per million examples; the table says so.

    nice -n 10 python benchmarks/bench_data_scale.py [--sizes 1000000,5000000] [--paths new,baseline]
        [--baseline-rev 36ae910] [--baseline-max-size 1000000] [--repeat 1] [--workdir DIR] [--json FILE]
        [--warmup 0] [--threads N] [--data-cache cold|warm] [--cache-dir DIR] [--set KEY=VALUE ...] [--quick]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib.metadata
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _common import bench_main, host_line, python_line

from rlora.reports import markdown_table

REPO = Path(__file__).resolve().parents[1]
PATHS = ("new", "baseline")
DEFAULT_SIZES = "1000000,5000000"
DEFAULT_BASELINE_REV = "36ae910"
DEFAULT_BASELINE_MAX_SIZE = 1_000_000
QUICK_SIZE = 2000
# The demo preset caps each task at 128 training examples (512 in all); lifted, so that the training mixture is the
# whole mixture. `--set data.max_train_per_task=128` restores the cap.
DEFAULT_OVERRIDES = ("data.max_train_per_task=null",)
TARGET_FIRST_STEP_S = 60.0  # the rewrite's goal, for a 1M-example mixture on 2 cores
TARGET_PEAK_GB = 2.0
GB = 10**9
GENERATOR_VERSION = 1  # bump when the synthetic data changes, so that files written before are not reused
TASKS = ("synth_qa", "synth_define", "synth_rewrite", "synth_choice")  # the last one is multiple choice
LOSS_LINE = re.compile(rb"'loss':")  # the Trainer's log dict after a step; never matches 'train_loss'
MIXTURE_LINE = re.compile(rb"training mixture")
DATA_CACHE_ENV = "RLORA_DATA_CACHE"  # where the new path keeps the Arrow tables it reads the files into
MODEL_LINE = re.compile(rb"Loading weights")  # transformers' progress bar as the model's weights load
TAIL_LINES = 40
SKIP_REASON = (
    "skipped: above --baseline-max-size ({limit:,}); the old path keeps every example in memory, several GB per "
    "million examples"
)

_WORD_TEXT = """
the of and to in is was for on that with as by at from this have not are but had one all were when we there can an
your which their said each she do how if will up other about out many then them these so some her would make like
him into time has look two more write go see number no way could people my than first water been call who oil its
now find long down day did get come made may part over new sound take only little work know place year live me back
give most very after thing our just name good sentence man think say great where help through much before line right
too mean old any same tell boy follow came want show also around form three small set put end does another well
large must big even such because turn here why ask went men read need land different home us move try kind hand
picture again change off play spell air away animal house point page letter mother answer found study still learn
should world high every near add food between own below country plant last school father keep tree never start city
earth eye light thought head under story saw left few while along might close something seem next hard open example
begin life always those both paper together got group often run important until children side feet car mile night
walk white sea began grow took river four carry state once book hear stop without second later miss idea enough eat
face watch far really almost let above girl sometimes mountain cut young talk soon list song being leave family
"""
WORDS = _WORD_TEXT.split()  # the synthetic texts' vocabulary


@dataclass
class Measurement:
    first_step_s: float | None  # None: the run never printed a loss line
    mixture_s: float | None
    model_s: float | None
    total_s: float
    peak_rss_bytes: int
    rss_at_first_step_bytes: int | None  # the peak so far, when the first loss is printed
    anon_rss_at_first_step_bytes: int | None  # resident then: anonymous memory (heap, tensors)
    file_rss_at_first_step_bytes: int | None  # resident then: mapped files (libraries, model weights)
    cpu_s: float
    returncode: int
    data_cache_bytes: int | None = None  # what the run left in its data cache (RLORA_DATA_CACHE): the new path's tables


@dataclass
class Row:
    size: int
    path: str
    rev: str
    repeats: int = 0
    first_step_s: float | None = None  # medians over the repeats
    mixture_s: float | None = None
    model_s: float | None = None
    total_s: float | None = None
    peak_rss_bytes: int | None = None
    rss_at_first_step_bytes: int | None = None
    cpu_s: float | None = None
    runs: list[dict] = field(default_factory=list)  # every repeat, as measured
    skipped: str | None = None
    error: str | None = None
    error_tail: str | None = None  # the failed run's last lines of output


# ---------------------------------------------------------------------------------------------------------- data


def parse_size(text: str) -> int:
    text = text.strip().lower().replace("_", "")
    scale = {"k": 10**3, "m": 10**6}.get(text[-1:], 1)
    try:
        value = int(float(text[:-1]) * scale) if scale > 1 else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of examples (e.g. 1000000 or 1M), got {text!r}") from None
    if value < 8:
        raise argparse.ArgumentTypeError(f"expected at least 8 examples (4 tasks, each split in two), got {value}")
    return value


def parse_sizes(text: str) -> list[int]:
    sizes = [parse_size(s) for s in text.split(",") if s.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError("expected one size or more, comma-separated")
    return sizes


def parse_paths(text: str) -> list[str]:
    paths = [p.strip() for p in text.split(",") if p.strip()]
    if not paths or not set(paths) <= set(PATHS) or len(set(paths)) < len(paths):
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(PATHS)}, comma-separated, got {text!r}")
    return paths


def task_sizes(n: int) -> list[int]:
    return [n // len(TASKS) + (i < n % len(TASKS)) for i in range(len(TASKS))]


def _words(rng: random.Random, low: int, high: int, mean_extra: float) -> str:
    """`low` words plus an exponential number more (mean `mean_extra`), at most `high`."""
    k = min(high, low + int(rng.expovariate(1.0 / mean_extra)))
    return " ".join(rng.choices(WORDS, k=k))


def _line(rng: random.Random, task: str) -> str:
    prompt = _words(rng, 3, 25, 5.0)
    if task != "synth_choice":
        return json.dumps({"prompt": prompt + "?", "answer": _words(rng, 1, 12, 1.5)})
    choices: list[str] = []
    while len(choices) < 4:
        choice = _words(rng, 1, 4, 0.7)
        if choice not in choices:
            choices.append(choice)
    return json.dumps({"prompt": prompt + "?", "choices": choices, "gold": rng.randrange(4)})


def write_mixture(folder: Path, n: int, seed: int) -> None:
    """The N-example mixture's task files and a manifest into `folder` (which must not exist)."""
    folder.mkdir(parents=True)
    sizes = {}
    for index, (task, count) in enumerate(zip(TASKS, task_sizes(n), strict=True)):
        rng = random.Random(f"{seed}/{task}")
        with open(folder / f"{task}.jsonl", "w", encoding="utf-8") as f:
            for start in range(0, count, 10_000):
                f.write("".join(_line(rng, task) + "\n" for _ in range(min(10_000, count - start))))
        sizes[task] = {"lines": count, "bytes": (folder / f"{task}.jsonl").stat().st_size, "index": index}
    manifest = {"version": GENERATOR_VERSION, "examples": n, "seed": seed, "tasks": sizes}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def mixture_files(workdir: Path, n: int, seed: int) -> tuple[list[Path], int]:
    """The task files of the N-example mixture under `workdir` (written if absent or stale) and their bytes."""
    folder = workdir / f"data-{n}-seed{seed}-v{GENERATOR_VERSION}"
    if not _whole(folder, n, seed):
        shutil.rmtree(folder, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=workdir))
        try:
            start = time.perf_counter()
            write_mixture(staging / "data", n, seed)
            (staging / "data").rename(folder)
            print(f"wrote {n:,} examples in {time.perf_counter() - start:.1f} s: {folder}", file=sys.stderr)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    files = [folder / f"{task}.jsonl" for task in TASKS]
    return files, sum(f.stat().st_size for f in files)


def _whole(folder: Path, n: int, seed: int) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        tasks = manifest["tasks"]
        same = (manifest["version"], manifest["examples"], manifest["seed"]) == (GENERATOR_VERSION, n, seed)
        return same and all((folder / f"{t}.jsonl").stat().st_size == tasks[t]["bytes"] for t in TASKS)
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ---------------------------------------------------------------------------------------------------- source trees


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def checkout_label() -> str:
    """This checkout's commit, and whether its src/ has uncommitted changes."""
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src")
    except (OSError, subprocess.CalledProcessError):
        return "working tree"
    return f"{head} (working tree{', src modified' if dirty else ''})"


@contextlib.contextmanager
def baseline_worktree(rev: str):
    """rlora at `rev`, checked out detached into a temporary folder (removed again); yields (src, short sha)."""
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    parent = Path(tempfile.mkdtemp(prefix="rlora-baseline-"))
    tree = parent / "tree"
    try:
        git("worktree", "add", "--detach", str(tree), sha)
        yield tree / "src", sha[:7]
    finally:
        try:
            git("worktree", "remove", "--force", str(tree))
        except (OSError, subprocess.CalledProcessError):  # e.g. half made: drop the folder, then git's record of it
            shutil.rmtree(tree, ignore_errors=True)
            with contextlib.suppress(OSError, subprocess.CalledProcessError):
                git("worktree", "prune")
        shutil.rmtree(parent, ignore_errors=True)


def child_env(src: Path, threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def check_imports(src: Path) -> str:
    """Where `import rlora` resolves with this source tree's environment; an error unless inside `src`."""
    probe = "import rlora, sys; sys.stdout.write(rlora.__file__)"
    found = subprocess.run(
        [sys.executable, "-c", probe], env=child_env(src), check=True, capture_output=True, text=True
    ).stdout
    if not Path(found).resolve().is_relative_to(src.resolve()):
        raise RuntimeError(f"with PYTHONPATH={src}, `import rlora` resolves to {found}, not into {src}")
    return found


def prepare(srcs: dict[str, Path], cache_dir: str | None) -> None:
    """Byte-compiles the source trees, converts the embedded model if needed, reads its files and imports torch,
    transformers and PEFT once: every timed run then finds the same warm caches."""
    for src in srcs.values():
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], check=True, stdout=subprocess.DEVNULL)
    warm = (
        "import sys, torch, transformers, peft; from rlora.models import DEFAULT_MODEL, resolve_model; "
        "sys.stdout.write(resolve_model(DEFAULT_MODEL, sys.argv[1] if len(sys.argv) > 1 else None))"
    )
    src = next(iter(srcs.values()))
    args = [cache_dir] if cache_dir else []
    model = subprocess.run(
        [sys.executable, "-c", warm, *args], env=child_env(src), check=True, capture_output=True, text=True
    ).stdout
    read_files(Path(model).rglob("*"))


def read_files(paths) -> None:
    for path in paths:
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


# ------------------------------------------------------------------------------------------------------- one run


def overrides(extra: list[str]) -> list[str]:
    """DEFAULT_OVERRIDES, each replaced by an `extra` one of the same key, then the other `extra` ones."""
    keys = {item.partition("=")[0].strip() for item in extra}
    return [item for item in DEFAULT_OVERRIDES if item.partition("=")[0] not in keys] + list(extra)


def train_command(files: list[Path], output_dir: Path, cache_dir: str | None, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "rlora", "train", "demo", "data.tasks=[]"]
    cmd += ["data.jsonl=[" + ",".join(json.dumps(str(f)) for f in files) + "]"]
    cmd += ["training.max_steps=1", "training.logging_steps=1", "training.save_steps=1000", f"output_dir={output_dir}"]
    cmd += overrides(extra)
    return cmd + (["--cache-dir", cache_dir] if cache_dir else [])


def memory_status(pid: int) -> dict[str, int]:
    """The process's resident-memory high-water mark so far (VmHWM) and its current anonymous and file-backed resident
    memory (RssAnon: the heap, tensors; RssFile: mapped files and libraries), in bytes (Linux /proc; {} elsewhere)."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmHWM", "RssAnon", "RssFile"):
                    found[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return found


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


class RunFailed(Exception):
    """A run that exited with an error, was killed or never logged a loss: why, and the last lines it printed."""

    def __init__(self, why: str, tail: str) -> None:
        super().__init__(why)
        self.why, self.tail = why, tail


def measure(cmd: list[str], env: dict[str, str], timeout_s: float) -> Measurement:
    """Runs `cmd` as a fresh process and measures it (see the module doc)."""
    tail: collections.deque[bytes] = collections.deque(maxlen=TAIL_LINES)
    first = mixture = model = None
    memory: dict[str, int] = {}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    timer = _Killer(proc, timeout_s)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if first is None and LOSS_LINE.search(line):
                first = time.perf_counter() - start
                memory = memory_status(proc.pid)
            elif mixture is None and first is None and MIXTURE_LINE.search(line):
                mixture = time.perf_counter() - start
            if model is None and first is None and MODEL_LINE.search(line):
                model = time.perf_counter() - start
            tail.append(line)
        _, status, usage = os.wait4(proc.pid, 0)
        total = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        timer.cancel()
        if proc.returncode is None:  # interrupted: never leave the child running
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    if proc.returncode != 0 or first is None:
        text = b"".join(tail).decode("utf-8", "replace").replace("\r", "\n")
        lines = [line for line in text.splitlines() if line.strip()][-15:]
        why = "timed out" if timer.fired else f"exit code {proc.returncode}"
        if proc.returncode == -signal.SIGKILL and not timer.fired:
            why += " (killed: out of memory?)"
        if proc.returncode == 0:
            why = "no loss line in its output"
        raise RunFailed(why, "\n".join(lines))
    return Measurement(
        first_step_s=first,
        mixture_s=mixture,
        model_s=model,
        total_s=total,
        peak_rss_bytes=usage.ru_maxrss * 1024,  # KiB on Linux
        rss_at_first_step_bytes=memory.get("VmHWM"),
        anon_rss_at_first_step_bytes=memory.get("RssAnon"),
        file_rss_at_first_step_bytes=memory.get("RssFile"),
        cpu_s=usage.ru_utime + usage.ru_stime,
        returncode=proc.returncode,
    )


class _Killer:
    """Kills the process after `timeout_s` (a daemon timer thread)."""

    def __init__(self, proc: subprocess.Popen, timeout_s: float) -> None:
        import threading

        self.fired = False
        self._timer = threading.Timer(timeout_s, self._fire, (proc,))
        self._timer.daemon = True
        self._timer.start()

    def _fire(self, proc: subprocess.Popen) -> None:
        self.fired = True
        with contextlib.suppress(OSError):
            proc.kill()

    def cancel(self) -> None:
        self._timer.cancel()


def summarise(row: Row, runs: list[Measurement]) -> None:
    row.repeats = len(runs)
    row.runs = [asdict(m) for m in runs]

    def median(name: str):
        values = [getattr(m, name) for m in runs if getattr(m, name) is not None]
        return statistics.median(values) if values else None

    row.first_step_s, row.mixture_s, row.model_s, row.total_s, row.cpu_s = map(
        median, ("first_step_s", "mixture_s", "model_s", "total_s", "cpu_s")
    )
    peak, at_first = median("peak_rss_bytes"), median("rss_at_first_step_bytes")
    row.peak_rss_bytes = None if peak is None else int(peak)
    row.rss_at_first_step_bytes = None if at_first is None else int(at_first)


# ----------------------------------------------------------------------------------------------------- reporting


def _s(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _gb(value: int | None) -> str:
    return "–" if value is None else f"{value / GB:.2f}"


def _ratio(new: float | None, old: float | None) -> str:
    return "–" if new is None or not old else f"{new / old:.2f}"


def tables(rows: list[Row], sizes_bytes: dict[int, int]) -> str:
    header = ["examples", "data MB", "path", "rev", "time to first step s", "to mixture table s", "to model load s"]
    header += ["total s", "CPU s"]
    header += ["peak RSS GB", "RSS at first step GB", f"≤ {TARGET_FIRST_STEP_S:.0f} s and < {TARGET_PEAK_GB:.0f} GB"]
    body = []
    for r in rows:
        megabytes = sizes_bytes.get(r.size, 0) / 1e6
        lead = [f"{r.size:,}", f"{megabytes:.1f}" if megabytes < 10 else f"{megabytes:.0f}", r.path, r.rev]
        if r.skipped or r.error:
            body.append([*lead, (r.skipped or f"failed: {r.error} (its output: on stderr)"), *["–"] * 7])
            continue
        met = (
            r.first_step_s is not None
            and r.first_step_s <= TARGET_FIRST_STEP_S
            and r.peak_rss_bytes < TARGET_PEAK_GB * GB
        )
        body.append(
            [
                *lead,
                _s(r.first_step_s),
                _s(r.mixture_s),
                _s(r.model_s),
                _s(r.total_s),
                _s(r.cpu_s),
                _gb(r.peak_rss_bytes),
                _gb(r.rss_at_first_step_bytes),
                "yes" if met else "no",
            ]
        )
    out = markdown_table(header, body)
    by_key = {(r.size, r.path): r for r in rows if not (r.skipped or r.error)}
    ratio_rows = []
    for size in sorted({r.size for r in rows}):
        new, old = by_key.get((size, "new")), by_key.get((size, "baseline"))
        if new and old:
            ratio_rows.append(
                [
                    f"{size:,}",
                    _ratio(new.first_step_s, old.first_step_s),
                    _ratio(new.total_s, old.total_s),
                    _ratio(new.cpu_s, old.cpu_s),
                    _ratio(new.peak_rss_bytes, old.peak_rss_bytes),
                ]
            )
    if ratio_rows:
        ratio_header = ["examples", "first step new/baseline", "total new/baseline", "CPU new/baseline"]
        out += "\n\n" + markdown_table([*ratio_header, "peak RSS new/baseline"], ratio_rows)
    return out


def machine() -> dict:
    versions = {}
    for package in ("torch", "transformers", "peft", "datasets", "pyarrow"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        memory = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    return {"host": host_line(), "cpus": os.cpu_count(), "memory_bytes": memory, "python": python_line()} | versions


def write_json_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------------------------ the run


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=DEFAULT_SIZES,
        help="mixture sizes, comma-separated (1000000 or 1M; default %(default)s)",
    )
    parser.add_argument(
        "--paths", type=parse_paths, default=",".join(PATHS), help="data paths to run: new, baseline (default: both)"
    )
    parser.add_argument("--repeat", dest="repeats", type=int, default=argparse.SUPPRESS, help="same as --repeats")
    parser.add_argument("--baseline-rev", default=DEFAULT_BASELINE_REV, help="git revision of the baseline")
    parser.add_argument(
        "--baseline-max-size",
        type=parse_size,
        default=DEFAULT_BASELINE_MAX_SIZE,
        help="skip the baseline above this size (default %(default)s: it needs GBs per million examples)",
    )
    parser.add_argument("--workdir", type=Path, help="where the data is written and reused (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--cache-dir", help="rlora's model cache (passed to `rlora train --cache-dir`)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument(
        "--data-cache",
        choices=("cold", "warm"),
        default="cold",
        help="the new path's Arrow cache of the files (RLORA_DATA_CACHE): cold, empty for every run (a first run: "
        "the files are read and converted), or warm, built by an untimed run first (a later run maps it); "
        "default %(default)s",
    )
    parser.add_argument(
        "--threads", type=int, help="OMP_NUM_THREADS of the runs (default: unset, torch's own: one per core)"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before one run is killed")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="an extra `rlora train` override (repeatable)"
    )


def run(args: argparse.Namespace) -> str:
    sizes, paths = [QUICK_SIZE] if args.quick else args.sizes, args.paths
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("bench_data_scale: --repeat must be >= 1 and --warmup >= 0")
    warmups = max(args.warmup, 1) if args.data_cache == "warm" else args.warmup  # warm: the tables built first
    load_start = os.getloadavg()
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="rlora-data-scale-"))
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        else:
            workdir = args.workdir.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        runs_dir = Path(tempfile.mkdtemp(prefix=".runs-", dir=workdir))
        stack.callback(shutil.rmtree, runs_dir, ignore_errors=True)

        needs_baseline = "baseline" in paths and any(n <= args.baseline_max_size for n in sizes)
        srcs = {"new": REPO / "src"} if "new" in paths else {}
        revs = {"new": checkout_label()}
        if needs_baseline:
            srcs["baseline"], revs["baseline"] = stack.enter_context(baseline_worktree(args.baseline_rev))
        imports = {path: check_imports(src) for path, src in srcs.items()}
        for path, found in imports.items():
            print(f"{path}: rlora {revs[path]} imported from {found}", file=sys.stderr)
        if srcs:
            prepare(srcs, args.cache_dir)

        rows: list[Row] = []
        sizes_bytes: dict[int, int] = {}
        for size in sizes:
            files, sizes_bytes[size] = mixture_files(workdir, size, args.seed)
            read_files(files)  # the page cache holds the data for every path alike
            rows += measure_size(args, size, files, srcs, revs, runs_dir, warmups)

    load_end = os.getloadavg()
    table = tables(rows, sizes_bytes)
    repeats = "one run each" if args.repeats == 1 else f"medians of {args.repeats} interleaved runs"
    if warmups:
        repeats += f" after {warmups} untimed"
    threads = f"OMP_NUM_THREADS={args.threads}" if args.threads else "torch's default threads"
    note = (
        f"\n\nEach run a fresh `python -m rlora train demo` process ({repeats}), training.max_steps=1, the "
        f"embedded model on CPU ({threads}), data cache {args.data_cache}, "
        f"{' '.join(overrides(args.set))}. Time to first step: "
        "process start to the first logged loss; peak RSS: the child's ru_maxrss (1 GB = 10^9 bytes); "
        f"target for 1M examples on 2 cores: first step ≤ {TARGET_FIRST_STEP_S:.0f} s, peak < {TARGET_PEAK_GB:.0f} GB. "
        f"Machine: {host_line()}; load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end."
    )
    if args.json is not None:
        data = {
            "benchmark": "data_scale",
            "started": started,
            "machine": machine(),
            "load_average": {"start": load_start, "end": load_end},
            "settings": {
                "sizes": sizes,
                "paths": paths,
                "repeats": args.repeats,
                "warmup": warmups,
                "seed": args.seed,
                "baseline_rev": args.baseline_rev,
                "baseline_max_size": args.baseline_max_size,
                "overrides": overrides(args.set),
                "threads": args.threads,
                "data_cache": args.data_cache,
                "command": train_command([Path("<task files>")], Path("<fresh dir>"), args.cache_dir, args.set),
                "data_bytes": sizes_bytes,
                "imports": imports,
            },
            "rows": [asdict(r) for r in rows],
        }
        write_json_atomically(args.json, data)
    return table + note


def measure_size(
    args: argparse.Namespace, size: int, files: list[Path], srcs: dict, revs: dict, runs_dir: Path, warmups: int
) -> list[Row]:
    """One row per path for `size` examples: its runs interleaved with the other paths', summarised."""
    rows, todo = [], []
    for path in args.paths:
        row = Row(size, path, revs.get(path, args.baseline_rev))
        rows.append(row)
        if path == "baseline" and size > args.baseline_max_size:
            row.skipped = SKIP_REASON.format(limit=args.baseline_max_size)
        else:
            todo.append(row)
    measured: dict[str, list[Measurement]] = {row.path: [] for row in todo}
    rounds = [(i, False) for i in range(warmups)] + [(i, True) for i in range(args.repeats)]
    for i, timed in rounds:  # round-robin, the order rotating every round
        for row in todo[i % len(todo) :] + todo[: i % len(todo)]:
            if not row.error:
                one_run(args, row, files, srcs[row.path], runs_dir, i, timed, measured[row.path])
    for row in todo:
        shutil.rmtree(runs_dir / f"{size}-{row.path}-data-cache", ignore_errors=True)
        if measured[row.path] and not row.error:
            summarise(row, measured[row.path])
    return rows


def one_run(
    args: argparse.Namespace,
    row: Row,
    files: list[Path],
    src: Path,
    runs_dir: Path,
    i: int,
    timed: bool,
    measured: list[Measurement],
) -> None:
    """The i-th run of `row`'s path: its measurement appended to `measured` when `timed`, its failure on `row`."""
    size = row.size
    label = f"{size:,} {row.path} {'run' if timed else 'warm-up'} {i + 1}"
    out = runs_dir / f"{size}-{row.path}-{'run' if timed else 'warmup'}-{i}"
    cmd = train_command(files, out, args.cache_dir, args.set)
    # the new path's table of the files: a fresh folder per run (cold), or one per path and size
    data_cache = runs_dir / (f"{size}-{row.path}-data-cache" if args.data_cache == "warm" else f"{out.name}-data-cache")
    env = child_env(src, args.threads) | {DATA_CACHE_ENV: str(data_cache)}
    try:
        m = measure(cmd, env, args.timeout)
        m.data_cache_bytes = folder_bytes(data_cache)
        if timed:
            measured.append(m)
        print(
            f"{label}: first step {m.first_step_s:.1f} s, total {m.total_s:.1f} s, "
            f"peak RSS {m.peak_rss_bytes / GB:.2f} GB (at first step: anon "
            f"{_gb(m.anon_rss_at_first_step_bytes)}, files {_gb(m.file_rss_at_first_step_bytes)}); "
            f"data cache {m.data_cache_bytes / 1e6:.1f} MB",
            file=sys.stderr,
        )
    except RunFailed as failed:
        row.error, row.error_tail = failed.why, failed.tail
        print(f"{label} failed: {failed.why}; its last lines:", file=sys.stderr)
        print(textwrap.indent(failed.tail, "    "), file=sys.stderr)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if args.data_cache == "cold":
            shutil.rmtree(data_cache, ignore_errors=True)


def main(argv: list[str] | None = None) -> str:
    return bench_main(argv, __doc__, add_args, run, repeats=1, warmup=0, torch_options=False)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the cleanup (finally blocks) runs
    sys.exit(1 if "| failed: " in main(sys.argv[1:]) else 0)  # a failed run: its row says so, and the exit code
