"""The output head only where the loss or a score needs it (`rlora.output_head`), against the model's own full logits.

Loss and gradients are checked in float64 against a naive reference written here from the model's full logits
(tolerance F64: the same sums in another order), on tiny Llama, Qwen2, Gemma2 (final logit softcapping), Cohere
(logit scale) and Granite (logits scaling) models with R-LoRA adapters; and through the Trainer with gradient
accumulation, against a plain Trainer on the same model and data. The largest tensor any operation produces while
rlora scores, evaluates or trains is checked on a model with a large vocabulary (`LargestTensor`).
"""

import pytest
import torch
import torch.nn.functional as F
from _tiny import F64, MLP, perturb_adapter, tiny_llama
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Trainer,
    TrainingArguments,
)

import rlora.output_head
from rlora import RLoraConfig
from rlora.data import IGNORE_INDEX, Example
from rlora.errors import ModelError
from rlora.evaluate import held_out_loss, predict
from rlora.output_head import causal_lm_loss
from rlora.trainer import HeadOnlyLossTrainer

numerics = pytest.mark.numerics  # run again on other CPU kernel paths by scripts/test.sh

SHAPE = {
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
ARCHITECTURES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=False)),
    # a small cap, so that the softcapping changes the logits (of size ~1 here) far beyond rounding
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**SHAPE, head_dim=8, final_logit_softcapping=2.0)),
    "cohere": lambda: CohereForCausalLM(CohereConfig(**SHAPE, logit_scale=0.5)),
    "granite": lambda: GraniteForCausalLM(GraniteConfig(**SHAPE, logits_scaling=3.0)),
}


