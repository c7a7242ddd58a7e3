"""moeray.kernels: the MoE hot path behind one API, Triton on CUDA and torch everywhere.

The public functions (shape letters in docs/SHAPES.md):
    topk_gating(router_logits [T, E], top_k, scoring, renormalize, bias) -> (weights f32 [T, K], ids i32 [T, K])
    fused_moe(hidden [T, D], w1 [E, 2F, D], w2 [E, D, F], topk_weights [T, K], topk_ids [T, K]) -> [T, D]
    prepare_expert_weights(w1 [E, 2F, D], w2 [E, D, F]) -> (w1, w2) in the form fused_moe runs fastest
    packed_linear(x [T, in], PackedWeight(w [out, in]), bias) -> [T, out]  (CPU, oneDNN-prepacked)
    rms_norm(x [..., D], weight [D], eps) -> [..., D]
    add_rms_norm(x [..., D], residual [..., D], weight [D], eps) -> (normed [..., D], x + residual [..., D])
    silu_and_mul(gate_up [T, 2F]) -> [T, F]
    apply_rope(x [T, heads, Dh], cos [T, 1, Dh], sin [T, 1, Dh]) -> [T, heads, Dh]
    moe_align(topk_ids [T, K], num_experts, block_m) -> TokenPermutation (slots sorted by expert)
    permute_tokens(hidden [T, D], perm) -> [P, D]            (dispatch: rows in expert order)
    unpermute_tokens(rows [P, D], perm, topk_weights [T, K]) -> [T, D]  (weighted combine)
    decode_attention(q [B, H, Dh], k_cache, v_cache [N, S, G, Dh], block_tables [B, M],
                     context_lens [B], scale) -> [B, H, Dh]   (CPU, where runs_cpu_kernels)
On CPU, where `runs_cpu_kernels` (MOERAY_KERNELS=auto, fp32/bf16, the extension built),
rms_norm, add_rms_norm, apply_rope and decode_attention run moeray's C++ kernels
(kernels/cpu_gemm.py).

Each call checks its arguments (ValueError naming the argument; the C++ CPU kernels check what
depends on the data, such as decode_attention's lengths and block tables, themselves and raise
RuntimeError naming the argument), then runs the Triton kernel or
the torch reference as moeray.kernels.dispatch decides (MOERAY_KERNELS=auto|triton|torch;
`use_backend(...)` overrides it in tests). Expert weights go through `prepare_expert_weights`
once, where they are loaded: on CPU it packs them for oneDNN (kernels/cpu_packed.py, the torch
backend's CPU fast path), elsewhere it returns them as they are. Ids outside [0, E) contribute
nothing, so a shard that holds some experts computes its partial sum when the caller maps
foreign experts to -1.
This module never imports triton; the triton_* modules do, and only when they are about to run.
"""

from __future__ import annotations

import torch
from moeray.kernels import contracts, cpu_gemm, cpu_packed, reference
from moeray.kernels.cpu_packed import PackedExperts, PackedWeight
from moeray.kernels.cpu_packed import linear as packed_linear
from moeray.kernels.dispatch import (
    packs_cpu_weights,
    resolve,
    runs_cpu_kernels,
    set_backend,
    triton_module,
    use_backend,
)
from moeray.kernels.reference import TokenPermutation, padded_rows

#: Expert weights as fused_moe takes them: plain [E, out, in] tensors, or prepacked for the CPU.
ExpertWeights = torch.Tensor | PackedExperts

__all__ = [
    "ExpertWeights",
    "PackedExperts",
    "PackedWeight",
    "TokenPermutation",
    "add_rms_norm",
    "apply_rope",
    "decode_attention",
    "fused_moe",
    "moe_align",
    "packed_linear",
    "packs_cpu_weights",
    "padded_rows",
    "permute_tokens",
    "prepare_expert_weights",
    "rms_norm",
    "runs_cpu_kernels",
    "set_backend",
    "silu_and_mul",
    "topk_gating",
    "unpermute_tokens",
    "use_backend",
]


