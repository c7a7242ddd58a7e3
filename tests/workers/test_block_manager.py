"""The block manager's prefix cache alone: chained keys, longest-prefix lookup, reference counts,
LRU eviction of cached blocks nobody holds, rollback of a step that never ran, and the switch.

Sequences are advanced by hand the way the scheduler does it (allocate, the step runs, commit);
the scheduler-level property test with a KV oracle is in test_scheduler.py.
"""

from __future__ import annotations

import hashlib

from moeray.workers.block_manager import ROOT_KEY, BlockManager, block_key
from moeray.workers.io_struct import SamplingParams
from moeray.workers.sequence import Sequence


def seq_of(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_tokens=4))


def admit_and_run(bm: BlockManager, seq: Sequence) -> list[int]:
    """Admits seq at its cached prefix and computes the rest of it; returns the hits."""
    hits = bm.lookup(seq)
    n = seq.num_tokens - len(hits) * bm.block_size
    assert bm.can_admit(seq, hits, n)
    bm.admit(seq, hits, n)
    seq.num_computed_tokens += n
    bm.commit()
    return hits


def test_keys_are_sha256_chained_over_the_prefix() -> None:
    first = block_key(ROOT_KEY, [1, 2])
    assert first == hashlib.sha256((1).to_bytes(8, "little") + (2).to_bytes(8, "little")).digest()
    # The same block of tokens after a different prefix has a different key.
    assert block_key(first, [3, 4]) != block_key(block_key(ROOT_KEY, [9, 2]), [3, 4])
    # Token ids are fixed-width: [1, 2] and [258] (or [1, 2, 0]) cannot share a key.
    assert block_key(ROOT_KEY, [1, 2]) != block_key(ROOT_KEY, [258])


def test_same_block_tokens_after_another_prefix_do_not_hit() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    admit_and_run(bm, seq_of("a", [1, 2, 3, 4, 5]))
    # b's second block equals a's, but after a different first block: nothing is reused.
    assert bm.lookup(seq_of("b", [9, 2, 3, 4, 5])) == []
    assert len(bm.lookup(seq_of("c", [1, 2, 3, 4, 5]))) == 2


def test_lookup_takes_the_longest_cached_prefix_but_never_the_last_token() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a = seq_of("a", [1, 2, 3, 4, 5, 6])
    admit_and_run(bm, a)  # blocks [1,2] [3,4] [5,6] all full and computed
    assert bm.num_cached_blocks == 3
    same = seq_of("same", [1, 2, 3, 4, 5, 6])
    assert bm.lookup(same) == a.block_table[:2]  # token 6 must be computed for its logits
    longer = seq_of("longer", [1, 2, 3, 4, 5, 6, 7])
    assert bm.lookup(longer) == a.block_table
    diverges = seq_of("diverges", [1, 2, 3, 9, 5, 6, 7])
    assert bm.lookup(diverges) == a.block_table[:1]
    hits = admit_and_run(bm, longer)
    assert longer.block_table[:3] == hits and len(longer.block_table) == 4
    # `same` recomputes its last block: the copy stays out of the cache (its key is taken).
    admit_and_run(bm, same)
    assert same.block_table[2] != a.block_table[2] and bm.num_cached_blocks == 3


def test_shared_blocks_are_reference_counted_and_stay_cached_when_free() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = seq_of("a", [1, 2, 3, 4, 5]), seq_of("b", [1, 2, 3, 4, 7])
    admit_and_run(bm, a)
    shared = a.block_table[:2]
    assert admit_and_run(bm, b) == shared
    assert bm.num_free_blocks == 6 - 4  # 2 shared + a's and b's own last blocks
    bm.free(a)
    assert bm.num_free_blocks == 3  # only a's own block: the shared ones are b's too
    bm.free(b)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 2
    c = seq_of("c", [1, 2, 3, 4, 8])
    assert bm.lookup(c) == shared
    # Reusing idle cached blocks takes them out of the free pool.
    assert bm.can_admit(c, bm.lookup(c), 1)
    admit_and_run(bm, c)
    assert bm.num_free_blocks == 6 - 3


