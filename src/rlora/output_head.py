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
model's own head and post-processing, and a difference from `OutputHead` beyond rounding is a `ModelError` naming the
model and what differed.

Precision is the model's own: the head runs in the autocast state (enabled or not, its dtype) that the model's forward
had when it reached its output head, recorded there, so a forward under the Trainer's (accelerate's) bf16 or fp16
autocast gets the same low-precision logits from rlora as from the model, also when a chunk is recomputed in the
backward pass. A model that adds a router's auxiliary loss to its own loss (`aux_loss`: Mixtral, Qwen2-MoE and the
like, with `output_router_logits`) gets it added to `causal_lm_loss` the same way: coefficient times `aux_loss`.

The forward goes through the model (and any wrapper: PEFT, DistributedDataParallel) as usual; only the output
head's input is swapped, by a forward pre-hook, so whatever the wrappers do in their forward still happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator
from typing import Any

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
        self.lm = lm
        self.logit_scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
        self.logits_scaling = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
        self.softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3: cap * tanh(logits / cap)
        weight = getattr(self.module, "weight", None)
        vocab = getattr(self.module, "out_features", None) or getattr(config, "vocab_size", None)
        self.vocab_size = int(vocab) if vocab else int(weight.shape[0])
        self.autocast: Autocast | None = None  # the forward's, once it reached the head (`capture_hidden`)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        with self.autocast.region() if self.autocast is not None else contextlib.nullcontext():
            logits = self.module(hidden)
            if self.logit_scale is not None:
                logits = logits * self.logit_scale
            if self.logits_scaling is not None:
                logits = logits / self.logits_scaling
            if self.softcap is not None:
                logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @property
    def roundings(self) -> int:
        """Roundings of the logits' dtype between the head's input and its logits: the matmul's result, then one per
        elementwise post-processing operation (softcapping: divide, tanh, multiply)."""
        return 1 + (self.logit_scale is not None) + (self.logits_scaling is not None) + 3 * (self.softcap is not None)

    def describe(self) -> str:
        """The post-processing applied, e.g. "final_logit_softcapping 30.0" ("none")."""
        done = {"logit_scale": self.logit_scale, "logits_scaling": self.logits_scaling}
        done["final_logit_softcapping"] = self.softcap
        return ", ".join(f"{k} {v}" for k, v in done.items() if v is not None) or "none"

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


