"""The CPU fast path of moeray.kernels: GEMMs on weights laid out once, when they are loaded.

On CPU, torch's F.linear hands fp32 GEMMs to MKL and bf16 ones to oneDNN, and either reads the
weight in its plain [out, in] layout on every call. A weight reordered ONCE into a blocked layout
streams faster. Two GEMMs take such weights here:
- moeray's own (kernels/cpu_gemm.py), where the CPU has AVX512_BF16 or AVX2 + FMA and it builds
  (and, for bf16, K is even):
  at one row (batch-1 decode, bound by how fast the weight streams from memory) 1.3-2x faster
  than oneDNN's, from 32 rows up as fast (figures in that module); bf16 on AMX tiles where the
  CPU has them (kernels/cpu_amx.h: 1.1-1.9x oneDNN's, itself on AMX there, up to 128 rows);
- otherwise oneDNN's: `torch.ops.mkldnn._reorder_linear_weight` once, then
  `torch.ops.mkldnn._linear_pointwise`, the two ops torch.compile's inductor emits for
  `nn.Linear` on CPU when it freezes weights (an expert's [2048, 512] w1 at 8 rows 430 -> 190 us
  against F.linear, fp32, 2-core dev VM, 2026-11-30; bf16 gains 20-40 %).
Either gives the same numbers on any thread count, so a shard (usually one thread) computes an
expert's rows exactly as a two-thread engine does in-process (workers/expert_routing.py). The
numbers are those of a correct fp32 (or bf16 x bf16 -> fp32-accumulated) GEMM in another
summation order than the reference's, and depend only on x's row count and values.

    PackedWeight(w [out, in])            one weight, packed
    PackedExperts(w [E, out, in])        one packed weight per expert; .shape/.dtype/.device as w
    linear(x [T, in], w: PackedWeight, bias [out] | None) -> [T, out]
    fused_moe(hidden [T, D], w1: PackedExperts [E, 2F, D], w2: PackedExperts [E, D, F],
              topk_weights [T, K] f32, topk_ids [T, K], out_dtype) -> [T, D]
        kernels.reference.fused_moe's algorithm (same grouping, fp32 SwiGLU and combine, ids
        outside [0, E) skipped) with packed GEMMs.

Whether to pack is decided in kernels/dispatch.py (`packs_cpu_weights`); nothing else calls the
mkldnn ops. FOOTGUN: the packed weights are opaque (oneDNN's are torch._mkldnn tensors, moeray's
a reordered copy): they cannot be indexed, viewed or moved as the weight; keep the plain weight
if you need it for anything else.
Shape letters: docs/SHAPES.md.
"""

from __future__ import annotations

import torch
from moeray.kernels import cpu_gemm
from moeray.kernels.reference import silu_and_mul

#: Dtypes the packed path takes (bf16 only where one of its GEMMs multiplies it: see supported()).
DTYPES = (torch.float32, torch.bfloat16)


def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack and multiply `dtype` weights here (bf16 needs AVX-512)."""
    if dtype not in DTYPES or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _own(dtype: torch.dtype, in_features: int) -> bool:
    """Whether moeray's GEMM takes such a weight: fp32, or bf16 with an even K (it multiplies
    pairs along K)."""
    return (
        dtype in DTYPES
        and cpu_gemm.available()
        and (dtype == torch.float32 or in_features % 2 == 0)
    )


def supported(dtype: torch.dtype, in_features: int | None = None) -> bool:
    """Whether the packed path takes `dtype` weights of `in_features` columns (None: an even
    number) here: moeray's GEMM or oneDNN's. On a CPU with AVX2 but no AVX-512, only moeray's
    multiplies bf16 (torch's own bf16 GEMM there is 3-5x slower: [2048, 512] at 1 / 32 rows,
    one thread, 446 / 13756 us against 140 / 2571; 2-core AMD EPYC VM, 2026-12-02)."""
    return _own(dtype, 2 if in_features is None else in_features) or onednn_supports(dtype)


class PackedWeight:
    """One [out, in] weight, packed once for moeray's CPU GEMM where it runs, else for oneDNN."""

    def __init__(self, weight: torch.Tensor) -> None:
        if (
            weight.dim() != 2
            or weight.device.type != "cpu"
            or not supported(weight.dtype, weight.shape[1])
        ):
            raise ValueError(
                f"weight must be a 2-d CPU tensor of a packable dtype, got {tuple(weight.shape)} "
                f"{weight.dtype} on {weight.device}"
            )
        self.shape = weight.shape
        self.dtype = weight.dtype
        self.device = weight.device
        w = weight.detach()
        own = _own(w.dtype, w.shape[1])
        self.blocked = cpu_gemm.pack(w) if own else None  # moeray's layout
        self.packed = None if own else torch.ops.mkldnn._reorder_linear_weight(w)  # oneDNN's


def linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) on the prepared w: x [T, in] (any strides) -> [T, out] in x's dtype.
    The result depends only on x's row count and values, not on where the call comes from."""
    if weight.blocked is not None:
        out = cpu_gemm.linear(x, weight.blocked, weight.shape[0])
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
        self.experts = [PackedWeight(w) for w in weights.unbind(0)]
        # moeray's GEMM: the experts' blocked weights stacked [E, ...] for cpu_gemm.fused_moe,
        # each expert's PackedWeight a view of its slice (stored once)
        self.blocked: torch.Tensor | None = None
        if all(p.blocked is not None for p in self.experts):
            self.blocked = torch.stack([p.blocked for p in self.experts])  # type: ignore[misc]
            for p, view in zip(self.experts, self.blocked.unbind(0)):
                p.blocked = view

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
    if w1.blocked is not None and w2.blocked is not None:  # moeray's GEMM: one call
        out = cpu_gemm.fused_moe(
            hidden.to(w1.dtype), w1.blocked, w2.blocked, topk_weights, topk_ids, w2.shape[2]
        )
        return out.to(out_dtype or hidden.dtype)
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
