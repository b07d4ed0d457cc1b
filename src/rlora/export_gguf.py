r"""Plain LoRA factors as a llama.cpp GGUF adapter, written with the `gguf` package as llama.cpp's own
`convert_lora_to_gguf.py` writes a PEFT LoRA adapter, and where to get the base model as GGUF.

What llama.cpp's adapter loader (`llama_adapter_lora_init`) reads, and so what is written here:
- metadata `general.architecture` (the base model's, else "model arch and LoRA arch mismatch"), `general.type` =
  "adapter", `adapter.type` = "lora", `adapter.lora.alpha` (the update is scaled by alpha / rank: the export's
  alpha is its rank, so 1);
- for each adapted base tensor (its GGUF name, `blk.N.attn_q.weight`, from gguf's tensor name map of the
  architecture) a pair `<name>.lora_a` = A (numpy shape (rank, d_in), ggml ne [d_in, rank]) and `<name>.lora_b` = B
  (numpy (d_out, rank), ne [rank, d_out]): the loader checks ne[0] of the base against lora_a's and ne[1] against
  lora_b's;
- Llama's q and k projections are stored in GGUF with their rows permuted for llama.cpp's rope (the converter's
  `LlamaModel.permute`); a LoRA update B @ A of such a weight gets the same row permutation on B.
- `--outtype`: f32, f16, or q8_0 (blocks of 32 along a row; a tensor whose rows are not a multiple of 32 long, as a
  lora_b of rank 8, falls back to f16, as the converter does).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError, MissingPackage

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "q8_0")
# transformers architecture -> (llama.cpp architecture, whether q/k rows are permuted as llama.cpp's converter does)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}
GGUF_INSTALL = "pip install gguf"
CONVERT_BASE = "python convert_hf_to_gguf.py BASE_MODEL_FOLDER --outfile base-f16.gguf --outtype f16"


def gguf_name(outtype: str) -> str:
    """The adapter file's name in an export folder."""
    return f"adapter-{outtype}.gguf"


def architecture(config) -> tuple[str, bool]:
    """(llama.cpp architecture name, q/k permuted) of a transformers model config, or a ConfigError that says what
    to do instead."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ConfigError(
        f"--format gguf: the base model's architecture {'/'.join(names) or '(none in its config)'} is not one rlora "
        f"writes GGUF adapters for ({', '.join(ARCHITECTURES)}); export as PEFT and convert with llama.cpp's "
        "convert_lora_to_gguf.py EXPORT --base BASE_MODEL_FOLDER"
    )


def permute_rows(B: torch.Tensor, n_head: int) -> torch.Tensor:
    """B's rows in the order llama.cpp stores a Llama q/k weight's rows: within each of `n_head` heads, the first
    half's rows and the second half's interleaved (rope on adjacent pairs instead of halves)."""
    d_out = B.shape[0]
    return B.reshape(n_head, 2, d_out // n_head // 2, *B.shape[1:]).swapaxes(1, 2).reshape(B.shape)


def gguf_tensors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], config) -> tuple[str, dict[str, torch.Tensor]]:
    """(architecture, {GGUF tensor name: tensor}) of plain LoRA `factors` {module name ("model.layers.0.mlp.up_proj"):
    (B (d_out, rank), A (rank, d_in))} on a base model of `config`."""
    import gguf

    arch, permute = architecture(config)
    arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    out = {}
    for module, (B, A) in factors.items():
        name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if name is None:
            raise ConfigError(f"--format gguf: llama.cpp has no tensor for the adapted layer {module!r} ({arch})")
        if permute and module.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if module.endswith("q_proj") else config.num_key_value_heads
            B = permute_rows(B, heads)
        out[f"{name}.lora_a"] = A
        out[f"{name}.lora_b"] = B
    return arch, out


def write_gguf_adapter(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]], config, path: Path, outtype: str, alpha: float
) -> None:
    """The GGUF adapter file at `path` (see the module docstring); `alpha` / rank is its scaling in llama.cpp."""
    try:
        import gguf
    except ImportError:
        raise MissingPackage(f"--format gguf needs the gguf package, not installed; {GGUF_INSTALL}") from None
    import numpy as np
    import torch

    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    arch, tensors = gguf_tensors(factors, config)
    types = gguf.GGMLQuantizationType
    qtype = {"f32": types.F32, "f16": types.F16, "q8_0": types.Q8_0}[outtype]
    files = gguf.LlamaFileType
    file_type = {"f32": files.ALL_F32, "f16": files.MOSTLY_F16, "q8_0": files.MOSTLY_Q8_0}[outtype]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, tensor in tensors.items():
        data = tensor.detach().to(torch.float32).contiguous().numpy()
        try:
            packed, kind = gguf.quants.quantize(data, qtype), qtype
        except gguf.QuantError:  # rows not a whole number of blocks (q8_0: 32): f16, as llama.cpp's converter does
            packed, kind = gguf.quants.quantize(data, types.F16), types.F16
        writer.add_tensor(name, np.ascontiguousarray(packed), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def base_gguf(model: str) -> tuple[Path | None, str]:
    """Where the base model is as GGUF: (the file, a sentence) for an embedded model, which ships as one; else
    (None, the llama.cpp command that makes it from the model's folder)."""
    from . import models

    if model in models.EMBEDDED_MODELS:
        path = models.embedded_gguf_path(model)
        return path, f"the embedded model is one already, `{path.name}` in the `{path.parent.name}` package"
    return None, f"make it with llama.cpp's converter, `{CONVERT_BASE}`"
