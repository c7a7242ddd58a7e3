"""The seam between the engine and the model: what one forward step needs besides ids and positions.

The engine's model runner builds one ForwardContext per step; every attention layer reads it. The
model never sees requests or the scheduler, and the engine never sees layers. Shape letters:
docs/SHAPES.md.

KV cache layout (owned by the engine, allocated with `model.make_kv_cache(N, S)`): one
(k_cache, v_cache) pair per layer, each [N, S, G, Dh]. Token slot `s` is block `s // S`, offset
`s % S`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardContext:
    """Per-step attention metadata for a flattened batch of T new tokens from B sequences.

    Sequences are laid out one after another in the token dimension: sequence b's new tokens are
    `query_start_loc[b] : query_start_loc[b+1]`, and they are the last tokens of its context, whose
    total length after this step is `context_lens[b]`.
    """

    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: k, v [N, S, G, Dh]
    slot_mapping: torch.Tensor  # [T] int64: KV slot each new token writes
    block_tables: torch.Tensor  # [B, M] int64: block ids of each sequence (padded with 0)
    query_start_loc: list[int]  # B+1 cumulative new-token counts
    context_lens: list[int]  # [B] context length after this step (cached + new)
    is_decode: bool  # every sequence has exactly one new token

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)
