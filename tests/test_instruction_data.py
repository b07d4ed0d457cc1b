"""Instruction data as users have it, end to end: an Alpaca file and a ShareGPT file are each a task that trains
(loss on the replies only) and is evaluated on its own, by held-out loss and perplexity next to exact match."""

import json
import math

import pytest
from _tiny import byte_tokenizer

from rlora.cli import main
from rlora.data import IGNORE_INDEX
from rlora.data.plan import plan_data
from rlora.runconfig import load_run_config

COLORS = ["red", "blue", "green", "white", "black", "yellow"]


def _alpaca(path, n=30):
    records = [
        {"instruction": "Repeat the color.", "input": COLORS[i % 6], "output": COLORS[i % 6], "source": f"s{i}"}
        | ({"system": "Be brief."} if i % 2 else {})
        for i in range(n)
    ]
    path.write_text(json.dumps(records, indent=1))  # a JSON array, as LLaMA-Factory ships Alpaca data
    return path


def _sharegpt(path, n=30):
    with open(path, "w") as f:
        for i in range(n):
            c, d = COLORS[i % 6], COLORS[(i + 1) % 6]
            turns = [
                {"from": "human", "value": f"Say {c}."},
                {"from": "gpt", "value": c},
                {"from": "human", "value": f"Now say {d} number {i}."},
                {"from": "gpt", "value": d},
            ]
            f.write(json.dumps({"conversations": turns}) + "\n")
    return path


def _overrides(out, files, *extra, steps=3):
    spec = ",".join(f"{{path: {p}}}" for p in files)
    return [
        f"output_dir={out}",
        "data.tasks=[]",
        f"data.files=[{spec}]",
        "data.test_fraction=0.3",
        "data.max_eval_per_task=4",
        "data.max_length=64",
        f"training.max_steps={steps}",
        "training.batch_size=4",
        "training.save_steps=100",
        "eval.batch_size=4",
        "eval.max_new_tokens=2",  # the longest prompt is 62 tokens; the tiny model reads 64
        *extra,
    ]


def test_replies_alone_carry_the_loss(tmp_path, workspace):
    tokenizer = byte_tokenizer()  # byte-level: decoding gives back the exact text
    files = [_alpaca(tmp_path / "repeat.json"), _sharegpt(tmp_path / "chat.jsonl")]
    cfg = load_run_config(None, [f"model={workspace / 'model'}", *_overrides(tmp_path / "run", files)])
    plan = plan_data(cfg.data, cfg.seed)
    assert list(plan.tasks) == ["repeat", "chat"]
    dataset = plan.train_dataset(tokenizer)
    assert len(dataset) == sum(plan.counts.values()) > 0
    for i in range(len(dataset)):
        example, feature = plan.train[i], dataset[i]
        trained = tokenizer.decode([t for t in feature["labels"] if t != IGNORE_INDEX])
        replies = [c for r, c in example.turns if r == "assistant"] + [example.answer]
        # plain mode: each reply is " <reply>" and the last is followed by EOS; nothing else is trained
        assert trained == "".join(" " + r for r in replies) + "<eos>"


def test_an_alpaca_and_a_sharegpt_file_train_and_evaluate_per_task(tmp_path, workspace):
    files = [_alpaca(tmp_path / "repeat.json"), _sharegpt(tmp_path / "chat.jsonl")]
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {workspace / 'model'}\n")
    assert main(["train", str(config), *_overrides(tmp_path / "run", files)]) == 0
    assert main(["eval", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(results["tasks"]) == {"repeat", "chat"}
    for task in results["tasks"].values():
        assert task["n"] == 4 and task["format"] == "free" and task["acc_ll"] is None
        assert 4 * task["acc_gen"] in {0, 1, 2, 3, 4}
        assert math.isfinite(task["loss"]) and task["ppl"] == pytest.approx(math.exp(task["loss"]), rel=1e-12)


@pytest.mark.slow
def test_the_embedded_model_learns_instruction_data_with_its_chat_template(model_cache_dir, tmp_path):
    """SmolLM2 with its chat template, a few steps on an Alpaca and a ShareGPT file: the held-out loss of both
    tasks falls below the base model's (the replies are a color named in the prompt: easy to learn)."""
    files = [_alpaca(tmp_path / "repeat.json", 60), _sharegpt(tmp_path / "chat.jsonl", 60)]
    settings = ["data.chat_template=true", "training.lr=1e-3"]
    cache = ["--cache-dir", str(model_cache_dir)]
    assert main(["train", "demo", *_overrides(tmp_path / "run", files, *settings, steps=8), *cache]) == 0
    assert main(["eval", str(tmp_path / "run"), "--base", *cache]) == 0
    assert main(["eval", str(tmp_path / "run"), *cache]) == 0
    base = json.loads((tmp_path / "run" / "eval_base.json").read_text())["tasks"]
    tuned = json.loads((tmp_path / "run" / "eval.json").read_text())["tasks"]
    for task in ("repeat", "chat"):
        assert tuned[task]["loss"] < base[task]["loss"], (task, base[task], tuned[task])


def test_show_marks_every_reply_of_a_conversation(tmp_path, capsys):
    path = tmp_path / "chat.jsonl"
    turns = [{"from": "human", "value": "Say red."}, {"from": "gpt", "value": "red"}]
    turns += [{"from": "human", "value": "Say blue."}, {"from": "gpt", "value": "blue"}]
    path.write_text(json.dumps({"conversations": turns}) + "\n")
    assert main(["show", "chat", "--data", str(path), "--test-fraction", "0"]) == 0
    expected = (
        "=== chat/1 (train) ===\nUser: Say red.\n\nAssistant:[[ red]]\n\nUser: Say blue.\n\nAssistant: [[blue]]\n\n"
    )
    assert capsys.readouterr().out == expected


def test_data_loader_workers_read_the_mapped_tables_and_train_the_same_adapter(tmp_path, workspace):
    """Worker processes read the memory-mapped tables themselves; the order and the features are the same as in the
    main process, so the trained adapter is bitwise the same."""
    from safetensors.torch import load_file

    files = [_alpaca(tmp_path / "repeat.json"), _sharegpt(tmp_path / "chat.jsonl")]
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {workspace / 'model'}\n")
    adapters = []
    for workers in (0, 2):
        out = tmp_path / f"run{workers}"
        overrides = _overrides(out, files, f"training.dataloader_workers={workers}")
        assert main(["train", str(config), *overrides]) == 0
        adapters.append(load_file(out / "adapter" / "adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    for name, tensor in adapters[0].items():
        assert (tensor == adapters[1][name]).all(), name
    start = load_file(tmp_path / "run0" / "adapter_init" / "adapter_model.safetensors")
    assert any((start[name] != tensor).any() for name, tensor in adapters[0].items())  # the steps did train
