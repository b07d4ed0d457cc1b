"""The README.md of an export: what it is, the exact commands that serve it (vLLM, llama.cpp), and its measured
fidelity to the routed model. Pure text from facts the exporter gathered."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .stats import format_ci

# vLLM accepts only these values of --max-lora-rank (its LoRA config's choices)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class ExportFacts:
    base_model: str  # the portable name (adapter_config.json's base_model_name_or_path)
    rank: int
    targets: list[str]
    gates: str  # how the gates were chosen, in words
    base_gguf: str  # where the base model is as GGUF (a sentence)
    gguf_files: list[str] = field(default_factory=list)  # adapter GGUF files written, relative to the folder
    fidelity: dict | None = None  # `fidelity.Fidelity.measure`'s result
    base_is_folder: bool = False  # the base model is a local folder (else a Hub id)


def vllm_max_lora_rank(rank: int) -> int:
    """The least value vLLM's --max-lora-rank accepts that holds `rank`."""
    for value in VLLM_MAX_LORA_RANKS:
        if value >= rank:
            return value
    raise ValueError(f"rank {rank} is above vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}")


def _vllm(facts: ExportFacts, modules: list[tuple[str, str]]) -> list[str]:
    listed = " ".join(f"{name}={path}" for name, path in modules)
    try:
        rank = vllm_max_lora_rank(facts.rank)
    except ValueError as error:
        return ["## vLLM", "", f"Not servable by vLLM: {error}.", ""]
    return [
        "## vLLM",
        "",
        f"The rank is {facts.rank}, so vLLM needs `--max-lora-rank {rank}` (its default, 16, refuses a rank above 16;",
        "it accepts only the values " + ", ".join(map(str, VLLM_MAX_LORA_RANKS)) + "):",
        "",
        "```sh",
        f"vllm serve {facts.base_model} --enable-lora --max-lora-rank {rank} --max-loras {len(modules)} \\",
        f"    --lora-modules {listed}",
        "```",
        "",
        "Run it from the folder that holds this export (the paths above are relative); a request names the adapter",
        f'as its model: `"model": "{modules[0][0]}"`.',
        "",
    ]


def _llama_cpp(facts: ExportFacts, cli: str, server: str, convert_from: list[str]) -> list[str]:
    """The llama.cpp section: `cli` and `server` are the adapter options of llama-cli and llama-server."""
    lines = ["## llama.cpp", "", f"The base model as GGUF: {facts.base_gguf}.", ""]
    if not facts.gguf_files:
        base = f"--base {facts.base_model}" if facts.base_is_folder else f"--base-model-id {facts.base_model}"
        converts = [f"python convert_lora_to_gguf.py {f} {base} --outtype f16" for f in convert_from]
        lines += [
            "No GGUF adapter was written (`rlora export ... --format gguf` writes one). llama.cpp's converter makes it",
            "from this PEFT folder (offline, with `--base` and a local copy of the base model):",
            "",
            "```sh",
            *converts,
            "```",
            "",
        ]
    lines += [
        "```sh",
        f"llama-cli -m BASE.gguf {cli} --temp 0 -n 64 -p 'Question: ...'",
        f"llama-server -m BASE.gguf {server} --host 127.0.0.1 --port 8080",
        "```",
        "",
    ]
    return lines


