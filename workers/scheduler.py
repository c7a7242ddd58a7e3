"""Continuous batching: which sequences run in the next step, and how many tokens each feeds.

Plain Python, no tensors (nano-vllm's scheduler, with vLLM's chunked prefill). Every step has a
token budget (max_num_batched_tokens):

1. Running sequences that decode (one new token each) are scheduled first, so a long prompt
   arriving never starves them.
2. Running sequences still prefilling get their next chunk (at most prefill_chunk_size tokens).
3. Waiting sequences are admitted in arrival order while the budget, max_num_seqs and free KV
   blocks allow, each with its first chunk.

A waiting sequence starts at the longest prefix of its tokens already in the prefix cache
(workers/block_manager.py): it holds those blocks and computes only the rest, in chunks as usual.

When the KV pool runs out, the newest running sequence is preempted (recompute): its blocks are
released and it goes back to the front of the waiting queue with its generated tokens kept. A
sequence that cannot fit even alone is finished with FinishReason.LENGTH (its context reached the
cache's capacity).

The engine's step is `schedule()`, the model run, then `finish_step(plan)`, which advances the
sequences and tells the block manager their KV is written.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from moeray.workers.block_manager import BlockManager
from moeray.workers.io_struct import FinishReason
from moeray.workers.sequence import Sequence, SequenceStatus


@dataclass
class PrefillCounters:
    """Prompt tokens since start, for the prefix-cache hit ratio.

    prompt_tokens: prompt tokens of the requests admitted (each counted at its first admission).
    prefix_cache_hit_tokens: of those, the tokens whose KV was reused from the prefix cache.
    prompt_tokens_computed: prompt tokens run through the model (again after a preemption).
    Without preemption, prompt_tokens == prefix_cache_hit_tokens + prompt_tokens_computed once
    every admitted prompt is prefilled.
    """

    prompt_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    prompt_tokens_computed: int = 0

    @property
    def hit_ratio(self) -> float:
        return self.prefix_cache_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass
class SchedulerOutput:
    """One step's plan: seqs[i] feeds num_new_tokens[i] tokens from its num_computed_tokens."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    # sequences the scheduler had to finish (did not fit in the KV cache even alone)
    finished: list[Sequence] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        prefill_chunk_size: int,
    ) -> None:
        self.block_manager = block_manager
        # Every running sequence must be able to decode in every step, or some would starve.
        self.max_num_seqs = min(max_num_seqs, max_num_batched_tokens)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk_size = prefill_chunk_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # since start, for stats and tests
        self.counters = PrefillCounters()

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Takes seq out of the running batch or the queue and frees its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def schedule(self) -> SchedulerOutput:
        self.block_manager.rollback()  # a no-op unless the last plan never ran
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # Decodes first, then unfinished prefills; preemption victims come from the tail.
        decodes = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        prefills = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        candidates = deque(decodes + prefills)
        kept: list[Sequence] = []
        while candidates and budget > 0:
            seq = candidates.popleft()
            n = min(seq.num_tokens - seq.num_computed_tokens, self.prefill_chunk_size, budget)
            if not self._make_room(seq, n, candidates, out):
                continue
            self.block_manager.allocate(seq, n)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            kept.append(seq)
            budget -= n
        if candidates:
            # Out of budget: those left out go first next step, so no decode starves.
            self.running = [*candidates, *kept]
        else:
            keep = set(kept)
            self.running = [s for s in self.running if s in keep]
        if out.num_preempted == 0:
            budget = self._admit(budget, out)
        return out

    def finish_step(self, plan: SchedulerOutput) -> list[Sequence]:
        """Records that plan ran: advances each sequence by its tokens, counts prefill work and
        commits the blocks it filled to the prefix cache. Returns the sequences that sample."""
        sampling: list[Sequence] = []
        for seq, n in zip(plan.seqs, plan.num_new_tokens):
            start = seq.num_computed_tokens
            self.counters.prompt_tokens_computed += max(
                0, min(start + n, seq.num_prompt_tokens) - start
            )
            seq.num_computed_tokens = start + n
            if seq.num_computed_tokens == seq.num_tokens:
                sampling.append(seq)
        self.block_manager.commit()
        return sampling

    def _make_room(
        self, seq: Sequence, n: int, candidates: deque[Sequence], out: SchedulerOutput
    ) -> bool:
        """Preempts from the tail of candidates until seq's next n tokens fit; False if seq lost."""
        while not self.block_manager.can_allocate(seq, n):
            if candidates:
                self._preempt(candidates.pop())
                out.num_preempted += 1
            elif not out.seqs:
                # seq holds every used block and still does not fit: preemption cannot help.
                self.finish(seq, FinishReason.LENGTH)
                out.finished.append(seq)
                return False
            else:
                self._preempt(seq)
                out.num_preempted += 1
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _admit(self, budget: int, out: SchedulerOutput) -> int:
        """Moves waiting sequences into the running batch while budget, seats and blocks allow;
        each starts after its cached prefix."""
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # prompt_logprobs need every prompt position computed: no cached prefix (vLLM's rule)
            hits = bm.lookup(seq) if seq.prompt_logprobs is None else []
            n = min(seq.num_tokens - len(hits) * bm.block_size, self.prefill_chunk_size, budget)
            if not bm.can_admit(seq, hits, n):
                if not self.running and bm.num_free_blocks == bm.num_blocks:
                    # Even an empty cache cannot hold this chunk (block pool tiny): give up on it.
                    self.finish(seq, FinishReason.LENGTH)
                    out.finished.append(seq)
                    continue
                break
            self.waiting.popleft()
            bm.admit(seq, hits, n)
            if seq.num_cached_tokens < 0:  # first admission
                seq.num_cached_tokens = seq.num_computed_tokens
                self.counters.prompt_tokens += seq.num_prompt_tokens
                self.counters.prefix_cache_hit_tokens += seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget -= n
        return budget
