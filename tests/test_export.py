"""`rlora export`: plain PEFT LoRA adapters equal to the R-LoRA model with fixed gates, loadable by bare PEFT in a
fresh process, with the tensor names vLLM and llama.cpp accept; per-task gates; merged models; bad input."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _tiny import F64, MLP, perturb_adapter, tiny_gpt2, tiny_llama, untrained_runs, word_tokenizer
from peft import get_peft_model, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlora import RLoraConfig
from rlora.cli import main
from rlora.commands.export import adapted_modules, export_run, lora_config, lora_tensors, write_merged
from rlora.errors import ConfigError, RunFolderError
from rlora.run import load_run

# The tensor name rules of the servers, from their documented loaders:
# - vLLM (`vllm.lora.utils.parse_fine_tuned_lora_name`): a PEFT key "base_model.model.<module>.lora_A.weight" or
#   "...lora_B.weight" (anything else: "<name> is unsupported LoRA weight");
# - llama.cpp (`convert_lora_to_gguf.py`): names ending in ".lora_A.weight" / ".lora_B.weight" ("Not a lora_A or
#   lora_B tensor" otherwise), the "base_model.model." prefix removed to find the base tensor.
VLLM_NAME = re.compile(r"^base_model\.model\.(?P<module>[\w.]+)\.lora_(?P<ab>[AB])\.weight$")
LLAMA_CPP_SUFFIX = (".lora_A.weight", ".lora_B.weight")


@pytest.fixture(scope="module")
def runs(workspace, tmp_path_factory) -> dict[str, Path]:
    return untrained_runs(workspace, tmp_path_factory.mktemp("export_runs"), perturb_scale=1.0)


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exported")
    assert main(["export", str(runs["rlora"]), "--gates", "uniform", "--out", str(out / "uniform")]) == 0
    assert main(["export", str(runs["rlora"]), "--gates", "per-task", "--out", str(out / "tasks")]) == 0
    return {"uniform": out / "uniform", "tasks": out / "tasks"}


def naive_fixed_gate_delta(layer, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """s * sum_k g_k B_k A x - offset_B offset_A x, one head at a time (the R-LoRA layer with its router fixed)."""
    r = layer.r["default"]
    A, B = layer.rlora_A["default"], layer.rlora_B["default"]
    out = sum(layer.scaling["default"] * gates[k] * (x @ A.T) @ B[:, k * r : (k + 1) * r].T for k in range(len(gates)))
    if "default" in layer.rlora_offset_A:
        out = out - (x @ layer.rlora_offset_A["default"].T) @ layer.rlora_offset_B["default"].T
    return out


@pytest.mark.numerics
@pytest.mark.parametrize("head_init", ["random", "zeros"])
def test_the_exported_lora_is_the_fixed_gate_model_in_float64(head_init):
    rlora = get_peft_model(
        tiny_llama(dtype=torch.float64), RLoraConfig(r=2, num_heads=3, target_modules=MLP, head_init=head_init)
    )
    perturb_adapter(rlora, scale=0.5)
    rlora.eval()
    layers = adapted_modules(rlora)
    gen = torch.Generator().manual_seed(0)
    gates = {name: torch.rand(3, generator=gen, dtype=torch.float64).softmax(0) for name in layers}
    tensors, rank = lora_tensors(layers, gates)
    assert rank == (4 if head_init == "random" else 2)  # 2r with R-LoRA's offset, r without
    plain = get_peft_model(tiny_llama(dtype=torch.float64), lora_config(layers, rank, None, rlora))
    assert set_peft_model_state_dict(plain, tensors).unexpected_keys == []
    plain.eval()

    def fixed(module, args, _output):
        return module.get_base_layer()(args[0]) + naive_fixed_gate_delta(module, args[0], gates[by_module[module]])

    by_module = {layer: name for name, layer in layers.items()}
    hooks = [layer.register_forward_hook(fixed) for layer in layers.values()]
    ids = torch.randint(0, 97, (2, 9), generator=gen)
    with torch.no_grad():
        expected = rlora(input_ids=ids).logits
        for h in hooks:
            h.remove()
        got = plain(input_ids=ids).logits
        routed = rlora(input_ids=ids).logits
    torch.testing.assert_close(got, expected, **F64)  # the same algebra in float64 (see F64)
    assert (routed - expected).abs().max() > 1e-3  # the routed model is another function: fixed gates cost something


@pytest.mark.numerics
@pytest.mark.parametrize(
    ("make", "targets"),
    [(tiny_gpt2, ["c_attn", "c_fc", "c_proj"]), (tiny_llama, ["q_proj", "v_proj", *MLP])],
    ids=["gpt2-conv1d", "llama-linear"],
)
def test_the_merged_export_is_the_fixed_gate_model_in_float64_for_every_layer_layout(make, targets, tmp_path):
    """`export --merged` writes the base with each layer's fixed-gate update merged in the layer's own layout: GPT-2's
    Conv1D stores its weight transposed (d_in, d_out); its c_attn (32 -> 96), c_fc (32 -> 128) and MLP c_proj
    (128 -> 32) are non-square, the attention's c_proj (32 -> 32) square (where a wrong layout would be silent).
    The model saved and loaded again equals the R-LoRA model with its routers replaced by those fixed gates, within
    F64: the same algebra in float64, summed in another order ((W + BA) x against W x + B (A x)), relative rounding
    about 1e-16 per operation on values of order 1. The run's own model is left as it was (the merge is on a copy)."""
    rlora = get_peft_model(make(dtype=torch.float64), RLoraConfig(r=2, num_heads=3, target_modules=targets)).eval()
    perturb_adapter(rlora, scale=0.5)
    layers = adapted_modules(rlora)
    gen = torch.Generator().manual_seed(1)
    gates = {name: torch.rand(3, generator=gen, dtype=torch.float64).softmax(0) for name in layers}
    ids = torch.randint(0, 97, (2, 9), generator=gen)
    with torch.no_grad():
        routed = rlora(input_ids=ids).logits
    before = {k: v.clone() for k, v in rlora.state_dict().items()}
    write_merged(rlora, word_tokenizer(), gates, tmp_path / "merged")
    assert all(torch.equal(v, before[k]) for k, v in rlora.state_dict().items())  # merged on a copy: untouched

    def fixed(module, args, _output):
        return module.get_base_layer()(args[0]) + naive_fixed_gate_delta(module, args[0], gates[by_module[module]])

    by_module = {layer: name for name, layer in layers.items()}
    hooks = [layer.register_forward_hook(fixed) for layer in layers.values()]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float64).eval()
    with torch.no_grad():
        expected = rlora(input_ids=ids).logits
        for h in hooks:
            h.remove()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, **F64)
    assert (routed - expected).abs().max() > 1e-3  # the gates are fixed for real: the routed model differs


