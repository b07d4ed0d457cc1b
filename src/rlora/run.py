"""A run folder: where each of its files lives, and loading, evaluating and analysing the run it holds.

    RUN_DIR/config.yaml           the resolved run config (every default filled in)
    RUN_DIR/data_manifest.json    tasks, split, per-task counts of the training mixture and of the test sets
    RUN_DIR/checkpoints/          Trainer checkpoints (checkpoint-<step>), each marked complete once fully written
    RUN_DIR/adapter/              the final adapter (PEFT format); the run is finished once it exists
    RUN_DIR/adapter_init/         the adapter as initialised (step 0), for the head-similarity analysis
    RUN_DIR/train_log.jsonl       the Trainer's log history, one record a line
    RUN_DIR/train_metrics.json    final training metrics
    RUN_DIR/eval.json, eval.md    per-task accuracy of the adapter (`rlora eval`)
    RUN_DIR/eval_base.json, .md   the same for the base model alone (`rlora eval --base`, `rlora demo`)
    RUN_DIR/analysis/             head similarity, router usage and the head map (`rlora analyze`)
    RUN_DIR/demo.md               the demo's table (`rlora demo`)

Every other module asks a `RunFolder` for these paths; `load_run` is the one way to get a run's config, data,
model and adapter back. Training writes the folder (`train.py`); everything is written atomically (`_io.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import models
from ._io import atomic_write_json, atomic_write_text, is_complete
from .data import encode_spans, gold_pair
from .data_plan import DataPlan, plan_data
from .errors import ConfigError, RunFolderError
from .reports import results_table, similarity_table
from .runconfig import RunConfig, dump_run_config, load_run_config


class RunFolder:
    """The paths of one run folder, and the files that several commands read or write."""

    def __init__(self, root: str | Path) -> None:
        self.root = root = Path(root)
        self.config = root / "config.yaml"
        self.manifest = root / "data_manifest.json"
        self.checkpoints = root / "checkpoints"
        self.adapter = root / "adapter"
        self.adapter_staging = root / ".adapter.staging"  # every process saves the adapter here, then one rename
        self.adapter_init = root / "adapter_init"
        self.train_log = root / "train_log.jsonl"
        self.train_metrics = root / "train_metrics.json"
        self.analysis = root / "analysis"
        self.demo_table = root / "demo.md"

    def results(self, base: bool = False, suffix: str = ".json") -> Path:
        """The evaluation results of the adapter, or with `base` of the base model alone (`suffix` .json or .md)."""
        return self.root / (("eval_base" if base else "eval") + suffix)

    def is_finished(self) -> bool:
        return self.adapter.is_dir()

    def complete_checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.checkpoints)

    def check_config(self, cfg: RunConfig) -> None:
        """Refuses to continue, reuse or overwrite a run folder that was made with another config."""
        if self.config.is_file() and self.config.read_text() != dump_run_config(cfg):
            raise ConfigError(
                f"{self.root} was made with a different config ({self.config}); use the same config and overrides, "
                "or another output_dir"
            )

    def write_config(self, cfg: RunConfig) -> None:
        atomic_write_text(self.config, dump_run_config(cfg))

    def read_config(self) -> RunConfig:
        if not self.config.is_file():
            raise RunFolderError(f"{self.root}: not a run folder (no config.yaml); train one with `rlora train`")
        return load_run_config(self.config)

    def write_results(self, results: dict, base: bool = False) -> None:
        atomic_write_json(self.results(base), results)
        column = "base" if base else results["method"]
        atomic_write_text(self.results(base, ".md"), results_table({column: results}) + "\n")

    def read_results(self, base: bool = False) -> dict | None:
        path = self.results(base)
        return json.loads(path.read_text()) if path.is_file() else None


def checkpoint_dir(checkpoints: Path, step: int) -> Path:
    """The Trainer's name for the checkpoint of `step`."""
    return checkpoints / f"checkpoint-{step}"


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """The Trainer checkpoints that were fully written (marked complete), oldest first."""
    return sorted((p for p in _checkpoints(checkpoints) if is_complete(p)), key=lambda p: int(p.name.split("-")[1]))


