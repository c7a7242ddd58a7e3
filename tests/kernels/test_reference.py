"""The torch references against independent oracles: Hugging Face's Mixtral MoE block, a dense
SwiGLU FFN, hand-worked gating examples, and the sum over expert shards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from moeray import kernels
from moeray.kernels import reference


def test_matches_hf_mixtral_block(close):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    cfg = MixtralConfig(
        hidden_size=24, intermediate_size=40, num_local_experts=5, num_experts_per_tok=2
    )
    block = MixtralSparseMoeBlock(cfg).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 9, 24)
    with torch.no_grad():
        expected = block(x).reshape(9, 24)  # [T, D]
        logits = F.linear(x.reshape(9, 24), block.gate.weight)  # [T, E]
        w, ids = reference.topk_gating(logits, 2, "softmax", renormalize=True)
        out = reference.fused_moe(
            x.reshape(9, 24), block.experts.gate_up_proj, block.experts.down_proj, w, ids
        )
    close("fused_moe vs HF Mixtral", out, expected)


def test_one_expert_is_a_dense_ffn(close):
    gen = torch.Generator().manual_seed(1)
    x, w1, w2 = (
        torch.randn(7, 16, generator=gen),
        torch.randn(1, 40, 16, generator=gen),
        torch.randn(1, 16, 20, generator=gen),
    )
    gate, up = F.linear(x, w1[0]).chunk(2, dim=-1)
    dense = F.linear(F.silu(gate) * up, w2[0])  # [T, D]
    out = reference.fused_moe(x, w1, w2, torch.ones(7, 1), torch.zeros(7, 1, dtype=torch.int32))
    close("one expert vs dense", out, dense)


def test_sigmoid_bias_selects_but_does_not_weigh():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0]])
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])
    w, ids = reference.topk_gating(logits, 2, "sigmoid", renormalize=False, bias=bias)
    assert ids.tolist() == [[2, 0]]  # expert 2 wins only because of its bias
    assert torch.allclose(w, torch.sigmoid(torch.tensor([[-1.0, 2.0]])))
    w, _ = reference.topk_gating(logits, 2, "sigmoid", renormalize=True, bias=bias)
    assert torch.allclose(w.sum(-1), torch.ones(1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_expert_shards_add_up_to_the_layer(backend, close):
    """Three shards holding experts [0,3), [3,5), [5,8): foreign ids -> -1, outputs summed."""
    gen = torch.Generator().manual_seed(2)
    T, E, K, D, Fw = 33, 8, 2, 24, 20
    x = torch.randn(T, D, generator=gen)
    w1, w2 = torch.randn(E, 2 * Fw, D, generator=gen) / 5, torch.randn(E, D, Fw, generator=gen) / 5
    weights, ids = reference.topk_gating(torch.randn(T, E, generator=gen), K, renormalize=True)
    full = reference.fused_moe(x, w1, w2, weights, ids)
    total = torch.zeros_like(full)
    with kernels.use_backend(backend):
        for lo, hi in [(0, 3), (3, 5), (5, 8)]:
            local = torch.where((ids >= lo) & (ids < hi), ids - lo, -1).to(torch.int32)
            total += kernels.fused_moe(x, w1[lo:hi], w2[lo:hi], weights, local)
    close(f"sum of shards ({backend})", total, full)


def test_permute_then_unpermute_is_k_times_identity(close):
    gen = torch.Generator().manual_seed(3)
    T, E, K = 33, 8, 4
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(torch.int32)
    x = torch.randn(T, 12, generator=gen)
    perm = reference.moe_align(ids, E, block_m=16)
    assert int(perm.expert_offsets[-1]) % 16 == 0
    assert perm.sorted_slots.numel() == reference.padded_rows(T * K, E, 16)
    rows = reference.permute_tokens(x, perm)  # [P, D]
    close("unpermute(permute(x))", reference.unpermute_tokens(rows, perm, torch.ones(T, K)), K * x)
