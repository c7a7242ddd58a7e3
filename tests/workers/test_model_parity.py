"""moeray's model against transformers (the oracle) on tiny real checkpoints of every architecture.

For each arch: batched one-step prefill logits, greedy continuation through the paged KV cache
(block size 4, so sequences cross blocks; also with chunked prefill so queries attend to cached
blocks with a causal offset), and bf16 logits within a bf16 tolerance.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from moeray.workers.checkpoint import load_expert_weights
from moeray.workers.loader import load_model
from moeray.workers.model import CausalLM
from moeray.workers.moe import DenseMLP, LocalExperts, MoEBlock

from tests.checkpoints import ARCHS
from tests.workers.paged_driver import PagedDriver, greedy

PROMPTS = [[5, 9, 33, 100, 7], [3, 44, 200], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
MAX_NEW = 12


@functools.cache  # the oracle model of a checkpoint is read once per session
def hf_model(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def hf_logits(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float()  # [L, V]


def moeray_prefill_logits(model: CausalLM, prompts: list[list[int]]) -> list[torch.Tensor]:
    """All prompts prefilled in ONE step; per-prompt logits [L_b, V]."""
    logits = PagedDriver(model, len(prompts), 32).step(prompts)
    return list(logits.split([len(p) for p in prompts]))


def report(name: str, ours: torch.Tensor, ref: torch.Tensor) -> str:
    err = (ours - ref).abs()
    return f"{name}: max err {err.max().item():.3g}, mean err {err.mean().item():.3g}"


LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}
VARIANTS: list[tuple[str, dict[str, Any]]] = [(arch, {}) for arch in ARCHS] + [
    ("qwen3", {"rope_parameters": LINEAR_ROPE, "tie_word_embeddings": True}),
    ("qwen2_moe", {"norm_topk_prob": True, "decoder_sparse_step": 2, "mlp_only_layers": []}),
]


@pytest.mark.parametrize(
    ("arch", "overrides"), VARIANTS, ids=[f"{a}{'-variant' if o else ''}" for a, o in VARIANTS]
)
def test_prefill_logits_match_transformers(
    arch: str, overrides: dict[str, Any], tiny_checkpoint: Callable[..., Path]
) -> None:
    path = tiny_checkpoint(arch, **overrides)
    ours = moeray_prefill_logits(load_model(path, progress=False), PROMPTS)
    hf = hf_model(path)
    for b, prompt in enumerate(PROMPTS):
        ref = hf_logits(hf, prompt)
        assert torch.allclose(ours[b], ref, atol=1e-4, rtol=1e-4), report(
            f"{arch} prompt {b}", ours[b], ref
        )


def hf_greedy(model: Any, prompt: list[int], max_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def until_eos(tokens: list[int], eos: list[int]) -> list[int]:
    """transformers stops after the first EOS; moeray's raw loop keeps going."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [0, 4])
def test_greedy_matches_transformers_generate(
    arch: str, chunk: int, tiny_checkpoint: Callable[..., Path]
) -> None:
    path = tiny_checkpoint(arch)
    model = load_model(path, progress=False)
    ours = greedy(model, PROMPTS, MAX_NEW, chunk=chunk)
    hf = hf_model(path)
    for b, prompt in enumerate(PROMPTS):
        assert until_eos(ours[b], model.args.eos_token_ids) == hf_greedy(hf, prompt, MAX_NEW), (
            arch,
            b,
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_logits_close_to_transformers(arch: str, tiny_checkpoint: Callable[..., Path]) -> None:
    path = tiny_checkpoint(arch, dtype="bfloat16")
    model = load_model(path, progress=False)  # "auto" -> the config's bfloat16
    assert model.args.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    ours = torch.cat(moeray_prefill_logits(model, PROMPTS))  # [T, V]
    hf = hf_model(path, torch.bfloat16)
    ref = torch.cat([hf_logits(hf, p) for p in PROMPTS])  # [T, V]
    # bf16 keeps 8 mantissa bits, so two implementations that round in different places drift by
    # a few ulps per layer (tolerance: 4% of the logit range). Where a token's router scores
    # nearly tie, that drift can flip its expert choice and move its logits (and, through
    # attention, later ones) further: such tokens are rare, so at least 75% must be within.
    per_token = (ours - ref).abs().amax(dim=-1)  # [T]
    within = per_token <= 0.04 * ref.abs().max()
    assert within.float().mean() >= 0.75, (
        report(arch, ours, ref) + f", per token {per_token.tolist()}"
    )


def test_float32_override_of_bf16_checkpoint(tiny_checkpoint: Callable[..., Path]) -> None:
    model = load_model(
        tiny_checkpoint("mixtral", dtype="bfloat16"), dtype="float32", progress=False
    )
    assert model.args.dtype == torch.float32 and model.embed_tokens.weight.dtype == torch.float32


def test_one_expert_moe_equals_dense_ffn() -> None:
    torch.manual_seed(0)
    D, F, T = 16, 24, 7
    dense = DenseMLP(D, F)
    moe = MoEBlock(layer=0, dim=D, num_experts=1, top_k=1, renormalize=False)
    w1 = dense.w13.weight.detach()[None]  # [1, 2F, D]
    w2 = dense.w2.weight.detach()[None]  # [1, D, F]
    moe.backend = LocalExperts({0: (w1, w2)})
    x = torch.randn(T, D)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), atol=1e-6, rtol=1e-5)


