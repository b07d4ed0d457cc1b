"""The lazy data plan: the same split, mixture and training features as the eager path it replaced, user files
read once into cached Arrow tables, and bad files still failing before any model loads."""

import json
import random

import numpy as np
import pytest
import torch
from _reference import read_jsonl_tasks, split_examples
from transformers.trainer_pt_utils import get_length_grouped_indices

from rlora.data import encode_examples, load_task
from rlora.data import plan as data_plan
from rlora.data.plan import plan_data
from rlora.data.store import load_file
from rlora.errors import DataError
from rlora.runconfig import load_run_config
from rlora.trainer import LengthGroupedIndices


def _naive_mixture(tasks, counts, seed):
    """The eager algorithm the plan replaced: sample each task's training examples, then shuffle the whole."""
    mixture = []
    for task, examples in tasks.items():
        mixture += random.Random(f"{seed}:{task}").sample(list(examples), counts[task])
    random.Random(seed).shuffle(mixture)
    return mixture


def _config(tmp_path, *overrides):
    return load_run_config(None, [f"output_dir={tmp_path / 'run'}", *overrides])


@pytest.mark.slow  # reads the built-in data
@pytest.mark.parametrize(
    "overrides",
    [
        ("seed=0", "data.mixture=proportional"),
        ("seed=3", "data.mixture=temperature", "data.temperature=2.0", "data.max_train_per_task=300"),
        ("seed=7", "data.mixture=equal", "data.total_train=500"),
    ],
)
def test_the_plan_draws_the_examples_the_eager_path_drew(tmp_path, workspace, overrides):
    files = [str(workspace / f) for f in ("colors.jsonl", "letters.jsonl", "free.jsonl")]
    cfg = _config(tmp_path, "data.tasks=[piqa,sciq]", f"data.jsonl=[{','.join(files)}]", *overrides)
    plan = plan_data(cfg.data, cfg.seed)
    eager = {name: load_task(name) for name in ("piqa", "sciq")}
    eager.update(read_jsonl_tasks(files))  # the eager reader: every line parsed into a list
    train = {t: split_examples(x, cfg.data.test_fraction)[0] for t, x in eager.items()}
    test = {t: split_examples(x, cfg.data.test_fraction)[1][: cfg.data.max_eval_per_task] for t, x in eager.items()}
    expected = _naive_mixture(train, plan.counts, cfg.seed)
    assert [e.uid for e in plan.train] == [e.uid for e in expected]
    assert {t: [e.uid for e in x] for t, x in plan.test.items()} == {t: [e.uid for e in x] for t, x in test.items()}
    assert plan.sizes == {
        t: {"total": len(eager[t]), "train": len(train[t]), "test": len(eager[t]) - len(train[t])} for t in eager
    }


def test_the_training_set_tokenizes_on_read_what_the_eager_path_encoded(tmp_path, workspace, tiny_tokenizer):
    files = [str(workspace / f) for f in ("colors.jsonl", "letters.jsonl", "free.jsonl")]
    for chat in ("false", "true"):
        cfg = _config(
            tmp_path,
            "data.tasks=[]",
            f"data.jsonl=[{','.join(files)}]",
            f"data.chat_template={chat}",
            "data.max_length=12",
        )
        plan = plan_data(cfg.data, cfg.seed)
        dataset = plan.train_dataset(tiny_tokenizer)
        eager = encode_examples(tiny_tokenizer, list(plan.train), cfg.data.chat_template, cfg.data.max_length)
        names = list(plan.tasks)  # each item also names its task by its index there (task routing's task id)
        tasks = [names.index(e.task) for e in plan.train]
        assert [dataset[i] for i in range(len(dataset))] == [
            f | {"task_id": t} for f, t in zip(eager, tasks, strict=True)
        ]
        assert dataset.lengths.tolist() == [len(f["input_ids"]) for f in eager]


@pytest.mark.slow  # reads the built-in data
def test_a_large_mixture_groups_by_characters(tmp_path, workspace, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(data_plan, "EXACT_LENGTHS_MAX", 10)
    files = [str(workspace / f) for f in ("colors.jsonl", "free.jsonl")]
    cfg = _config(tmp_path, "data.tasks=[copa]", f"data.jsonl=[{','.join(files)}]")
    plan = plan_data(cfg.data, cfg.seed)
    expected = [len(e.prompt) + len(e.answer) for e in plan.train]
    assert plan.train_dataset(tiny_tokenizer).lengths.tolist() == expected


@pytest.mark.parametrize(("n", "batch"), [(1, 4), (37, 4), (1000, 8), (5000, 3)])
def test_the_length_grouped_order_is_transformers_order(n, batch):
    rng = random.Random(n)
    lengths = [rng.randint(1, 30) for _ in range(n)]  # many equal lengths: the ties' order is checked too
    for seed in range(3):
        sampler = LengthGroupedIndices(np.array(lengths), batch, seed=seed)
        sampler.set_epoch(seed + 1)
        expected = get_length_grouped_indices(lengths, batch, generator=sampler.generator())
        assert list(sampler) == expected


def test_the_length_grouped_order_is_a_function_of_the_seed_and_the_epoch_only():
    lengths = np.array([random.Random(1).randint(1, 30) for _ in range(200)])
    orders = {}
    for seed, epoch in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]:
        sampler = LengthGroupedIndices(lengths, 4, seed=seed)
        sampler.set_epoch(epoch)
        orders[seed, epoch] = list(sampler)
    torch.manual_seed(123)  # the global generator's history plays no part
    torch.rand(7)
    again = LengthGroupedIndices(lengths, 4, seed=0)
    assert list(again) == orders[0, 0]
    again.set_epoch(2)
    assert list(again) == orders[0, 2]
    assert len({tuple(o) for o in orders.values()}) == len(orders)  # every (seed, epoch) draws its own order


