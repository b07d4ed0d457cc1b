"""Exports where users serve: portable base names, READMEs with the servers' commands, GGUF adapters as llama.cpp's
converter writes them, the heads as per-request mixtures (exact in float64), and the fidelity every export carries."""

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from _tiny import F64, MLP, perturb_adapter, tiny_llama, untrained_runs
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from rlora import RLoraConfig
from rlora.cli import main
from rlora.commands.export import adapted_modules, export_run
from rlora.commands.export_heads import head_tensors
from rlora.errors import ConfigError
from rlora.export_gguf import CONVERT_BASE, base_gguf, gguf_tensors, permute_rows
from rlora.export_readme import vllm_max_lora_rank
from rlora.fidelity import ExampleScores, flag, paired
from rlora.models import portable_name
from rlora.stats import t_quantile_975


@pytest.fixture(scope="module")
def runs(workspace, tmp_path_factory) -> dict[str, Path]:
    return untrained_runs(workspace, tmp_path_factory.mktemp("deploy_runs"), perturb_scale=1.0)


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("deployed")
    run = str(runs["rlora"])
    as_gguf = ["--format", "gguf"]
    assert main(["export", run, *as_gguf, "--out", str(out / "f32")]) == 0
    assert main(["export", run, *as_gguf, "--outtype", "q8_0", "--no-fidelity", "--out", str(out / "q8")]) == 0
    assert main(["export", run, "--gates", "per-task", "--as-scales", *as_gguf, "--out", str(out / "heads")]) == 0
    assert main(["export", run, "--gates", "per-task", "--no-fidelity", "--out", str(out / "tasks")]) == 0
    return {name: out / name for name in ("f32", "q8", "heads", "tasks")}


