"""Every Triton kernel against its torch reference, on CPU under TRITON_INTERPRET=1.

Shapes are small and awkward (T = 1, 7, 33, 130; E = 3, 8, 16; K = 1, 2, 4; D and F not
multiples of the blocks), chosen as a covering set rather than the full product to keep the
interpreter's run time low. A shard case maps foreign experts to -1.
"""

from __future__ import annotations

import os

import pytest
import torch
from moeray import kernels
from moeray.kernels import reference

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True)
def triton_backend():
    with kernels.use_backend("triton"):
        yield


def test_interpreter_is_active():
    from moeray.kernels import triton_gating, triton_moe, triton_norm
    from triton.runtime.interpreter import InterpretedFunction

    assert os.environ.get("TRITON_INTERPRET") == "1"
    for fn in (
        triton_gating._topk_gating_kernel,
        triton_moe._gate_up_kernel,
        triton_norm._rms_norm_kernel,
    ):
        assert isinstance(fn, InterpretedFunction), (
            "moeray's triton_* modules were imported before tests/kernels/conftest.py set "
            "TRITON_INTERPRET=1; run this folder on its own or set TRITON_INTERPRET=1 in the env"
        )


GATING_CASES = [
    # T, E, K, scoring, renormalize, with_bias, dtype
    (1, 8, 2, "softmax", True, False, torch.float32),  # Mixtral
    (7, 3, 1, "softmax", False, False, torch.float32),
    (33, 16, 4, "softmax", False, False, torch.bfloat16),  # Qwen2-MoE, no renorm
    (130, 16, 4, "softmax", True, False, torch.float32),  # Qwen3-MoE
    (33, 8, 2, "sigmoid", True, True, torch.float32),  # DeepSeek-V3 style
    (7, 16, 4, "sigmoid", False, True, torch.bfloat16),
    (130, 3, 2, "sigmoid", False, False, torch.float32),
]


@pytest.mark.parametrize("T,E,K,scoring,renormalize,with_bias,dtype", GATING_CASES)
def test_topk_gating(T, E, K, scoring, renormalize, with_bias, dtype, close):
    gen = torch.Generator().manual_seed(T * 100 + E + K)
    logits = torch.randn(T, E, generator=gen).to(dtype)
    bias = torch.randn(E, generator=gen) if with_bias else None
    w, ids = kernels.topk_gating(logits, K, scoring, renormalize, bias)
    w_ref, ids_ref = reference.topk_gating(logits, K, scoring, renormalize, bias)
    assert ids.dtype == torch.int32 and torch.equal(ids, ids_ref)
    close("topk_gating weights", w, w_ref)


def test_topk_gating_ties_pick_lower_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    _, ids = kernels.topk_gating(logits, 2)
    assert ids.tolist() == [[1, 2]]


def _routing(T, E, K, gen, shard=None):
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(torch.int32)
    weights = torch.rand(T, K, generator=gen)
    if shard is not None:  # keep the shard's experts, renumbered from 0; the rest -> -1
        lo, hi = shard
        ids = torch.where((ids >= lo) & (ids < hi), ids - lo, -1).to(torch.int32)
    return weights, ids


ALIGN_CASES = [(1, 3, 1, 16), (7, 8, 2, 16), (33, 16, 4, 16), (130, 8, 2, 1), (130, 16, 4, 32)]


@pytest.mark.parametrize("T,E,K,block_m", ALIGN_CASES)
def test_moe_align_matches_reference(T, E, K, block_m):
    gen = torch.Generator().manual_seed(T + E)
    _, ids = _routing(T, E, K, gen)
    ids[::3, 0] = -1  # foreign experts are dropped
    perm = kernels.moe_align(ids, E, block_m)
    ref = reference.moe_align(ids, E, block_m)
    for name, a, b in zip(perm._fields, perm, ref):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, name
    # Each padded segment holds exactly its expert's slots.
    for e in range(E):
        lo = int(perm.expert_offsets[e])
        rows = perm.sorted_slots[lo : lo + int(perm.expert_counts[e])].long()
        assert bool((ids.reshape(-1)[rows] == e).all())


@pytest.mark.parametrize(
    "T,E,K,D,dtype", [(7, 8, 2, 40, torch.float32), (33, 3, 1, 24, torch.bfloat16)]
)
def test_permute_and_unpermute(T, E, K, D, dtype, close):
    gen = torch.Generator().manual_seed(T)
    weights, ids = _routing(T, E, K, gen)
    ids[0, 0] = -1
    hidden = torch.randn(T, D, generator=gen).to(dtype)
    perm = reference.moe_align(ids, E, 16)
    rows = kernels.permute_tokens(hidden, perm)
    assert torch.equal(rows, reference.permute_tokens(hidden, perm))
    close(
        "unpermute_tokens",
        kernels.unpermute_tokens(rows, perm, weights),
        reference.unpermute_tokens(rows, perm, weights),
    )