def test_a_file_is_read_once_then_mapped_from_the_cache(tmp_path, monkeypatch):
    from rlora.data import store

    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": f"a{i}"}) + "\n" for i in range(50)))
    spec = store.DataFile(path, schema="rlora")
    calls = []
    real = store.iter_examples
    monkeypatch.setattr(store, "iter_examples", lambda s: calls.append(s) or real(s))
    first = load_file(spec, tmp_path / "cache")
    second = load_file(spec, tmp_path / "cache")
    assert len(calls) == 1
    assert [first.example(i) for i in range(50)] == [second.example(i) for i in range(50)]
    assert second.example(49).answer == "a49"
    path.write_text(json.dumps({"prompt": "new", "answer": "x"}) + "\n")  # an edited file is read again
    assert load_file(store.DataFile(path, schema="rlora"), tmp_path / "cache").example(0).prompt == "new"
    assert len(calls) == 2


def test_a_bad_line_leaves_no_cached_table(tmp_path):
    from rlora.data import store

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n" + '{"prompt": 3, "answer": "a"}\n')
    for _ in range(2):  # the second attempt reads the file again and fails the same way
        with pytest.raises(DataError, match=r"t\.jsonl:2: field 'prompt': expected a non-empty string, got 3$"):
            load_file(store.DataFile(path, schema="rlora"), tmp_path / "cache")
    assert not any(p.name.endswith(".arrow") for p in (tmp_path / "cache").rglob("*"))


def test_data_jsonl_reads_json_lines_whatever_the_suffix(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": "a"}) + "\n" for i in range(20)))
    cfg = _config(tmp_path, "data.tasks=[]", f"data.jsonl=[{path}]")
    plan = plan_data(cfg.data, cfg.seed)
    assert list(plan.tasks) == ["mine"] and plan.sizes["mine"]["total"] == 20


def test_rlora_cache_lists_the_tables_and_removes_the_stale_ones(tmp_path, monkeypatch, capsys):
    from rlora.cli import main
    from rlora.data import store

    monkeypatch.setenv("RLORA_DATA_CACHE", str(tmp_path / "cache"))
    kept, edited = tmp_path / "kept.jsonl", tmp_path / "edited.jsonl"
    for path in (kept, edited):
        path.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": "a"}) + "\n" for i in range(30)))
        load_file(store.DataFile(path, schema="rlora"))
    edited.write_text(json.dumps({"prompt": "new", "answer": "a"}) + "\n")  # its table is now stale
    tables = store.cached_tables()
    assert sorted((t.source["path"], t.source["examples"], t.stale) for t in tables) == [
        (str(edited), 30, True),
        (str(kept), 30, False),
    ]
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert f"{edited}: stale (its file changed or is gone)" in out and f"{kept}: 30 examples" in out
    assert "2 tables" in out and "rlora cache --clear-stale removes the stale, damaged and partial ones" in out
    assert main(["cache", "--clear-stale"]) == 0
    assert [t.source["path"] for t in store.cached_tables()] == [str(kept)]
    assert main(["cache", "--clear"]) == 0
    assert store.cached_tables() == [] and capsys.readouterr().out.endswith("0 tables, 0.0 MB; removed 1\n")


@pytest.mark.parametrize("source", ["jsonl", "files"])
def test_a_config_naming_its_own_files_trains_and_evaluates_on_those_alone(tmp_path, source):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": f"a{i}"}) + "\n" for i in range(20)))
    cfg = _config(tmp_path, f"data.{source}=[{path}]")  # no data.tasks: no built-in task is added
    assert cfg.data.tasks == []
    plan = plan_data(cfg.data, cfg.seed)
    assert list(plan.tasks) == ["mine"] and list(plan.test) == ["mine"] and list(plan.counts) == ["mine"]


def test_a_config_without_any_data_source_gets_the_default_tasks(tmp_path):
    assert _config(tmp_path).data.tasks == ["boolq", "piqa", "arc_easy", "winogrande"]
    assert _config(tmp_path, "data.tasks=[piqa]").data.tasks == ["piqa"]
