"""Paged attention over the engine's block-table KV cache (the layout in workers/forward_context.py).

One call per layer: write the step's new k/v into their slots, then attend each sequence's queries
to its whole context. Two paths, chosen per step:

- decode (every sequence has one new token): gather all sequences' K/V with their block tables
  in ONE indexing op into [B, Lmax, G, Dh] and run ONE scaled_dot_product_attention with a padding
  mask. GQA costs no copy: with one query per sequence, the R = H/G query heads sharing a kv head
  are laid out as R "query positions" of that kv head ([B, G, R, Dh]).
- prefill / mixed: per sequence SDPA with the causal offset (its queries are the last q_len
  positions of its context). A sequence whose whole context is new attends to the new k/v
  directly, without reading the cache back.

The gather indices and masks depend only on the step, not the layer, so they are computed once
per ForwardContext (cached on it) and reused by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moeray.workers.forward_context import ForwardContext

_META_ATTR = "_paged_attention_meta"  # where the per-step metadata is cached on the ctx


@dataclass
class _StepMeta:
    """Per-step gather metadata shared by all layers."""

    decode_index: torch.Tensor | None  # [B, Lmax] flat slot of every context position (decode)
    decode_mask: torch.Tensor | None  # [B, 1, 1, Lmax] bool, True = attend; None if all equal
    seq_index: list[torch.Tensor | None]  # per sequence [L_b] flat slots; None = all-new context
    seq_mask: list[torch.Tensor | None]  # per sequence [q_len, L_b] causal-with-offset mask


def _context_slots(block_tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """[B, M] block ids -> [B, length] flat slot ids of positions 0..length-1."""
    pos = torch.arange(length, device=block_tables.device)  # [L]
    blocks = block_tables[:, pos // block_size]  # [B, L]
    return blocks * block_size + pos % block_size  # [B, L]


def _build_meta(ctx: ForwardContext, block_size: int) -> _StepMeta:
    tables = ctx.block_tables
    if ctx.is_decode:
        lmax = max(ctx.context_lens)
        index = _context_slots(tables, lmax, block_size)  # [B, Lmax]
        mask = None
        if min(ctx.context_lens) != lmax:
            lens = torch.tensor(ctx.context_lens, device=tables.device)  # [B]
            pos = torch.arange(lmax, device=tables.device)
            mask = (pos[None, :] < lens[:, None])[:, None, None, :]  # [B, 1, 1, Lmax]
        return _StepMeta(index, mask, [], [])
    seq_index: list[torch.Tensor | None] = []
    seq_mask: list[torch.Tensor | None] = []
    for b, length in enumerate(ctx.context_lens):
        q_len = ctx.query_start_loc[b + 1] - ctx.query_start_loc[b]
        if q_len == length:  # whole context is new: plain causal attention on the new k/v
            seq_index.append(None)
            seq_mask.append(None)
            continue
        seq_index.append(_context_slots(tables[b : b + 1], length, block_size)[0])  # [L_b]
        ones = torch.ones(q_len, length, dtype=torch.bool, device=tables.device)
        seq_mask.append(ones.tril(diagonal=length - q_len))  # [q_len, L_b]
    return _StepMeta(None, None, seq_index, seq_mask)


def step_meta(ctx: ForwardContext, block_size: int) -> _StepMeta:
    """The step's gather metadata, computed on first use and cached on the context."""
    meta = ctx.__dict__.get(_META_ATTR)
    if meta is None:
        meta = _build_meta(ctx, block_size)
        ctx.__dict__[_META_ATTR] = meta
    return meta


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Stores the new k, v [T, G, Dh] at flat slots [T] of the caches [N, S, G, Dh]."""
    G, Dh = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, G, Dh).index_copy_(0, slots, k)
    v_cache.view(-1, G, Dh).index_copy_(0, slots, v)


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [N, S, G, Dh], slots [...] flat slot ids -> [..., G, Dh].
    index_select on [N*S, G*Dh] rows is a plain row copy, ~3x faster on CPU than advanced
    indexing with the same ids."""
    G, Dh = cache.shape[2], cache.shape[3]
    rows = cache.view(-1, G * Dh).index_select(0, slots.reshape(-1))  # [numel(slots), G*Dh]
    return rows.view(*slots.shape, G, Dh)


def _decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: _StepMeta, scale: float
) -> torch.Tensor:
    """q [B, H, Dh] -> [B, H, Dh]; one SDPA over all sequences."""
    B, H, Dh = q.shape
    G = k_cache.shape[2]
    assert meta.decode_index is not None
    keys = _gather(k_cache, meta.decode_index).transpose(1, 2)  # [B, G, Lmax, Dh]
    values = _gather(v_cache, meta.decode_index).transpose(1, 2)  # [B, G, Lmax, Dh]
    queries = q.view(B, G, H // G, Dh)  # the R heads of a kv group act as R query rows
    out = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=meta.decode_mask, scale=scale
    )  # [B, G, R, Dh]
    return out.reshape(B, H, Dh)


def _prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    ctx: ForwardContext,
    meta: _StepMeta,
    scale: float,
) -> torch.Tensor:
    """q [T, H, Dh], new k/v [T, G, Dh] -> [T, H, Dh]; one SDPA per sequence."""
    G = k_cache.shape[2]
    gqa = q.shape[1] != G
    out = torch.empty_like(q)
    starts = ctx.query_start_loc
    for b, index in enumerate(meta.seq_index):
        s, e = starts[b], starts[b + 1]
        if index is None:
            keys, values = k[s:e], v[s:e]  # [L_b, G, Dh]
        else:
            keys = _gather(k_cache, index)  # [L_b, G, Dh]
            values = _gather(v_cache, index)
        o = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1),  # [H, q_len, Dh]
            keys.transpose(0, 1),  # [G, L_b, Dh]
            values.transpose(0, 1),
            attn_mask=meta.seq_mask[b],
            is_causal=index is None,
            scale=scale,
            enable_gqa=gqa,
        )  # [H, q_len, Dh]
        out[s:e] = o.transpose(0, 1)
    return out


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    ctx: ForwardContext,
    scale: float,
) -> torch.Tensor:
    """Attention of the step's T new tokens over their sequences' cached + new context.

    q [T, H, Dh], k/v [T, G, Dh] (after rope), kv_cache = (k_cache, v_cache) [N, S, G, Dh]
    -> [T, H, Dh]. Writes k/v into the cache at ctx.slot_mapping first.
    """
    k_cache, v_cache = kv_cache
    write_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
    meta = step_meta(ctx, k_cache.shape[1])
    if ctx.is_decode:
        return _decode(q, k_cache, v_cache, meta, scale)
    return _prefill(q, k, v, k_cache, v_cache, ctx, meta, scale)
