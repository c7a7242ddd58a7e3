"""The paged KV cache's bookkeeping: which fixed-size blocks each sequence owns.

The cache itself (per layer k, v [N, S, G, Dh]) is allocated by the model runner; this module only
hands out block ids. A sequence's block table grows one block at a time as its context grows and
all its blocks return to the free pool when it finishes, is aborted, or is preempted. Token
position p of a sequence lives in slot `block_table[p // S] * S + p % S`.
"""

from __future__ import annotations

from collections import deque

from moeray.workers.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks seq needs to also cache its next num_new_tokens tokens."""
        total = self.blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grows seq's block table to fit num_new_tokens more tokens. Caller checked capacity."""
        need = self.blocks_needed(seq, num_new_tokens)
        assert need <= len(self._free), "allocate() without can_allocate()"
        pop = self._free.popleft
        seq.block_table.extend(pop() for _ in range(need))

    def free(self, seq: Sequence) -> None:
        """Returns all of seq's blocks to the pool (finish, abort, preemption)."""
        self._free.extend(seq.block_table)
        seq.block_table.clear()
