r"""The multi-head LoRA layer (HydraLoRA architecture, R-LoRA initialisation and dropout).

For a frozen linear layer W0 (d_out x d_in) and input x, with K heads of rank r:

    g(x) = softmax(W_r x)                                   # (K,) per token, in float32
    h    = W0 x + s * sum_k g_k(x) * B_k @ drop_k(A x)  -  s * mean_k(B_k^0) @ A^0 x

A (r x d_in) is shared, B_k (d_out x r) are the heads, W_r (K x d_in) the router. s = alpha/sqrt(r) (rsLoRA)
or alpha/r. The router starts at zero (uniform gates; R-LoRA) or kaiming-uniform like a default nn.Linear
(router_init="random"; HydraLoRA, whose zero heads would otherwise sit on a saddle where all heads stay equal).

Fused forward: x is read once, by one matmul that computes A x, the offset's A^0 x and the router's W_r x
together (A x apart only where a dropout on x feeds it); the K dropout masks are drawn on the r-dim A x, the
gates (times s) are folded in, and one matmul with the concatenated heads B = [B_1 ... B_K] (d_out x K*r)
produces the update. There is no Python loop over heads.

Initialisation:
- head_init="zeros" (HydraLoRA/LoRA): A ~ kaiming-uniform, B_k = 0, no offset.
- head_init="random" (R-LoRA): f = d_out**0.25 / sqrt(gamma); A ~ f N(0, 1/d_in), every B_k ~ f N(0, 1/d_out),
  drawn independently. The initial update s * mean_k(B_k^0) A^0 is non-zero; it is subtracted in the forward
  pass through two frozen rank-r buffers (offset_B = s * mean_k(B_k^0), offset_A = A^0) saved with the adapter,
  so the base weights are never edited and the start is exactly the pretrained function (uniform gates).

Router options (config `routing`, `share`, `balance_loss_coef`, `router_z_loss_coef`; docs/routing.md), kept apart
in the "Router options" section below:
- routing="task" / "token+task": the gate logits are t_task (a learned (num_tasks, K) table, started as the router) or
  W_r x + t_task; each row's task id comes from `RoutingInputs` (set by `RLoraModel.routing`), -1 or none: zero.
- share="up" (ALoRA): K down-projections A_k (K*r x d_in) and one B (d_out x r): h = W0 x + s B sum_k g_k A_k x.
- the balance and z losses are computed from the gate logits in training and kept on the layer until the model
  collects them (`RLoraModel.router_losses`).

Dropout:
- head_dropout=True (R-LoRA): independent masks per head on the r-dim A x.
- head_dropout=False (HydraLoRA baseline): one mask on x shared by the heads. The offset always reads the
  undropped x: it belongs to the frozen part of the layer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.integrations import dequantize_bnb_weight, get_bnb_param_type
from torch import nn

from .config import RLoraConfig

MERGE_ERROR = (
    "R-LoRA/HydraLoRA adapters cannot be merged into the base weights exactly: the router mixes the heads with "
    "gates that depend on each token's input, so the update is not a fixed matrix. Keep the adapter unmerged, or "
    "use `merge_with_fixed_gates(...)` for an explicit approximation with one fixed head mixture."
)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2 family): a linear layer whose weight is stored transposed, (d_in, d_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_adaptable(module: nn.Module) -> bool:
    """A layer R-LoRA adapts: a `torch.nn.Linear` (bitsandbytes' 4/8-bit ones included) or a `Conv1D`."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def base_shape(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an adaptable layer."""
    if is_conv1d(base):
        d_in, d_out = base.weight.shape  # stored (d_in, d_out): PEFT's LoRA calls this fan_in_fan_out
        return d_in, d_out
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    raise TypeError(f"R-LoRA adapts torch.nn.Linear and Conv1D layers only, got {type(base).__name__}")


@dataclass(frozen=True)
class RoutingInputs:
    """What a forward pass tells the layers besides x: each row's task id (B,), or one int for every row (-1: none),
    for task routing, and which tokens are real (B, T) for the router losses (None: every token)."""

    task_ids: torch.Tensor | int | None = None
    token_mask: torch.Tensor | None = None

    def rows(self, rows: list[int]) -> RoutingInputs:
        def pick(t):
            return t[rows] if isinstance(t, torch.Tensor) else t

        return RoutingInputs(pick(self.task_ids), pick(self.token_mask))


class RLoraLayer(BaseTunerLayer):
    adapter_layer_names = ("rlora_A", "rlora_B", "rlora_router", "rlora_task_logits")
    other_param_names = (
        "r",
        "num_heads",
        "scaling",
        "dropout_p",
        "head_dropout",
        "rlora_offset_A",
        "rlora_offset_B",
        "share",
        "routing",
        "router_losses_on",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.num_heads: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.head_dropout: dict[str, bool] = {}
        self.rlora_A = nn.ParameterDict({})  # (r, d_in)
        self.rlora_B = nn.ParameterDict({})  # (d_out, K*r): head k is columns k*r:(k+1)*r
        self.rlora_router = nn.ParameterDict({})  # (K, d_in)
        self.rlora_offset_A = BufferDict({}, persistent=True)  # (r, d_in), frozen A^0
        self.rlora_offset_B = BufferDict({}, persistent=True)  # (d_out, r), frozen s * mean_k(B_k^0)
        self.share: dict[str, str] = {}  # "down": one A, K heads B_k; "up": K A_k, one B
        self.routing: dict[str, str] = {}
        self.router_losses_on: dict[str, bool] = {}
        self.rlora_task_logits = nn.ParameterDict({})  # (num_tasks, K), routing task or token+task
        self.routing_inputs: RoutingInputs | None = None  # set around a forward pass by RLoraModel.routing
        self.recorded_router_losses: list[tuple[torch.Tensor, torch.Tensor]] = []  # (balance, z) per training forward
        self._disable_adapters = False
        self._inference_weights: dict[tuple, tuple] | None = None  # `_fused`'s weights, in `reuse_fused_weights`
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        self.in_features, self.out_features = base_shape(base)

    def update_layer(
        self, adapter_name: str, config: RLoraConfig, inference_mode: bool = False, num_heads: int | None = None
    ) -> None:
        """Adds adapter `adapter_name`; `num_heads` (default `config.num_heads`) is this layer's K (heads_pattern)."""
        r, k = config.r, num_heads or config.num_heads
        self.r[adapter_name] = r
        self.num_heads[adapter_name] = k
        self.scaling[adapter_name] = config.scaling
        self.dropout_p[adapter_name] = float(config.lora_dropout)
        self.head_dropout[adapter_name] = config.head_dropout
        self._update_router_options(adapter_name, config, k)
        a_rows, b_cols = (k * r, r) if config.share == "up" else (r, k * r)
        self.rlora_A[adapter_name] = nn.Parameter(torch.empty(a_rows, self.in_features))
        self.rlora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, b_cols))
        if config.routing != "task":
            self.rlora_router[adapter_name] = nn.Parameter(torch.zeros(k, self.in_features))
        self._init_heads(adapter_name, config)
        if config.router_init == "random" and adapter_name in self.rlora_router:
            with torch.no_grad():  # nn.Linear's default init: U(-1/sqrt(d_in), 1/sqrt(d_in))
                nn.init.kaiming_uniform_(self.rlora_router[adapter_name], a=math.sqrt(5))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        if config.head_init == "random":
            self._store_offset(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def _init_heads(self, adapter_name: str, config: RLoraConfig) -> None:
        A, B = self.rlora_A[adapter_name], self.rlora_B[adapter_name]
        if config.head_init == "zeros":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)
        else:
            f = self.out_features**0.25 / math.sqrt(config.init_gamma)
            nn.init.normal_(A, std=f / math.sqrt(self.in_features))
            nn.init.normal_(B, std=f / math.sqrt(self.out_features))

    @torch.no_grad()
    def _store_offset(self, adapter_name: str) -> None:
        """Freeze the initial update s * mean_k(B_k) @ A as two rank-r buffers, from the weights as stored."""
        dtype = torch.promote_types(self.rlora_A[adapter_name].dtype, torch.float32)  # float64 stays float64
        A, B = self.rlora_A[adapter_name].to(dtype), self.rlora_B[adapter_name].to(dtype)
        r, k = self.r[adapter_name], self.num_heads[adapter_name]
        if self.share[adapter_name] == "up":  # s * B @ mean_k(A_k): the mean is over the down-projections
            self.rlora_offset_A[adapter_name] = A.view(k, r, self.in_features).mean(dim=0)
            self.rlora_offset_B[adapter_name] = self.scaling[adapter_name] * B.clone()
            return
        mean_head = B.view(self.out_features, k, r).mean(dim=1)  # (d_out, r)
        self.rlora_offset_A[adapter_name] = A.clone()
        self.rlora_offset_B[adapter_name] = self.scaling[adapter_name] * mean_head

    def gates(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """Router probabilities (..., K), in float32 (float64 for float64 inputs)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        router = self.rlora_router.get(adapter_name)
        token = F.linear(x.to(dtype), router.to(dtype)) if router is not None else None
        return torch.softmax(self.route_logits(x, token, adapter_name, dtype), dim=-1)

    def head_weights(self, adapter_name: str) -> torch.Tensor:
        """The heads as a (K, d_out, r) tensor (a view of the trained parameter); with share="up" the K
        down-projections, (K, r, d_in)."""
        r, k = self.r[adapter_name], self.num_heads[adapter_name]
        if self.share[adapter_name] == "up":
            return self.rlora_A[adapter_name].view(k, r, self.in_features)
        return self.rlora_B[adapter_name].view(self.out_features, k, r).permute(1, 0, 2)

    def delta(self, x: torch.Tensor, adapter_name: str, result: torch.Tensor | None = None) -> torch.Tensor:
        """The adapter's contribution to the layer output for input x (..., d_in) -> (..., d_out).

        With `result` (the base layer's output), returns result + contribution, added inside the last matmul.
        """
        if self._inference_weights is not None and result is not None and not self.training:
            kept = None if torch.is_grad_enabled() else self._decode_weights(adapter_name)
            if kept is not None and x.dtype == result.dtype == kept[0].dtype:
                return self._decode_delta(x, result, *kept)
        A, B = self.rlora_A[adapter_name], self.rlora_B[adapter_name]
        r, k, p = self.r[adapter_name], self.num_heads[adapter_name], self.dropout_p[adapter_name]
        x = self._cast_input_dtype(x, A.dtype)
        offset = adapter_name in self.rlora_offset_A
        gate_dtype = torch.promote_types(x.dtype, torch.float32)
        dropped = not self.head_dropout[adapter_name] and self.training and p > 0  # A reads x through a dropout
        up = self.share[adapter_name] == "up"  # A holds K down-projections (K*r rows), B is one (d_out, r)

        # One matmul for everything that reads the undropped x: A (unless dropped), the offset's A^0 and, when the
        # gates' float32 (float64) is x's dtype, the router. The weights are concatenated, (2r + K) x d_in at most.
        readers = [] if dropped else [A]
        readers += [self.rlora_offset_A[adapter_name]] if offset else []
        router = self.rlora_router.get(adapter_name)  # None: routing by task alone
        fused_router = router is not None and gate_dtype == x.dtype
        readers += [router] if fused_router else []
        z = F.linear(F.dropout(x, p, self.training), A) if dropped else None  # (..., r or K*r)
        parts = []  # none when A reads a dropped x and nothing else reads x in x's dtype (a low-precision adapter)
        if readers:
            read = self._fused(
                ("read", adapter_name, A.dtype, dropped), readers, lambda: torch.cat([w.to(A.dtype) for w in readers])
            )
            parts = list(F.linear(x, read).split([w.shape[0] for w in readers], dim=-1))  # (..., r + r + K) at most
            z = parts.pop(0) if z is None else z
        z0 = parts.pop(0) if offset else None  # (..., r): A^0 x
        if fused_router:
            token_logits = parts.pop(0)  # (..., K)
        else:
            token_logits = None if router is None else F.linear(x.to(gate_dtype), router.to(gate_dtype))
        logits = self.route_logits(x, token_logits, adapter_name, gate_dtype)  # (..., K)
        if self.training and self.router_losses_on[adapter_name]:
            self._record_router_losses(logits)
        gates = (torch.softmax(logits, dim=-1) * self.scaling[adapter_name]).to(A.dtype)  # (..., K)

        if up:
            zk = z.unflatten(-1, (k, r))  # (..., K, r): A_k x
            zk = F.dropout(zk, p, self.training) if self.head_dropout[adapter_name] else zk  # mask per head
            u = (zk * gates.unsqueeze(-1)).sum(-2)  # (..., r): sum_k g_k A_k x
        elif self.head_dropout[adapter_name]:
            zk = F.dropout(z.unsqueeze(-2).expand(*z.shape[:-1], k, r), p, self.training)  # (..., K, r), mask per head
            u = (zk * gates.unsqueeze(-1)).flatten(-2)  # (..., K*r)
        else:
            zk = z.unsqueeze(-2)  # (..., 1, r), broadcast over heads (one mask on x, or none)
            u = (zk * gates.unsqueeze(-1)).flatten(-2)  # (..., K*r)
        if offset:  # the offset is one more "head" with input A^0 x and weight -s*mean_k(B_k^0): same matmul
            u = torch.cat([u, z0], dim=-1)  # (..., (K+1)*r)
            offset_B = self.rlora_offset_B[adapter_name]
            B = self._fused(("B", adapter_name), [B, offset_B], lambda: torch.cat([B, -offset_B.to(B.dtype)], dim=1))
        if result is None:
            return F.linear(u, B)  # (..., d_out)
        if result.dtype != u.dtype:
            return result + F.linear(u, B).to(result.dtype)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), u.reshape(-1, u.shape[-1]), B.t())
        return out.view(result.shape)

    def _decode_weights(self, adapter_name: str) -> tuple | None:
        """Inside `reuse_fused_weights`: the weights `_decode_delta` reads, kept while their sources are unchanged
        (storage and in-place version counter), or None where the layer is not in its case (one shared A, token
        routing, a float32/64 adapter: the gates' dtype)."""
        entry = self._inference_weights.get(("decode", adapter_name))
        if entry is not None and entry[1] == _stamp(entry[0]):
            return entry[2]
        A, B = self.rlora_A[adapter_name], self.rlora_B[adapter_name]
        router = self.rlora_router.get(adapter_name)
        offset = adapter_name in self.rlora_offset_A
        sources = [A, B] + ([router] if router is not None else [])
        sources += [self.rlora_offset_A[adapter_name], self.rlora_offset_B[adapter_name]] if offset else []
        kept = None
        eligible = self.share[adapter_name] == "down" and self.routing[adapter_name] == "token"
        if eligible and A.dtype in (torch.float32, torch.float64) and B.dtype == A.dtype:
            s = self.scaling[adapter_name]
            readers = [A, self.rlora_offset_A[adapter_name], router] if offset else [A, router]
            writers = [s * B, -self.rlora_offset_B[adapter_name]] if offset else [s * B]
            read_t = torch.cat([w.detach().to(A.dtype) for w in readers]).t().contiguous()  # (d_in, r [+ r] + K)
            write_t = torch.cat([w.detach().to(A.dtype) for w in writers], dim=1).t().contiguous()  # (K*r [+ r], d_out)
            kept = (read_t, write_t, self.r[adapter_name], self.num_heads[adapter_name], offset)
        self._inference_weights[("decode", adapter_name)] = (
            sources,
            _stamp(sources),
            kept,
        )
        return kept

    @staticmethod
    def _decode_delta(
        x: torch.Tensor, result: torch.Tensor, read_t: torch.Tensor, write_t: torch.Tensor, r: int, k: int, offset: bool
    ) -> torch.Tensor:
        """`delta`'s algebra with as few small operations as it takes, for decoding (a token at a time, where each
        operation's fixed cost outweighs its arithmetic): one matmul reads x for A, the offset's A^0 and the router
        (their weights kept transposed, (d_in, r [+ r] + K)); the scaling is folded into the kept B (s B_k, and
        -s mean_k B_k^0 for the offset), stored transposed for the last matmul; dropout is the identity in eval mode.
        Rows are flattened to 2-D so that each step is one call (`split` rather than indexing). Held to the per-head
        formula in float64 by `tests/test_layer.py::test_the_decoding_path_is_the_layers_algebra`."""
        shape = result.shape
        parts = torch.mm(x.reshape(-1, x.shape[-1]), read_t)  # (N, r [+ r] + K): A x, [A^0 x], W_r x
        if offset:
            z, z0, logits = parts.split([r, r, k], dim=1)
        else:
            z, logits = parts.split([r, k], dim=1)
        u = torch.mul(torch.softmax(logits, dim=1).unsqueeze(2), z.unsqueeze(1)).view(-1, k * r)  # (N, K*r): g_k A x
        if offset:
            u = torch.cat([u, z0], dim=1)
        return torch.addmm(result.reshape(-1, shape[-1]), u, write_t).view(shape)

    # ---- Router options: task routing and the router losses (config `routing`, `balance_loss_coef`, ...) ----

    def _update_router_options(self, adapter_name: str, config: RLoraConfig, k: int) -> None:
        self.share[adapter_name] = config.share
        self.routing[adapter_name] = config.routing
        self.router_losses_on[adapter_name] = config.balance_loss_coef > 0 or config.router_z_loss_coef > 0
        if config.routing != "token":  # as the router: zero (uniform task gates, exact start) or random
            self.rlora_task_logits[adapter_name] = nn.Parameter(torch.zeros(len(config.task_names), k))
            if config.router_init == "random":  # zero heads with zero task logits: every head the same gradient
                with torch.no_grad():
                    nn.init.uniform_(self.rlora_task_logits[adapter_name], -1.0, 1.0)

    def route_logits(
        self, x: torch.Tensor, token_logits: torch.Tensor | None, adapter_name: str, dtype: torch.dtype
    ) -> torch.Tensor:
        """The gate logits (..., K) in `dtype`: the token router's `token_logits` (W_r x), the task table's row of
        each example's task, or their sum (`routing`). A row whose task id is -1, or a forward pass without
        `routing_inputs`, gets zero task logits."""
        if self.routing[adapter_name] == "token":
            return token_logits
        table = self.rlora_task_logits[adapter_name].to(dtype)  # (num_tasks, K)
        task = self._task_logits(x, table)  # (B, 1, ..., 1, K) or None
        if token_logits is None:  # routing "task": the same gates for every token of a row
            shape = (*x.shape[:-1], table.shape[1])
            return task.expand(shape) if task is not None else table.new_zeros(shape)
        return token_logits if task is None else token_logits + task

    def _task_logits(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor | None:
        ids = self.routing_inputs.task_ids if self.routing_inputs is not None else None
        if ids is None:
            return None
        if isinstance(ids, int):
            ids = torch.full((x.shape[0],), ids, dtype=torch.long)
        if ids.dim() != 1 or x.dim() < 2 or ids.shape[0] != x.shape[0]:
            raise ValueError(
                f"task_ids: expected one task id per row of the batch ({x.shape[0]} rows), got shape {tuple(ids.shape)}"
            )
        ids = ids.to(table.device)
        known = (ids >= 0) & (ids < table.shape[0])
        rows = table[ids.clamp(0, table.shape[0] - 1)] * known.unsqueeze(-1).to(table.dtype)  # (B, K); -1: zeros
        return rows.view(ids.shape[0], *([1] * (x.dim() - 2)), table.shape[1])

    def _record_router_losses(self, logits: torch.Tensor) -> None:
        """Keeps this forward's (balance, z) terms over its real tokens: balance = K * sum_k f_k P_k (f_k: the share
        of tokens whose largest gate is k, no gradient; P_k: the mean gate of k), z = mean logsumexp(logits)^2."""
        k = logits.shape[-1]
        flat = logits.reshape(-1, k)
        mask = self.routing_inputs.token_mask if self.routing_inputs is not None else None
        if mask is not None and tuple(mask.shape) == tuple(logits.shape[:-1]):
            flat = flat[mask.reshape(-1).to(flat.device).bool()]
        if flat.shape[0] == 0:
            return
        probs = torch.softmax(flat, dim=-1)  # (tokens, K)
        share = F.one_hot(probs.argmax(-1), k).to(probs.dtype).mean(0)  # f_k
        balance = k * (share * probs.mean(0)).sum()
        z = torch.logsumexp(flat, dim=-1).pow(2).mean()
        self.recorded_router_losses.append((balance, z))

    def _fused(self, key: tuple, sources: list[torch.Tensor], build) -> torch.Tensor:
        """`build()`, a weight concatenated from `sources`; inside `reuse_fused_weights` with autograd off, kept from
        one call to the next while no source changed (its storage and in-place version counter are the key), so that
        a decoding step does not copy the adapter's weights again in every layer."""
        if self._inference_weights is None or torch.is_grad_enabled():
            return build()
        stamp = _stamp(sources)
        kept = self._inference_weights.get(key)
        if kept is None or kept[0] != stamp:
            kept = self._inference_weights[key] = (stamp, build())
        return kept[1]


def _stamp(sources: list[torch.Tensor]) -> tuple:
    """What a kept inference weight is checked against: each source's storage, in-place version counter and dtype."""
    return tuple((t.data_ptr(), t._version, t.dtype) for t in sources)


class RLoraLinear(nn.Module, RLoraLayer):
    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: RLoraConfig, num_heads: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__()
        RLoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, num_heads=num_heads)

    def forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any
    ) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        if adapter_names is not None:
            return self._mixed_batch_forward(x, result, adapter_names)
        for name in self.active_adapters:
            if name in self.rlora_A:
                result = self.delta(x, name, result)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """Row i of the batch gets adapter `adapter_names[i]` ("__base__": none), whatever the active adapter is; the
        rows of one adapter go through `delta` together. PEFT passes `adapter_names` here (`RLoraModel`'s hook)."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names: {len(adapter_names)} names for a batch of {x.shape[0]} rows")
        names = dict.fromkeys(adapter_names)  # unique, in order of first use
        if len(names) == 1:  # every row the same adapter: no rows to gather and scatter back
            return self.delta(x, adapter_names[0], result) if adapter_names[0] in self.rlora_A else result
        inputs = self.routing_inputs
        try:
            for name in names:
                if name not in self.rlora_A:  # "__base__", or an adapter that does not adapt this layer
                    continue
                rows = [i for i, n in enumerate(adapter_names) if n == name]
                self.routing_inputs = inputs.rows(rows) if inputs is not None else None  # those rows' task ids
                result[rows] = self.delta(x[rows], name, result[rows])
        finally:
            self.routing_inputs = inputs
        return result

    def merge(self, *args, **kwargs) -> None:  # PEFT's signature: (safe_merge, adapter_names)
        raise ValueError(MERGE_ERROR)

    @torch.no_grad()
    def add_to_base_weight(self, delta: torch.Tensor) -> float:
        """Adds `delta` (d_out x d_in) to the base layer's weight, in its own layout: transposed for a Conv1D; a
        bitsandbytes 4-bit or 8-bit weight is dequantized, summed in float32 and quantized again, as PEFT's LoRA
        merges into such weights. Returns the largest error that re-quantizing left in the merged weight (0 for a
        float weight)."""
        base = self.get_base_layer()
        weight = base.weight
        if is_conv1d(base):
            delta = delta.t()
        kind = get_bnb_param_type(weight)
        if not kind:  # the sum in the wider of the two dtypes, then one rounding to the weight's
            wide = torch.promote_types(weight.dtype, delta.dtype)
            weight.copy_(weight.to(wide) + delta.to(weight.device, wide))
            return 0.0
        import bitsandbytes as bnb

        state = getattr(base, "state", None)
        merged = dequantize_bnb_weight(weight, state).float() + delta.to(weight.device, torch.float32)
        if kind == "4bit":
            settings = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k != "data"}
            settings |= {"requires_grad": False, "bnb_quantized": False}
            new = bnb.nn.Params4bit(merged.to("cpu"), **settings).to(weight.device)
        else:
            new = bnb.nn.Int8Params(merged.to("cpu"), requires_grad=False, has_fp16_weights=weight.has_fp16_weights)
            new = new.to(weight.device)
            state.reset_grads()
            state.SCB = new.SCB
        base.weight = new
        return (dequantize_bnb_weight(new, state).float() - merged).abs().max().item()

    def unmerge(self) -> None:
        pass  # nothing is ever merged

    def get_delta_weight(self, adapter_name: str, gates: torch.Tensor | None = None) -> torch.Tensor:
        """Update W (d_out x d_in) for a FIXED head mixture `gates` (K,), default uniform; an approximation."""
        B, A = self.fixed_gate_lora(adapter_name, gates)
        return B @ A

    def task_gates(self, adapter_name: str, task_id: int) -> torch.Tensor:
        """The gates (K,) of every token of task `task_id` under routing "task" (float64): fixed by construction,
        so the fixed-gate LoRA of them is exactly this layer for that task."""
        if self.routing[adapter_name] != "task":
            raise ValueError(f"task_gates: routing is {self.routing[adapter_name]!r}; the gates depend on the tokens")
        return torch.softmax(self.rlora_task_logits[adapter_name].detach().double()[task_id], dim=-1)

    def fixed_gate_lora(
        self, adapter_name: str, gates: torch.Tensor | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain LoRA factors (B, A), scaling 1, whose update B @ A is this layer's for the FIXED head mixture
        `gates` (K,), default uniform: B = [s * sum_k g_k B_k, -offset_B] (d_out, r or 2r with the offset) and
        A = [A; offset_A] (r or 2r, d_in), computed in `dtype` (default: float32 at least; float64 stays float64)."""
        k = self.num_heads[adapter_name]
        dtype = dtype or torch.promote_types(self.rlora_A[adapter_name].dtype, torch.float32)
        A = self.rlora_A[adapter_name].detach().to(dtype)
        heads = self.head_weights(adapter_name).detach().to(dtype)  # (K, d_out, r); share="up": (K, r, d_in)
        g = torch.full((k,), 1.0 / k, device=A.device, dtype=dtype) if gates is None else gates.to(A.device, dtype)
        one = torch.tensor(1.0, device=g.device, dtype=dtype)
        if g.shape != (k,) or (g < 0).any() or not torch.isclose(g.sum(), one):
            raise ValueError(f"gates: expected {k} non-negative weights summing to 1, got {gates}")
        if self.share[adapter_name] == "up":  # s * B @ (sum_k g_k A_k)
            B = self.scaling[adapter_name] * self.rlora_B[adapter_name].detach().to(dtype)  # (d_out, r)
            A = torch.einsum("k,kri->ri", g, heads)  # (r, d_in)
        else:
            B = self.scaling[adapter_name] * torch.einsum("k,kor->or", g, heads)  # (d_out, r)
        if adapter_name in self.rlora_offset_A:
            B = torch.cat([B, -self.rlora_offset_B[adapter_name].to(dtype)], dim=1)  # (d_out, 2r)
            A = torch.cat([A, self.rlora_offset_A[adapter_name].to(dtype)])  # (2r, d_in)
        return B, A

    def __repr__(self) -> str:
        return "rlora." + super().__repr__()


@contextlib.contextmanager
def reuse_fused_weights(model: nn.Module) -> Iterator[None]:
    """While inside, every R-LoRA layer of `model` keeps the weights its forward concatenates (A with the offset's A^0
    and the router, B with the offset's B) from one call without autograd to the next: for generation, where a
    decoding step would otherwise copy them again in every layer. A weight changed in place is seen through its
    version counter, and one given new storage (`.data = ...`) through its address; but not every writer bumps the
    counter (fused AdamW does not, nor an in-place write through `.data`), and the decoding path (`_decode_delta`,
    taken in eval mode) keeps the parameter objects it read, so one replaced by another object is not seen by it:
    the weights are kept only where the caller knows they do not change, and dropped on leaving."""
    layers = [m for m in model.modules() if isinstance(m, RLoraLayer)]
    for layer in layers:
        layer._inference_weights = {}
    try:
        yield
    finally:
        for layer in layers:
            layer._inference_weights = None
