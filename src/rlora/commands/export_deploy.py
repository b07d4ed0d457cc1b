"""What every `rlora export` folder carries besides its PEFT adapter: the gates with their measured fidelity to the
routed model (gates.json), the README with the commands that serve it, and (`--format gguf`) a llama.cpp adapter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import atomic_write_json, atomic_write_text
from ..adapters import README_FILE
from ..errors import ConfigError
from ..export_gguf import OUTTYPES, base_gguf, gguf_name, write_gguf_adapter
from ..export_readme import ExportFacts, lora_readme
from ..fidelity import DEFAULT_MAX_LOSS_RISE, Fidelity
from ..tuner.convert import PEFT_PREFIX
from .export import GATES_FILE

if TYPE_CHECKING:
    import torch

    from ..run import Run

FORMATS = ("peft", "gguf")


@dataclass
class DeployOptions:
    format: str = "peft"  # peft | gguf (the PEFT folder and a llama.cpp adapter in it)
    outtype: str = "f32"  # the GGUF adapter's tensor type: f32 | f16 | q8_0
    fidelity: bool = True  # measure the export against the routed model on the held-out split
    max_loss_rise: float = DEFAULT_MAX_LOSS_RISE

    def check(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"--format {self.format!r}: expected one of {', '.join(FORMATS)}")
        if self.outtype not in OUTTYPES:
            raise ConfigError(f"--outtype {self.outtype!r}: expected one of {', '.join(OUTTYPES)}")


def factors(tensors: dict[str, torch.Tensor], layers: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (B, A)} from an adapter's PEFT-named tensors."""
    return {
        name: (tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"], tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
        for name in layers
    }


def base_config(model):
    """The transformers config of the base model under a PeftModel."""
    return model.get_base_model().config


class Deployer:
    """Adds gates.json (with `fidelity`), README.md and the GGUF adapter to each LoRA export of one run."""

    def __init__(self, run: Run, layers: dict[str, Any], options: DeployOptions, gates_spec: str) -> None:
        from ..models import portable_name

        options.check()
        self.run, self.layers, self.options, self.spec = run, layers, options, gates_spec
        self.base_model = portable_name(run.cfg.model)
        self.fidelity = Fidelity(run, layers, options.max_loss_rise) if options.fidelity else None

    def tasks_for(self, task: str | None) -> list[str]:
        """The held-out tasks an export is measured on: its own task (per-task), else every task."""
        return [task] if task is not None else list(self.run.plan.tasks)

    def facts(self, rank: int, targets: list[str], gates: str, fidelity: dict | None) -> ExportFacts:
        _, where = base_gguf(self.run.cfg.model)
        files = [gguf_name(self.options.outtype)] if self.options.format == "gguf" else []
        folder = Path(self.run.cfg.model).expanduser().is_dir()
        return ExportFacts(self.base_model, rank, targets, gates, where, files, fidelity, folder)

    def write_gguf(self, folder: Path, parts: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int) -> None:
        if self.options.format == "gguf":
            config = base_config(self.run.model)
            write_gguf_adapter(parts, config, folder / gguf_name(self.options.outtype), self.options.outtype, rank)

    def gates_record(self, task: str | None, layer_gates: dict[str, torch.Tensor]) -> dict:
        """gates.json of a merged export of `task`'s gates (None: every task): the gates and, unless asked not to, the
        fidelity of the fixed-gate model they make (the merged model is that model), measured as for a LoRA export."""
        from ..tuner.convert import lora_tensors

        record = {"gates": {name: g.tolist() for name, g in layer_gates.items()}}
        if self.fidelity is not None:
            tensors, _ = lora_tensors(self.layers, layer_gates)
            record["fidelity"] = self.fidelity.measure(factors(tensors, self.layers), self.tasks_for(task))
        return record

    def extras(self, task: str | None, name: str):
        """What `write_lora` calls in the folder it is filling, for the export called `name` of `task`'s gates (None:
        one export for every task)."""

        def write(folder: Path, tensors: dict[str, torch.Tensor], rank: int, config, gates: dict) -> None:
            parts = factors(tensors, self.layers)
            measured = self.fidelity.measure(parts, self.tasks_for(task)) if self.fidelity else None
            self.write_gguf(folder, parts, rank)
            record = {"gates": gates}
            if measured is not None:
                record["fidelity"] = measured
            atomic_write_json(folder / GATES_FILE, record)
            what = gates_words(self.spec, task)
            facts = self.facts(rank, sorted(config.target_modules), what, measured)
            atomic_write_text(folder / README_FILE, lora_readme(facts, name))

        return write


def gates_words(spec: str, task: str | None) -> str:
    if task is not None:
        return f"task {task}'s mean gates per layer over its training tokens"
    if spec == "uniform":
        return "uniform (1/K for every head)"
    if spec.startswith("task:"):
        return f"task {spec[5:]}'s mean gates per layer over its training tokens"
    return f"from the file {Path(spec).name}"