def test_the_export_is_a_plain_peft_lora_adapter_with_server_compatible_names(exported):
    folder = exported["uniform"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "gates.json",
    ]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == config["lora_alpha"] == 8  # rank 2r (r=4 + the offset's 4), scaling alpha/r = 1
    assert config["use_rslora"] is False and config["lora_dropout"] == 0.0 and config["bias"] == "none"
    assert config["use_dora"] is False and sorted(config["target_modules"]) == sorted(MLP)
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        names = list(f.keys())  # noqa: SIM118 (not a dict)
        shapes = {n: f.get_slice(n).get_shape() for n in names}
    assert len(names) == 2 * 2 * len(MLP)  # 2 layers, 3 modules, A and B
    for name in names:
        match = VLLM_NAME.match(name)
        assert match and name.endswith(LLAMA_CPP_SUFFIX), name
        assert match["module"].rsplit(".", 1)[-1] in MLP
        assert shapes[name][0 if match["ab"] == "A" else 1] == config["r"]
    gates = json.loads((folder / "gates.json").read_text())["gates"]
    assert len(gates) == 6 and all(g == [1 / 3] * 3 for g in gates.values())


BARE_PEFT = """
import sys
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

base, adapter, out = sys.argv[1:4]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).double()
deltas = {n.removeprefix("base_model.model."): m.get_delta_weight("default").contiguous()
          for n, m in model.named_modules() if isinstance(m, LoraLayer)}
save_file(deltas, out)
print("rlora loaded:", any(name == "rlora" or name.startswith("rlora.") for name in sys.modules))
"""


