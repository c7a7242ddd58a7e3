"""The paged KV cache's bookkeeping: which fixed-size blocks each sequence holds, and the prefix cache.

The cache itself (per layer k, v [N, S, G, Dh]) is allocated by the model runner; this module only
hands out block ids. A sequence's block table grows one block at a time as its context grows, and
its references are dropped when it finishes, is aborted, or is preempted. Token position p of a
sequence lives in slot `block_table[p // S] * S + p % S`.

Automatic prefix caching (vLLM's, on unless `enable_prefix_caching=False`):

- A full block of S tokens gets a key, `sha256(parent key + its S token ids as int64)`, chained
  from the first block, so a key names the whole token prefix up to the block's end. With a 256-bit
  hash, two different prefixes sharing a key is not a practical event; a weaker (e.g. Python's
  64-bit) hash would let a collision hand a request another prompt's KV.
- A block enters the cache (`key -> block`) as soon as it is scheduled to be full and computed.
  A sequence admitted later IN THE SAME STEP may reuse it: this relies on the attention writing
  every new token's K/V of the step before any sequence of the step reads the cache (paged
  attention does, per layer). `commit()` marks the step as run; blocks keyed for a step that never
  ran (its model call raised) leave the cache at the next `rollback()`, so no KV that was never
  written is reused.
- A new sequence takes the longest run of cached blocks that matches its tokens (one reference
  more each), up to but never including its last token: its logits must be computed.
- Blocks are reference counted. A block nobody holds returns to the free pool: without a key to the
  plain free list, with a key to the evictable LRU, where it stays reusable until a new block is
  needed and no plain free block is left. A sequence's blocks are released last block first, so
  the tail of a prompt is evicted before its head.
- Shared blocks are never written again: a sequence only writes positions at or after its
  `num_computed_tokens`, and reused blocks lie entirely before it. A block whose key is already
  cached (the same prefix computed twice at once) simply stays out of the cache.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from moeray.workers.sequence import Sequence

ROOT_KEY = b""  # the parent key of a sequence's first block


def block_key(parent: bytes, token_ids: list[int]) -> bytes:
    """The prefix-cache key of a full block: sha256 over the parent's key and the token ids."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refs = [0] * num_blocks  # sequences holding each block
        self._keys: list[bytes | None] = [None] * num_blocks  # each block's key while cached
        self._free: deque[int] = deque(range(num_blocks))  # held by none, no key: used first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # held by none, keyed: LRU first
        self._cached: dict[bytes, int] = {}  # key -> block
        self._uncommitted: list[int] = []  # blocks keyed for the step not yet run

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones included: they are evicted on demand)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks seq needs to also cache its next num_new_tokens tokens."""
        total = self.blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grows seq's block table to fit num_new_tokens more tokens (caller checked capacity)
        and keys the blocks those tokens fill."""
        need = self.blocks_needed(seq, num_new_tokens)
        assert need <= self.num_free_blocks, "allocate() without can_allocate()"
        seq.block_table.extend(self._take_free() for _ in range(need))
        if self.enable_prefix_caching:
            self._key_full_blocks(seq, seq.num_computed_tokens + num_new_tokens)

    def free(self, seq: Sequence) -> None:
        """Drops seq's references (finish, abort, preemption); its last block is released first."""
        refs = self._refs
        for block in reversed(seq.block_table):
            refs[block] -= 1
            if refs[block] == 0:
                if self._keys[block] is None:
                    self._free.append(block)
                else:
                    self._evictable[block] = None  # most recently used end
        seq.block_table.clear()
        seq.num_keyed_blocks = 0

    # ---- prefix cache ------------------------------------------------------------------------

    def lookup(self, seq: Sequence) -> list[int]:
        """The cached blocks holding seq's longest cached prefix (full blocks, never its last
        token). Takes nothing: `admit` does."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        most = (seq.num_tokens - 1) // self.block_size
        keys = self._block_keys(seq, most)
        for i in range(most):
            block = self._cached.get(keys[i])
            if block is None:
                break
            hits.append(block)
        return hits

    def can_admit(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> bool:
        """Whether seq (holding no block) fits with the cached prefix `hits` and num_new_tokens
        more tokens; reused blocks nobody holds count against the free pool too."""
        cached = len(hits) * self.block_size
        need = self.blocks_for(cached + num_new_tokens) - len(hits)
        idle = sum(1 for block in hits if self._refs[block] == 0)
        return need + idle <= self.num_free_blocks

    def admit(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> None:
        """Gives seq (holding no block) its cached prefix `hits` and blocks for its next
        num_new_tokens tokens; its computation starts after the prefix."""
        assert not seq.block_table and seq.num_computed_tokens == 0, seq
        for block in hits:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        seq.block_table.extend(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_keyed_blocks = len(hits)
        self.allocate(seq, num_new_tokens)

    def commit(self) -> None:
        """The step whose blocks were keyed has run: their KV is written."""
        self._uncommitted.clear()

    def rollback(self) -> None:
        """Takes out of the cache the blocks keyed for a step that never ran."""
        for block in self._uncommitted:
            key = self._keys[block]
            if key is None:
                continue
            del self._cached[key]
            self._keys[block] = None
            if self._refs[block] == 0:
                del self._evictable[block]
                self._free.append(block)
        self._uncommitted.clear()

    def _take_free(self) -> int:
        """A block for one holder: a plain free one, else the least recently used cached one."""
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            key = self._keys[block]
            assert key is not None
            del self._cached[key]
            self._keys[block] = None
        self._refs[block] = 1
        return block

    def _key_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Offers seq's blocks that are full once num_tokens tokens are computed to the cache."""
        full = num_tokens // self.block_size
        if full <= seq.num_keyed_blocks:
            return
        keys = self._block_keys(seq, full)
        for i in range(seq.num_keyed_blocks, full):
            if keys[i] not in self._cached:  # else the same prefix is cached in another block
                block = seq.block_table[i]
                self._cached[keys[i]] = block
                self._keys[block] = keys[i]
                self._uncommitted.append(block)
        seq.num_keyed_blocks = full

    def _block_keys(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """seq.block_hashes, extended to at least its first num_blocks full blocks."""
        keys = seq.block_hashes
        size = self.block_size
        parent = keys[-1] if keys else ROOT_KEY
        for i in range(len(keys), num_blocks):
            parent = block_key(parent, seq.token_ids[i * size : (i + 1) * size])
            keys.append(parent)
        return keys