def incomplete_checkpoints(checkpoints: Path) -> list[Path]:
    """The checkpoints a killed run left half-written (never marked complete)."""
    return [p for p in _checkpoints(checkpoints) if not is_complete(p)]


def _checkpoints(checkpoints: Path) -> list[Path]:
    return list(checkpoints.glob("checkpoint-*")) if checkpoints.is_dir() else []


@dataclass
class LoadedRun:
    folder: RunFolder
    cfg: RunConfig
    plan: DataPlan
    model: Any  # the base model, with the run's adapter unless loaded with adapter=False
    tokenizer: Any


def load_run(
    run_dir: str | Path, cache_dir: str | None = None, *, adapter: bool = True, multi_head: bool = False
) -> LoadedRun:
    """The run's config, data plan, model and tokenizer; with `adapter` (the default) the trained adapter on top.
    A folder that is no run, has no adapter yet or (with `multi_head`) is a plain LoRA run is refused before any
    model loads."""
    folder = RunFolder(run_dir)
    cfg = folder.read_config()
    if adapter and not (folder.adapter / "adapter_config.json").is_file():
        raise RunFolderError(f"{folder.root}: the run has no adapter yet; finish it with `rlora train ... --resume`")
    if multi_head and cfg.method == "lora":
        raise RunFolderError(f"{folder.root}: a plain LoRA run has one head and no router; analyze a multi-head run")
    plan = plan_data(cfg)
    model, tokenizer = models.load_model_and_tokenizer(cfg.model, cache_dir=cache_dir)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder.adapter))
    return LoadedRun(folder, cfg, plan, model, tokenizer)


def evaluate_run(run_dir: str | Path, cache_dir: str | None = None, base: bool = False) -> dict:
    """Evaluates a trained run (or, with `base`, its base model alone) on its held-out split, writes the results
    into the run folder (`RunFolder.results`) and returns them."""
    from .evaluate import evaluate_plan

    run = load_run(run_dir, cache_dir, adapter=not base)
    adapter = None if base else str(run.folder.adapter)
    results = {"model": run.cfg.model, "adapter": adapter, "method": run.cfg.method}
    results |= evaluate_plan(run.model, run.tokenizer, run.cfg, run.plan)
    run.folder.write_results(results, base)
    return results


def analyze_run(run_dir: str | Path, cache_dir: str | None = None, max_prompts_per_task: int = 64) -> dict:
    """Writes RUN_DIR/analysis/: head similarity (init and trained) as table, JSON and line plot; router usage per
    task on held-out examples as JSON and heatmap; the heads' PCA map. Returns the JSON data."""
    from .analysis import head_projection, head_similarity, router_usage
    from .plots import plot_head_projection, plot_router_usage, plot_similarity

    run = load_run(run_dir, cache_dir, multi_head=True)
    model = run.model.eval()
    trained = head_similarity(model)
    init = None
    if run.folder.adapter_init.is_dir():
        model.load_adapter(str(run.folder.adapter_init), adapter_name="init")
        init = head_similarity(model, "init")
    d = run.cfg.data
    sequences = {  # what the model reads in training: the gold context and answer (RC or MC, as configured)
        task: [
            encode_spans(run.tokenizer, *gold_pair(e), d.chat_template, d.max_length, e.uid)
            for e in examples[:max_prompts_per_task]
        ]
        for task, examples in run.plan.test.items()
    }
    prompts = {task: [s.prompt + s.answer for s in spans] for task, spans in sequences.items()}
    usage = router_usage(model, prompts, batch_size=run.cfg.eval.batch_size)
    projection = head_projection(model)

    out = run.folder.analysis
    data = {"head_similarity": {"init": init, "trained": trained}, "router_usage": usage, "head_projection": projection}
    atomic_write_json(out / "analysis.json", data)
    atomic_write_text(out / "head_similarity.md", similarity_table(init, trained) + "\n")
    plot_similarity(init, trained, out / "head_similarity.png")
    plot_router_usage(usage, out / "router_usage.png")
    plot_head_projection(projection, out / "heads_pca.png")
    return data
