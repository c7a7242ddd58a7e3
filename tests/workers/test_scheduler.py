"""The scheduler and block manager alone (no model): budgets, chunking, preemption, block accounting.

The property test drives the scheduler like the engine does (feed the scheduled tokens, append a
"sampled" token when a sequence is fully computed, finish or abort at random) and checks the
paged-cache invariants after every step.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moeray.workers.block_manager import BlockManager
from moeray.workers.io_struct import FinishReason, SamplingParams
from moeray.workers.scheduler import Scheduler
from moeray.workers.sequence import Sequence, SequenceStatus


def make_seq(rid: str, prompt_len: int, max_tokens: int = 4) -> Sequence:
    return Sequence(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens))


def advance(sched: Scheduler) -> list[Sequence]:
    """One engine step without a model: feed tokens, append one to fully computed sequences."""
    plan = sched.schedule()
    for seq, n in zip(plan.seqs, plan.num_new_tokens):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)
    return plan.seqs


def check_invariants(sched: Scheduler, bm: BlockManager) -> None:
    owned = [b for s in sched.running for b in s.block_table]
    assert len(owned) == len(set(owned)), "a block is owned twice"
    assert len(owned) + bm.num_free_blocks == bm.num_blocks, "blocks leaked"
    assert all(not s.block_table and s.num_computed_tokens == 0 for s in sched.waiting)
    for s in sched.running:
        assert len(s.block_table) >= bm.blocks_for(s.num_computed_tokens)
        assert s.status is SequenceStatus.RUNNING
    assert len(sched.running) <= sched.max_num_seqs


def test_decodes_first_then_prefill_chunks_fill_the_budget() -> None:
    bm = BlockManager(num_blocks=100, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10, prefill_chunk_size=6)
    a = make_seq("a", 3)
    sched.add(a)
    advance(sched)  # a prefilled (3 tokens) and sampled: now decoding
    long = make_seq("long", 20)
    sched.add(long)
    plan = sched.schedule()
    assert [s.request_id for s in plan.seqs] == ["a", "long"]
    assert plan.num_new_tokens == [1, 6]  # decode, then one chunk (chunk size 6)
    for s, n in zip(plan.seqs, plan.num_new_tokens):
        s.num_computed_tokens += n
    a.token_ids.append(9)
    b = make_seq("b", 4)
    sched.add(b)
    plan = sched.schedule()
    # budget 10: a's decode (1), long's next chunk (6), then b's first 3 tokens
    assert [s.request_id for s in plan.seqs] == ["a", "long", "b"]
    assert plan.num_new_tokens == [1, 6, 3]
    check_invariants(sched, bm)


def test_every_running_sequence_decodes_every_step() -> None:
    """The running batch is capped at the token budget, so no decode is ever left out."""
    bm = BlockManager(num_blocks=100, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=2, prefill_chunk_size=2)
    for i in range(3):
        sched.add(make_seq(str(i), 1))
    for _ in range(6):
        served = advance(sched)
        assert len(sched.running) <= 2
        assert {s.request_id for s in served} == {s.request_id for s in sched.running}


def test_max_num_seqs_limits_the_running_batch() -> None:
    bm = BlockManager(num_blocks=100, block_size=4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=100, prefill_chunk_size=100)
    for i in range(5):
        sched.add(make_seq(str(i), 3))
    plan = sched.schedule()
    assert [s.request_id for s in plan.seqs] == ["0", "1"]
    assert len(sched.waiting) == 3


def test_preemption_frees_the_newest_and_requeues_it_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100, prefill_chunk_size=100)
    old, new = make_seq("old", 4), make_seq("new", 3)
    sched.add(old)
    sched.add(new)
    advance(sched)  # old: 2 blocks (4 tokens), new: 2 blocks (3 tokens) -> pool empty
    assert bm.num_free_blocks == 0
    advance(sched)  # old needs a 3rd block for its 5th token: new is preempted
    assert [s.request_id for s in sched.running] == ["old"]
    assert list(sched.waiting) == [new]
    assert new.num_computed_tokens == 0 and not new.block_table
    assert new.num_tokens == 4  # its sampled token is kept and will be recomputed
    check_invariants(sched, bm)


def test_a_sequence_too_big_for_the_whole_cache_finishes_with_length() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100, prefill_chunk_size=100)
    seq = make_seq("a", 4)
    sched.add(seq)
    advance(sched)  # 4 tokens fill both blocks; one sampled
    plan = sched.schedule()
    assert plan.finished == [seq] and seq.finish_reason is FinishReason.LENGTH
    assert bm.num_free_blocks == 2


def test_finish_and_abort_return_every_block() -> None:
    bm = BlockManager(num_blocks=10, block_size=2)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100, prefill_chunk_size=100)
    seqs = [make_seq(str(i), 5) for i in range(3)]
    for s in seqs:
        sched.add(s)
    advance(sched)
    sched.finish(seqs[0], FinishReason.STOP)
    sched.finish(seqs[2], FinishReason.ABORT)
    assert bm.num_free_blocks == 10 - len(seqs[1].block_table)
    sched.finish(seqs[1], FinishReason.ABORT)
    assert bm.num_free_blocks == 10 and not sched.has_unfinished()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_blocks=st.integers(3, 24),
    block_size=st.sampled_from([1, 2, 3, 4]),
    budget=st.integers(1, 16),
    chunk=st.integers(1, 8),
    max_seqs=st.integers(1, 6),
)
def test_random_workloads_keep_the_cache_consistent_and_finish(
    seed: int, num_blocks: int, block_size: int, budget: int, chunk: int, max_seqs: int
) -> None:
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_seqs, budget, chunk)
    capacity = num_blocks * block_size
    live: list[Sequence] = []
    for i in range(8):
        seq = make_seq(str(i), rng.randint(1, max(1, capacity - 1)), max_tokens=rng.randint(1, 5))
        sched.add(seq)
        live.append(seq)
    for _ in range(400):
        if not sched.has_unfinished():
            break
        advance(sched)
        for seq in list(sched.running):
            if seq.num_tokens - seq.num_prompt_tokens >= seq.params.max_tokens:
                sched.finish(seq, FinishReason.LENGTH)
        if rng.random() < 0.05 and sched.running:
            sched.finish(rng.choice(sched.running), FinishReason.ABORT)
        check_invariants(sched, bm)
    assert not sched.has_unfinished(), "the scheduler stalled"
    assert bm.num_free_blocks == num_blocks
    assert all(s.is_finished for s in live)


def test_block_manager_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="num_kv_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
