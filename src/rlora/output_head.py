r"""The output head applied only where a loss or a score needs it.

A causal LM's forward ends with its output head (`get_output_embeddings()`, often tied to the input embeddings)
and the architecture's post-processing of the logits, on every position: a batch x sequence x vocabulary tensor
(8 x 512 x 49,152 in float32: 0.8 GB). The training loss and the choice scores need it at a few positions only
(the answer's). Here the model's forward runs up to its output head, which then gets an empty slice of the hidden
states (so the model computes no logits), and the head is applied by `OutputHead` to the chosen positions only,
in chunks of at most `CHUNK_ELEMENTS` logits.

`OutputHead` applies the head module itself (a plain, tied, quantized or adapted `nn.Linear` alike) and the
post-processing that transformers' causal LMs apply after it, read from the text config: Cohere's `logit_scale`
(multiply), Granite's `logits_scaling` (divide), Gemma 2/3's `final_logit_softcapping` (cap * tanh(logits / cap)).
An architecture may do something else; so on the first forward of each model a few positions also go through the
model's own head and post-processing, and a difference from `OutputHead` is a `ModelError` naming the model.

The forward goes through the model (and any wrapper: PEFT, DistributedDataParallel) as usual; only the output
head's input is swapped, by a forward pre-hook, so whatever the wrappers do in their forward still happens.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data import IGNORE_INDEX
from .errors import ModelError

CHUNK_ELEMENTS = 2**24  # logits computed at once: 64 MiB in float32 (341 positions of a 49,152-word vocabulary)
_checked: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # output heads whose post-processing was checked


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside `model`: unwraps torch.compile, (Distributed)DataParallel and PEFT."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, torch.nn.DataParallel | torch.nn.parallel.DistributedDataParallel):
        model = model.module
    model = getattr(model, "_orig_mod", model)
    get_base_model = getattr(model, "get_base_model", None)  # a PeftModel
    return get_base_model() if callable(get_base_model) else model


class OutputHead:
    """The model's output head and its logit post-processing, for hidden states (..., d) -> logits (..., V)."""

    def __init__(self, model: torch.nn.Module) -> None:
        lm = causal_lm(model)
        get_head = getattr(lm, "get_output_embeddings", None)
        self.module = get_head() if callable(get_head) else None
        if self.module is None:
            raise ModelError(f"{type(lm).__name__} has no output head (get_output_embeddings()); not a causal LM")
        config = lm.config.get_text_config()
        self.name = type(lm).__name__
        self.logit_scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
        self.logits_scaling = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
        self.softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3: cap * tanh(logits / cap)
        weight = getattr(self.module, "weight", None)
        vocab = getattr(self.module, "out_features", None) or getattr(config, "vocab_size", None)
        self.vocab_size = int(vocab) if vocab else int(weight.shape[0])

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.module(hidden)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @property
    def rows_per_chunk(self) -> int:
        return max(1, CHUNK_ELEMENTS // self.vocab_size)

    def chunks(self, rows: torch.Tensor, targets: torch.Tensor):
        step = self.rows_per_chunk
        for start in range(0, len(rows), step):
            yield rows[start : start + step], targets[start : start + step]

    def target_logprobs(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target) for hidden states (N, d) and target ids (N,): (N,), in float32 at least. Without grad."""
        out = []
        with torch.no_grad():
            for h, t in self.chunks(rows, targets):
                logits = _upcast(self(h))  # (chunk, V)
                out.append(logits.gather(-1, t[:, None]).squeeze(-1) - logits.logsumexp(-1))
        return torch.cat(out) if out else rows.new_zeros(0, dtype=_upcast(rows).dtype)

    def nll_sum(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The summed cross-entropy of hidden states (N, d) against target ids (N,), in float32 at least, with
        gradients. Each chunk's logits are recomputed in the backward pass (activation checkpointing) rather than
        kept, so memory holds one chunk's logits at a time whatever N."""
        total = _upcast(rows).new_zeros(())
        for h, t in self.chunks(rows, targets):
            if torch.is_grad_enabled() and h.requires_grad:
                total = total + checkpoint(self._chunk_nll, h, t, use_reentrant=False)
            else:
                total = total + self._chunk_nll(h, t)
        return total

    def _chunk_nll(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_upcast(self(rows)), targets, reduction="sum")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """float32 at least, as transformers' losses compute (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def forward_hidden(model: torch.nn.Module, **inputs) -> tuple[torch.Tensor, OutputHead]:
    """The final hidden states (B, T, d) that `model(**inputs)` feeds its output head, and that head, from one forward
    pass in which the model computes no logits (its head gets an empty slice of positions; see the module doc)."""
    head = OutputHead(model)
    check = head.module not in _checked
    captured: list[torch.Tensor] = []

    def swap_input(_module: torch.nn.Module, args: tuple) -> tuple:
        if captured or not args:  # our own calls of the head, after the model's
            return args
        hidden = args[0]
        captured.append(hidden)
        return (hidden[..., -1:, :] if check else hidden[..., :0, :], *args[1:])

    handle = head.module.register_forward_pre_hook(swap_input)
    try:
        outputs = model(**inputs)
    finally:
        handle.remove()
    if not captured:
        raise ModelError(f"{head.name}: its forward did not call its output head (get_output_embeddings())")
    hidden = captured[0]
    if check:
        _check_post_processing(head, hidden, getattr(outputs, "logits", None))
    return hidden, head


@torch.no_grad()
def _check_post_processing(head: OutputHead, hidden: torch.Tensor, theirs: torch.Tensor | None) -> None:
    """The model's own logits at the last position against `head`'s; equal up to rounding, or a ModelError."""
    if theirs is None or theirs.shape[:-1] != hidden[..., -1:, :].shape[:-1]:
        raise ModelError(f"{head.name}: its forward does not return the logits of its output head's input")
    ours = head(hidden[..., -1:, :]).double()
    theirs = theirs.double()
    # Same module, same inputs, same operations: equal but for the order of a kernel's sums. A missed scaling or
    # softcapping of logits of size ~1 moves them by >1e-4 relative, far above 16 roundings of the logits' dtype.
    bound = 16 * torch.finfo(hidden.dtype).eps * max(1.0, theirs.abs().max().item())
    if (ours - theirs).abs().max().item() > bound:
        raise ModelError(
            f"{head.name}: its logits are not its output head's output after the post-processing rlora knows "
            "(logit_scale, logits_scaling, final_logit_softcapping); this architecture is not supported"
        )
    _checked.add(head.module)


def causal_lm_loss(
    model: torch.nn.Module, inputs: dict, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """transformers' causal-LM loss of `model(**inputs)` with `labels`, from the trained positions' logits only: the
    position t predicts labels[t + 1]; summed over the positions whose label is not IGNORE_INDEX, divided by
    `num_items_in_batch` when given (the Trainer's count over all accumulated batches), else by their number."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    hidden, head = forward_hidden(model, **inputs)
    targets = labels[..., 1:].to(hidden.device)
    trained = targets != IGNORE_INDEX
    total = head.nll_sum(hidden[..., :-1, :][trained], targets[trained])  # (N, d) rows: the trained positions only
    if num_items_in_batch is None:
        return total / trained.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def positions_logprobs(
    model: torch.nn.Module, inputs: dict, rows: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """log p(targets[i] | the input up to positions[i]) in row rows[i] of the batch `inputs`, (N,), float32 at least,
    from one forward pass and the output head at those N positions only."""
    hidden, head = forward_hidden(model, **inputs)
    return head.target_logprobs(hidden[rows, positions], targets.to(hidden.device))
