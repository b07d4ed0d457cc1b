"""Mixed-adapter batches: `adapter_names=[...]` in `forward` and `generate` gives every row its own adapter, exactly
as if that row ran alone with that adapter active (PEFT's LoRA contract), for R-LoRA adapters."""

import pytest
import torch
from _tiny import F64, MLP, tiny_llama
from peft import get_peft_model

from rlora import RLoraConfig

pytestmark = pytest.mark.numerics  # float64 results of matmul kernels compared against a bound

NAMES = ["default", "b", "__base__", "b"]  # row i runs adapter NAMES[i]; "__base__" is the base model alone


def move_off_init(model: torch.nn.Module, adapter: str, seed: int) -> None:
    """Every parameter of `adapter` (heads, A, router) moved from its init, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{adapter}" in name and "rlora_" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_llama(dtype=torch.float64), RLoraConfig(r=2, num_heads=3, target_modules=MLP))
    peft_model.add_adapter(
        "b", RLoraConfig(r=3, num_heads=2, target_modules=MLP, head_init="zeros", router_init="random")
    )
    move_off_init(peft_model, "default", seed=1)
    move_off_init(peft_model, "b", seed=2)
    return peft_model.eval()


def alone(model, name: str, fn):
    """`fn()` with only adapter `name` active ("__base__": with the adapters disabled)."""
    if name == "__base__":
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    try:
        return fn()
    finally:
        model.set_adapter("default")


def test_a_mixed_batch_forward_equals_each_row_alone(model):
    ids = torch.randint(0, 97, (len(NAMES), 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=NAMES).logits
        rows = [alone(model, n, lambda i=i: model(input_ids=ids[i : i + 1]).logits[0]) for i, n in enumerate(NAMES)]
    for i in range(len(NAMES)):
        torch.testing.assert_close(mixed[i], rows[i], **F64)  # same algebra, float64 (see F64)
    # the adapters really differ, so a row given the wrong adapter would be caught far above F64
    assert (rows[0] - rows[1]).abs().max() > 1e-2 and (rows[1] - rows[2]).abs().max() > 1e-2


def test_a_mixed_batch_generates_each_rows_own_greedy_text(model):
    ids = torch.randint(0, 97, (len(NAMES), 5), generator=torch.Generator().manual_seed(4))
    greedy = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=NAMES, **greedy)
        rows = [
            alone(model, n, lambda i=i: model.generate(input_ids=ids[i : i + 1], **greedy)[0])
            for i, n in enumerate(NAMES)
        ]
    assert [row.tolist() for row in mixed] == [row.tolist() for row in rows]
    assert len({tuple(row.tolist()) for row in rows}) > 1  # the adapters steer generation apart


def test_beam_search_keeps_each_rows_adapter_on_its_beams(model):
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(6))
    beams = {"max_new_tokens": 4, "do_sample": False, "num_beams": 3, "pad_token_id": 0}
    names = ["b", "default"]
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **beams)
        rows = [
            alone(model, n, lambda i=i: model.generate(input_ids=ids[i : i + 1], **beams)[0])
            for i, n in enumerate(names)
        ]
    assert [row.tolist() for row in mixed] == [row.tolist() for row in rows]


def test_the_active_adapter_is_not_what_a_mixed_batch_uses(model):
    ids = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.set_adapter("default")
        first = model(input_ids=ids, adapter_names=["b", "b"]).logits
        model.set_adapter("b")
        second = model(input_ids=ids).logits
        model.set_adapter("default")
    torch.testing.assert_close(first, second, **F64)


@pytest.mark.parametrize(
    ("names", "error", "message"),
    [
        (["default", "c"], ValueError, "adapter_names: no adapter named 'c'; the model has 'b', 'default'"),
        (["default"], ValueError, "adapter_names: 1 names for a batch of 2 rows"),
        ("default", TypeError, "adapter_names: expected a list of adapter names, one per row"),
    ],
)
def test_bad_adapter_names_are_refused_with_their_reason(model, names, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")), torch.no_grad():
        model(input_ids=torch.zeros(2, 3, dtype=torch.long), adapter_names=names)


def test_mixed_batches_are_refused_in_training(model):
    model.train()
    try:
        with pytest.raises(ValueError, match="adapter_names: mixed-adapter batches are for inference"):
            model(input_ids=torch.zeros(2, 3, dtype=torch.long), adapter_names=["b", "b"])
    finally:
        model.eval()
