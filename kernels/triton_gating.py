"""Fused top-k gating in Triton: scoring, selection bias, top-k and renormalisation in one pass.

One program takes BLOCK_T rows of router logits with the whole expert axis in one power-of-two
block, so the logits are read once and only [T, K] weights and ids are written. Top-k is K rounds
of (row max, lowest id reaching it, knock it out): K is small (1-8) and unrolled. Torch twin:
moeray.kernels.reference.topk_gating. Shape letters: docs/SHAPES.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moeray.kernels import block_config, contracts


@triton.jit
def _topk_gating_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    T,
    E,
    stride_lt,
    stride_le,
    TOP_K: tl.constexpr,
    SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    cols = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    row_ok = rows < T
    col_ok = cols < E
    ptrs = logits_ptr + rows[:, None].to(tl.int64) * stride_lt + cols[None, :] * stride_le
    x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    # Padding columns get -inf so softmax gives them 0 and selection never picks them.
    x = tl.where(col_ok[None, :], x, float("-inf"))
    if SIGMOID:
        scores = tl.sigmoid(x)
    else:
        p = tl.exp(x - tl.max(x, axis=1)[:, None])
        scores = p / tl.sum(p, axis=1)[:, None]
    select = scores
    if HAS_BIAS:
        # DeepSeek-V3: the bias steers selection only; the weights stay the unbiased scores.
        select = scores + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    select = tl.where(col_ok[None, :], select, float("-inf"))

    kcols = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    w_tile = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    id_tile = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(select, axis=1)  # [BLOCK_T]
        # Lowest id among ties, as the reference's order promises.
        idx = tl.min(tl.where(select == best[:, None], cols[None, :], BLOCK_E), axis=1)
        chosen = cols[None, :] == idx[:, None]  # [BLOCK_T, BLOCK_E]
        w = tl.sum(tl.where(chosen, scores, 0.0), axis=1)  # [BLOCK_T]
        w_tile = tl.where(kcols[None, :] == k, w[:, None], w_tile)
        id_tile = tl.where(kcols[None, :] == k, idx[:, None], id_tile)
        select = tl.where(chosen, float("-inf"), select)
    if RENORMALIZE:
        w_tile = w_tile / tl.maximum(tl.sum(w_tile, axis=1), 1e-20)[:, None]

    out_off = rows[:, None].to(tl.int64) * TOP_K + kcols[None, :]
    out_mask = row_ok[:, None] & (kcols[None, :] < TOP_K)
    tl.store(weights_ptr + out_off, w_tile, mask=out_mask)
    tl.store(ids_ptr + out_off, id_tile, mask=out_mask)


def _launch_topk_gating(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str,
    renormalize: bool,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    contracts.check_topk_gating(router_logits, top_k, scoring, bias)
    T, E = router_logits.shape
    dev = router_logits.device
    weights = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=dev)
    if T == 0:
        return weights, ids
    cfg = block_config.lookup("topk_gating", f"E={E}", router_logits.dtype, T, dev)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]),)
    _topk_gating_kernel[grid](
        router_logits,
        router_logits if bias is None else bias.contiguous(),  # never read without a bias
        weights,
        ids,
        T,
        E,
        router_logits.stride(0),
        router_logits.stride(1),
        TOP_K=top_k,
        SIGMOID=scoring == "sigmoid",
        HAS_BIAS=bias is not None,
        RENORMALIZE=bool(renormalize),
        BLOCK_T=cfg["BLOCK_T"],
        BLOCK_E=triton.next_power_of_2(E),
        BLOCK_K=triton.next_power_of_2(top_k),
        num_warps=cfg["num_warps"],
    )
    return weights, ids


def topk_gating(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = False,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights float32 [T, K], ids int32 [T, K]); see the reference."""
    return _launch_topk_gating(router_logits, top_k, scoring, renormalize, bias)
