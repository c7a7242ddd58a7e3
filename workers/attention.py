"""Paged attention over the engine's block-table KV cache (the layout in workers/forward_context.py).

One call per layer: write the step's new k/v into their slots, then attend each sequence's queries
to its whole context. Two paths, chosen per step:

- decode (every sequence has one new token): on CPU, moeray's kernel (kernels.decode_attention)
  reads each sequence's K/V in place through its block table; elsewhere (and under
  MOERAY_KERNELS=torch or onednn) gather all sequences' K/V with their block tables
  in ONE indexing op into [B, Lmax, G, Dh] and run ONE scaled_dot_product_attention with a padding
  mask. GQA costs no copy: with one query per sequence, the R = H/G query heads sharing a kv head
  are laid out as R "query positions" of that kv head ([B, G, R, Dh]). The kernel saves the
  gathered copy: 385 vs 648 us a layer at 25 sequences of 130-190 tokens, K/V read from memory
  as in a decode step (fp32, 2-core dev VM, 2026-12-01, bench/cpu_layers.py).
- prefill / mixed: the sequences with one new token (decodes, which are most of a served step:
  requests keep arriving while others decode) take the batched decode path above together; every
  sequence with several new tokens gets its own SDPA with the causal offset (its queries are the
  last q_len positions of its context). A sequence whose whole context is new attends to the new
  k/v directly, without reading the cache back.

The gather indices and masks depend only on the step, not the layer, so they are computed once
per ForwardContext (cached on it) and reused by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moeray import kernels
from moeray.workers.forward_context import ForwardContext

_META_ATTR = "_paged_attention_meta"  # where the per-step metadata is cached on the ctx


@dataclass
class _StepMeta:
    """Per-step gather metadata shared by all layers."""

    decode_index: torch.Tensor | None  # [Bd, Lmax] flat slots of the one-new-token sequences
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, Lmax] bool, True = attend; None if all equal
    # for the CPU kernel instead of the two above: [Bd, M] block tables, [Bd] int64 lengths
    decode_tables: torch.Tensor | None
    decode_lens: torch.Tensor | None
    decode_rows: torch.Tensor | None  # [Bd] their token rows (mixed steps; None otherwise)
    prefill: list[_Prefill]  # the sequences with several new tokens


@dataclass
class _Prefill:
    start: int  # token rows start:end of the step are this sequence's new tokens
    end: int
    index: torch.Tensor | None  # [L_b] flat slots of its context; None = all-new context
    mask: torch.Tensor | None  # [q_len, L_b] causal-with-offset mask; None = plain causal


def _context_slots(block_tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """[B, M] block ids -> [B, length] flat slot ids of positions 0..length-1."""
    pos = torch.arange(length, device=block_tables.device)  # [L]
    blocks = block_tables[:, pos // block_size]  # [B, L]
    return blocks * block_size + pos % block_size  # [B, L]


def _decode_meta(
    tables: torch.Tensor, lens: list[int], block_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block tables [Bd, M] and context lengths of one-new-token sequences -> gather index
    [Bd, Lmax] and padding mask [Bd, 1, 1, Lmax] (None when all lengths are equal)."""
    lmax = max(lens)
    index = _context_slots(tables, lmax, block_size)  # [Bd, Lmax]
    if min(lens) == lmax:
        return index, None
    t = torch.tensor(lens, device=tables.device)  # [Bd]
    pos = torch.arange(lmax, device=tables.device)
    return index, (pos[None, :] < t[:, None])[:, None, None, :]


