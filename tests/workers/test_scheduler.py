"""The scheduler and block manager alone (no model): budgets, chunking, preemption, block accounting.

The property test drives the scheduler like the engine does (feed the scheduled tokens, append a
"sampled" token when a sequence is fully computed, finish or abort at random), with prompts that
share prefixes so the prefix cache hits, evicts and shares blocks, and checks the paged-cache
invariants and, through a model-free KV oracle, that every token reads the right K/V.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moeray.workers.block_manager import BlockManager
from moeray.workers.io_struct import FinishReason, SamplingParams
from moeray.workers.scheduler import Scheduler, SchedulerOutput
from moeray.workers.sequence import Sequence, SequenceStatus


def make_seq(rid: str, prompt_len: int, max_tokens: int = 4, first: int = 1) -> Sequence:
    """Prompt first, first+1, ...: sequences with the same `first` share a prefix."""
    prompt = list(range(first, first + prompt_len))
    return Sequence(rid, prompt, SamplingParams(max_tokens=max_tokens))


def advance(sched: Scheduler) -> list[Sequence]:
    """One engine step without a model: feed tokens, append one to fully computed sequences."""
    plan = sched.schedule()
    for seq in sched.finish_step(plan):
        seq.token_ids.append(7)
    return plan.seqs


def check_invariants(sched: Scheduler, bm: BlockManager) -> None:
    holders: dict[int, list[tuple[Sequence, int]]] = {}
    for s in sched.running:
        for i, b in enumerate(s.block_table):
            holders.setdefault(b, []).append((s, i))
    assert len(holders) + bm.num_free_blocks == bm.num_blocks, "blocks leaked"
    size = bm.block_size
    for b, held in holders.items():
        if len(held) > 1:  # shared: a full computed block of one identical prefix
            first, i = held[0]
            for s, j in held:
                assert j == i and (i + 1) * size <= s.num_computed_tokens, (b, s)
                assert s.token_ids[: (i + 1) * size] == first.token_ids[: (i + 1) * size], b
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
    old, new = make_seq("old", 4), make_seq("new", 3, first=50)  # nothing shared
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


def test_admission_starts_after_the_cached_prefix_and_chunks_the_rest() -> None:
    bm = BlockManager(num_blocks=20, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100, prefill_chunk_size=3)
    a = make_seq("a", 10)
    sched.add(a)
    while a.num_computed_tokens < 10:
        advance(sched)
    b = Sequence("b", [*range(1, 9), 50, 51, 52, 53, 54], SamplingParams(max_tokens=4))
    sched.add(b)
    plan = sched.schedule()
    assert plan.seqs == [a, b] and plan.num_new_tokens == [1, 3]
    assert b.num_computed_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    sched.finish_step(plan)
    plan = sched.schedule()
    assert plan.num_new_tokens[-1] == 2  # the rest of b: 13 - 8 - 3
    sched.finish_step(plan)
    c = sched.counters
    assert (c.prompt_tokens, c.prefix_cache_hit_tokens, c.prompt_tokens_computed) == (23, 8, 15)
    assert b.num_cached_tokens == 8 and c.hit_ratio == 8 / 23


def test_requests_admitted_together_share_a_prefix_in_the_same_step() -> None:
    bm = BlockManager(num_blocks=20, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100, prefill_chunk_size=100)
    seqs = [Sequence(str(i), [*range(1, 13), 20 + i], SamplingParams()) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    plan = sched.schedule()
    assert plan.num_new_tokens == [13, 1, 1]  # 12 shared tokens are computed once
    assert seqs[1].block_table[:3] == seqs[2].block_table[:3] == seqs[0].block_table[:3]
    assert bm.num_free_blocks == 20 - 6


def test_a_preempted_sequence_leaves_shared_blocks_and_resumes_from_the_cache() -> None:
    bm = BlockManager(num_blocks=5, block_size=2)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100, prefill_chunk_size=100)
    a = Sequence("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=4))
    b = Sequence("b", [1, 2, 3, 4, 6], SamplingParams(max_tokens=8))
    sched.add(a)
    sched.add(b)
    rng = random.Random(0)
    oracle = KVOracle(sched, rng)
    oracle.step()
    shared = a.block_table[:2]
    assert b.block_table[:2] == shared
    resumed_at = -1
    for _ in range(40):
        if not sched.has_unfinished():
            break
        waiting = b.status is SequenceStatus.WAITING
        plan = oracle.step()
        if waiting and b in plan.seqs:
            resumed_at = b.num_computed_tokens - plan.num_new_tokens[plan.seqs.index(b)]
        if b.status is SequenceStatus.WAITING:
            assert a.block_table[:2] == shared and not b.block_table  # a keeps the shared blocks
        for seq in list(sched.running):
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish(seq, FinishReason.LENGTH)
        check_invariants(sched, bm)
    assert sched.num_preemptions > 0 and resumed_at >= 4  # b came back at least past the prefix
    assert not sched.has_unfinished() and bm.num_free_blocks == 5


class KVOracle:
    """Stands in for the model's KV cache: each slot remembers which token prefix's K/V it holds.

    `step` runs one engine step the way paged attention does: every scheduled token's K/V is
    written first, then every scheduled sequence reads its whole context, and each read must find
    the K/V of exactly its own prefix (a wrong cache hit, a stale or evicted block, a shared block
    overwritten: all fail here).
    """

    def __init__(self, sched: Scheduler, rng: random.Random) -> None:
        self.sched = sched
        self.rng = rng
        self.slots: dict[int, int] = {}  # slot -> id of the prefix whose last token it holds
        self.prefix_ids: dict[str, list[int]] = {}  # request -> id of each prefix of its tokens

    def prefix_id(self, seq: Sequence, p: int) -> int:
        ids = self.prefix_ids.setdefault(seq.request_id, [])
        for q in range(len(ids), p + 1):
            ids.append(hash((ids[-1] if ids else 0, seq.token_ids[q])))
        return ids[p]

    def slot(self, seq: Sequence, p: int) -> int:
        size = self.sched.block_manager.block_size
        return seq.block_table[p // size] * size + p % size

    def step(self) -> SchedulerOutput:
        plan = self.sched.schedule()
        work = list(zip(plan.seqs, plan.num_new_tokens))
        assert min(plan.num_new_tokens, default=1) >= 1, "a sequence must compute its last token"
        for seq, n in work:  # writes
            for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                self.slots[self.slot(seq, p)] = self.prefix_id(seq, p)
        for seq, n in work:  # reads
            for p in range(seq.num_computed_tokens + n):
                assert self.slots.get(self.slot(seq, p)) == self.prefix_id(seq, p), (seq, p)
        for seq in self.sched.finish_step(plan):
            seq.token_ids.append(self.rng.randint(1, 3))  # continuations diverge
        return plan


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_blocks=st.integers(3, 24),
    block_size=st.sampled_from([1, 2, 3, 4]),
    budget=st.integers(1, 16),
    chunk=st.integers(1, 8),
    max_seqs=st.integers(1, 6),
    prefix_caching=st.booleans(),
)
def test_random_workloads_keep_the_cache_consistent_and_finish(
    seed: int,
    num_blocks: int,
    block_size: int,
    budget: int,
    chunk: int,
    max_seqs: int,
    prefix_caching: bool,
) -> None:
    """Prompts from three shared prefixes arrive over time; every step's reads find the right
    K/V, no block leaks, everything finishes."""
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    sched = Scheduler(bm, max_seqs, budget, chunk)
    oracle = KVOracle(sched, rng)
    capacity = num_blocks * block_size
    live: list[Sequence] = []

    def arrive() -> None:
        i = len(live)
        n = rng.randint(1, max(1, capacity - 1))
        seq = make_seq(str(i), n, max_tokens=rng.randint(1, 5), first=rng.choice([1, 40, 80]))
        sched.add(seq)
        live.append(seq)

    for _ in range(4):
        arrive()
    for step in range(600):
        if not sched.has_unfinished() and len(live) >= 12:
            break
        if step % 5 == 0 and len(live) < 12:
            arrive()
        oracle.step()
        for seq in list(sched.running):
            if seq.num_tokens - seq.num_prompt_tokens >= seq.params.max_tokens:
                sched.finish(seq, FinishReason.LENGTH)
        if rng.random() < 0.05 and sched.running:
            sched.finish(rng.choice(sched.running), FinishReason.ABORT)
        check_invariants(sched, bm)
    assert not sched.has_unfinished(), "the scheduler stalled"
    assert bm.num_free_blocks == num_blocks
    assert all(s.is_finished for s in live)
    c = sched.counters
    assert c.prefix_cache_hit_tokens <= c.prompt_tokens
    if not prefix_caching:
        assert c.prefix_cache_hit_tokens == 0 and bm.num_cached_blocks == 0


def test_block_manager_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="num_kv_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