def test_expert_counts_count_routed_tokens(tiny_checkpoint: Callable[..., Path]) -> None:
    model = load_model(tiny_checkpoint("qwen2_moe"), progress=False)
    moeray_prefill_logits(model, PROMPTS)
    counts = model.take_expert_counts()
    T, K = sum(map(len, PROMPTS)), model.args.top_k
    assert counts.shape == (model.args.num_layers, model.args.num_experts)
    assert counts.dtype == torch.int64
    for layer in range(model.args.num_layers):
        expected = T * K if layer in model.args.moe_layers else 0  # layer 1 is dense
        assert int(counts[layer].sum()) == expected
    assert int(model.take_expert_counts().sum()) == 0  # reset by the first call


def test_set_expert_backend_swaps_every_moe_layer(tiny_checkpoint: Callable[..., Path]) -> None:
    """A backend that holds the experts in two halves (as shards would) gives the same logits."""
    path = tiny_checkpoint("olmoe")
    model = load_model(path, progress=False)
    before = moeray_prefill_logits(model, PROMPTS)
    assert isinstance(model.expert_backend, LocalExperts)
    E = model.args.num_experts
    halves = []
    for ids in (list(range(E // 2)), list(range(E // 2, E))):
        weights = {
            layer: load_expert_weights(path, layer, ids) for layer in model.args.moe_layers
        }  # what a shard reads: only its experts' tensors
        halves.append(LocalExperts(weights, {layer: ids for layer in weights}, num_experts=E))

    class SumOfShards:
        def forward_layer(self, layer, hidden, topk_weights, topk_ids):  # type: ignore[no-untyped-def]
            return sum(h.forward_layer(layer, hidden, topk_weights, topk_ids) for h in halves)

    model.set_expert_backend(SumOfShards())
    after = moeray_prefill_logits(model, PROMPTS)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_single_sequence_decode_matches_transformers(
    arch: str, tiny_checkpoint: Callable[..., Path]
) -> None:
    """Batch-1 decode takes LocalExperts' one-token path and the unmasked attention path."""
    path = tiny_checkpoint(arch)
    model = load_model(path, progress=False)
    hf = hf_model(path)
    prompt = PROMPTS[2]
    ours = greedy(model, [prompt], MAX_NEW)[0]
    assert until_eos(ours, model.args.eos_token_ids) == hf_greedy(hf, prompt, MAX_NEW)


def test_local_experts_run_kernels_fused_moe_on_prepared_weights() -> None:
    """LocalExperts == kernels.fused_moe on the weights prepare_expert_weights gives (prepacked
    on this CPU), bit for bit, at one token and at several; a subset holder gives the partial
    sum. The prepacked path itself is checked against the reference in tests/kernels."""
    from moeray.kernels import PackedExperts, fused_moe, prepare_expert_weights

    torch.manual_seed(0)
    E, D, F, K = 6, 16, 8, 3
    w1, w2 = torch.randn(E, 2 * F, D), torch.randn(E, D, F)
    p1, p2 = prepare_expert_weights(w1, w2)
    assert isinstance(p1, PackedExperts) and isinstance(p2, PackedExperts)
    experts = LocalExperts({0: (w1, w2)})
    shard = LocalExperts({0: (w1[[2, 4]], w2[[2, 4]])}, {0: [2, 4]}, num_experts=E)  # 2 of 6
    sp1, sp2 = prepare_expert_weights(w1[[2, 4]], w2[[2, 4]])
    for T in (1, 5):
        x, weights = torch.randn(T, D), torch.rand(T, K)
        ids = torch.tensor([[4, 0, 2]] * T, dtype=torch.int32)
        got = experts.forward_layer(0, x, weights, ids)
        assert torch.equal(got, fused_moe(x, p1, p2, weights, ids))
        local = torch.tensor([[1, -1, 0]] * T, dtype=torch.int32)  # 4 -> slot 1, 2 -> slot 0
        assert torch.equal(
            shard.forward_layer(0, x, weights, ids), fused_moe(x, sp1, sp2, weights, local)
        )
