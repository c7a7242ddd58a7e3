"""The Triton kernels against the references on a CUDA GPU, in bf16 at model-like widths.

Marked `gpu`; skipped on machines without CUDA (every CPU CI machine), where
test_triton_vs_reference.py covers the same kernels through the interpreter.
"""

from __future__ import annotations

import pytest
import torch
from moeray import kernels
from moeray.kernels import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def triton_backend():
    with kernels.use_backend("triton"):
        yield


@pytest.mark.parametrize(
    "T,E,K,D,F",
    [(1, 8, 2, 512, 1792), (33, 16, 4, 256, 200), (257, 128, 8, 512, 192), (1000, 8, 2, 384, 448)],
)
def test_fused_moe_bf16(T, E, K, D, F, close):
    gen = torch.Generator(device="cuda").manual_seed(T)
    hidden = torch.randn(T, D, device="cuda", generator=gen).bfloat16()
    w1 = (torch.randn(E, 2 * F, D, device="cuda", generator=gen) / D**0.5).bfloat16()
    w2 = (torch.randn(E, D, F, device="cuda", generator=gen) / F**0.5).bfloat16()
    logits = torch.randn(T, E, device="cuda", generator=gen)
    weights, ids = kernels.topk_gating(logits, K, renormalize=True)
    w_ref, ids_ref = reference.topk_gating(logits, K, renormalize=True)
    assert torch.equal(ids, ids_ref)
    close("topk_gating (cuda)", weights, w_ref)
    ids[::5, 0] = -1  # a shard's view: some experts live elsewhere
    close(
        "fused_moe (cuda)",
        kernels.fused_moe(hidden, w1, w2, weights, ids),
        reference.fused_moe(hidden, w1, w2, weights, ids),
    )


@pytest.mark.parametrize("T,D", [(1, 4096), (130, 2048), (4096, 1000)])
def test_norm_and_activation_bf16(T, D, close):
    x = torch.randn(T, D, device="cuda").bfloat16()
    weight = torch.randn(D, device="cuda").bfloat16()
    close("rms_norm (cuda)", kernels.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))
    out, summed = kernels.add_rms_norm(x, x.flip(0), weight, 1e-6)
    out_ref, summed_ref = reference.add_rms_norm(x, x.flip(0), weight, 1e-6)
    close("add_rms_norm sum (cuda)", summed, summed_ref)
    close("add_rms_norm (cuda)", out, out_ref)
    close(
        "silu_and_mul (cuda)",
        kernels.silu_and_mul(x[:, : D // 2 * 2]),
        reference.silu_and_mul(x[:, : D // 2 * 2]),
    )


def test_moe_align_cuda():
    ids = torch.randint(-1, 16, (257, 4), device="cuda", dtype=torch.int32)
    perm, ref = kernels.moe_align(ids, 16, 64), reference.moe_align(ids, 16, 64)
    for name, a, b in zip(perm._fields, perm, ref):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, name
