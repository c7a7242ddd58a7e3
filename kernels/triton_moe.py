"""The routed-expert FFN in Triton: token permutation, grouped GEMMs with fused SwiGLU, combine.

fused_moe runs five kernels, no host sync:
  1. _expert_counts_kernel   one program per expert counts its slots             -> counts [E]
  2. _expert_scatter_kernel  one program per expert: padded offsets (a prefix sum over counts),
                             stable positions of its slots (cumsum), block -> expert map
  3. _gate_up_kernel         per (row block, F block): x rows gathered by slot, two accumulators
                             (gate rows, up rows of w1[e]), silu(gate) * up in the epilogue -> h [P, F]
  4. _down_kernel            per (row block, D block): h @ w2[e]^T                  -> y [P, D]
  5. _combine_kernel         per (token, D block): sum_k w[t,k] * y[slot_rows[t*K+k]] -> out [T, D]
Every row block belongs to one expert (segments are padded to BLOCK_M), so a tile reads one
expert's weights. Row blocks past the rows in use have expert -1 and exit at once: the grid is
sized by the static bound P, so launching never waits for the counts.

EXPERTS OUTSIDE THE SHARD: ids outside [0, E) (the caller maps foreign experts to -1) match no
expert's program in steps 1-2, so their slots get no row, slot_rows = -1, and step 5 skips them:
they contribute nothing, and the shards' partial outputs add up to the full layer.

Torch twins: moeray.kernels.reference.{moe_align, permute_tokens, unpermute_tokens, fused_moe}.
Shape letters: docs/SHAPES.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moeray.kernels import block_config, contracts
from moeray.kernels.reference import TokenPermutation, padded_rows


@triton.jit
def _expert_counts_kernel(ids_ptr, counts_ptr, num_slots, BLOCK: tl.constexpr):
    e = tl.program_id(0)
    total = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, num_slots, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < num_slots, other=-1)
        total += (ids == e).to(tl.int32)
    tl.store(counts_ptr + e, tl.sum(total, axis=0))


@triton.jit
def _expert_scatter_kernel(
    ids_ptr,
    counts_ptr,
    sorted_slots_ptr,
    slot_rows_ptr,
    offsets_ptr,
    block_experts_ptr,
    num_slots,
    E,
    BLOCK_M: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    e = tl.program_id(0)
    # 1. This expert's padded segment start: an exclusive prefix sum over the padded counts.
    ecols = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + ecols, mask=ecols < E, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.sum(tl.where(ecols < e, padded, 0), axis=0)
    size = tl.sum(tl.where(ecols == e, padded, 0), axis=0)
    tl.store(offsets_ptr + e, start)
    if e == E - 1:
        tl.store(offsets_ptr + E, start + size)
    # 2. Its row blocks belong to it.
    num_blocks = size // BLOCK_M
    for b0 in range(0, num_blocks, BLOCK):
        blocks = b0 + tl.arange(0, BLOCK)
        tl.store(
            block_experts_ptr + start // BLOCK_M + blocks, e + 0 * blocks, mask=blocks < num_blocks
        )
    # 3. Its slots, in slot order (stable): row = start + rank among this expert's slots.
    base = start
    for s0 in range(0, num_slots, BLOCK):
        slots = s0 + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + slots, mask=slots < num_slots, other=-1)
        hit = (ids == e).to(tl.int32)
        rows = base + tl.cumsum(hit, axis=0) - 1
        tl.store(sorted_slots_ptr + rows, slots, mask=hit > 0)
        tl.store(slot_rows_ptr + slots, rows, mask=hit > 0)
        base += tl.sum(hit, axis=0)


def _launch_moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> TokenPermutation:
    contracts.check_moe_align(topk_ids, num_experts, block_m)
    T, K = topk_ids.shape
    E, dev = num_experts, topk_ids.device
    flat = topk_ids.reshape(-1).contiguous()  # [T*K]
    P = padded_rows(T * K, E, block_m)
    sorted_slots = torch.full((P,), T * K, dtype=torch.int32, device=dev)
    slot_rows = torch.full((T * K,), -1, dtype=torch.int32, device=dev)
    offsets = torch.zeros(E + 1, dtype=torch.int32, device=dev)
    counts = torch.zeros(E, dtype=torch.int32, device=dev)
    block_experts = torch.full((P // block_m,), -1, dtype=torch.int32, device=dev)
    if T * K > 0:
        cfg = block_config.lookup("moe_align", f"E={E},K={K}", topk_ids.dtype, T, dev)
        warps = cfg["num_warps"]
        _expert_counts_kernel[(E,)](flat, counts, T * K, BLOCK=cfg["BLOCK"], num_warps=warps)
        _expert_scatter_kernel[(E,)](
            flat,
            counts,
            sorted_slots,
            slot_rows,
            offsets,
            block_experts,
            T * K,
            E,
            BLOCK_M=block_m,
            BLOCK=cfg["BLOCK"],
            BLOCK_E=triton.next_power_of_2(E),
            num_warps=warps,
        )
    return TokenPermutation(sorted_slots, slot_rows, offsets, counts, block_experts, K, block_m)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int = 1) -> TokenPermutation:
    """topk_ids [T, K] -> TokenPermutation (slots sorted by expert, padded to block_m)."""
    return _launch_moe_align(topk_ids, num_experts, block_m)


@triton.jit
def _permute_kernel(
    x_ptr, sorted_slots_ptr, out_ptr, D, num_slots, top_k, stride_x, stride_o, BLOCK_D: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    slot = tl.load(sorted_slots_ptr + row)
    tok = (slot // top_k).to(tl.int64)
    x_mask = (cols < D) & ((slot + 0 * cols) < num_slots)  # broadcast first (interpreter)
    x = tl.load(x_ptr + tok * stride_x + cols, mask=x_mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, x, mask=cols < D)


def _launch_permute_tokens(hidden: torch.Tensor, perm: TokenPermutation) -> torch.Tensor:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape [T, D], got {tuple(hidden.shape)}")
    T, D = hidden.shape
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    P = perm.sorted_slots.numel()
    out = torch.empty(P, D, dtype=hidden.dtype, device=hidden.device)  # [P, D]
    if P > 0 and D > 0:
        cfg = block_config.lookup(
            "moe_combine", f"D={D},K={perm.top_k}", hidden.dtype, T, hidden.device
        )
        grid = (P, triton.cdiv(D, cfg["BLOCK_D"]))
        _permute_kernel[grid](
            hidden, perm.sorted_slots, out, D, T * perm.top_k, perm.top_k,
            hidden.stride(0), out.stride(0), BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
        )  # fmt: skip
    return out


def permute_tokens(hidden: torch.Tensor, perm: TokenPermutation) -> torch.Tensor:
    """Dispatch: hidden [T, D] -> rows [P, D] in expert order (padding rows are zero)."""
    return _launch_permute_tokens(hidden, perm)


@triton.jit
def _combine_kernel(
    y_ptr, slot_rows_ptr, w_ptr, out_ptr, D, stride_y, stride_wt, stride_o,
    TOP_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        row = tl.load(slot_rows_ptr + t * TOP_K + k).to(tl.int64)  # -1: another shard's expert
        w = tl.load(w_ptr + t * stride_wt + k).to(tl.float32)
        # Broadcast row to the block before comparing: a scalar-and-block mask trips the interpreter.
        y_mask = (cols < D) & ((row + 0 * cols) >= 0)
        y = tl.load(y_ptr + row * stride_y + cols, mask=y_mask, other=0.0)
        acc += w * y.to(tl.float32)
    tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < D)


def _launch_unpermute_tokens(
    rows: torch.Tensor,
    perm: TokenPermutation,
    topk_weights: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    T, K = topk_weights.shape
    if rows.dim() != 2 or rows.shape[0] != perm.sorted_slots.numel():
        raise ValueError(
            f"rows must have shape [P={perm.sorted_slots.numel()}, D], got {tuple(rows.shape)}"
        )
    if perm.top_k != K or perm.slot_rows.numel() != T * K:
        raise ValueError(
            f"topk_weights must have shape [T, K={perm.top_k}] matching the permutation, got {(T, K)}"
        )
    D = rows.shape[1]
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    topk_weights = topk_weights.contiguous()
    out = torch.empty(T, D, dtype=out_dtype or rows.dtype, device=rows.device)  # [T, D]
    if T > 0 and D > 0:
        cfg = block_config.lookup("moe_combine", f"D={D},K={K}", rows.dtype, T, rows.device)
        grid = (T, triton.cdiv(D, cfg["BLOCK_D"]))
        _combine_kernel[grid](
            rows, perm.slot_rows, topk_weights, out, D, rows.stride(0), topk_weights.stride(0),
            out.stride(0), TOP_K=K, BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
        )  # fmt: skip
    return out


def unpermute_tokens(
    rows: torch.Tensor, perm: TokenPermutation, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Weighted combine: rows [P, D], topk_weights [T, K] -> [T, D] (slots with row -1 skipped)."""
    return _launch_unpermute_tokens(rows, perm, topk_weights)


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr):
    """acc + a @ b. DOT_FP32 upcasts the tiles first: set only under TRITON_INTERPRET, whose
    tl.dot runs on numpy, which has no bfloat16 (it would multiply the raw bits)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _gate_up_kernel(
    x_ptr, w1_ptr, h_ptr, sorted_slots_ptr, block_experts_ptr,
    D, F, num_slots, top_k,
    stride_xt, stride_xd, stride_we, stride_wn, stride_wd, stride_hp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    e = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    if e < 0:  # a block past the rows in use
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] permuted rows
    slots = tl.load(sorted_slots_ptr + rows)
    valid = slots < num_slots  # padding rows load zeros and are not stored
    tok = (slots // top_k).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] within F
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + ks[None, :] * stride_xd  # [BM, BK]
    # w1[e] is [2F, D]: gate rows 0..F-1, up rows F..2F-1; tiles are read transposed, [BK, BN].
    wg_ptrs = w1_ptr + e * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wd
    wu_ptrs = wg_ptrs + F * stride_wn
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = ks < D - k0
        x = tl.load(x_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & (cols[None, :] < F)
        acc_gate = _dot(x, tl.load(wg_ptrs, mask=w_mask, other=0.0), acc_gate, DOT_FP32)
        acc_up = _dot(x, tl.load(wu_ptrs, mask=w_mask, other=0.0), acc_up, DOT_FP32)
        x_ptrs += BLOCK_K * stride_xd
        wg_ptrs += BLOCK_K * stride_wd
        wu_ptrs += BLOCK_K * stride_wd
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up  # SwiGLU in fp32, before rounding
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hp + cols[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=valid[:, None] & (cols[None, :] < F))


@triton.jit
def _down_kernel(
    h_ptr, w2_ptr, y_ptr, sorted_slots_ptr, block_experts_ptr,
    D, F, num_slots,
    stride_hp, stride_we, stride_wd, stride_wf, stride_yp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    e = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] permuted rows
    valid = tl.load(sorted_slots_ptr + rows) < num_slots
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] within D
    ks = tl.arange(0, BLOCK_K)  # within F
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hp + ks[None, :]  # [BM, BK]
    w_ptrs = (
        w2_ptr + e * stride_we + cols[None, :] * stride_wd + ks[:, None] * stride_wf
    )  # [BK, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        k_ok = ks < F - k0
        h = tl.load(h_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & (cols[None, :] < D), other=0.0)
        acc = _dot(h, w, acc, DOT_FP32)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wf
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_yp + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & (cols[None, :] < D))


def shape_key(E: int, F: int, D: int) -> str:
    """The key of fused_moe's tuned block sizes in configs/fused_moe.json."""
    return f"E={E},F={F},D={D}"


