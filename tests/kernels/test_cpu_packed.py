"""The CPU fast path (kernels/cpu_packed.py) against the torch references, and who decides it.

Awkward shapes (1, 7, 33, 257 tokens; expert counts 5 and 8; top-k 1, 2 and 8), both dtypes,
foreign ids (-1, as a shard sees them) and the fp32 partial sums shards ask for.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from moeray import kernels
from moeray.kernels import PackedExperts, PackedWeight, cpu_gemm, cpu_packed, dispatch, reference

pytestmark = pytest.mark.skipif(
    not cpu_packed.supported(torch.float32), reason="torch is built without oneDNN (mkldnn)"
)
DTYPES = [torch.float32] + ([torch.bfloat16] if cpu_packed.supported(torch.bfloat16) else [])


def _needs_packing(dtype: torch.dtype) -> None:
    """Under the "onednn" backend on a CPU whose oneDNN has no bf16, bf16 is not packed."""
    if not cpu_packed.supported(dtype):
        pytest.skip(f"no GEMM of the packed path takes {dtype} on this CPU under this backend")


def _experts(E: int, D: int, F_: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(E * 100 + D)
    return (
        (torch.randn(E, 2 * F_, D, generator=g) / 4).to(dtype),
        (torch.randn(E, D, F_, generator=g) / 4).to(dtype),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 33, 257])
@pytest.mark.parametrize(("E", "K"), [(5, 1), (8, 2), (8, 8)])
def test_packed_fused_moe_matches_the_reference(dtype, T, E, K, close):
    _needs_packing(dtype)
    D, F_ = 48, 40
    w1, w2 = _experts(E, D, F_, dtype)
    g = torch.Generator().manual_seed(T + E + K)
    hidden = torch.randn(T, D, generator=g).to(dtype)
    scores = torch.softmax(torch.randn(T, E, generator=g), dim=-1)
    weights, ids = torch.topk(scores, K)
    ids = ids.to(torch.int32)
    ids[::3, 0] = -1  # a shard's view: some experts are held elsewhere
    ref = reference.fused_moe(hidden, w1, w2, weights, ids)
    p1, p2 = PackedExperts(w1), PackedExperts(w2)
    close(
        f"packed fused_moe T={T} E={E} K={K}", kernels.fused_moe(hidden, p1, p2, weights, ids), ref
    )
    partial = kernels.fused_moe(hidden, p1, p2, weights, ids, out_dtype=torch.float32)
    assert partial.dtype == torch.float32
    assert torch.equal(partial.to(dtype), kernels.fused_moe(hidden, p1, p2, weights, ids))


@pytest.fixture(params=["auto", "onednn"], autouse=True)
def gemm(request):
    """Every test here runs on both GEMMs of the packed path: moeray's (where this CPU runs it;
    else the two runs are alike) and oneDNN's (kernels/cpu_packed.py). Tests that switch the
    backend themselves (use_backend) restore this one when they are done."""
    with kernels.use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 33])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("out", "inp"), [(70, 24), (24, 70), (24, 24)])  # wide, narrow, square
def test_packed_linear_matches_f_linear(dtype, rows, bias, out, inp, gemm, close):
    _needs_packing(dtype)
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(out, inp, generator=g).to(dtype)
    b = torch.randn(out, generator=g).to(dtype) if bias else None
    x = torch.randn(rows, 2 * inp, generator=g).to(dtype)[:, ::2]  # strided input
    packed = PackedWeight(w)
    assert (packed.blocked is not None) == (gemm == "auto" and cpu_gemm.available())
    close(f"packed linear rows={rows} [{out}, {inp}] {gemm}",
          kernels.packed_linear(x, packed, b), F.linear(x, w, b))  # fmt: skip


def test_experts_compute_the_same_on_any_thread_count(on_thread_counts):
    """A shard (often one thread) and the engine (more) must give an expert's rows the same
    numbers, at one row and at several."""
    w1, w2 = _experts(4, 16, 24, torch.float32)  # w1 [4, 48, 16] is wide, w2 [4, 16, 24] not
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 16, generator=g)
    weights = torch.rand(5, 2, generator=g)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [2, 1]], dtype=torch.int32)  # 1-3 rows each

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        p1, p2 = PackedExperts(w1), PackedExperts(w2)  # packed on that thread count too
        return (kernels.fused_moe(hidden, p1, p2, weights, ids),
                kernels.fused_moe(hidden[:1], p1, p2, weights[:1], ids[:1]))  # fmt: skip

    outs = on_thread_counts(run)
    assert all(torch.equal(o[0], outs[0][0]) and torch.equal(o[1], outs[0][1]) for o in outs)


def test_prepare_packs_under_auto_and_onednn_only():
    w1, w2 = _experts(4, 16, 8, torch.float32)
    for backend in ("auto", "onednn"):
        with kernels.use_backend(backend):
            p1, p2 = kernels.prepare_expert_weights(w1, w2)
            assert isinstance(p1, PackedExperts) and isinstance(p2, PackedExperts)
            assert p1.shape == w1.shape and p1.dtype == w1.dtype and p1.device == w1.device
            own = backend == "auto" and cpu_gemm.available()
            assert all((p.blocked is not None) == own for p in p1.experts + p2.experts)
    for backend in ("torch", "triton"):
        with kernels.use_backend(backend):
            assert kernels.prepare_expert_weights(w1, w2) == (w1, w2)
            assert not dispatch.packs_cpu_weights(w1)
    half = w1.to(torch.float16)  # oneDNN packs fp32 and bf16 only
    assert kernels.prepare_expert_weights(half, w2.to(torch.float16))[0] is half


def test_bf16_weights_are_packed_where_either_gemm_multiplies_them(gemm):
    even, odd = torch.randn(32, 8).to(torch.bfloat16), torch.randn(32, 7).to(torch.bfloat16)
    own = gemm == "auto" and cpu_gemm.available()
    onednn = cpu_packed.onednn_supports(torch.bfloat16)
    assert dispatch.packs_cpu_weights(even) == (own or onednn)
    assert dispatch.packs_cpu_weights(odd) == onednn  # moeray's GEMM multiplies pairs along K
    if own or onednn:
        packed = PackedWeight(even)
        assert (packed.blocked is not None) == own
        x = torch.randn(3, 8).to(torch.bfloat16)
        torch.testing.assert_close(kernels.packed_linear(x, packed), F.linear(x, even))
    if not onednn:
        with pytest.raises(ValueError, match=r"packable dtype, got \(32, 7\) torch.bfloat16"):
            PackedWeight(odd)


def test_packed_weights_are_refused_where_they_cannot_run():
    w1, w2 = _experts(4, 16, 8, torch.float32)
    p1, p2 = PackedExperts(w1), PackedExperts(w2)
    x, w, ids = torch.randn(3, 16), torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="both be prepacked"):
        kernels.fused_moe(x, p1, w2, w, ids)
    with pytest.raises(ValueError, match="w2 must have shape"):
        kernels.fused_moe(x, p1, PackedExperts(w2[:, :, :4]), w, ids)
    with pytest.raises(ValueError, match="out_dtype"):
        kernels.fused_moe(x, p1, p2, w, ids, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="2-d CPU tensor"):
        PackedWeight(torch.zeros(2, 3, 4))


def test_packed_weights_under_the_triton_backend_are_an_error():
    pytest.importorskip("triton")
    w1, w2 = _experts(4, 16, 8, torch.float32)
    p1, p2 = PackedExperts(w1), PackedExperts(w2)
    x, w, ids = torch.randn(3, 16), torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.int32)
    with kernels.use_backend("triton"), pytest.raises(ValueError, match="Triton kernels need"):
        kernels.fused_moe(x, p1, p2, w, ids)
