"""Paged attention against a dense per-sequence reference, on decode, prefill and mixed steps
(the served case: one-token decodes batched together beside chunked and whole prefills)."""

from __future__ import annotations

import math

import pytest
import torch
from moeray.workers.attention import paged_attention
from moeray.workers.forward_context import ForwardContext

H, G, DH, S, N = 4, 2, 8, 4, 64  # heads, kv heads, head dim, block size, blocks


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """q [q_len, H, Dh] = the last q_len positions of a context with keys/values [L, G, Dh]."""
    q_len, length = q.shape[0], keys.shape[0]
    k = keys.repeat_interleave(H // G, dim=1)  # [L, H, Dh]
    v = values.repeat_interleave(H // G, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(DH)  # [H, q_len, L]
    allowed = torch.ones(q_len, length, dtype=torch.bool).tril(diagonal=length - q_len)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


# (cached tokens before the step, new tokens in the step) per sequence
STEPS = {
    "decode": [(5, 1), (1, 1), (12, 1)],
    "prefill": [(0, 7), (0, 3)],
    "mixed": [(9, 1), (0, 6), (4, 1), (8, 5), (0, 1), (15, 1), (3, 4)],
}


@pytest.mark.parametrize("kind", list(STEPS))
def test_paged_attention_equals_dense_reference(kind: str) -> None:
    torch.manual_seed(0)
    seqs = STEPS[kind]
    k_cache = torch.zeros(N, S, G, DH)
    v_cache = torch.zeros(N, S, G, DH)
    free = torch.randperm(N).tolist()  # blocks scattered over the cache
    tables, contexts, new_q, new_k, new_v, slots, starts = [], [], [], [], [], [], [0]
    max_blocks = max(math.ceil((c + n) / S) for c, n in seqs)
    for cached, new in seqs:
        length = cached + new
        blocks = [free.pop() for _ in range(math.ceil(length / S))]
        tables.append(blocks + [0] * (max_blocks - len(blocks)))
        keys, values = torch.randn(length, G, DH), torch.randn(length, G, DH)
        contexts.append((keys, values))
        flat = [blocks[p // S] * S + p % S for p in range(length)]
        for p in range(cached):  # what earlier steps wrote
            k_cache.view(-1, G, DH)[flat[p]] = keys[p]
            v_cache.view(-1, G, DH)[flat[p]] = values[p]
        new_q.append(torch.randn(new, H, DH))
        new_k.append(keys[cached:])
        new_v.append(values[cached:])
        slots += flat[cached:]
        starts.append(starts[-1] + new)
    ctx = ForwardContext(
        kv_caches=[(k_cache, v_cache)],
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor(tables),
        query_start_loc=starts,
        context_lens=[c + n for c, n in seqs],
        is_decode=all(n == 1 for _, n in seqs),
    )
    q = torch.cat(new_q)
    out = paged_attention(q, torch.cat(new_k), torch.cat(new_v), (k_cache, v_cache), ctx,
                          1 / math.sqrt(DH))  # fmt: skip
    for b, (keys, values) in enumerate(contexts):
        want = reference(new_q[b], keys, values)
        got = out[starts[b] : starts[b + 1]]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"sequence {b}")
