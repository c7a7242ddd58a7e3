"""The MoE block: Router (gate + top-k) -> ExpertBackend (dispatch, experts, combine) -> + shared expert.

The block itself knows nothing about where experts live. `LocalExperts` runs them in-process with
moeray.kernels.fused_moe; a Ray backend (built elsewhere from the same w1/w2 tensors, or from
`checkpoint.load_expert_weights`) sends each layer's tokens to shard actors. Swapping the backend
is a transform applied to a finished model (`CausalLM.set_expert_backend`), gpt-fast style.
Shape letters: docs/SHAPES.md.
"""

from __future__ import annotations

from typing import Protocol

import torch
from moeray.kernels import (
    ExpertWeights,
    fused_moe,
    prepare_expert_weights,
    silu_and_mul,
    topk_gating,
)
from torch import nn


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
    w2 [E_local, D, F], kept in the form kernels.prepare_expert_weights gives them (prepacked
    for oneDNN on CPU). A full model holds every expert (E_local = E). A shard holds a subset:
    pass `expert_ids` (layer -> the global ids of the rows of w1/w2) and `num_experts` (global E); tokens routed to
    experts it does not hold contribute nothing (their ids map to -1, which fused_moe skips).
    """

    def __init__(
        self,
        weights: dict[int, tuple[torch.Tensor, torch.Tensor]],
        expert_ids: dict[int, list[int]] | None = None,
        num_experts: int | None = None,
    ) -> None:
        self.weights: dict[int, tuple[ExpertWeights, ExpertWeights]] = {
            layer: prepare_expert_weights(w1, w2) for layer, (w1, w2) in weights.items()
        }
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
                self._to_local[layer] = table.to(weights[layer][0].device)

    def forward_layer(
        self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        w1, w2 = self.weights[layer]
        table = self._to_local.get(layer)
        if table is not None:
            topk_ids = table[topk_ids.long()]  # [T, K] local ids or -1
        return fused_moe(hidden, w1, w2, topk_weights, topk_ids)

    def begin_step(self) -> None:
        """Nothing moves between steps in-process."""

    def end_step(self, expert_counts: torch.Tensor) -> None:
        """In-process load is not reported (the counts stay readable on the model)."""


class DenseMLP(nn.Module):
    """SwiGLU FFN with gate and up fused into one Linear: x [T, D] -> [T, D]."""

    def __init__(self, dim: int, width: int, bias: bool = False) -> None:
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * width, bias=bias)  # gate rows then up rows
        self.w2 = nn.Linear(width, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(silu_and_mul(self.w13(x)))  # [T, 2F] -> [T, F] -> [T, D]


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
        weights, ids = topk_gating(self.gate(x), self.top_k, "softmax", self.renormalize)  # [T, K]
        if self.counts is not None:
            self.counts += torch.bincount(ids.view(-1), minlength=self.num_experts)
        assert self.backend is not None, "set_expert_backend was not called"
        out = self.backend.forward_layer(self.layer, x, weights, ids)  # [T, D]
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
