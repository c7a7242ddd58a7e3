"""The CPU fast path of moeray.kernels: GEMMs on weights laid out once, when they are loaded.

On CPU, torch's F.linear hands fp32 GEMMs to MKL and bf16 ones to oneDNN, and either reads the
weight in its plain [out, in] layout on every call. oneDNN can instead reorder a weight ONCE into
the blocked layout its JIT micro-kernels stream (`torch.ops.mkldnn._reorder_linear_weight`) and
multiply against it (`torch.ops.mkldnn._linear_pointwise`): the same two ops torch.compile's
inductor emits for `nn.Linear` on CPU when it freezes weights. Measured on the 2-core dev VM
(2026-11-30, cold weights, 2 threads, fp32): an expert's [2048, 512] w1 at 8 rows 430 -> 190 us,
the [32000, 512] LM head at 32 rows 13.5 -> 5.6 ms; bf16 gains 20-40 %.
One row (batch-1 decode) is a GEMV bound by how fast the weight streams from memory. For a
"wide" fp32 weight (more outputs than inputs: an expert's w1, the LM head) MKL's GEMV over the
weight stored [in, out] is the faster on ONE thread (w1 187 vs 265 us), oneDNN's packed form on
two (w1 179 vs 200 us, the [32000, 512] LM head 2.2 vs 3.0 ms; 2026-11-30, cold weights); a
narrow one (w2) is faster packed on any thread count. The two round differently; the packed
GEMM gives the same numbers on any thread count. So:
- experts (PackedExperts) are always packed: a shard (usually one thread) must compute an
  expert's rows exactly as the engine does in-process (bit for bit, workers/expert_routing.py),
  and on two threads packed is the faster anyway (batch-1 step of the bench checkpoint 12.7-13.0
  ms vs 13.5 ms with an [in, out] copy of every w1);
- a dense layer (workers/cpu_tuning.py), computed only where it lives, keeps an [in, out] copy
  of a wide fp32 weight (`columns=True`) in a process that runs torch on one thread (step on
  one thread 15.5 ms with copies vs 18.8 without; on two 13.9 without vs 14.6 with).
The copy costs that weight's memory again; bf16 keeps only the packed form.
The numbers are those of a correct fp32 (or bf16 x bf16 -> fp32-accumulated) GEMM in another
summation order than the reference's.

    PackedWeight(w [out, in], columns)   one weight, packed (+ an [in, out] copy if columns)
    PackedExperts(w [E, out, in])        one packed weight per expert; .shape/.dtype/.device as w
    linear(x [T, in], w: PackedWeight, bias [out] | None) -> [T, out]
    fused_moe(hidden [T, D], w1: PackedExperts [E, 2F, D], w2: PackedExperts [E, D, F],
              topk_weights [T, K] f32, topk_ids [T, K], out_dtype) -> [T, D]
        kernels.reference.fused_moe's algorithm (same grouping, fp32 SwiGLU and combine, ids
        outside [0, E) skipped) with packed GEMMs.

Whether to pack is decided in kernels/dispatch.py (`packs_cpu_weights`); nothing else calls the
mkldnn ops. FOOTGUN: the packed tensors are opaque (layout torch._mkldnn): they cannot be
indexed, viewed or moved; keep the plain weight if you need it for anything else.
Shape letters: docs/SHAPES.md.
"""

from __future__ import annotations

import torch
from moeray.kernels.reference import silu_and_mul

#: Dtypes the packed path takes (bf16 only where the CPU has bf16 dot products: see supported()).
DTYPES = (torch.float32, torch.bfloat16)


def supported(dtype: torch.dtype) -> bool:
    """Whether torch's oneDNN can pack and multiply `dtype` weights on this CPU."""
    if dtype not in DTYPES or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def is_wide_fp32(weight: torch.Tensor) -> bool:
    """An fp32 [out, in] weight with out > in: the kind whose one-row products MKL's GEMV over
    an [in, out] copy may do faster (see the module docstring)."""
    return weight.dtype == torch.float32 and weight.dim() == 2 and weight.shape[0] > weight.shape[1]