@pytest.mark.numerics
@pytest.mark.parametrize("which", ["uniform", "tasks/colors"])
def test_bare_peft_loads_the_export_in_a_fresh_process(exported, runs, workspace, tmp_path, which):
    folder = exported["uniform"] if which == "uniform" else exported["tasks"] / "colors"
    out = tmp_path / "deltas.safetensors"
    script = textwrap.dedent(BARE_PEFT)
    done = subprocess.run(
        [sys.executable, "-c", script, str(workspace / "model"), str(folder), str(out)],
        capture_output=True,
        text=True,
        timeout=300,  # a fresh interpreter loading torch on 2 busy cores
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rlora loaded: False" in done.stdout
    deltas = load_file(str(out))
    model = load_run(runs["rlora"]).model.double()
    gates = json.loads((folder / "gates.json").read_text())["gates"]
    layers = adapted_modules(model)
    assert sorted(deltas) == sorted(layers)
    eps32 = torch.finfo(torch.float32).eps
    for name, layer in layers.items():
        g = torch.tensor(gates[name], dtype=torch.float64)
        expected = layer.get_delta_weight("default", g)
        B, A = layer.fixed_gate_lora("default", g)
        # the export stores B in float32: one rounding of each entry (relative eps32/2) carried through B @ A; A and
        # the offset are float32 parameters already, stored exactly; plus float64 rounding (F64)
        bound = eps32 * (B.abs() @ A.abs()) + F64["atol"]
        assert ((deltas[name] - expected).abs() <= bound).all(), name
        assert expected.abs().max() > 1e-2


@pytest.mark.numerics
def test_per_task_gates_are_each_tasks_mean_gates_over_its_training_tokens(exported, runs):
    run = load_run(runs["rlora"])
    model = run.model.eval()
    layers = adapted_modules(model)
    assert sorted(p.name for p in exported["tasks"].iterdir()) == ["colors", "letters"]
    from rlora.data import gold_spans

    names = list(run.plan.tasks)
    for t, task in enumerate(names):
        gates = json.loads((exported["tasks"] / task / "gates.json").read_text())["gates"]
        rows = sorted(set(run.plan.mixture[1][run.plan.mixture[0] == t].tolist()))
        sums = {name: torch.zeros(3, dtype=torch.float64) for name in layers}
        tokens = 0
        for i in rows:  # each example alone, no padding: the mean over every token of every example
            span = gold_spans(run.tokenizer, run.plan.train_example(t, i), False, run.cfg.data.max_length)
            ids = torch.tensor([span.prompt + span.answer])
            seen = {}
            hooks = [
                layer.register_forward_hook(
                    lambda m, a, _o, n=name, seen=seen: seen.__setitem__(n, m.gates(a[0], "default"))
                )
                for name, layer in layers.items()
            ]
            with torch.no_grad():
                model(input_ids=ids)
            for h in hooks:
                h.remove()
            for name in layers:
                sums[name] += seen[name][0].double().sum(0)
            tokens += ids.shape[1]
        for name in layers:
            # float32 gates summed over ~1e3 tokens in another order and batching: agree to ~1e-6
            torch.testing.assert_close(
                torch.tensor(gates[name], dtype=torch.float64), sums[name] / tokens, atol=1e-5, rtol=0
            )
    first, second = (json.loads((exported["tasks"] / t / "gates.json").read_text())["gates"] for t in names)
    assert first != second


@pytest.mark.numerics
def test_merged_export_is_the_base_model_plus_the_fixed_gate_update(runs, workspace, tmp_path):
    out = tmp_path / "merged"
    assert main(["export", str(runs["rlora"]), "--merged", "--out", str(out)]) == 0
    merged = load_file(str(out / "model.safetensors"))
    base = load_file(str(workspace / "model" / "model.safetensors"))
    layers = adapted_modules(load_run(runs["rlora"]).model.double())
    eps32 = torch.finfo(torch.float32).eps
    for name, layer in layers.items():
        key = f"{name}.weight"
        expected = base[key].double() + layer.get_delta_weight("default")
        # the sum is computed in float64 (F64) and rounded once to float32 (relative eps32/2)
        assert ((merged[key].double() - expected).abs() <= eps32 * expected.abs() + F64["atol"]).all(), key
    untouched = [k for k in base if not any(k == f"{n}.weight" for n in layers)]
    assert all(torch.equal(merged[k], base[k]) for k in untouched if k in merged)  # copied, not computed
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_a_gates_file_with_the_wrong_number_of_heads_is_refused(runs, tmp_path):
    bad = tmp_path / "gates.json"
    bad.write_text("[0.5, 0.5]")
    with pytest.raises(ConfigError, match=r"gates.json: layer 'model.layers.0.mlp.gate_proj': expected 3 non-negative"):
        export_run(runs["rlora"], str(bad), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_gates_list_file_applies_to_every_layer(runs, tmp_path):
    file = tmp_path / "gates.json"
    file.write_text("[1, 0, 0]")
    (folder,) = export_run(runs["rlora"], str(file), tmp_path / "out")
    assert set(map(tuple, json.loads((folder / "gates.json").read_text())["gates"].values())) == {(1.0, 0.0, 0.0)}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gates", "task:nope"], "--gates task:nope: the run trained on colors, letters"),
        (["--gates", "sometimes"], "--gates 'sometimes': expected uniform, per-task, task:NAME or a JSON file"),
    ],
)
def test_bad_gates_are_one_line_errors(runs, tmp_path, capsys, args, message):
    assert main(["export", str(runs["rlora"]), *args, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_an_export_replaces_an_earlier_export_only(runs, tmp_path):
    (folder,) = export_run(runs["rlora"], "uniform", tmp_path / "out")
    assert export_run(runs["rlora"], "uniform", folder) == [folder]  # an earlier export: replaced
    with pytest.raises(ConfigError, match=r"--out .*rlora: exists and is not an earlier export \(no gates.json\)"):
        export_run(runs["rlora"], "uniform", runs["rlora"])


def test_a_plain_lora_run_is_not_exported(runs, tmp_path):
    with pytest.raises(RunFolderError, match="a plain LoRA run's adapter is already a PEFT LoRA adapter"):
        export_run(runs["lora"], "uniform", tmp_path / "o")


def test_eval_adapter_scores_an_adapter_folder_as_rlora_eval_scores_the_run(runs, exported):
    from rlora.commands.eval import evaluate_run

    routed = evaluate_run(runs["rlora"])
    assert main(["eval", str(runs["rlora"]), "--adapter", str(runs["rlora"] / "adapter")]) == 0
    same = json.loads((runs["rlora"] / "eval_adapter_adapter.json").read_text())
    assert not (runs["rlora"] / "adapter" / "eval.json").exists()  # the adapter folder is left as it was
    for task, scores in routed["tasks"].items():  # the same model and examples, scored the same way
        for metric, value in scores.items():
            expected = value if isinstance(value, str) or value is None else pytest.approx(value, rel=1e-6)
            assert same["tasks"][task][metric] == expected, (task, metric)
    assert main(["eval", str(runs["rlora"]), "--adapter", str(exported["uniform"])]) == 0
    written = json.loads((runs["rlora"] / "eval_adapter_uniform.json").read_text())
    assert not (exported["uniform"] / "eval.json").exists()  # the export is left as it was
    assert written["method"] == "adapter uniform" and written["adapter"] == str(exported["uniform"])
    assert {t: r["n"] for t, r in written["tasks"].items()} == {t: r["n"] for t, r in routed["tasks"].items()}
    assert "adapter uniform" in (runs["rlora"] / "eval_adapter_uniform.md").read_text()


def test_eval_adapter_needs_a_run_folder_without_base(runs, exported, capsys):
    assert main(["eval", str(runs["rlora"]), "--base", "--adapter", str(exported["uniform"])]) == 2
    assert "--adapter: evaluates an adapter on a run folder's held-out data; give a run folder, no --base" in (
        capsys.readouterr().err
    )
