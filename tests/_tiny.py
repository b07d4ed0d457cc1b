"""Tiny models built from a config, shared by the unit tests."""

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

MLP = ["gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def perturb_adapter(model: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Move every trainable adapter parameter away from its init, as training would (router included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("rlora_" in name or "lora_" in name):
                p.add_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in milliseconds on a few sentences (every string encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Question: is the sky blue? Answer: yes", "Answer format: A/B/C/D. Answer: A", "no yes B C D"] * 5
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def tiny_model_dir(path, seed: int = 0):
    """A complete local model folder (tiny Llama + tokenizer) that `from_pretrained(path)` loads."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(seed)
    model.resize_token_embeddings(len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_config(workspace, out, **sections) -> Path:
    text = f"""
model: {workspace / "model"}
output_dir: {out}
data:
  tasks: []
  jsonl: [{workspace / "colors.jsonl"}, {workspace / "letters.jsonl"}]
  max_eval_per_task: 6
  max_length: 64
training:
  max_steps: 6
  batch_size: 4
  save_steps: 2
  logging_steps: 1
  lr: 1e-3
adapter:
  num_heads: 3
eval:
  batch_size: 4
  max_new_tokens: 3
"""
    path = Path(out).with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
