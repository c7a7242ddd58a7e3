"""Torch references for the MoE hot path: the CPU implementation and the oracle for the Triton kernels.

Every function here has the same signature as its Triton twin in this package. The references
compute in float32 (inputs are upcast; a no-op for fp32 models, which the CPU engine runs, so that
path makes no copies) and return the input dtype, except where the contract says float32. One
exception: fused_moe keeps its GEMM operands in the weights' dtype with fp32 accumulation, as the
Triton kernel does (see its docstring).
Shape letters: docs/SHAPES.md.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def topk_gating(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = False,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores experts and picks the top-k per token.

    router_logits [T, E] -> (weights float32 [T, K], ids int32 [T, K]).
    scoring="softmax": softmax over all E, then top-k (Mixtral, Qwen2/3-MoE, OLMoE);
    scoring="sigmoid": sigmoid scores; `bias` [E] is added for *selection only* and the weights are
    the unbiased scores (DeepSeek-V3). renormalize=True divides the K weights by their sum.
    Ids come in descending order of the selection score; ties pick the lower expert id.
    """
    logits = router_logits.float()  # [T, E]
    if scoring == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif scoring == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    select = scores if bias is None else scores + bias.float()
    _, ids = torch.topk(select, top_k, dim=-1)  # [T, K]
    weights = scores.gather(-1, ids)  # [T, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return weights, ids.to(torch.int32)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation: [T, 2F] (gate then up) -> [T, F] = silu(gate) * up."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return F.silu(gate).mul_(up).to(gate_up.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: x [..., D], weight [D] -> [..., D] (as Llama/Mixtral/Qwen do it:
    normalise in fp32, cast back to x's dtype, then scale)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, HF's rotate_half convention: x [T, heads, Dh], cos/sin [T, 1, Dh] (in
    x's dtype) -> x * cos + rotate_half(x) * sin, each product rounded to x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm, as a decoder layer does between its blocks:
    x [..., D], residual [..., D], weight [D] -> (rms_norm(x + residual) [..., D], x + residual [..., D]).
    The sum is rounded to x's dtype before the norm, as HF models do."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def fused_moe(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The routed-expert FFN: out[t] = sum_k w[t,k] * W2[e] @ (silu(W1g[e] @ x) * (W1u[e] @ x)).

    hidden [T, D], w1 [E, 2F, D] (gate rows then up rows), w2 [E, D, F],
    topk_weights [T, K] (float32), topk_ids [T, K] (int) -> [T, D] in out_dtype (default
    hidden's; the sum is fp32, so out_dtype=float32 returns it unrounded).
    Ids outside [0, E) (e.g. -1 for experts another shard holds) contribute nothing, so a shard
    holding E_local experts gets its partial sum; the shards' outputs add up to the full layer.
    Loops only over experts that got tokens (one host sync for the counts).
    Precision: the GEMM operands stay in the weights' dtype with fp32 accumulation (what the
    Triton kernel's tl.dot and CPU bf16 GEMMs do; upcasting bf16 weights would copy every
    expert's weights on every call), the SwiGLU and the weighted combine run in fp32.
    """
    T, D = hidden.shape
    E = w1.shape[0]
    K = topk_ids.shape[1]
    out = torch.zeros(T, D, dtype=torch.float32, device=hidden.device)
    flat_ids = topk_ids.reshape(-1).long()  # [T*K]
    flat_w = topk_weights.reshape(-1).float()  # [T*K]
    # Foreign ids (outside [0, E)) sort to the end under key E and are never visited.
    key = torch.where((flat_ids >= 0) & (flat_ids < E), flat_ids, E)  # [T*K]
    order = torch.argsort(key, stable=True)  # [T*K]
    counts = torch.bincount(key, minlength=E + 1)[:E].tolist()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        slots = order[start : start + n]  # [n] positions in the flattened [T*K]
        start += n
        tok = slots // K  # [n]
        x = hidden.index_select(0, tok).to(w1.dtype)  # [n, D]
        h = silu_and_mul(F.linear(x, w1[e]))  # [n, 2F] -> [n, F], SwiGLU in fp32
        y = F.linear(h, w2[e]).float()  # [n, D]
        out.index_add_(0, tok, y.mul_(flat_w[slots].unsqueeze(-1)))
    return out.to(out_dtype or hidden.dtype)


class TokenPermutation(NamedTuple):
    """Token slots sorted by expert: the dispatch plan of one MoE layer.

    A slot is one (token, choice) pair, numbered t*K + k. Rows are the permuted order: expert e
    owns rows [expert_offsets[e], expert_offsets[e+1]); its first expert_counts[e] rows are real,
    the rest pad the segment to a multiple of block_m (so a GEMM tile never spans two experts).
      sorted_slots   int32 [P]      slot of each row; padding rows hold T*K (out of range)
      slot_rows      int32 [T*K]    the inverse: row of each slot, -1 where the id is outside [0, E)
      expert_offsets int32 [E + 1]  padded segment starts; expert_offsets[E] = rows in use
      expert_counts  int32 [E]      real rows per expert
      block_experts  int32 [P / block_m]  expert of each row block, -1 past the rows in use
    P = padded_rows(T*K, E, block_m) is a static upper bound, so no host sync is needed.
    Within an expert, rows keep slot order (the permutation is stable).
    """

    sorted_slots: torch.Tensor
    slot_rows: torch.Tensor
    expert_offsets: torch.Tensor
    expert_counts: torch.Tensor
    block_experts: torch.Tensor
    top_k: int
    block_m: int


def padded_rows(num_slots: int, num_experts: int, block_m: int) -> int:
    """Upper bound P on permuted rows: every expert may waste block_m - 1 rows of padding."""
    if block_m == 1:
        return num_slots
    blocks = -(-(num_slots + num_experts * (block_m - 1)) // block_m)
    return blocks * block_m


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int = 1) -> TokenPermutation:
    """Sorts token slots by expert: topk_ids [T, K] -> TokenPermutation (see its shapes).

    Ids outside [0, num_experts) are dropped (their slot_rows entry is -1).
    """
    T, K = topk_ids.shape
    E, dev = num_experts, topk_ids.device
    flat = topk_ids.reshape(-1).long()  # [T*K]
    key = torch.where((flat >= 0) & (flat < E), flat, E)  # [T*K], E = dropped
    order = torch.argsort(key, stable=True)  # [T*K]
    counts = torch.bincount(key, minlength=E + 1)[: E + 1]  # [E + 1]
    starts = torch.cumsum(counts, 0) - counts  # [E + 1] unpadded segment starts
    padded = (counts[:E] + block_m - 1) // block_m * block_m  # [E]
    offsets = torch.zeros(E + 2, dtype=torch.long, device=dev)
    offsets[1 : E + 1] = torch.cumsum(padded, 0)
    # Sorted position i holds expert e = key[order[i]] at rank i - starts[e] within its segment.
    e_sorted = key[order]  # [T*K]
    rows = offsets[e_sorted] + torch.arange(T * K, device=dev) - starts[e_sorted]  # [T*K]
    keep = e_sorted < E
    P = padded_rows(T * K, E, block_m)
    sorted_slots = torch.full((P,), T * K, dtype=torch.int32, device=dev)
    sorted_slots[rows[keep]] = order[keep].to(torch.int32)
    slot_rows = torch.full((T * K,), -1, dtype=torch.int32, device=dev)
    slot_rows[order[keep]] = rows[keep].to(torch.int32)
    block_experts = torch.full((P // block_m,), -1, dtype=torch.int32, device=dev)
    used = torch.repeat_interleave(
        torch.arange(E, device=dev), padded // block_m
    )  # [blocks in use]
    block_experts[: used.numel()] = used.to(torch.int32)
    return TokenPermutation(
        sorted_slots,
        slot_rows,
        offsets[: E + 1].to(torch.int32),
        counts[:E].to(torch.int32),
        block_experts,
        K,
        block_m,
    )


def permute_tokens(hidden: torch.Tensor, perm: TokenPermutation) -> torch.Tensor:
    """Dispatch: hidden [T, D] -> rows [P, D] in expert order (padding rows are zero)."""
    T = hidden.shape[0]
    valid = perm.sorted_slots < T * perm.top_k  # [P]
    tok = torch.where(valid, perm.sorted_slots.long() // perm.top_k, 0)  # [P]
    return hidden[tok].masked_fill_(~valid.unsqueeze(-1), 0)


def unpermute_tokens(
    rows: torch.Tensor, perm: TokenPermutation, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Weighted combine, the inverse of permute_tokens: rows [P, D], topk_weights [T, K] -> [T, D].

    out[t] = sum_k topk_weights[t, k] * rows[slot_rows[t*K + k]], skipping slots with row -1.
    """
    T, K = topk_weights.shape
    D = rows.shape[1]
    idx = perm.slot_rows.long()  # [T*K]
    y = rows.float()[idx.clamp_min(0)].view(T, K, D)  # [T, K, D]
    w = torch.where(idx.view(T, K) >= 0, topk_weights.float(), 0.0)  # [T, K]
    return torch.einsum("tkd,tk->td", y, w).to(rows.dtype)
