"""moeray's paged decode attention on CPU (kernels/cpu_attention.cpp) against float64 attention over
the same gathered context, and the engine's two decode paths against each other.

Shapes cover its loops and edges: GQA groups of 1, 3, 4 and 5 query heads (the kernel takes
them four at a time, then one by one; on a CPU with AMX, bf16 scores of blocks of 16 keys on
tiles, groups up to 16), head sizes off the 16-lane grid (40, 72), one-token contexts, contexts
ending mid-block, shuffled block tables, a strided q (the engine passes a view of its fused q|k
projection).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moeray import kernels
from moeray.kernels import cpu_gemm

pytestmark = pytest.mark.skipif(
    not cpu_gemm.available(),
    reason="this CPU has neither AVX512_BF16 nor AVX2 with FMA, or the extension did not build",
)


def _case(B, H, G, Dh, S, dtype, seed, N=48, M=6):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(N, S, G, Dh, generator=g).to(dtype)
    v_cache = torch.randn(N, S, G, Dh, generator=g).to(dtype)
    tables = torch.stack([torch.randperm(N, generator=g)[:M] for _ in range(B)])
    lens = torch.randint(1, M * S + 1, (B,), generator=g)
    lens[0] = 1
    q = torch.randn(B, H + 2 * G, Dh, generator=g).to(dtype)[:, :H]  # strided, as the engine's
    return q, k_cache, v_cache, tables, lens


def _reference(q, k_cache, v_cache, tables, lens, scale):
    """float64 softmax(q k^T * scale) v over each sequence's gathered context -> [B, H, Dh]."""
    B, H, Dh = q.shape
    S, G = k_cache.shape[1], k_cache.shape[2]
    out = []
    for b in range(B):
        pos = torch.arange(int(lens[b]))
        slots = tables[b, pos // S] * S + pos % S
        k = k_cache.reshape(-1, G, Dh)[slots].double()  # [L, G, Dh]
        v = v_cache.reshape(-1, G, Dh)[slots].double()
        scores = torch.einsum("grd,lgd->grl", q[b].double().view(G, H // G, Dh), k) * scale
        out.append(torch.einsum("grl,lgd->grd", scores.softmax(-1), v).reshape(H, Dh))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("H", "G", "Dh", "S"),
    [(8, 2, 64, 16), (4, 4, 40, 8), (9, 3, 128, 4), (10, 2, 72, 16), (32, 2, 128, 32)],
)
def test_decode_attention_matches_float64(dtype, H, G, Dh, S):
    q, k_cache, v_cache, tables, lens = _case(7, H, G, Dh, S, dtype, H * Dh + S)
    scale = Dh**-0.5
    got = kernels.decode_attention(q, k_cache, v_cache, tables, lens, scale)
    assert got.shape == q.shape and got.dtype == dtype
    ref = _reference(q, k_cache, v_cache, tables, lens, scale)
    # fp32: the scores and sums carry a few ulps each; bf16: the output is rounded to 8 bits
    tol = 2e-6 if dtype == torch.float32 else 2.0**-8
    err = (got.double() - ref).abs()
    assert bool((err <= tol * (ref.abs() + 1.0)).all()), f"max err {err.max().item():.3e}"
    # a one-token context returns that token's value
    assert torch.allclose(
        got[0].double(),
        v_cache[tables[0, 0], 0].double().repeat_interleave(H // G, 0),
        atol=tol,
    )


def test_the_avx512_scores_hold_without_amx_too():
    """MOERAY_AMX=0 (read once per process) keeps the vector loop for bf16 scores: checked in a
    child process, so that a CPU with AMX tests both."""
    root = Path(__file__).resolve().parents[2]
    code = (
        "import torch; from moeray.kernels import cpu_gemm; "
        "from tests.kernels.test_cpu_attention import test_decode_attention_matches_float64 as t; "
        "t(torch.bfloat16, 8, 2, 64, 16); t(torch.bfloat16, 32, 2, 128, 32); print(cpu_gemm.amx())"
    )
    env = {**os.environ, "MOERAY_AMX": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_does_not_depend_on_threads_or_batch(dtype, on_thread_counts):
    q, k_cache, v_cache, tables, lens = _case(9, 8, 2, 64, 16, dtype, 5)
    outs = on_thread_counts(
        lambda: kernels.decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    )
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    alone = kernels.decode_attention(q[3:4], k_cache, v_cache, tables[3:4], lens[3:4], 0.125)
    assert torch.equal(alone[0], outs[0][3])


def test_the_engine_decode_paths_agree():
    """workers/attention.py's decode: the kernel under MOERAY_KERNELS=auto, gather + SDPA under
    onednn and torch, on one step's context."""
    from moeray.workers.attention import paged_attention
    from moeray.workers.forward_context import ForwardContext

    q, k_cache, v_cache, tables, lens = _case(5, 8, 2, 64, 16, torch.float32, 9)
    g = torch.Generator().manual_seed(1)
    k_new, v_new = torch.randn(5, 2, 64, generator=g), torch.randn(5, 2, 64, generator=g)
    slots = torch.stack(
        [tables[b, (lens[b] - 1) // 16] * 16 + (lens[b] - 1) % 16 for b in range(5)]
    )
    outs = {}
    for backend in ("auto", "onednn", "torch"):
        ctx = ForwardContext(
            kv_caches=[(k_cache.clone(), v_cache.clone())],
            slot_mapping=slots,
            block_tables=tables,
            query_start_loc=list(range(6)),
            context_lens=lens.tolist(),
            is_decode=True,
        )
        with kernels.use_backend(backend):
            outs[backend] = paged_attention(q, k_new, v_new, ctx.kv_caches[0], ctx, 0.125)
    assert not torch.equal(outs["auto"], outs["torch"])  # two different computations ...
    torch.testing.assert_close(outs["auto"], outs["torch"], rtol=2e-5, atol=2e-6)  # ... one result
    assert torch.equal(outs["onednn"], outs["torch"])


def test_decode_attention_refuses_what_it_cannot_read():
    q, k_cache, v_cache, tables, lens = _case(3, 8, 2, 64, 16, torch.float32, 2)
    bad_len = lens.clone()
    bad_len[1] = 6 * 16 + 1
    with pytest.raises(RuntimeError, match=r"context_lens\[1\] = 97 is outside \[1, 96\]"):
        kernels.decode_attention(q, k_cache, v_cache, tables, bad_len, 0.125)
    bad_table = tables.clone()
    bad_table[2, 0] = 48
    with pytest.raises(RuntimeError, match=r"block_tables\[2, 0\] is not a block of the cache"):
        kernels.decode_attention(q, k_cache, v_cache, bad_table, lens, 0.125)
    with pytest.raises(RuntimeError, match="must all be float32 or all bfloat16"):
        kernels.decode_attention(q.to(torch.bfloat16), k_cache, v_cache, tables, lens, 0.125)
    with pytest.raises(RuntimeError, match="multiple of the kv heads"):
        kernels.decode_attention(q[:, :7], k_cache, v_cache, tables, lens, 0.125)
    with pytest.raises(RuntimeError, match="int64"):
        kernels.decode_attention(q, k_cache, v_cache, tables.int(), lens, 0.125)
    with kernels.use_backend("torch"), pytest.raises(ValueError, match="MOERAY_KERNELS=auto"):
        kernels.decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
