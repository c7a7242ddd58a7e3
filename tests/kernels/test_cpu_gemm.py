"""moeray's CPU GEMM (kernels/cpu_gemm.cpp) against float64 products of the same inputs.

Each output must lie within the rounding bound of an fp32-accumulated product: K * 2^-24 of
|x| @ |w|^T, plus, for bf16 outputs, half a bf16 ulp of the result. Shapes cover the kernel's
loops and their edges: one row (the streaming loop), 2-13 rows (register tiles of 6, 4, 2, 1),
33 rows, column counts that are not multiples of the 4-block tile or of a 16-column block, odd K
(fp32), strided inputs, no rows.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from moeray import kernels
from moeray.kernels import PackedWeight, cpu_gemm, packed_linear

pytestmark = pytest.mark.skipif(
    not cpu_gemm.available(), reason="this CPU has no AVX512_BF16, or the extension did not build"
)


def _bound(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    K = x.shape[1]
    bound = K * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
    if dtype == torch.bfloat16:
        bound = bound + ref.abs() * 2.0**-8
    return bound + 1e-30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 5, 6, 7, 13, 33])
@pytest.mark.parametrize(("out", "inp"), [(64, 32), (70, 24), (24, 70), (200, 130), (16, 2)])
def test_linear_is_within_rounding_of_float64(dtype, rows, out, inp):
    g = torch.Generator().manual_seed(rows * 1000 + out)
    w = torch.randn(out, inp, generator=g).to(dtype)
    x = torch.randn(rows, 2 * inp, generator=g).to(dtype)[:, ::2]  # strided input
    got = cpu_gemm.linear(x, cpu_gemm.pack(w), out)
    assert got.shape == (rows, out) and got.dtype == dtype
    ref = x.double() @ w.double().T
    err = (got.double() - ref).abs()
    assert bool((err <= _bound(x, w, ref, dtype)).all()), f"max err {err.max().item():.3e}"


def test_odd_fp32_columns():
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(33, 7, generator=g), torch.randn(4, 7, generator=g)
    for t in (1, 4):
        ref = x[:t].double() @ w.double().T
        err = (cpu_gemm.linear(x[:t], cpu_gemm.pack(w), 33).double() - ref).abs()
        assert bool((err <= _bound(x[:t], w, ref, torch.float32)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_do_not_depend_on_the_thread_count(dtype):
    """Each output is one thread's fixed-order sum: a one-thread shard and a two-thread engine
    compute an expert's rows alike."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(1000, 256, generator=g).to(dtype)
    x = torch.randn(9, 256, generator=g).to(dtype)
    packed = cpu_gemm.pack(w)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append((cpu_gemm.linear(x[:1], packed, 1000), cpu_gemm.linear(x, packed, 1000)))
    finally:
        torch.set_num_threads(before)
    for one, many in outs[1:]:
        assert torch.equal(one, outs[0][0]) and torch.equal(many, outs[0][1])


def test_packed_weight_takes_it_unless_told_otherwise():
    w = torch.randn(48, 32)
    x = torch.randn(3, 32)
    own = PackedWeight(w)
    assert own.blocked is not None and own.packed is None
    with kernels.use_backend("onednn"):
        onednn = PackedWeight(w)
        assert kernels.dispatch.packs_cpu_weights(w)
    assert onednn.blocked is None and onednn.packed is not None
    torch.testing.assert_close(packed_linear(x, own), packed_linear(x, onednn))


def test_odd_bf16_columns_stay_on_onednn():
    """vdpbf16ps multiplies pairs along K: a bf16 weight with odd K is left to oneDNN."""
    w = torch.randn(32, 7).to(torch.bfloat16)
    packed = PackedWeight(w)
    assert packed.blocked is None
    x = torch.randn(2, 7).to(torch.bfloat16)
    torch.testing.assert_close(packed_linear(x, packed), torch.nn.functional.linear(x, w))


def test_mismatched_input_is_refused():
    packed = cpu_gemm.pack(torch.randn(32, 16))
    with pytest.raises(RuntimeError, match=r"x must be \[T, 16\] of the weight's dtype"):
        cpu_gemm.linear(torch.randn(2, 8), packed, 32)
    with pytest.raises(RuntimeError, match="of the weight's dtype"):
        cpu_gemm.linear(torch.randn(2, 16).to(torch.bfloat16), packed, 32)
    with pytest.raises(RuntimeError, match="N does not match"):
        cpu_gemm.linear(torch.randn(2, 16), packed, 48)


def test_a_stale_build_lock_does_not_block_loading():
    """A builder killed mid-build leaves torch's lock file; one older than a build could take is
    removed, and the finished build is imported (fresh locks are left to their builders)."""
    _, directory = cpu_gemm._name_and_directory()
    lock = directory / "lock"
    assert not lock.exists()
    lock.touch()
    try:
        old = time.time() - cpu_gemm.STALE_LOCK_S - 1
        os.utime(lock, (old, old))
        module = cpu_gemm.build()
        assert not lock.exists()
        x, w = torch.randn(2, 16), torch.randn(16, 16)
        torch.testing.assert_close(module.linear(x, module.pack(w), 16), x @ w.T)
    finally:
        lock.unlink(missing_ok=True)