def test_the_base_is_named_portably(exported, workspace):
    assert portable_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"  # not the converted cache folder
    assert portable_name("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    path, where = base_gguf("smollm2-135m")  # the embedded model ships as GGUF: llama.cpp's base as it is
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file() and path.name in where
    assert base_gguf("Qwen/Qwen2.5-0.5B") == (None, f"make it with llama.cpp's converter, `{CONVERT_BASE}`")
    config = json.loads((exported["f32"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(workspace / "model")  # the run config's model, as the user gave it
    heads = json.loads((exported["heads"] / "head_0" / "adapter_config.json").read_text())
    assert heads["base_model_name_or_path"] == str(workspace / "model")


@pytest.mark.parametrize(("rank", "expected"), [(1, 1), (2, 8), (8, 8), (9, 16), (16, 16), (17, 32), (300, 320)])
def test_vllm_max_lora_rank_is_the_least_value_vllm_accepts(rank, expected):
    assert vllm_max_lora_rank(rank) == expected


def test_the_readme_gives_the_servers_commands(exported, workspace):
    readme = (exported["f32"] / "README.md").read_text()
    base = workspace / "model"
    # rank 8: R-LoRA's r = 4 heads mixture and its offset
    assert f"vllm serve {base} --enable-lora --max-lora-rank 8 --max-loras 1 \\\n    --lora-modules f32=f32" in readme
    assert "llama-cli -m BASE.gguf --lora f32/adapter-f32.gguf --temp 0" in readme
    assert "python convert_hf_to_gguf.py BASE_MODEL_FOLDER --outfile base-f16.gguf --outtype f16" in readme
    tasks = (exported["tasks"] / "colors" / "README.md").read_text()
    assert f"python convert_lora_to_gguf.py colors --base {base} --outtype f16" in tasks  # a local base folder
    assert "## Fidelity" not in tasks  # --no-fidelity


def naive_gguf_row_order(d_out: int, n_head: int) -> list[int]:
    """For each row of a Llama q/k weight as llama.cpp stores it, the transformers row it holds: within a head of
    size h, GGUF rows 2i and 2i + 1 are rows i and i + h/2 (rope on adjacent pairs instead of halves)."""
    h = d_out // n_head
    return [head * h + (j // 2) + (j % 2) * (h // 2) for head in range(n_head) for j in range(h)]


def test_gguf_tensors_are_named_and_shaped_as_llama_cpp_loads_them():
    config = tiny_llama().config
    config.architectures = ["LlamaForCausalLM"]
    gen = torch.Generator().manual_seed(0)
    factors = {
        "model.layers.1.self_attn.q_proj": (torch.randn(32, 4, generator=gen), torch.randn(4, 32, generator=gen)),
        "model.layers.0.self_attn.k_proj": (torch.randn(16, 4, generator=gen), torch.randn(4, 32, generator=gen)),
        "model.layers.0.mlp.down_proj": (torch.randn(32, 4, generator=gen), torch.randn(4, 64, generator=gen)),
    }
    arch, tensors = gguf_tensors(factors, config)
    assert arch == "llama"
    assert sorted(tensors) == [
        "blk.0.attn_k.weight.lora_a",
        "blk.0.attn_k.weight.lora_b",
        "blk.0.ffn_down.weight.lora_a",
        "blk.0.ffn_down.weight.lora_b",
        "blk.1.attn_q.weight.lora_a",
        "blk.1.attn_q.weight.lora_b",
    ]
    B, A = factors["model.layers.1.self_attn.q_proj"]
    assert torch.equal(tensors["blk.1.attn_q.weight.lora_a"], A)
    assert torch.equal(tensors["blk.1.attn_q.weight.lora_b"], B[naive_gguf_row_order(32, 4)])  # 4 query heads
    B, _ = factors["model.layers.0.self_attn.k_proj"]
    assert torch.equal(tensors["blk.0.attn_k.weight.lora_b"], B[naive_gguf_row_order(16, 2)])  # 2 key-value heads
    assert torch.equal(tensors["blk.0.ffn_down.weight.lora_b"], factors["model.layers.0.mlp.down_proj"][0])
    assert torch.equal(permute_rows(torch.arange(8.0)[:, None], 1)[:, 0], torch.tensor([0, 4, 1, 5, 2, 6, 3, 7.0]))


def test_an_architecture_llama_cpp_is_not_written_for_is_a_clear_error():
    config = tiny_llama().config
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ConfigError, match=r"--format gguf: the base model's architecture GPT2LMHeadModel is not one"):
        gguf_tensors({}, config)


def read_gguf(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("which", ["f32", "q8"])
def test_the_gguf_adapter_holds_the_exported_lora(exported, which):
    from safetensors.torch import load_file

    folder = exported[which]
    outtype = "f32" if which == "f32" else "q8_0"
    fields, tensors = read_gguf(folder / f"adapter-{outtype}.gguf")
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0  # = the rank: scaling 1
    peft = load_file(str(folder / "adapter_model.safetensors"))
    assert len(tensors) == len(peft) == 12
    for layer in range(2):
        for hf, ours in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            prefix = f"base_model.model.model.layers.{layer}.mlp.{hf}"
            for ab in ("a", "b"):
                expected = peft[f"{prefix}.lora_{ab.upper()}.weight"].double()
                t = tensors[f"blk.{layer}.{ours}.weight.lora_{ab}"]
                assert [int(n) for n in t.shape] == list(reversed(expected.shape))  # ggml's ne: columns first
                got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64))
                got = got.reshape(expected.shape)
                if which == "f32":
                    assert t.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(got, expected)
                elif ab == "b":  # rows of rank 8: not whole q8_0 blocks of 32, so f16 as llama.cpp's converter does
                    assert t.tensor_type == gguf.GGMLQuantizationType.F16
                    assert ((got - expected).abs() <= expected.abs() * 2**-11).all()  # one f16 rounding
                else:
                    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
                    # q8_0: per block of 32, d = max|x| / 127 rounded to f16, each value round(x / d) * d: an error of
                    # at most d / 2, plus the f16 rounding of d times 127 steps
                    blocks = expected.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
                    bound = blocks * (0.5 + 127 * 2**-11)
                    assert ((got - expected).reshape(-1, 32).abs() <= bound).all()


@pytest.mark.numerics
def test_the_heads_mix_to_any_fixed_gate_model_in_float64():
    rlora = get_peft_model(
        tiny_llama(dtype=torch.float64),
        RLoraConfig(r=2, num_heads=3, target_modules=[*MLP, "q_proj"], head_init="random"),
    )
    perturb_adapter(rlora, scale=0.5)
    rlora.eval()
    layers = adapted_modules(rlora)
    adapters = head_tensors(layers)
    assert list(adapters) == ["head_0", "head_1", "head_2", "offset"]
    config = LoraConfig(r=2, lora_alpha=2, target_modules=[*MLP, "q_proj"], lora_dropout=0.0)
    plain = get_peft_model(tiny_llama(dtype=torch.float64), config, adapter_name="head_0")
    for name in adapters:
        if name != "head_0":
            plain.add_adapter(name, config)
        assert set_peft_model_state_dict(plain, adapters[name], adapter_name=name).unexpected_keys == []
    plain.base_model.set_adapter(list(adapters))
    plain.eval()
    from peft.tuners.lora import LoraLayer

    lora_layers = [m for m in plain.modules() if isinstance(m, LoraLayer)]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (2, 9), generator=gen)
    for _ in range(3):
        g = torch.rand(3, generator=gen, dtype=torch.float64).softmax(0)
        for layer in lora_layers:  # the request's scales: g_k for head k, 1 for the offset
            for k in range(3):
                layer.set_scale(f"head_{k}", g[k].item())
            layer.set_scale("offset", 1.0)

        def fixed(module, args, _output, g=g):
            B, A = module.fixed_gate_lora("default", g, torch.float64)
            return module.get_base_layer()(args[0]) + args[0] @ A.T @ B.T

        hooks = [layer.register_forward_hook(fixed) for layer in layers.values()]
        with torch.no_grad():
            expected = rlora(input_ids=ids).logits
            for h in hooks:
                h.remove()
            got = plain(input_ids=ids).logits
        torch.testing.assert_close(got, expected, **F64)  # the same algebra in float64 (see F64)
        with plain.disable_adapter():
            base = plain(input_ids=ids).logits
        assert (got - base).abs().max() > 1e-3  # the heads do change the model


def test_per_task_scales_are_each_tasks_mean_gates_averaged_over_layers(exported):
    heads = exported["heads"]
    assert sorted(p.name for p in heads.iterdir()) == [
        "README.md",
        "gates.json",
        "head_0",
        "head_1",
        "head_2",
        "offset",
    ]
    record = json.loads((heads / "gates.json").read_text())
    assert record["adapters"] == ["head_0", "head_1", "head_2", "offset"]
    for task in ("colors", "letters"):
        per_layer = json.loads((exported["tasks"] / task / "gates.json").read_text())["gates"]
        mean = [sum(g[k] for g in per_layer.values()) / len(per_layer) for k in range(3)]
        assert record["scales"][task] == pytest.approx(mean, abs=1e-12)
        assert list(record["fidelity"][task]["tasks"]) == [task]  # each task measured with its own scales
    assert (heads / "offset" / "adapter-f32.gguf").is_file()
    readme = (heads / "README.md").read_text()
    s = record["scales"]["colors"]
    request = [{"id": k, "scale": round(s[k], 6)} for k in range(3)] + [{"id": 3, "scale": 1.0}]
    assert json.dumps(request) in readme
    server = "llama-server -m BASE.gguf --lora-init-without-apply --lora head_0/adapter-f32.gguf --lora head_1/"
    assert server in readme
    assert f"llama-cli -m BASE.gguf --lora-scaled head_0/adapter-f32.gguf:{s[0]:.6g} --lora-scaled" in readme
    assert "vllm serve" not in readme  # vLLM applies one adapter per request: it cannot mix the heads


def naive_paired(routed_nll, fixed_nll, tokens, routed_ok, fixed_ok):
    n, total = len(tokens), sum(tokens)
    d_loss = [n * (f - r) / total for f, r in zip(fixed_nll, routed_nll, strict=True)]
    d_acc = [f - r for f, r in zip(fixed_ok, routed_ok, strict=True)]

    def ci(d):
        mean = sum(d) / len(d)
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
        return mean, t_quantile_975(len(d) - 1) * sd / math.sqrt(len(d))

    return ci(d_loss), ci(d_acc)


def test_paired_scores_are_the_task_loss_rise_and_accuracy_change_with_cis():
    routed = ExampleScores([2.0, 3.0, 1.0], [2, 3, 1], {"acc_ll": [1.0, 0.0, 1.0]})
    fixed = ExampleScores([2.5, 3.0, 1.6], [2, 3, 1], {"acc_ll": [1.0, 1.0, 0.0]})
    out = paired(routed, fixed)
    (loss_mean, loss_ci), (acc_mean, acc_ci) = naive_paired(routed.nll, fixed.nll, [2, 3, 1], [1, 0, 1], [1, 1, 0])
    assert out["n"] == 3
    assert out["loss"]["routed"] == pytest.approx(6 / 6) and out["loss"]["fixed"] == pytest.approx(7.1 / 6)
    assert out["loss"]["diff"] == pytest.approx(1.1 / 6) == pytest.approx(loss_mean)  # the token-weighted rise
    assert out["loss"]["ci"] == pytest.approx(loss_ci)
    assert out["acc_ll"] == pytest.approx({"routed": 2 / 3, "fixed": 2 / 3, "diff": 0.0, "ci": acc_ci})
    assert flag({"t": out}, 0.1) == [
        "t: the loss rises by 0.183 ± "
        f"{loss_ci:.3f} nats with fixed gates (more than 0.1); the routed model (`rlora serve`) serves this task better"
    ]
    assert flag({"t": out}, 0.2) == []


def test_every_export_carries_its_fidelity_as_rlora_eval_measures_it(exported, runs):
    from rlora.commands.eval import evaluate_run

    record = json.loads((exported["f32"] / "gates.json").read_text())
    fidelity = record["fidelity"]
    assert len(record["gates"]) == 6 and fidelity["max_loss_rise"] == 0.05
    routed = evaluate_run(runs["rlora"])
    assert main(["eval", str(runs["rlora"]), "--adapter", str(exported["f32"])]) == 0
    fixed = json.loads((runs["rlora"] / "eval_adapter_f32.json").read_text())
    for task in ("colors", "letters"):
        scores = fidelity["tasks"][task]
        assert scores["n"] == routed["tasks"][task]["n"] == 6
        for metric in ("loss", "acc_ll"):
            # the same examples through the same scoring, batched the same: float32 sums agree to ~1e-6
            assert scores[metric]["routed"] == pytest.approx(routed["tasks"][task][metric], rel=1e-5)
            assert scores[metric]["fixed"] == pytest.approx(fixed["tasks"][task][metric], rel=1e-5)
    readme = (exported["f32"] / "README.md").read_text()
    loss = fidelity["tasks"]["colors"]["loss"]
    assert f"| colors | 6 | {loss['routed']:.3f} | {loss['fixed']:.3f} |" in readme
    assert ("**Warning**" in readme) == bool(fidelity["warnings"])


def test_a_merged_export_carries_the_fidelity_of_its_fixed_gate_model(exported, runs, tmp_path):
    """The merged model is the fixed-gate model of the uniform-gate LoRA export: the same gates, the same measurement
    (the same examples through the same scoring of the same routed and fixed-gate adapters: equal numbers)."""
    assert main(["export", str(runs["rlora"]), "--merged", "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "gates.json").read_text())
    lora = json.loads((exported["f32"] / "gates.json").read_text())
    assert merged["gates"] == lora["gates"]
    assert merged["fidelity"] == lora["fidelity"]
    assert main(["export", str(runs["rlora"]), "--merged", "--no-fidelity", "--out", str(tmp_path / "bare")]) == 0
    assert json.loads((tmp_path / "bare" / "gates.json").read_text()) == {"gates": lora["gates"]}


def test_a_loss_rise_past_the_threshold_is_flagged(runs, tmp_path, caplog):
    (folder,) = export_run(runs["rlora"], "uniform", tmp_path / "out", deploy=_options(max_loss_rise=-1.0))
    record = json.loads((folder / "gates.json").read_text())
    assert [w.split(":")[0] for w in record["fidelity"]["warnings"]] == ["colors", "letters"]
    assert "**Warning** (loss rise above -1.0 nats):" in (folder / "README.md").read_text()
    assert "fixed gates: colors: the loss rises by" in caplog.text


def _options(**kwargs):
    from rlora.commands.export_deploy import DeployOptions

    return DeployOptions(**kwargs)


def test_an_exports_gates_json_is_a_gates_file(runs, exported, tmp_path):
    (folder,) = export_run(
        runs["rlora"], str(exported["f32"] / "gates.json"), tmp_path / "again", deploy=_options(fidelity=False)
    )
    assert (
        json.loads((folder / "gates.json").read_text())["gates"]
        == json.loads((exported["f32"] / "gates.json").read_text())["gates"]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "{adapter}/eval.json"], "--out {adapter}/eval.json: inside the adapter folder"),
        (["--out", "{tmp}/results.txt"], "--out {tmp}/results.txt: expected a file name ending in .json"),
    ],
)
def test_eval_adapter_never_writes_into_the_adapter(runs, exported, tmp_path, capsys, args, message):
    fill = {"adapter": exported["f32"], "tmp": tmp_path}
    argv = ["eval", str(runs["rlora"]), "--adapter", str(exported["f32"]), *[a.format(**fill) for a in args]]
    assert main(argv) == 2
    assert message.format(**fill) in capsys.readouterr().err


def test_eval_adapter_writes_where_out_says(runs, exported, tmp_path):
    out = tmp_path / "scores" / "fixed.json"
    assert main(["eval", str(runs["rlora"]), "--adapter", str(exported["tasks"] / "colors"), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["method"] == "adapter colors" and out.with_suffix(".md").is_file()


def test_generate_with_an_export_is_the_fixed_gate_models_greedy_text(runs, exported, workspace):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlora.commands.generate import Sampling, generate_run

    prompt = "Question: is the sky blue?"
    (got,) = generate_run(
        runs["rlora"], [prompt], sampling=Sampling(max_new_tokens=6), adapter=exported["f32"], stream=False
    )
    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace / "model"), exported["f32"])
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0].tolist()
    assert got["ids"] == expected


LLAMA_CPP_RUN = """
model: smollm2-135m
output_dir: {out}
data:
  tasks: []
  jsonl: [{colors}, {letters}]
  max_eval_per_task: 4
  max_length: 64
adapter:
  r: 4
  num_heads: 3
  target_modules: [q_proj, k_proj, v_proj, up_proj, down_proj]
"""


def llama_cpp_greedy(llm, adapters: list, scales: list[float], prompt: list[int], steps: int):
    """Greedy tokens from llama.cpp with `adapters` at `scales`, and the log-softmax at each step (float64)."""
    import ctypes

    import llama_cpp

    array = (llama_cpp.llama_adapter_lora_p_ctypes * max(1, len(adapters)))(*adapters)
    weights = (ctypes.c_float * max(1, len(scales)))(*scales)
    assert llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, array, len(adapters), weights) == 0
    llm.reset()
    tokens, logprobs = list(prompt), []
    for _ in range(steps):
        llm.eval(tokens[llm.n_tokens :])
        logits = torch.from_numpy(llm.scores[llm.n_tokens - 1].astype(np.float64))
        logprobs.append(logits.log_softmax(-1))
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt) :], logprobs