def test_admission_counts_idle_cached_blocks_against_the_pool() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a = seq_of("a", [1, 2, 3, 4, 5])
    admit_and_run(bm, a)
    bm.free(a)  # 2 cached blocks idle, 1 plain free block
    b = seq_of("b", [1, 2, 3, 4, 5, 6, 7, 8])  # 2 hits + needs 2 new blocks: 4 > 3
    hits = bm.lookup(b)
    assert len(hits) == 2 and not bm.can_admit(b, hits, 4)
    assert bm.can_admit(b, hits, 2)  # a first chunk that needs one new block fits


def test_plain_free_blocks_go_first_then_cached_ones_tail_first() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = seq_of("a", [1, 2, 3, 4, 0]), seq_of("b", [5, 6, 7, 8, 0])
    admit_and_run(bm, a)
    admit_and_run(bm, b)
    bm.free(a)  # a's blocks idle first, then b's: a's are older
    bm.free(b)
    assert bm.num_cached_blocks == 4 and bm.num_free_blocks == 6
    c = seq_of("c", [9, 9, 9, 9, 9])  # needs 3 blocks: the 2 plain free ones, then 1 evicted
    admit_and_run(bm, c)
    # a's tail block [3, 4] was released before its head, so it is the one evicted.
    assert len(bm.lookup(seq_of("a2", [1, 2, 3, 4, 0]))) == 1
    assert len(bm.lookup(seq_of("b2", [5, 6, 7, 8, 0]))) == 2
    assert bm.num_cached_blocks == 1 + 2 + 2  # c's two full blocks joined the cache


def test_reused_cached_blocks_are_evicted_after_older_ones() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = seq_of("a", [1, 2, 3, 4, 0]), seq_of("b", [5, 6, 7, 8, 0])
    admit_and_run(bm, a)
    admit_and_run(bm, b)
    bm.free(b)  # b's blocks idle before a's: b's are older...
    bm.free(a)
    b2 = seq_of("b2", [5, 6, 7, 8, 1])
    assert len(admit_and_run(bm, b2)) == 2  # ...until b2 reuses them
    bm.free(b2)
    d = seq_of("d", [7] * 11)  # 6 blocks: the 4 plain free ones, then a's 2 cached ones
    admit_and_run(bm, d)
    assert bm.lookup(seq_of("a3", [1, 2, 3, 4, 0])) == []
    assert len(bm.lookup(seq_of("b3", [5, 6, 7, 8, 0]))) == 2


def test_blocks_filled_while_decoding_are_cached() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq_of("a", [1, 2, 3])
    admit_and_run(bm, a)
    assert bm.num_cached_blocks == 0
    for token in (10, 11, 12):  # decode steps: sampled tokens are computed in the next step
        a.token_ids.append(token)
        bm.allocate(a, 1)
        a.num_computed_tokens += 1
        bm.commit()
    assert a.num_computed_tokens == 6 and bm.num_cached_blocks == 1
    follow_up = seq_of("turn2", [1, 2, 3, 10, 11, 12, 13, 14])  # the next turn of the chat
    assert bm.lookup(follow_up) == a.block_table[:1]


def test_a_step_that_never_ran_leaves_no_reusable_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a = seq_of("a", [1, 2, 3, 4, 5])
    bm.admit(a, [], 5)  # keyed for a step...
    same_step = seq_of("b", [1, 2, 3, 4, 6])
    assert len(bm.lookup(same_step)) == 2  # ...which a sequence of the same step may share
    bm.free(a)  # the model call raised; the engine aborts the request
    bm.rollback()
    assert bm.num_cached_blocks == 0 and bm.lookup(same_step) == []
    assert bm.num_free_blocks == 8
    c = seq_of("c", [1, 2, 3, 4, 5])
    assert admit_and_run(bm, c) == []
    assert bm.num_cached_blocks == 2


def test_disabled_prefix_caching_never_keys_or_reuses() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = seq_of("a", [1, 2, 3, 4, 5])
    admit_and_run(bm, a)
    assert bm.num_cached_blocks == 0
    assert bm.lookup(seq_of("b", [1, 2, 3, 4, 5])) == []
    bm.free(a)
    assert bm.num_free_blocks == 8