def fidelity_lines(fidelity: dict | None) -> list[str]:
    """The fidelity table (routed vs this export's fixed gates, per task, paired 95% CIs) and its warnings."""
    if fidelity is None:
        return []
    lines = [
        "## Fidelity to the routed model",
        "",
        "Measured at export on the run's held-out split, every example scored by both models (fixed - routed, paired",
        "95% CI over the examples). The loss is nats per trained token; accuracies in %.",
        "",
        "| task | n | loss routed | loss fixed | rise | metric | routed | fixed | diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, scores in fidelity["tasks"].items():
        loss = scores.get("loss")
        cells = ["-"] * 3
        if loss is not None:
            rise = format_ci(loss["diff"], loss["ci"], scale=1.0, digits=3)
            cells = [f"{loss['routed']:.3f}", f"{loss['fixed']:.3f}", rise]
        metric = next((m for m in ("acc_norm", "acc_ll", "acc_gen") if m in scores), None)
        if metric is None:
            acc = ["-"] * 4
        else:
            s = scores[metric]
            acc = [metric, f"{100 * s['routed']:.1f}", f"{100 * s['fixed']:.1f}", format_ci(s["diff"], s["ci"])]
        lines.append(f"| {task} | {scores['n']} | " + " | ".join(cells + acc) + " |")
    lines.append("")
    warnings = fidelity["warnings"]
    if warnings:
        lines += [f"**Warning** (loss rise above {fidelity['max_loss_rise']} nats):", ""]
        lines += [f"- {w}" for w in warnings] + [""]
    else:
        lines += [f"No task's loss rises by more than {fidelity['max_loss_rise']} nats.", ""]
    lines += ["The same numbers are in gates.json (`fidelity`).", ""]
    return lines


def lora_readme(facts: ExportFacts, name: str) -> str:
    """The README of a fixed-gate LoRA export folder called `name`."""
    lines = [
        "# Fixed-gate LoRA export (rlora)",
        "",
        f"A plain PEFT LoRA adapter for `{facts.base_model}`: rank {facts.rank}, scaling 1 (lora_alpha = r), no",
        f"dropout, on {', '.join(facts.targets)}. Gates: {facts.gates}. With these gates it is exactly the run's",
        "multi-head adapter; the run's router mixes the heads per token instead, which the fidelity table prices.",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{facts.base_model}"), "{name}")',
        "```",
        "",
    ]
    lines += _vllm(facts, [(name, name)])
    lora = f"--lora {name}/{facts.gguf_files[0]}" if facts.gguf_files else f"--lora {name}.gguf"
    lines += _llama_cpp(facts, lora, lora, [name])
    lines += fidelity_lines(facts.fidelity)
    return "\n".join(lines)


def heads_readme(facts: ExportFacts, adapters: list[str], scales: dict[str, list[float]]) -> str:
    """The README of a per-head export: `adapters` (folder names; the offset last when there is one) and per task
    the scale of each head."""
    k = len(next(iter(scales.values())))
    offset = len(adapters) > k
    lines = [
        "# Per-head LoRA export (rlora)",
        "",
        f"The run's {k} heads as {k} plain PEFT LoRA adapters for `{facts.base_model}` sharing one A"
        + (", and R-LoRA's offset as one more (always at scale 1)" if offset else "")
        + f": rank {facts.rank} each, scaling 1, on {', '.join(facts.targets)}. Served with per-request scales",
        "g_1..g_K (the same in every layer), the model is exactly the run's adapter with those fixed gates:",
        "sum_k g_k head_k" + (" + offset." if offset else "."),
        "",
        "Scales per task (gates.json `scales`: the task's mean gates on its training tokens, averaged over layers):",
        "",
        "| task | " + " | ".join(adapters[:k]) + " |",
        "|---|" + "---|" * k,
    ]
    lines += [f"| {task} | " + " | ".join(f"{v:.4f}" for v in s) + " |" for task, s in scales.items()]
    lines.append("")
    gguf = [f"{a}/{facts.gguf_files[0]}" for a in adapters] if facts.gguf_files else [f"{a}.gguf" for a in adapters]
    task, first = next(iter(scales.items()))
    task_scales = [*first, 1.0] if offset else list(first)
    cli = " ".join(f"--lora-scaled {g}:{s:.6g}" for g, s in zip(gguf, task_scales, strict=True))
    server = "--lora-init-without-apply " + " ".join(f"--lora {g}" for g in gguf)
    lines += [f"The llama-cli line applies `{task}`'s scales.", ""]
    lines += _llama_cpp(facts, cli, server, adapters)
    request = [{"id": i, "scale": round(s, 6)} for i, s in enumerate(task_scales)]
    lines += [
        f"llama-server loads the adapters in this order (ids 0..{len(adapters) - 1}) at scale 0, and applies per",
        "request the adapters a request lists at its scales (one it leaves out: 0). The request for",
        f"`{task}`:",
        "",
        "```sh",
        "curl http://127.0.0.1:8080/completion -d '"
        + json.dumps({"prompt": "Question: ...", "n_predict": 32, "temperature": 0, "lora": request})
        + "'",
        "```",
        "",
        "vLLM applies one adapter per request, so it cannot mix these: serve the per-task exports there (`rlora export",
        "--gates per-task`, each with its README's vLLM command).",
        "",
    ]
    lines += fidelity_lines(facts.fidelity)
    return "\n".join(lines)
