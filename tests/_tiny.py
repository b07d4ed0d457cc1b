"""Tiny models built from a config, shared by the unit tests."""

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