def teacher_forced(model, tokens: list[int], prompt_len: int) -> list[torch.Tensor]:
    """The model's log-softmax (float64) at each generated position of `tokens`, read in one forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0, prompt_len - 1 : -1]
    return list(logits.double().log_softmax(-1))


def llama_cpp_run(workspace, tmp_path, cache_dir) -> str:
    """A run on the embedded model whose R-LoRA adapter (q, k, v, up, down) is moved off its init, exported three
    ways: uniform gates as GGUF, gates [0.7, 0.3, 0] as PEFT, and the heads as GGUF adapters."""
    from transformers import AutoModelForCausalLM

    from rlora.models import resolve_model
    from rlora.run import RunFolder
    from rlora.runconfig import load_run_config
    from rlora.train import build_peft_model

    config = tmp_path / "run.yaml"
    files = {name: workspace / f"{name}.jsonl" for name in ("colors", "letters")}
    config.write_text(LLAMA_CPP_RUN.format(out=tmp_path / "run", **files))
    cfg = load_run_config(config, [])
    folder = RunFolder(cfg.output_dir)
    folder.write_config(cfg)
    model = build_peft_model(cfg, AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model, cache_dir)))
    model.save_pretrained(folder.adapter_init)
    perturb_adapter(model, scale=0.02)  # heads off their init, as training moves them: the export is not the base
    model.save_pretrained(folder.adapter)
    run, common = str(folder.root), ["--no-fidelity", "--cache-dir", str(cache_dir)]
    (tmp_path / "mix.json").write_text("[0.7, 0.3, 0.0]")  # two heads mixed, the same gates in every layer
    for args in (
        ["--format", "gguf", "--out", str(tmp_path / "uniform")],
        ["--gates", str(tmp_path / "mix.json"), "--out", str(tmp_path / "mix")],
        ["--as-scales", "--format", "gguf", "--out", str(tmp_path / "heads")],
    ):
        assert main(["export", run, *args, *common]) == 0
    return run


@pytest.mark.slow
@pytest.mark.llamacpp
def test_llama_cpp_generates_the_fixed_gate_models_text(workspace, tmp_path, model_cache_dir):
    """llama.cpp itself (llama-cpp-python) loads the embedded base GGUF with rlora's GGUF adapters and generates
    greedily the text `rlora generate --adapter` gives with the fixed-gate model; the same with two heads mixed per
    request by scales. Run by scripts/check_llamacpp.sh (it builds llama.cpp once)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from rlora.adapters import load_adapter
    from rlora.commands.generate import Sampling, generate_run
    from rlora.models import embedded_gguf_path
    from rlora.run import load_run

    run = llama_cpp_run(workspace, tmp_path, model_cache_dir)
    text, steps = "Question: what colour is the sky on a clear day?\nAnswer:", 12
    base_model = load_run(run, str(model_cache_dir), adapter=False)
    prompt = base_model.tokenizer(text).input_ids
    llm = llama_cpp.Llama(
        model_path=str(embedded_gguf_path("smollm2-135m")), n_ctx=128, logits_all=True, verbose=False, n_threads=2
    )

    def load(path):
        handle = llama_cpp.llama_adapter_lora_init(llm._model.model, str(path).encode())
        assert handle is not None, path
        return handle

    heads = [load(tmp_path / "heads" / n / "adapter-f32.gguf") for n in ("head_0", "head_1", "head_2", "offset")]
    base_tokens, base_cpp = llama_cpp_greedy(llm, [], [], prompt, steps)
    # llama.cpp against transformers on the base alone, after the prompt: its Q4_1 weights times 8-bit activations
    base_hf = teacher_forced(base_model.model, prompt + base_tokens, len(prompt))[0]
    base_gap = (base_cpp[0] - base_hf).abs().max().item()
    cases = {
        "uniform": ([load(tmp_path / "uniform" / "adapter-f32.gguf")], [1.0], tmp_path / "uniform"),
        "two heads mixed by scales": (heads, [0.7, 0.3, 0.0, 1.0], tmp_path / "mix"),
    }
    report = {"base_gap": base_gap}
    for case, (handles, scales, export) in cases.items():
        tokens, cpp = llama_cpp_greedy(llm, handles, scales, prompt, steps)
        sampling = Sampling(max_new_tokens=steps)
        (out,) = generate_run(
            run, [text], sampling=sampling, adapter=export, cache_dir=str(model_cache_dir), stream=False
        )
        expected = out["ids"][len(prompt) :]
        assert out["ids"][: len(prompt)] == prompt and expected != base_tokens  # the adapter changes the text
        fixed = load_adapter(load_run(run, str(model_cache_dir), adapter=False).model, export).eval()
        hf = teacher_forced(fixed, out["ids"], len(prompt))
        same = next((i for i, (a, b) in enumerate(zip(tokens, expected, strict=False)) if a != b), steps)
        # after the prompt the log-probabilities differ by about the base's quantization gap, and by less than the
        # adapter itself changes them (`effect`): a wrong adapter (e.g. q/k rows not permuted as llama.cpp stores
        # those weights) is off by about the adapter's effect
        gap, effect = (cpp[0] - hf[0]).abs().max().item(), (hf[0] - base_hf).abs().max().item()
        assert gap <= 2 * base_gap + 0.05 and gap < effect, (case, gap, base_gap, effect)
        if same < steps:  # both read the same tokens up to here: a different choice only where the two best are close
            top = hf[same].topk(2).values
            assert (top[0] - top[1]).item() <= 2 * (cpp[same] - hf[same]).abs().max().item(), (case, same)
        report[case] = {"same_tokens": same, "of": steps, "gap": gap, "effect": effect}
        report[case]["text"] = base_model.tokenizer.decode(tokens)
    print(json.dumps(report))


@pytest.mark.parametrize("flag", [["--as-scales"], ["--format", "gguf"]])
def test_merged_is_not_mixed_with_adapter_formats(runs, tmp_path, capsys, flag):
    assert main(["export", str(runs["rlora"]), "--merged", *flag, "--out", str(tmp_path / "o")]) == 2
    assert "--merged writes a full model; --as-scales and --format gguf write adapters: choose one" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "o").exists()


def test_a_hub_base_readme_names_the_hub_id_and_the_least_vllm_rank():
    from rlora.export_readme import ExportFacts, lora_readme

    hub = "HuggingFaceTB/SmolLM2-135M-Instruct"
    facts = ExportFacts(hub, 18, ["q_proj", "v_proj"], "uniform (1/K for every head)", "somewhere")
    readme = lora_readme(facts, "exp")
    # r = 9 with the offset: rank 18, past vLLM's default --max-lora-rank of 16; 32 is the next value it accepts
    assert f"vllm serve {hub} --enable-lora --max-lora-rank 32 --max-loras 1 \\\n    --lora-modules exp=exp" in readme
    assert f"python convert_lora_to_gguf.py exp --base-model-id {hub} --outtype f16" in readme
    assert "## Fidelity" not in readme  # none measured
