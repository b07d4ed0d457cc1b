"""Shared fixtures: the tiny word-level tokenizer and the converted embedded model (once per session)."""

import json
import os
import random
from pathlib import Path

import pytest
from _tiny import tiny_model_dir, word_tokenizer
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """`_tiny.word_tokenizer`: fixed ids for the tests that spell out token ids."""
    return word_tokenizer()


@pytest.fixture(scope="session")
def model_cache_dir(request) -> Path:
    """Where the embedded model is converted: $RLORA_CACHE_DIR if set, else pytest's cache (kept across runs)."""
    if os.environ.get("RLORA_CACHE_DIR"):
        return Path(os.environ["RLORA_CACHE_DIR"])
    return Path(request.config.cache.mkdir("rlora-cache"))


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A tiny model folder and three tiny JSONL tasks (yes/no, lettered, free-form)."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_model_dir(root / "model")
    rng = random.Random(0)
    with open(root / "colors.jsonl", "w") as f:
        for i in range(40):
            c = rng.choice(["red", "blue"])
            row = {"prompt": f"item {i}: the sky is {c}?", "choices": ["yes", "no"], "labels": ["yes", "no"]}
            f.write(json.dumps(row | {"gold": int(c == "red")}) + "\n")
    with open(root / "letters.jsonl", "w") as f:
        for i in range(40):
            g = rng.randrange(4)
            row = {"prompt": f"question {i}: pick {'ABCD'[g]}", "choices": ["one", "two", "three", "four"], "gold": g}
            f.write(json.dumps(row) + "\n")
    with open(root / "free.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"prompt": f"say {i}", "answer": f"{i}"}) + "\n")
    return root


@pytest.fixture(scope="session")
def embedded_tokenizer(model_cache_dir):
    """The embedded model's tokenizer (SmolLM2), converted once per session."""
    from rlora import models

    return models.load_tokenizer(models.DEFAULT_MODEL, model_cache_dir)


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory):
    """User files' Arrow tables go to a folder of this session, not the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RLORA_DATA_CACHE", str(tmp_path_factory.mktemp("data-cache")))
    yield
    mp.undo()


REAL_FIXTURES = ("embedded_tokenizer", "model_cache_dir")  # fixtures that convert or load the embedded model


@pytest.fixture(autouse=True)
def _fast_lane_guard(request, monkeypatch):
    """The fast lane (`-m "not slow"`) needs neither the embedded model nor the built-in data: a test not marked
    slow that reads either (in this process) fails, naming what it read."""
    if request.node.get_closest_marker("slow") is not None:
        return
    used = [name for name in REAL_FIXTURES if name in request.fixturenames]
    if used:
        pytest.fail(f"uses {used[0]} (the embedded model) but is not marked slow")
    from rlora import models
    from rlora.data import builtin

    def no_data(*_args):
        pytest.fail("reads the built-in data but is not marked slow")

    def no_conversion(*_args):
        pytest.fail("converts the embedded model but is not marked slow")

    load = models._load

    def no_model(auto_class, name_or_path, *args, **kwargs):
        loaded = load(auto_class, name_or_path, *args, **kwargs)  # a bad cache folder fails here, without the model
        if name_or_path in models.EMBEDDED_MODELS:
            pytest.fail("loads the embedded model but is not marked slow")
        return loaded

    monkeypatch.setattr(builtin, "_rows", no_data)  # listing the task names reads no data
    monkeypatch.setattr(models, "_gguf_to_safetensors", no_conversion)  # a test may fake the conversion over this
    monkeypatch.setattr(models, "_load", no_model)