def topk_gating(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = False,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights float32 [T, K], ids int32 [T, K]); see reference.topk_gating."""
    contracts.check_topk_gating(router_logits, top_k, scoring, bias)
    if resolve(router_logits) == "triton":
        return triton_module("triton_gating").topk_gating(
            router_logits, top_k, scoring, renormalize, bias
        )
    return reference.topk_gating(router_logits, top_k, scoring, renormalize, bias)


def fused_moe(
    hidden: torch.Tensor,
    w1: ExpertWeights,
    w2: ExpertWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """hidden [T, D], w1 [E, 2F, D], w2 [E, D, F], topk_weights [T, K], topk_ids [T, K] -> [T, D].

    The routed-expert FFN (grouped GEMM, SwiGLU, down projection, weighted combine); ids outside
    [0, E) contribute nothing. See reference.fused_moe. w1/w2 as prepare_expert_weights left
    them: prepacked ones run kernels/cpu_packed.py. The weighted sum is fp32 and returned in
    out_dtype (default hidden's): expert shards ask for float32, so that their partial sums add
    up to the in-process result without a second rounding.
    """
    if out_dtype not in (None, torch.float32, hidden.dtype):
        raise ValueError(f"out_dtype must be None, float32 or hidden's dtype, got {out_dtype}")
    contracts.check_fused_moe(hidden, w1, w2, topk_weights, topk_ids)
    backend = resolve(hidden)
    if isinstance(w1, PackedExperts) and isinstance(w2, PackedExperts):
        if backend == "triton":
            raise ValueError(
                "w1 and w2 are prepacked for the CPU (prepare_expert_weights ran under another "
                "backend); the Triton kernels need plain tensors"
            )
        return cpu_packed.fused_moe(hidden, w1, w2, topk_weights, topk_ids, out_dtype)
    if isinstance(w1, PackedExperts) or isinstance(w2, PackedExperts):
        raise ValueError("w1 and w2 must both be prepacked or both plain tensors")
    if backend == "triton":
        return triton_module("triton_moe").fused_moe(
            hidden, w1, w2, topk_weights, topk_ids, out_dtype
        )
    return reference.fused_moe(hidden, w1, w2, topk_weights, topk_ids, out_dtype)


def prepare_expert_weights(
    w1: torch.Tensor, w2: torch.Tensor
) -> tuple[ExpertWeights, ExpertWeights]:
    """w1 [E, 2F, D], w2 [E, D, F] -> the same weights in the form fused_moe runs fastest on
    their device: prepacked for oneDNN on CPU (see dispatch.packs_cpu_weights), else unchanged.
    Call once where the weights are loaded (the in-process experts and the expert shards both
    do, so both run the same GEMMs and give the same numbers)."""
    if w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"w1 and w2 must be [E, 2F, D] and [E, D, F], got {tuple(w1.shape)}, {tuple(w2.shape)}"
        )
    if packs_cpu_weights(w1) and packs_cpu_weights(w2) and w2.dtype == w1.dtype:
        return PackedExperts(w1), PackedExperts(w2)
    return w1, w2


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> [..., D]; see reference.rms_norm (on CPU moeray's C++ kernel
    where it runs: the same arithmetic, the sum of squares in another order)."""
    contracts.check_rms_norm(x, weight, eps)
    if resolve(x) == "triton":
        return triton_module("triton_norm").rms_norm(x, weight, eps)
    if runs_cpu_kernels(x) and weight.dtype == x.dtype:
        return cpu_gemm.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., D], weight [D] -> (rms_norm(x + residual), x + residual); one pass on GPU."""
    contracts.check_add_rms_norm(x, residual, weight, eps)
    if resolve(x) == "triton":
        return triton_module("triton_norm").add_rms_norm(x, residual, weight, eps)
    if runs_cpu_kernels(x) and weight.dtype == x.dtype == residual.dtype:
        return cpu_gemm.add_rms_norm(x, residual, weight, eps)
    return reference.add_rms_norm(x, residual, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, Dh], cos/sin [T, 1, Dh] -> x rotated (see reference.apply_rope; on CPU
    moeray's C++ kernel where it runs, equal bit for bit)."""
    if runs_cpu_kernels(x) and x.dtype == cos.dtype == sin.dtype and x.shape[-1] % 2 == 0:
        return cpu_gemm.apply_rope(x, cos, sin)
    return reference.apply_rope(x, cos, sin)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2F] (gate then up) -> [T, F]; see reference.silu_and_mul."""
    contracts.check_silu_and_mul(gate_up)
    if resolve(gate_up) == "triton":
        return triton_module("triton_norm").silu_and_mul(gate_up)
    return reference.silu_and_mul(gate_up)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int = 1) -> TokenPermutation:
    """topk_ids [T, K] -> TokenPermutation (slots sorted by expert, segments padded to block_m)."""
    contracts.check_moe_align(topk_ids, num_experts, block_m)
    if resolve(topk_ids) == "triton":
        return triton_module("triton_moe").moe_align(topk_ids, num_experts, block_m)
    return reference.moe_align(topk_ids, num_experts, block_m)


def permute_tokens(hidden: torch.Tensor, perm: TokenPermutation) -> torch.Tensor:
    """Dispatch: hidden [T, D] -> rows [P, D] in expert order (padding rows are zero)."""
    if resolve(hidden) == "triton":
        return triton_module("triton_moe").permute_tokens(hidden, perm)
    return reference.permute_tokens(hidden, perm)


def unpermute_tokens(
    rows: torch.Tensor, perm: TokenPermutation, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Weighted combine: rows [P, D], topk_weights [T, K] -> [T, D]; slots with row -1 skipped."""
    if resolve(rows) == "triton":
        return triton_module("triton_moe").unpermute_tokens(rows, perm, topk_weights)
    return reference.unpermute_tokens(rows, perm, topk_weights)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Paged decode attention with moeray's CPU kernel (kernels/cpu_attention.cpp): q [B, H, Dh]
    (one query per sequence), k_cache/v_cache [N, S, G, Dh], block_tables [B, M] int64,
    context_lens [B] int64 -> [B, H, Dh] = softmax(q k^T * scale) v over each sequence's
    positions 0..len-1, in fp32, K/V read in place. Only where runs_cpu_kernels(k_cache)
    (workers/attention.py keeps the torch path for the rest)."""
    if not runs_cpu_kernels(k_cache):
        raise ValueError(
            "decode_attention runs where runs_cpu_kernels(k_cache) is true: MOERAY_KERNELS"
            "=auto, a CPU fp32 or bf16 cache, and moeray's C++ CPU kernels built"
        )
    return cpu_gemm.decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
