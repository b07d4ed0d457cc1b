"""Run lm-eval-harness (0.4.13) on a handful of multiple-choice docs and return what it computed per doc.

Used by tests/test_lm_eval_agreement.py to cross-check rlora's cloze ("RC") scorer against the reference
implementation. `lm_eval_choices(model_dir, docs, tmp_path)` writes the docs to a JSONL file and a local
task YAML (`dataset_path: json`, `output_type: multiple_choice`), runs `lm_eval.simple_evaluate` with
`model="hf"`, `model_args="pretrained=MODEL_DIR[,peft=ADAPTER_DIR],dtype=float32"`, `device="cpu"` and
`log_samples=True` in a subprocess, and returns per doc the summed log-likelihood of every choice (the
logged samples' `filtered_resps`) and lm-eval's own `acc` / `acc_norm` for that doc.

Why a subprocess: lm-eval reconfigures logging and imports a lot; the hub/dataset offline switches
(HF_HUB_OFFLINE, HF_DATASETS_OFFLINE) are read when `datasets`/`huggingface_hub` are first imported, which
in the test process has already happened; and an rlora adapter only loads where `rlora` was imported first
(that registers the rlora PEFT type), which the child does before importing lm_eval.

What lm-eval scores (HFLM, causal backend), checked against SmolLM2-135M-Instruct's tokenizer:

* The scored text of choice i is `context + target_delimiter + choices[i]`, target_delimiter " " by default.
  `loglikelihood(context, " " + choice)` is the sum of the log-softmax of the continuation tokens;
  `acc` = argmax of these sums, `acc_norm` = argmax of sum / len(choice) in *characters* of the choice text
  (without the delimiter), `is_greedy` is unused for multiple choice.
* BOS: HFLM's `add_bos_token` defaults to None, which means "the tokenizer's default" (`tokenizer.encode`
  with no `add_special_tokens` argument, i.e. True). The SmolLM2 tokenizer converted from the GGUF has a
  TemplateProcessing post-processor with no special tokens, so *no BOS is added*: `encode("Hi") == [26843]`
  (its bos_token `<|im_start|>`, id 1, is a chat marker, not a document start). The first context token is
  conditioned on nothing (its own probability is never scored). (`prefix_token_id` = BOS is only used for an
  empty context, which these tests never have.)
* Context/continuation split (`TemplateLM._encode_pair`): trailing whitespace of the context is moved to the
  front of the continuation, then `whole = encode(context + continuation)`, `ctx = encode(context)` and the
  continuation tokens are `whole[len(ctx):]` (the tail). rlora's scorer instead encodes
  `tokenizer(context, add_special_tokens=True)` and `tokenizer(" " + choice, add_special_tokens=False)`
  separately. For this tokenizer the two give identical token ids on every (context, choice) pair of the
  built-in arc_easy, piqa, hellaswag, winogrande, openbookqa, commonsense_qa and boolq sets with the context
  "Question: {prompt}\\nAnswer:" (63,304 pairs, 0 differences): the context ends in ":" and the continuation
  starts with " " + a non-space character, which is always a pre-tokeniser boundary for this byte-level BPE.
  They can differ when a choice starts with whitespace or when the context ends with a character that merges
  with " " + the choice's first characters.
* Batching: requests are sorted by length (longest first) and right-padded; no attention mask is passed to
  the causal model (padding is after the scored tokens, so it cannot change them). With `logits_cache`
  (default) continuations of one token that share a context reuse one forward pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TASK_NAME = "rlora_lm_eval_xcheck"

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
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def lm_eval_choices(
    model_dir: str | os.PathLike,
    docs: list[dict],
    tmp_path: str | os.PathLike,
    adapter_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    threads: int = 1,
    timeout: float = 600,
) -> list[dict]:
    """lm-eval's result for each doc ({"context": str, "choices": [str, ...], "gold": int}), in order.

    Each result is {"lls": [summed log-likelihood of each choice], "acc": 0.0/1.0, "acc_norm": 0.0/1.0,
    "pred": argmax(lls), "pred_norm": argmax(lls / len(choice))}. `pred`/`pred_norm` are recomputed
    from `lls` here and checked against lm-eval's own acc/acc_norm.

    `threads`: torch CPU threads in the child. 1 by default: on 2 cores shared with other work, two OpenMP
    threads made a 20-token forward pass of the 135M model 5-10x slower than one thread (1.3-1.9 s vs 0.2 s).
    """
    work = Path(tmp_path) / "lm_eval"
    (work / "tasks").mkdir(parents=True, exist_ok=True)
    data_file = work / "docs.jsonl"
    with open(data_file, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            row = {"id": i, "context": doc["context"], "choices": list(doc["choices"]), "gold": int(doc["gold"])}
            f.write(json.dumps(row) + "\n")
    (work / "tasks" / f"{TASK_NAME}.yaml").write_text(
        TASK_YAML.format(task=TASK_NAME, data_file=json.dumps(str(data_file)))
    )
    model_args = f"pretrained={model_dir}"
    if adapter_dir is not None:
        model_args += f",peft={adapter_dir}"
    model_args += ",dtype=float32"
    spec = {
        "include_path": str(work / "tasks"),
        "task": TASK_NAME,
        "model_args": model_args,
        "batch_size": batch_size,
        "out": str(work / "samples.json"),
        "threads": threads,
    }
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work / "hf_datasets_cache"),  # fresh: never a stale copy of docs.jsonl
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(threads),
    }
    proc = subprocess.run(
        [sys.executable, __file__, json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"lm-eval failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    samples = json.loads(Path(spec["out"]).read_text())
    if sorted(s["doc_id"] for s in samples) != list(range(len(docs))):
        raise RuntimeError(f"lm-eval logged samples for doc ids {sorted(s['doc_id'] for s in samples)}")
    results = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = docs[sample["doc_id"]]
        lls = [float(ll) for ll, _is_greedy in sample["filtered_resps"]]
        if len(lls) != len(doc["choices"]) or sample["doc"]["context"] != doc["context"]:
            raise RuntimeError(f"lm-eval sample {sample['doc_id']} does not match its doc")
        pred = max(range(len(lls)), key=lls.__getitem__)
        pred_norm = max(range(len(lls)), key=lambda i: lls[i] / len(doc["choices"][i]))
        result = {"lls": lls, "acc": float(sample["acc"]), "acc_norm": float(sample["acc_norm"])}
        result |= {"pred": pred, "pred_norm": pred_norm}
        if result["acc"] != float(pred == doc["gold"]) or result["acc_norm"] != float(pred_norm == doc["gold"]):
            raise RuntimeError(f"lm-eval's acc/acc_norm disagree with its own log-likelihoods: {result}")
        results.append(result)
    return results


def _child(spec: dict) -> None:
    """Runs in the subprocess: rlora first (registers the PEFT type), then lm-eval; writes the logged samples."""
    import torch

    import rlora  # noqa: F401  (side effect: PEFT registration, so peft=ADAPTER_DIR can load an rlora adapter)

    torch.set_num_threads(spec["threads"])
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model="hf",
        model_args=spec["model_args"],
        tasks=[spec["task"]],
        task_manager=TaskManager(include_path=spec["include_path"]),
        device="cpu",
        batch_size=spec["batch_size"],
        num_fewshot=0,
        log_samples=True,
        bootstrap_iters=0,
        write_out=False,
    )
    samples = [
        {
            "doc_id": s["doc_id"],
            "doc": s["doc"],
            "filtered_resps": [[float(ll), bool(greedy)] for ll, greedy in s["filtered_resps"]],
            "acc": s["acc"],
            "acc_norm": s["acc_norm"],
        }
        for s in out["samples"][spec["task"]]
    ]
    Path(spec["out"]).write_text(json.dumps(samples))


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