class PackedWeight:
    """One [out, in] weight in oneDNN's blocked layout (packed once, here); with columns=True
    (wide fp32 weights only) also stored [in, out], and one-row inputs then take MKL's GEMV."""

    def __init__(self, weight: torch.Tensor, *, columns: bool = False) -> None:
        if weight.dim() != 2 or weight.device.type != "cpu" or not supported(weight.dtype):
            raise ValueError(
                f"weight must be a 2-d CPU tensor of a packable dtype, got {tuple(weight.shape)} "
                f"{weight.dtype} on {weight.device}"
            )
        if columns and not is_wide_fp32(weight):
            raise ValueError(
                f"columns is for wide fp32 weights, got {tuple(weight.shape)} {weight.dtype}"
            )
        self.shape = weight.shape
        self.dtype = weight.dtype
        self.device = weight.device
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        self.columns = weight.detach().t().contiguous() if columns else None  # [in, out]


def linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) on the prepared w: x [T, in] (any strides) -> [T, out] in x's dtype.
    The result depends only on x's row count and values, not on where the call comes from."""
    if x.shape[0] == 1 and weight.columns is not None:
        out = torch.mm(x, weight.columns)  # [1, in] @ [in, out]: MKL's GEMV
        return out if bias is None else out.add_(bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight.packed, bias, "none", [], "")


class PackedExperts:
    """Expert weights [E, out, in] (w1 [E, 2F, D] or w2 [E, D, F]), one PackedWeight per expert.

    Stands in for the [E, out, in] tensor in kernels.fused_moe: `shape`, `dtype`, `device` and
    `dim()` answer as the tensor would, so the argument checks apply unchanged."""

    def __init__(self, weights: torch.Tensor) -> None:
        if weights.dim() != 3:
            raise ValueError(f"expert weights must be [E, out, in], got {tuple(weights.shape)}")
        self.shape = weights.shape
        self.dtype = weights.dtype
        self.device = weights.device
        # Packed only (no [in, out] copy): the same numbers on any thread count, so a shard
        # computes an expert's rows exactly as the engine does in-process.
        self.experts = [PackedWeight(w) for w in weights.unbind(0)]

    def dim(self) -> int:
        return 3


def fused_moe(
    hidden: torch.Tensor,
    w1: PackedExperts,
    w2: PackedExperts,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """reference.fused_moe on packed expert weights: hidden [T, D] -> [T, D] in out_dtype
    (default hidden's; the sum is fp32).

    The GEMMs take hidden in the weights' dtype and return it (oneDNN accumulates in fp32); the
    SwiGLU and the weighted combine run in fp32. Experts are visited in ascending id order, each
    adding its rows into an fp32 sum, as the reference does, so a shard's partial sums add up
    to the full layer exactly when every token's experts are on at most two shards.
    """
    T, D = hidden.shape
    E = w1.shape[0]
    K = topk_ids.shape[1]
    if T == 1:  # batch-1 decode: K GEMVs, no grouping bookkeeping
        return _one_token(hidden, w1, w2, topk_weights, topk_ids).to(out_dtype or hidden.dtype)
    out = torch.zeros(T, D, dtype=torch.float32)
    flat_ids = topk_ids.reshape(-1).long()  # [T*K]
    flat_w = topk_weights.reshape(-1).float()  # [T*K]
    key = torch.where((flat_ids >= 0) & (flat_ids < E), flat_ids, E)  # [T*K]; foreign ids last
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
        h = silu_and_mul(linear(x, w1.experts[e]))  # [n, 2F] -> [n, F]
        y = linear(h, w2.experts[e]).float()  # [n, D]
        out.index_add_(0, tok, y.mul_(flat_w[slots].unsqueeze(-1)))
    return out.to(out_dtype or hidden.dtype)


def _one_token(
    hidden: torch.Tensor,
    w1: PackedExperts,
    w2: PackedExperts,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """fused_moe for hidden [1, D] -> [1, D] float32: the same products and fp32 sum, in
    ascending expert order."""
    E = w1.shape[0]
    x = hidden.to(w1.dtype)
    out = torch.zeros(hidden.shape, dtype=torch.float32)
    for e, w in sorted(zip(topk_ids[0].tolist(), topk_weights[0].tolist())):
        if 0 <= e < E:
            h = silu_and_mul(linear(x, w1.experts[e]))  # [1, F]
            out += linear(h, w2.experts[e]).float() * w  # [1, D]
    return out
