"""The MoE block: Router (gate + top-k) -> ExpertBackend (dispatch, experts, combine) -> + shared expert.

The block itself knows nothing about where experts live. `LocalExperts` runs them in-process with
moeray.kernels.fused_moe; a Ray backend (built elsewhere from the same w1/w2 tensors, or from
`checkpoint.load_expert_weights`) sends each layer's tokens to shard actors. Swapping the backend
is a transform applied to a finished model (`CausalLM.set_expert_backend`), gpt-fast style.
Shape letters: docs/SHAPES.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from moeray.kernels import fused_moe, silu_and_mul, topk_gating
from moeray.workers.gemv import expert_linear, linear
from torch import nn


def column_major(w: torch.Tensor) -> torch.Tensor:
    """The same [..., out, in] weight, stored with its last two dims swapped in memory.

    F.linear(x, w) then hands BLAS a contiguous [in, out] matrix (an "NN" GEMM), which on CPU
    streams weights from DRAM about 1.7x faster at decode batch sizes than the row-major layout
    (measured on the 2-core dev machine: bench-model decode step at batch 1 from ~24 to ~11 ms,
    and no slower at batch 32). Logical shapes, and so every contract, are unchanged."""
    return w.transpose(-1, -2).contiguous().transpose(-1, -2)


class ExpertBackend(Protocol):
    """Runs the routed experts of one MoE layer for a step's tokens.

    The engine brackets every step's forward with begin_step() and end_step(counts): a backend
    may change where experts live only in begin_step, and learns the step's expert load from
    end_step, never by watching layer indices go by."""

    def begin_step(self) -> None:
        """A step's forward is about to run (nothing of it has yet)."""
        ...

    def end_step(self, expert_counts: torch.Tensor) -> None:
        """The step's forward ran: expert_counts int64 [num_layers, E] are its tokens routed per
        (model layer, expert) (rows of dense layers are 0)."""
        ...

    def forward_layer(
        self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """hidden [T, D], topk_weights [T, K] f32, topk_ids [T, K] int32 (global expert ids)
        -> [T, D] routed output (weighted, summed over K), in hidden's dtype."""
        ...


class LocalExperts:
    """In-process experts: per MoE layer, w1 [E_local, 2F, D] (gate rows then up rows) and
    w2 [E_local, D, F].

    The tensors may be strided views (the CPU loader stores them column-major). A full model
    holds every expert (E_local = E). A shard holds a subset: pass `expert_ids`
    (layer -> the global ids of the rows of w1/w2) and `num_experts` (global E); tokens routed to
    experts it does not hold contribute nothing (their ids map to -1, which fused_moe skips).
    """

    def __init__(
        self,
        weights: dict[int, tuple[torch.Tensor, torch.Tensor]],
        expert_ids: dict[int, list[int]] | None = None,
        num_experts: int | None = None,
    ) -> None:
        self.weights = weights
        self.expert_ids = expert_ids
        self._to_local: dict[int, torch.Tensor] = {}
        if expert_ids is not None:
            if num_experts is None:
                raise ValueError("num_experts is required when expert_ids is given")
            for layer, ids in expert_ids.items():
                table = torch.full((num_experts,), -1, dtype=torch.int32)  # [E] global -> local
                table[torch.tensor(ids, dtype=torch.long)] = torch.arange(
                    len(ids), dtype=torch.int32
                )
                self._to_local[layer] = table

    def begin_step(self) -> None:
        """Nothing moves between steps in-process."""

    def end_step(self, expert_counts: torch.Tensor) -> None:
        """In-process load is not reported (the counts stay readable on the model)."""

    def layer_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1 [E_local, 2F, D], w2 [E_local, D, F]) of MoE layer `layer`."""
        return self.weights[layer]

    def forward_layer(
        self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        w1, w2 = self.weights[layer]
        table = self._to_local.get(layer)
        if table is not None:
            topk_ids = table.to(topk_ids.device)[topk_ids.long()]  # [T, K] local ids or -1
        if hidden.device.type == "cpu" and hidden.dtype == torch.float32:
            if hidden.shape[0] == 1:
                return _one_token_moe(hidden, w1, w2, topk_weights, topk_ids)
            return cpu_fused_moe(hidden, w1, w2, topk_weights, topk_ids, expert_linear)
        return fused_moe(hidden, w1, w2, topk_weights, topk_ids)


def _one_token_moe(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """fused_moe for a single fp32 token on CPU (batch-1 decode), without the sort/permute
    bookkeeping that costs more than the K small GEMVs: fp32 products, summed in ascending
    expert order. With row-major weights the numbers equal the reference bit for bit; with the
    CPU loader's column-major weights the GEMVs go through numpy's BLAS (workers/gemv.py), the
    same math in another summation order. hidden [1, D] -> [1, D]."""
    E = w1.shape[0]
    out = torch.zeros_like(hidden)
    for e, w in sorted(zip(topk_ids[0].tolist(), topk_weights[0].tolist())):
        if 0 <= e < E:
            h = silu_and_mul(expert_linear(hidden, w1[e]))  # [1, F]
            out += expert_linear(h, w2[e]) * w  # [1, D]
    return out


def cpu_fused_moe(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    local_ids: torch.Tensor,
    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear,
) -> torch.Tensor:
    """kernels.reference.fused_moe's algorithm for fp32 CPU tensors: the same rows in the same
    order, with its bookkeeping (grouping the [t, K] slots by expert) done in numpy (on a few
    dozen ids a numpy op costs ~1 us and a torch op ~5-10 us). `linear` runs the GEMMs: with
    F.linear the numbers equal the reference's; LocalExperts and the expert shards both pass
    workers/gemv.expert_linear (numpy's BLAS for column-major weights), so in-process and
    sharded experts give the same numbers as each other.
    hidden [t, D] f32, w1 [e, 2F, D], w2 [e, D, F], topk_weights [t, K] f32, local_ids [t, K]
    -> [t, D] float32 (ids outside [0, e) contribute nothing)."""
    t, D = hidden.shape
    E = w1.shape[0]
    K = local_ids.shape[1]
    out = torch.zeros(t, D, dtype=torch.float32)
    flat = local_ids.numpy().reshape(-1)  # [t*K]
    key = np.where((flat >= 0) & (flat < E), flat, E)  # [t*K]; foreign ids sort last, unvisited
    order = np.argsort(key, kind="stable")  # [t*K]
    counts = np.bincount(key, minlength=E + 1)[:E].tolist()
    flat_w = topk_weights.reshape(-1).float()  # [t*K]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        slots = torch.from_numpy(order[start : start + n])  # [n] positions in the flat [t*K]
        start += n
        tok = slots // K  # [n]
        x = hidden.index_select(0, tok).to(w1.dtype)  # [n, D]
        h = silu_and_mul(linear(x, w1[e]))  # [n, 2F] -> [n, F], SwiGLU in fp32
        y = linear(h, w2[e]).float()  # [n, D]
        out.index_add_(0, tok, y.mul_(flat_w[slots].unsqueeze(-1)))
    return out


class DenseMLP(nn.Module):
    """SwiGLU FFN with gate and up fused into one Linear: x [T, D] -> [T, D]."""

    def __init__(self, dim: int, width: int, bias: bool = False) -> None:
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * width, bias=bias)  # gate rows then up rows
        self.w2 = nn.Linear(width, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = silu_and_mul(linear(x, self.w13.weight, self.w13.bias))  # [T, 2F] -> [T, F]
        return linear(h, self.w2.weight, self.w2.bias)  # [T, D]


class MoEBlock(nn.Module):
    """Router -> ExpertBackend -> (+ sigmoid-gated shared expert). Counts routed tokens per expert."""

    def __init__(
        self,
        layer: int,
        dim: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        shared_width: int = 0,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.shared_expert = DenseMLP(dim, shared_width) if shared_width else None
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if shared_width else None
        self.backend: ExpertBackend | None = None  # set by CausalLM.set_expert_backend
        self.counts: torch.Tensor | None = None  # [E] int64 row of the model's [L, E] counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        # HF routers: softmax in fp32 over all E, top-k, optional renormalisation.
        weights, ids = topk_gating(
            linear(x, self.gate.weight), self.top_k, "softmax", self.renormalize
        )  # [T, K]
        if self.counts is not None:
            self.counts += torch.bincount(ids.view(-1), minlength=self.num_experts)
        assert self.backend is not None, "set_expert_backend was not called"
        out = self.backend.forward_layer(self.layer, x, weights, ids)  # [T, D]
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
