"""A minimal prefill/decode driver over moeray's paged KV cache, standing in for the engine.

It gives every sequence a scattered (shuffled) set of KV blocks, so block-table indexing is
exercised, and builds the ForwardContext of each step by hand. Used by the model tests to compare
moeray's model with transformers without depending on the engine.
"""

from __future__ import annotations

import torch
from moeray.workers.forward_context import ForwardContext
from moeray.workers.model import CausalLM


class PagedDriver:
    def __init__(self, model: CausalLM, num_seqs: int, max_len: int, block_size: int = 4) -> None:
        self.model = model
        self.block_size = block_size
        per_seq = -(-max_len // block_size)  # ceil
        blocks = torch.randperm(num_seqs * per_seq, generator=torch.Generator().manual_seed(0))
        self.tables = blocks.view(num_seqs, per_seq)  # [B, M]
        self.kv = model.make_kv_cache(num_seqs * per_seq, block_size)
        self.lens = [0] * num_seqs  # tokens cached per sequence

    def step(self, chunks: list[list[int]]) -> torch.Tensor:
        """Runs one step in which sequence b gets the new tokens chunks[b] (possibly []);
        returns the logits [T, V] of all new tokens, sequences in order."""
        seqs = [b for b, c in enumerate(chunks) if c]
        ids, pos, slots, starts, ctx_lens = [], [], [], [0], []
        for b in seqs:
            for i, tok in enumerate(chunks[b]):
                p = self.lens[b] + i
                ids.append(tok)
                pos.append(p)
                slots.append(
                    int(self.tables[b, p // self.block_size]) * self.block_size
                    + p % self.block_size
                )
            self.lens[b] += len(chunks[b])
            starts.append(starts[-1] + len(chunks[b]))
            ctx_lens.append(self.lens[b])
        ctx = ForwardContext(
            kv_caches=self.kv,
            slot_mapping=torch.tensor(slots),
            block_tables=self.tables[seqs],
            query_start_loc=starts,
            context_lens=ctx_lens,
            is_decode=all(len(chunks[b]) == 1 for b in seqs),
        )
        with torch.inference_mode():
            hidden = self.model(torch.tensor(ids), torch.tensor(pos), ctx)
            return self.model.compute_logits(hidden)


def greedy(
    model: CausalLM, prompts: list[list[int]], max_new: int, chunk: int = 0
) -> list[list[int]]:
    """Greedy continuations of all prompts, batched: prefill (in chunks of `chunk` tokens if > 0,
    so later chunks attend to cached blocks), then one decode step per new token."""
    longest = max(len(p) for p in prompts)
    driver = PagedDriver(model, len(prompts), longest + max_new)
    pending = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    while any(pending):
        step = [p[: chunk or len(p)] for p in pending]
        logits = driver.step(step)
        pending = [p[len(s) :] for p, s in zip(pending, step)]
        ends = torch.tensor([len(s) for s in step if s]).cumsum(0) - 1
        done = [b for b, s in enumerate(step) if s and not pending[b]]
        for b, row in zip([b for b, s in enumerate(step) if s], ends.tolist()):
            if b in done:
                out[b].append(int(logits[row].argmax()))
    for _ in range(max_new - 1):
        logits = driver.step([[o[-1]] for o in out])
        for b, o in enumerate(out):
            o.append(int(logits[b].argmax()))
    return out
