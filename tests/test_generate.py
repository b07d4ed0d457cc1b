"""`rlora generate`: text from a run (streamed), the routing map (PNG / HTML) and its values, and bad input."""

import io
import sys
from pathlib import Path

import pytest
import torch
from _tiny import adapted_layer_calls, untrained_runs

from rlora.analysis import favoured_heads
from rlora.cli import main
from rlora.commands.generate import Sampling, generate_run
from rlora.run import load_run


@pytest.fixture(scope="module")
def runs(workspace, tmp_path_factory) -> dict[str, Path]:
    """A finished run folder of each kind (R-LoRA, plain LoRA), made without training; routers moved off uniform."""
    return untrained_runs(workspace, tmp_path_factory.mktemp("gen_runs"), perturb_scale=1.0)


def test_generate_streams_text_and_draws_the_routing_map(runs, tmp_path, capsys):
    png = tmp_path / "routing.png"
    prompts = ["Question: is the sky blue?", "Answer:"]
    code = main(["generate", str(runs["rlora"]), *prompts, "--routing", str(png), "--max-new-tokens", "48"])
    assert code == 0
    out = capsys.readouterr().out
    assert "=== Question: is the sky blue?" in out and "=== Answer:" in out
    assert f"routing map written to {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_generated_text_is_greedy_and_matches_transformers(runs):
    results = generate_run(runs["rlora"], ["Answer: yes"], sampling=Sampling(max_new_tokens=5), stream=False)
    run = load_run(runs["rlora"])
    ids = run.tokenizer("Answer: yes")["input_ids"]
    expected = run.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False)[0].tolist()
    assert results[0]["ids"] == expected
    assert results[0]["text"] == run.tokenizer.decode(expected[len(ids) :], skip_special_tokens=True)


def test_prompts_come_from_stdin_one_per_line(runs, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("first prompt\n\nsecond prompt\n"))
    assert main(["generate", str(runs["rlora"]), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "=== first prompt" in out and "=== second prompt" in out


def test_routing_html_is_a_coloured_table(runs, tmp_path):
    html = tmp_path / "routing.html"
    sampling = Sampling(max_new_tokens=48)  # within the tiny model's 64-token context
    (result,) = generate_run(runs["rlora"], ["Answer: no"], sampling=sampling, routing=html, stream=False)
    text = html.read_text()
    assert text.startswith("<!DOCTYPE html>") and "head 0" in text and "head 2" in text
    assert text.count("<tr>") == len(result["tokens"]) + 1


def test_the_map_is_the_argmax_gate_of_each_token_and_layer(runs):
    run = load_run(runs["rlora"])
    model = run.model.double()
    ids = run.tokenizer("Question: is the sky blue? Answer: yes")["input_ids"]
    found = favoured_heads(model, ids)
    layers = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "RLoraLinear"]
    assert found["heads"].shape == (len(ids), len(layers)) and found["num_heads"] == 3
    assert found["layers"][:3] == ["0.gate_proj", "0.up_proj", "0.down_proj"]
    name, layer = layers[1]
    with adapted_layer_calls(model) as calls, torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    (x,) = [x for m, x, _ in calls if m is layer]
    router = layer.rlora_router["default"].detach()
    naive = []
    for t in range(len(ids)):  # softmax by hand, then the largest gate
        logits = [sum(float(router[k, i]) * float(x[0, t, i]) for i in range(x.shape[-1])) for k in range(3)]
        exp = [torch.tensor(v).exp().item() for v in logits]
        gates = [e / sum(exp) for e in exp]
        naive.append(max(range(3), key=gates.__getitem__))
    assert found["heads"][:, 1].tolist() == naive
    assert len(set(found["heads"].flatten().tolist())) > 1  # a moved router: not one head everywhere


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "{tmp}/nothing", "hi"], "{tmp}/nothing"),
        (["generate", "{lora}", "hi", "--routing", "{tmp}/r.png"], "a plain LoRA run has one head and no router"),
        (["generate", "{rlora}", "hi", "--routing", "{tmp}/r.pdf"], "expected a file ending in .png or .html"),
    ],
)
def test_bad_input_is_one_line(runs, tmp_path, capsys, argv, message):
    fill = {"tmp": tmp_path, "lora": runs["lora"], "rlora": runs["rlora"]}
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rlora: error: "), err
    assert message.format(**fill) in err
    assert not (tmp_path / "r.png").exists()


def test_generate_refuses_an_empty_prompt_and_one_past_the_models_context(runs, capsys):
    run = str(runs["rlora"])
    assert main(["generate", run, "Answer: yes", "  "]) == 2
    assert capsys.readouterr().err == "rlora: error: prompt 2 is empty; give the text to continue\n"
    ids = load_run(run).tokenizer("Answer: yes")["input_ids"]
    # the tiny model's context is 64 tokens (max_position_embeddings)
    assert main(["generate", run, "Answer: yes", "--max-new-tokens", "1000000000"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"rlora: error: prompt 1: its {len(ids)} tokens and --max-new-tokens 1000000000 exceed the model's context "
        "of 64 tokens; shorten the prompt or lower --max-new-tokens"
    )
    assert main(["generate", run, "yes " * 70, "--max-new-tokens", "1"]) == 2
    assert "exceed the model's context of 64 tokens" in capsys.readouterr().err.splitlines()[-1]
    assert main(["generate", run, "Answer: yes", "--max-new-tokens", str(64 - len(ids))]) == 0