@dataclasses.dataclass(frozen=True)
class Autocast:
    """torch's autocast state for one device type, as a forward had it: re-entered, it computes as that forward did."""

    device_type: str
    enabled: bool
    dtype: torch.dtype
    cache_enabled: bool

    @classmethod
    def current(cls, device: torch.device) -> Autocast:
        kind = device.type
        enabled = torch.is_autocast_enabled(kind)
        return cls(kind, enabled, torch.get_autocast_dtype(kind), torch.is_autocast_cache_enabled())

    def region(self) -> contextlib.AbstractContextManager:
        if not self.enabled and not torch.is_autocast_enabled(self.device_type):
            return contextlib.nullcontext()  # no autocast then, none now (and any device type, autocast-capable or not)
        return torch.autocast(self.device_type, self.dtype, self.enabled, self.cache_enabled)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """float32 at least, as transformers' losses compute (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def forward_hidden(model: torch.nn.Module, **inputs) -> tuple[torch.Tensor, OutputHead]:
    """The final hidden states (B, T, d) that `model(**inputs)` feeds its output head, and that head, from one forward
    pass in which the model computes no logits (its head gets an empty slice of positions; see the module doc)."""
    with capture_hidden(model) as capture:
        capture.outputs = model(**inputs)
    return capture.hidden, capture.head


@dataclasses.dataclass
class Capture:
    """What a forward under `capture_hidden` fed its output head: the hidden states (B, T, d), the head (with the
    forward's autocast state) and, once set by the caller, the model's outputs."""

    head: OutputHead
    hidden: torch.Tensor | None = None
    outputs: Any = None


@contextlib.contextmanager
def capture_hidden(model: torch.nn.Module) -> Iterator[Capture]:
    """While active, the forward of `model` (and of any wrapper around it) gives its output head an empty slice of the
    positions, and the yielded `Capture` records the hidden states and the autocast state the head met. On leaving,
    a forward that never reached the head is a ModelError, and the first forward of each model checks the head's
    post-processing at its last position (`check_post_processing`): set `Capture.outputs` to the forward's outputs."""
    capture = Capture(OutputHead(model))
    head = capture.head
    check = head.module not in _checked

    def swap_input(_module: torch.nn.Module, args: tuple) -> tuple:
        if capture.hidden is not None or not args:  # our own calls of the head, after the model's
            return args
        hidden = args[0]
        capture.hidden = hidden
        head.autocast = Autocast.current(hidden.device)
        return (hidden[..., -1:, :] if check else hidden[..., :0, :], *args[1:])

    handle = head.module.register_forward_pre_hook(swap_input)
    try:
        yield capture
    finally:
        handle.remove()
    if capture.hidden is None:
        raise ModelError(f"{head.name}: its forward did not call its output head (get_output_embeddings())")
    if check:
        check_post_processing(head, capture.hidden, getattr(capture.outputs, "logits", None))


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the distance from 1 to the next number of `dtype`: 2^-8 for bfloat16, 2^-11 for float16, 2^-24 float32."""
    return torch.finfo(dtype).eps / 2


def logits_bound(head: OutputHead, dtype: torch.dtype, scale: float) -> float:
    """How far two computations of the same logits from the same inputs may differ, for logits of size `scale` at most
    computed in `dtype`. Each of the two rounds every operation's result (`head.roundings` of them) to `dtype`, within
    u relative each: 2 u per operation between them. The matmul's sums, in float32 at least (as CPU and GPU kernels
    accumulate low-precision products), may run in another order: 32 roundings of that dtype, as in fp32 before."""
    accumulate = torch.promote_types(dtype, torch.float32)
    return (32 * unit_roundoff(accumulate) + 2 * head.roundings * unit_roundoff(dtype)) * scale


@torch.no_grad()
def check_post_processing(head: OutputHead, hidden: torch.Tensor, theirs: torch.Tensor | None) -> None:
    """The model's own logits at the last position against `head`'s, in the dtype the head computed them in (the
    forward's autocast dtype, else the weights'): equal up to `logits_bound`, or a ModelError saying by how much not."""
    if theirs is None or theirs.shape[:-1] != hidden[..., -1:, :].shape[:-1]:
        raise ModelError(f"{head.name}: its forward does not return the logits of its output head's input")
    ours = head(hidden[..., -1:, :])
    used = ours.dtype  # e.g. bfloat16 under bf16 autocast; accelerate hands the model's back as float32, exactly
    dtype = str(used).removeprefix("torch.")
    if not torch.isfinite(theirs).all():
        raise ModelError(f"{head.name}: its own logits are not finite in {dtype}; this model needs a wider precision")
    theirs = theirs.to(used).double()
    ours = ours.double()
    scale = max(1.0, theirs.abs().max().item(), ours.abs().max().item())
    bound = logits_bound(head, used, scale)
    difference = (ours - theirs).abs().max().item()
    if not difference <= bound:  # NaN included
        raise ModelError(
            f"{head.name}: its logits are not its output head's output after the post-processing rlora knows "
            f"(it applied: {head.describe()}): they differ by up to {difference:.3g} at logits of size up to "
            f"{scale:.3g}, beyond the {bound:.3g} that {head.roundings} rounding(s) of {dtype} "
            "allow; this architecture is not supported"
        )
    _checked.add(head.module)


def router_aux_loss(lm: torch.nn.Module, outputs: Any) -> torch.Tensor | None:
    """What the model adds to its causal-LM loss for its router's load balancing: coefficient times `aux_loss` (None
    when its outputs have no `aux_loss`, as Mixtral's and Qwen2-MoE's without `output_router_logits`)."""
    aux = getattr(outputs, "aux_loss", None)
    if aux is None:
        return None
    config = lm.config.get_text_config()
    for owner, name in ((lm, "router_aux_loss_coef"), (lm, "aux_loss_coef"), (config, "router_aux_loss_coef")):
        coefficient = getattr(owner, name, None)
        if coefficient is not None:
            return coefficient * aux
    raise ModelError(
        f"{type(lm).__name__}: its forward returns a router auxiliary loss (aux_loss) with no coefficient rlora knows "
        "(router_aux_loss_coef, aux_loss_coef); this architecture is not supported"
    )


def causal_lm_loss(
    model: torch.nn.Module, inputs: dict, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """transformers' causal-LM loss of `model(**inputs)` with `labels`, from the trained positions' logits only: the
    position t predicts labels[t + 1]; summed over the positions whose label is not IGNORE_INDEX, divided by
    `num_items_in_batch` when given (the Trainer's count over all accumulated batches), else by their number; plus
    the router's auxiliary loss where the model adds one (`router_aux_loss`)."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    with capture_hidden(model) as capture:
        capture.outputs = model(**inputs)
    return head_only_loss(capture, labels, num_items_in_batch)


def head_only_loss(
    capture: Capture,
    labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """`causal_lm_loss` of a forward made under `capture_hidden`, with its `labels` (or, as transformers' loss takes
    them, `shift_labels`: already shifted, the position t predicts shift_labels[t])."""
    hidden, head = capture.hidden, capture.head
    if shift_labels is None:
        hidden, targets = hidden[..., :-1, :], labels[..., 1:]
    else:
        targets = shift_labels
    targets = targets.to(hidden.device)
    trained = targets != IGNORE_INDEX
    total = head.nll_sum(hidden[trained], targets[trained])  # (N, d) rows: the trained positions only
    if num_items_in_batch is None:
        loss = total / trained.sum()
    else:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    aux = router_aux_loss(head.lm, capture.outputs)
    return loss if aux is None else loss + aux.to(loss.device)


def positions_logprobs(
    model: torch.nn.Module, inputs: dict, rows: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """log p(targets[i] | the input up to positions[i]) in row rows[i] of the batch `inputs`, (N,), float32 at least,
    from one forward pass and the output head at those N positions only."""
    hidden, head = forward_hidden(model, **inputs)
    return head.target_logprobs(hidden[rows, positions], targets.to(hidden.device))
