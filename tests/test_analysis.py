"""Head similarity, router usage and the plots, on tiny models with hand-computed expectations."""

import math

import pytest
import torch
from _tiny import F64, MLP, tiny_llama
from peft import get_peft_model

from rlora import RLoraConfig
from rlora.analysis import describe, head_projection, head_similarity, mean_pairwise_cosine, router_usage
from rlora.plots import plot_head_projection, plot_router_usage, plot_similarity
from rlora.reports import similarity_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_mean_pairwise_cosine_matches_hand_computed_values():
    heads = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # pairs: (0,1) = 0, (0,2) = 1/sqrt2, (1,2) = 1/sqrt2; computed in float32 (eps 1.2e-7): a few roundings
    assert mean_pairwise_cosine(heads) == pytest.approx((0 + 2 / math.sqrt(2)) / 3, rel=1e-6)
    assert mean_pairwise_cosine(torch.ones(4, 3, 2)) == pytest.approx(1.0, rel=1e-6)
    assert math.isnan(mean_pairwise_cosine(torch.ones(1, 5)))
    assert math.isnan(mean_pairwise_cosine(torch.zeros(3, 4)))  # HydraLoRA's heads at init: undefined, not 0


def test_describe_reads_the_layer_index_and_module_name():
    assert describe("base_model.model.model.layers.12.mlp.up_proj") == (12, "up_proj")
    assert describe("lm_head") == (-1, "lm_head")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_head_similarity_is_near_zero_for_random_heads_and_one_after_identical_updates(seed):
    model = get_peft_model(tiny_llama(seed), RLoraConfig(target_modules=MLP, num_heads=4))
    rows = head_similarity(model)
    assert [(r["layer"], r["module"]) for r in rows] == [
        (i, m) for i in range(2) for m in ("gate_proj", "up_proj", "down_proj")
    ]
    # independent Gaussian heads of D = d_out * r >= 128 entries: each cosine has sd 1/sqrt(D) <= 0.089, the mean
    # of the 6 pairs sd <= 0.036; 0.2 is more than 5 sd
    assert all(abs(r["mean_cosine"]) < 0.2 for r in rows)
    zeros = get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP, num_heads=4, head_init="zeros"))
    with torch.no_grad():
        for name, p in zeros.named_parameters():
            if "rlora_B" in name:  # every head gets the same update, as with identical gradients
                p.copy_(torch.randn(p.shape[0], 1, p.shape[1] // 4).expand(-1, 4, -1).reshape(p.shape))
    # identical heads: cosine 1 up to a few float32 roundings
    assert all(r["mean_cosine"] == pytest.approx(1.0, rel=1e-6) for r in head_similarity(zeros))


@pytest.mark.parametrize("seed", [0, 1])
def test_router_usage_averages_gates_over_real_tokens_only(seed):
    model = tiny_llama(seed, dtype=torch.float64)  # padded batch vs one prompt at a time: equal in exact arithmetic
    model = get_peft_model(model, RLoraConfig(target_modules=["up_proj"], num_heads=3)).eval()
    prompts = {"uniform": [[1, 2, 3], [4, 5]]}
    usage = router_usage(model, prompts)
    assert usage["uniform"]["tokens"] == 5
    # a zero router: every gate is the float64 softmax of zeros, 1/3 up to a few roundings of the average
    assert usage["uniform"]["mean_gate"] == pytest.approx([1 / 3] * 3, rel=1e-12)
    assert usage["uniform"]["entropy"] == pytest.approx(math.log(3), rel=1e-12)

    with torch.no_grad():  # a trained router: gates that differ from token to token, and from uniform
        for name, p in model.named_parameters():
            if "rlora_router" in name:
                p.normal_(std=0.3, generator=torch.Generator().manual_seed(seed))
    # compare with a naive computation: each prompt alone (no padding), the gates of its tokens averaged
    expected = []
    hidden = {}

    def keep(_module, args, _output, key):
        hidden[key] = args[0]

    layers = [m for n, m in model.named_modules() if n.endswith("up_proj") and hasattr(m, "rlora_router")]
    hooks = [m.register_forward_hook(lambda mod, a, o, k=i: keep(mod, a, o, k)) for i, m in enumerate(layers)]
    with torch.no_grad():
        for p in prompts["uniform"]:
            model(input_ids=torch.tensor([p]))
            expected.append(
                [torch.softmax(hidden[i][0] @ m.rlora_router["default"].T, -1) for i, m in enumerate(layers)]
            )
    for h in hooks:
        h.remove()
    per_layer = [torch.cat([e[i] for e in expected]).mean(0) for i in range(len(layers))]
    naive = torch.stack(per_layer).mean(0)
    got = router_usage(model, prompts)["uniform"]["mean_gate"]
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), naive, **F64)
    assert max(got) - min(got) > 0.1  # not the uniform answer again


def test_plots_are_written_as_non_empty_pngs(tmp_path):
    model = get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP, num_heads=3))
    rows = head_similarity(model)
    usage = router_usage(model, {"a": [[1, 2, 3]], "b": [[7, 8]]})
    projection = head_projection(model)
    assert set(projection) == {"gate_proj", "up_proj", "down_proj"}
    assert len(projection["up_proj"]["xy"]) == 2 * 3 and projection["up_proj"]["head"] == [0, 1, 2, 0, 1, 2]
    plot_similarity(rows, rows, tmp_path / "sim.png")
    plot_router_usage(usage, tmp_path / "router.png")
    plot_head_projection(projection, tmp_path / "heads.png")
    for name in ("sim.png", "router.png", "heads.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    table = similarity_table(rows, rows).splitlines()
    assert table[0] == "| layer | module | cosine at init | cosine trained |"
    assert len(table) == 2 + 6


def test_drawing_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a caller's choice, e.g. a notebook's inline backend
    try:
        plot_similarity(None, [{"layer": 0, "module": "up_proj", "mean_cosine": 0.5}], tmp_path / "s.png")
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "s.png").read_bytes().startswith(PNG_MAGIC)
    finally:
        matplotlib.use(before)
