"""moeray's CPU row-wise ops (kernels/cpu_rows.cpp) against the torch references they stand in for.

RMSNorm: row sizes off the 16-lane grid (40, 70), 1-d to 3-d inputs (Qwen3's per-head q/k norms
are [T, H, Dh]), both dtypes, strided inputs; the residual sum must equal the reference's
exactly (one rounding of the same two numbers), the normed rows within a few ulps (the sum of
squares is added in another order). Rope: bit for bit, on the strided q|k view the model passes.
"""

from __future__ import annotations

import pytest
import torch
from moeray import kernels
from moeray.kernels import cpu_gemm, reference

pytestmark = pytest.mark.skipif(
    not cpu_gemm.available(),
    reason="this CPU has neither AVX512_BF16 nor AVX2 with FMA, or the extension did not build",
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(512,), (5, 40), (33, 70), (3, 4, 64)])
def test_norms_match_the_reference(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 3).to(dtype)[..., ::2]  # strided
    residual = torch.randn(shape, generator=g).to(dtype)
    weight = torch.randn(shape[-1], generator=g).to(dtype)
    assert kernels.runs_cpu_kernels(x)
    # fp32: a few ulps from the sum of squares' order; bf16: that can flip one rounding
    tol = 2.0**-20 if dtype == torch.float32 else 2.0**-7
    got = kernels.rms_norm(x, weight, 1e-6)
    ref = reference.rms_norm(x, weight, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    err = (got.float() - ref.float()).abs()
    assert bool((err <= tol * (ref.float().abs() + 1e-3)).all()), f"max err {err.max().item():.3e}"
    normed, summed = kernels.add_rms_norm(x, residual, weight, 1e-6)
    ref_normed, ref_summed = reference.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(summed, ref_summed)
    err = (normed.float() - ref_normed.float()).abs()
    assert bool((err <= tol * (ref_normed.float().abs() + 1e-3)).all())


def test_norms_do_not_depend_on_the_thread_count(on_thread_counts):
    g = torch.Generator().manual_seed(4)
    x, residual, weight = torch.randn(70, 512, generator=g), torch.randn(70, 512), torch.randn(512)
    outs = on_thread_counts(lambda: kernels.add_rms_norm(x, residual, weight, 1e-5))
    assert all(torch.equal(o[0], outs[0][0]) and torch.equal(o[1], outs[0][1]) for o in outs)


def test_other_dtypes_and_backends_keep_the_reference():
    x, weight = torch.randn(3, 16), torch.randn(16)
    with kernels.use_backend("torch"):
        assert not kernels.runs_cpu_kernels(x)
        assert torch.equal(kernels.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))
    half = x.to(torch.float16)
    assert not kernels.runs_cpu_kernels(half)
    mixed = kernels.rms_norm(x.to(torch.bfloat16), weight, 1e-6)  # fp32 weight: promoted
    assert torch.equal(mixed, reference.rms_norm(x.to(torch.bfloat16), weight, 1e-6))
    with pytest.raises(RuntimeError, match="must both be float32 or both bfloat16"):
        cpu_gemm.rms_norm(x, weight.to(torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match=r"x must be \[..., D\] and weight \[D\]"):
        cpu_gemm.rms_norm(x, weight[:8], 1e-6)
    with pytest.raises(RuntimeError, match="residual must match x"):
        cpu_gemm.add_rms_norm(x, x[:2], weight, 1e-6)


def _rope_case(T, heads, Dh, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, (heads + 3) * Dh, generator=g).to(dtype)
    x = qkv[:, : heads * Dh].view(T, heads, Dh)  # a view of the fused projection, as in the model
    angles = torch.rand(T, 1, Dh // 2, generator=g) * 100
    emb = torch.cat((angles, angles), dim=-1)
    return x, emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("T", "heads", "Dh"), [(1, 10, 64), (33, 3, 40), (9, 4, 128), (2, 1, 2)])
def test_rope_equals_the_reference_bit_for_bit(dtype, T, heads, Dh):
    x, cos, sin = _rope_case(T, heads, Dh, dtype, T * heads + Dh)
    assert T == 1 or x.stride(0) != heads * Dh  # strided rows
    got = kernels.apply_rope(x, cos, sin)
    assert got.shape == x.shape and got.dtype == dtype
    assert torch.equal(got, reference.apply_rope(x, cos, sin))


def test_rope_does_not_depend_on_the_thread_count(on_thread_counts):
    x, cos, sin = _rope_case(40, 10, 64, torch.float32, 1)
    outs = on_thread_counts(lambda: kernels.apply_rope(x, cos, sin))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_rope_refuses_what_it_cannot_rotate():
    x, cos, sin = _rope_case(3, 2, 8, torch.float32, 2)
    with pytest.raises(RuntimeError, match=r"cos and sin must hold \[T, Dh\] = \[3, 8\]"):
        cpu_gemm.apply_rope(x, cos[:2], sin[:2])
    with pytest.raises(RuntimeError, match="must all be float32 or all bfloat16"):
        cpu_gemm.apply_rope(x, cos.to(torch.bfloat16), sin)
    with pytest.raises(RuntimeError, match="Dh even"):
        cpu_gemm.apply_rope(x[..., :7], cos[..., :7], sin[..., :7])
    odd = kernels.apply_rope(x[..., :7], cos[..., :7], sin[..., :7])  # the reference takes it
    assert torch.equal(odd, reference.apply_rope(x[..., :7], cos[..., :7], sin[..., :7]))
