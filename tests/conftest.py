"""Shared fixtures: a tiny offline word-level tokenizer and the converted embedded model (once per session)."""

import json
import os
import random
from pathlib import Path

import pytest
from _tiny import tiny_model_dir
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

TINY_WORDS = [
    "What",
    "is",
    "two",
    "plus",
    "four",
    "?",
    "Answer",
    ":",
    "A",
    "B",
    "C",
    "D",
    ".",
    "yes",
    "no",
    "format",
    "/",
    "user",
    "assistant",
    "red",
    "blue",
    "sky",
    "the",
]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m.role }} : {{ m.content }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: ids 0 <pad>, 1 <eos>, 2 <unk>, then TINY_WORDS in order from 3; splits on spaces/punctuation."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(TINY_WORDS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


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