def _decode_fields(
    tables: torch.Tensor, lens: list[int], block_size: int, native: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(index, mask, tables, lens) of _StepMeta for the one-new-token sequences."""
    if native:
        return None, None, tables, torch.tensor(lens, dtype=torch.int64, device=tables.device)
    return (*_decode_meta(tables, lens, block_size), None, None)


def _build_meta(ctx: ForwardContext, block_size: int) -> _StepMeta:
    tables, starts, lens = ctx.block_tables, ctx.query_start_loc, ctx.context_lens
    native = kernels.runs_cpu_kernels(ctx.kv_caches[0][0])
    if ctx.is_decode:
        index, mask, dtables, dlens = _decode_fields(tables, lens, block_size, native)
        return _StepMeta(index, mask, dtables, dlens, None, [])
    single = [b for b in range(len(lens)) if starts[b + 1] - starts[b] == 1]
    index = mask = dtables = dlens = rows = None
    if single:
        picked = torch.tensor(single, device=tables.device)
        index, mask, dtables, dlens = _decode_fields(
            tables[picked], [lens[b] for b in single], block_size, native
        )
        rows = torch.tensor([starts[b] for b in single], device=tables.device)  # [Bd]
    prefill = []
    for b in sorted(set(range(len(lens))) - set(single)):
        q_len, length = starts[b + 1] - starts[b], lens[b]
        if q_len == length:  # whole context is new: plain causal attention on the new k/v
            prefill.append(_Prefill(starts[b], starts[b + 1], None, None))
            continue
        ones = torch.ones(q_len, length, dtype=torch.bool, device=tables.device)
        prefill.append(_Prefill(starts[b], starts[b + 1],
                                _context_slots(tables[b : b + 1], length, block_size)[0],
                                ones.tril(diagonal=length - q_len)))  # fmt: skip
    return _StepMeta(index, mask, dtables, dlens, rows, prefill)


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
    """q [Bd, H, Dh] (one query per sequence) -> [Bd, H, Dh]: moeray's CPU kernel, or one SDPA
    over all of them."""
    if meta.decode_lens is not None:
        assert meta.decode_tables is not None
        return kernels.decode_attention(
            q, k_cache, v_cache, meta.decode_tables, meta.decode_lens, scale
        )
    B, H, Dh = q.shape
    G = k_cache.shape[2]
    assert meta.decode_index is not None
    keys = _gather(k_cache, meta.decode_index).transpose(1, 2)  # [Bd, G, Lmax, Dh]
    values = _gather(v_cache, meta.decode_index).transpose(1, 2)  # [Bd, G, Lmax, Dh]
    queries = q.view(B, G, H // G, Dh)  # the R heads of a kv group act as R query rows
    out = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=meta.decode_mask, scale=scale
    )  # [Bd, G, R, Dh]
    return out.reshape(B, H, Dh)


def _prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    p: _Prefill,
    scale: float,
) -> torch.Tensor:
    """One sequence's queries q[p.start:p.end] [q_len, H, Dh] -> [q_len, H, Dh]."""
    gqa = q.shape[1] != k_cache.shape[2]
    if p.index is None:
        keys, values = k[p.start : p.end], v[p.start : p.end]  # [L_b, G, Dh]
    else:
        keys = _gather(k_cache, p.index)  # [L_b, G, Dh]
        values = _gather(v_cache, p.index)
    # 4-d [1, heads, len, Dh]: on CPU torch runs 3-d inputs through its math path (a bmm, a
    # softmax over the whole [H, q_len, L_b] scores, and a copy of k/v per query head for GQA)
    # and 4-d ones through its flash kernel, mask and GQA included: 2x faster at 64 new tokens
    # over a 576-token context (docs/BENCHMARKS.md, "Cached-prefix prefill").
    o = F.scaled_dot_product_attention(
        q[p.start : p.end].transpose(0, 1)[None],  # [1, H, q_len, Dh]
        keys.transpose(0, 1)[None],  # [1, G, L_b, Dh]
        values.transpose(0, 1)[None],
        attn_mask=p.mask,
        is_causal=p.index is None,
        scale=scale,
        enable_gqa=gqa,
    )  # [1, H, q_len, Dh]
    return o[0].transpose(0, 1)


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
    out = torch.empty_like(q)
    if meta.decode_rows is not None:
        rows = meta.decode_rows
        out.index_copy_(0, rows, _decode(q.index_select(0, rows), k_cache, v_cache, meta, scale))
    for p in meta.prefill:
        out[p.start : p.end] = _prefill(q, k, v, k_cache, v_cache, p, scale)
    return out