MOE_CASES = [
    # T, E, K, D, F, dtype, shard (lo, hi) of a larger E or None
    (1, 8, 2, 40, 48, torch.float32, None),
    (7, 3, 1, 24, 20, torch.float32, None),
    (33, 16, 4, 48, 36, torch.float32, None),
    (130, 8, 2, 40, 24, torch.float32, None),
    (33, 8, 2, 40, 48, torch.bfloat16, None),
    (7, 16, 4, 24, 40, torch.bfloat16, None),
    (33, 3, 2, 40, 20, torch.float32, (3, 6)),  # shard holding experts 3..5 of 8
    (130, 3, 4, 24, 36, torch.bfloat16, (5, 8)),  # shard holding experts 5..7 of 16
]


@pytest.mark.parametrize("T,E,K,D,F,dtype,shard", MOE_CASES)
def test_fused_moe(T, E, K, D, F, dtype, shard, close):
    gen = torch.Generator().manual_seed(T * 7 + E)
    total_experts = E if shard is None else max(shard[1], 16 if K == 4 else 8)
    weights, ids = _routing(T, total_experts, K, gen, shard)
    hidden = torch.randn(T, D, generator=gen).to(dtype)
    w1 = (torch.randn(E, 2 * F, D, generator=gen) / D**0.5).to(dtype)
    w2 = (torch.randn(E, D, F, generator=gen) / F**0.5).to(dtype)
    out = kernels.fused_moe(hidden, w1, w2, weights, ids)
    close("fused_moe", out, reference.fused_moe(hidden, w1, w2, weights, ids))


def test_fused_moe_all_foreign_is_zero():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 24, generator=gen)
    w1, w2 = torch.randn(3, 40, 24, generator=gen), torch.randn(3, 24, 20, generator=gen)
    ids = torch.full((7, 2), -1, dtype=torch.int32)
    out = kernels.fused_moe(hidden, w1, w2, torch.rand(7, 2, generator=gen), ids)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize(
    "shape,dtype",
    [((1, 40), torch.float32), ((3, 11, 24), torch.bfloat16), ((130, 48), torch.float32)],
)
def test_rms_norm(shape, dtype, close):
    gen = torch.Generator().manual_seed(shape[0])
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    weight = torch.randn(shape[-1], generator=gen).to(dtype)
    close("rms_norm", kernels.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize(
    "shape,dtype",
    [((1, 40), torch.bfloat16), ((2, 17, 24), torch.float32), ((130, 48), torch.bfloat16)],
)
def test_add_rms_norm(shape, dtype, close):
    gen = torch.Generator().manual_seed(shape[0] + 1)
    x, residual = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    weight = torch.randn(shape[-1], generator=gen).to(dtype)
    out, summed = kernels.add_rms_norm(x, residual, weight, 1e-5)
    out_ref, summed_ref = reference.add_rms_norm(x, residual, weight, 1e-5)
    # Not bit-equal in bf16: the interpreter rounds fp32 -> bf16 toward zero, GPUs to nearest.
    close("add_rms_norm sum", summed, summed_ref)
    close("add_rms_norm", out, out_ref)


@pytest.mark.parametrize(
    "T,F,dtype", [(1, 48, torch.float32), (33, 20, torch.bfloat16), (130, 36, torch.float32)]
)
def test_silu_and_mul(T, F, dtype, close):
    gate_up = torch.randn(T, 2 * F, generator=torch.Generator().manual_seed(T)).to(dtype)
    close("silu_and_mul", kernels.silu_and_mul(gate_up), reference.silu_and_mul(gate_up))


def test_empty_batch():
    w, ids = kernels.topk_gating(torch.zeros(0, 8), 2)
    assert w.shape == (0, 2) and ids.shape == (0, 2)
    out = kernels.fused_moe(
        torch.zeros(0, 24), torch.zeros(3, 40, 24), torch.zeros(3, 24, 20), w, ids
    )
    assert out.shape == (0, 24)


def test_triton_moe_needs_one_dtype():
    hidden = torch.randn(2, 24)
    with pytest.raises(ValueError, match="w1"):
        kernels.fused_moe(
            hidden,
            torch.randn(3, 40, 24).bfloat16(),
            torch.randn(3, 24, 20),
            torch.rand(2, 1),
            torch.zeros(2, 1, dtype=torch.int32),
        )