def adapted(architecture: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    base = ARCHITECTURES[architecture]().double()
    model = get_peft_model(base, RLoraConfig(r=2, num_heads=3, target_modules=MLP, lora_dropout=0.0))
    perturb_adapter(model)
    return model.train()


def batch(seed: int = 0, rows: int = 3, length: int = 11) -> dict:
    """Right-padded rows with the loss on a few positions each (as the collator makes them), one row untrained."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, SHAPE["vocab_size"], (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 6:] = ids[0, 6:]
    labels[1, 4:8] = ids[1, 4:8]
    labels[2, 2] = ids[2, 2]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference_loss(model, inputs: dict, num_items=None) -> torch.Tensor:
    """transformers' causal-LM loss written out on the model's full float64 logits: sum of -log p over the shifted
    labels != IGNORE_INDEX, divided by `num_items` or by their count."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    logits = model(**inputs).logits[:, :-1]  # (B, T-1, V)
    targets = labels[:, 1:]
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (num_items if num_items is not None else (targets != IGNORE_INDEX).sum())


def grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


@numerics
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_loss_and_gradients_equal_the_full_logits_loss(architecture, monkeypatch):
    model, inputs = adapted(architecture), batch()
    for num_items in (None, torch.tensor(17)):  # the Trainer's count over several accumulated batches
        expected = reference_loss(model, inputs, num_items)
        theirs = grads(model, expected)
        assert len(theirs) == 3 * 3 * SHAPE["num_hidden_layers"]  # A, B, router of 3 MLP projections per layer
        for chunk_rows in (1024, 2):  # one chunk, or the head at 2 positions at a time (each recomputed backward)
            monkeypatch.setattr(rlora.output_head, "CHUNK_ELEMENTS", chunk_rows * SHAPE["vocab_size"])
            loss = causal_lm_loss(model, inputs, num_items)
            assert loss.dtype == torch.float64
            torch.testing.assert_close(loss, expected, **F64)
            ours = grads(model, loss)
            for name in theirs:
                torch.testing.assert_close(ours[name], theirs[name], **F64, msg=name)
    # and the model's own loss, which transformers computes from float32 logits (`.float()`): their rounding
    # (relative 6e-8 of logits of size ~1, over ~100 classes) moves a loss of ~4.6 nats by well under 1e-5
    own = model(**inputs).loss
    assert own.item() == pytest.approx(causal_lm_loss(model, inputs).item(), abs=1e-5, rel=0)


def test_an_unknown_logit_post_processing_is_refused_by_name():
    model = tiny_llama(seed=0, dtype=torch.float64)
    model.config.final_logit_softcapping = 2.0  # rlora would cap the logits; Llama's forward does not
    with pytest.raises(ModelError, match=r"LlamaForCausalLM: its logits are not its output head's output after"):
        causal_lm_loss(model, batch())


@numerics
def test_the_trainer_trains_the_same_adapter_as_a_plain_trainer_with_gradient_accumulation(tmp_path):
    """Two optimizer steps of 2 accumulated batches of 2 rows whose trained-token counts differ: the loss is
    normalised over all accumulated tokens (`num_items_in_batch`) exactly as the model's own loss is."""
    rows = [{k: v[i] for k, v in batch(seed=s).items()} for s in range(3) for i in range(3)][:8]
    trained = {}
    for name, trainer_class in (("plain", Trainer), ("head only", HeadOnlyLossTrainer)):
        model = adapted("llama")
        args = TrainingArguments(
            output_dir=str(tmp_path / name),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=2,
            learning_rate=0.05,
            lr_scheduler_type="constant",
            optim="sgd",
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            use_cpu=True,
            train_sampling_strategy="sequential",
            seed=0,
            disable_tqdm=True,
        )
        trainer = trainer_class(model=model, args=args, train_dataset=rows)
        trainer.train()
        trained[name] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        trained[name, "losses"] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert trained["plain", "losses"] == pytest.approx(trained["head only", "losses"], rel=1e-6)  # logged rounded
    for name, weight in trained["plain"].items():
        assert not torch.equal(weight, adapted("llama").state_dict()[name])  # it trained (exact: a copy vs changed)
        # the plain Trainer's loss goes through float32 logits (`.float()`), ours stays in float64: gradients of
        # size ~1e-2 differ by ~1e-8 relative, times lr 0.05 over 2 steps
        torch.testing.assert_close(trained["head only"][name], weight, atol=1e-8, rtol=1e-6, msg=name)


class LargestTensor(TorchDispatchMode):
    """The number of elements of the largest tensor any aten operation produces while active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


VOCAB = 5000


@pytest.fixture(scope="module")
def big_vocab():
    """A tiny model with a large vocabulary: its logits over a batch dwarf every other tensor."""
    torch.manual_seed(0)
    config = LlamaConfig(**(SHAPE | {"vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 1}))
    return LlamaForCausalLM(config).eval()


def long_examples() -> list[Example]:
    prompt = " ".join(["the sky is blue ?"] * 8)
    return [
        Example.multiple_choice("t", prompt, ["red", "blue sky", "green"], 1, "rc", format="rc"),
        Example.multiple_choice("t", prompt + " no", ["A", "B", "C"], 2, "mc", format="mc"),
        Example("t", prompt, "yes the sky is blue .", uid="free"),
    ] * 2


def test_scoring_and_the_loss_never_make_a_batch_by_sequence_by_vocabulary_tensor(big_vocab, tiny_tokenizer):
    model, data = big_vocab, long_examples()
    ids = tiny_tokenizer(data[0].prompt).input_ids
    full_logits = len(data) * len(ids) * VOCAB  # what one batch's logits would hold: (rows, length, vocabulary)
    with LargestTensor() as seen:  # the instrument sees full logits where they are made
        model(input_ids=torch.tensor([ids] * len(data)))
    assert seen.numel >= full_logits

    with LargestTensor() as seen:
        predictions = predict(model, tiny_tokenizer, data, batch_size=len(data), generate=False, max_length=128)
        held_out_loss(model, tiny_tokenizer, data, batch_size=len(data), max_length=128)
    assert all(p.scores is not None for p in predictions[:2])
    answer_tokens = max(len(tiny_tokenizer(" yes the sky is blue .").input_ids) + 1, 3) * len(data)
    # the largest is the head's output at the scored positions (at most every answer token of the batch)
    assert VOCAB <= seen.numel <= answer_tokens * VOCAB < full_logits / 4

    model.train()
    inputs = batch(rows=len(data), length=len(ids))
    inputs["labels"][:, : len(ids) - 4] = IGNORE_INDEX
    with LargestTensor() as seen:
        causal_lm_loss(model, inputs).backward()
    assert seen.numel <= len(data) * 4 * VOCAB < full_logits / 4
    model.eval()