def _launch_fused_moe(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: dict[str, int] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`config` forces the block sizes (bench/kernels.py --tune); otherwise configs/fused_moe.json."""
    contracts.check_fused_moe(hidden, w1, w2, topk_weights, topk_ids)
    contracts.check_same_dtype(hidden, w1=w1, w2=w2)
    T, D = hidden.shape
    E, F = w1.shape[0], w1.shape[1] // 2
    if T == 0 or topk_ids.shape[1] == 0:
        return torch.zeros_like(hidden, dtype=out_dtype or hidden.dtype)
    cfg = config or block_config.lookup(
        "fused_moe", shape_key(E, F, D), hidden.dtype, T, hidden.device
    )
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    dot_fp32 = not hidden.is_cuda  # the interpreter (see _dot)
    perm = _launch_moe_align(topk_ids, E, bm)
    P = perm.sorted_slots.numel()
    num_slots = topk_ids.numel()
    h = torch.empty(P, F, dtype=hidden.dtype, device=hidden.device)  # [P, F]
    _gate_up_kernel[(P // bm, triton.cdiv(F, bn))](
        hidden, w1, h, perm.sorted_slots, perm.block_experts, D, F, num_slots, topk_ids.shape[1],
        hidden.stride(0), hidden.stride(1), w1.stride(0), w1.stride(1), w1.stride(2), h.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_FP32=dot_fp32, **opts,
    )  # fmt: skip
    y = torch.empty(P, D, dtype=hidden.dtype, device=hidden.device)  # [P, D]
    _down_kernel[(P // bm, triton.cdiv(D, bn))](
        h, w2, y, perm.sorted_slots, perm.block_experts, D, F, num_slots,
        h.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_FP32=dot_fp32, **opts,
    )  # fmt: skip
    return _launch_unpermute_tokens(y, perm, topk_weights, out_dtype)


def fused_moe(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """hidden [T, D], w1 [E, 2F, D], w2 [E, D, F], topk_weights [T, K], topk_ids [T, K] -> [T, D].

    Same contract as the reference; hidden, w1 and w2 must share one dtype. Ids outside [0, E)
    contribute nothing (see the module docstring). The combine sums in fp32 and writes
    out_dtype (default hidden's).
    """
    return _launch_fused_moe(hidden, w1, w2, topk_weights, topk_ids, out_dtype=out_dtype)
