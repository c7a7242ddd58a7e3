"""One request inside the engine: its tokens, how many are in the KV cache, its blocks.

A Sequence is the scheduler's unit. `token_ids` holds prompt + generated tokens; the first
`num_computed_tokens` of them have their keys/values in the paged cache (blocks listed in
`block_table`). A step feeds the next tokens; when, after a step, every token is computed, the
model's last hidden state is sampled and one token is appended. Preemption (recompute) only resets
`num_computed_tokens` and the block table: generated tokens are kept and prefilled again (from the
prefix cache where its blocks are still there).

For the prefix cache (workers/block_manager.py) a sequence also carries `block_hashes`, the chained
keys of its full blocks of tokens (they depend only on `token_ids`, which only grow, so they stay
valid across preemption), and `num_keyed_blocks`, how many of its blocks were offered to the cache.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

import torch
from moeray.workers.io_struct import FinishReason, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from moeray.workers.detokenizer import IncrementalDetokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    __slots__ = (
        "block_hashes",
        "block_table",
        "detokenizer",
        "finish_reason",
        "generator",
        "guide",
        "logprobs",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_keyed_blocks",
        "num_prompt_tokens",
        "num_sent_chars",
        "num_sent_tokens",
        "params",
        "prompt_logprobs",
        "prompt_token_ids",
        "request_id",
        "status",
        "stream",
        "token_ids",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        stream: bool = True,
    ) -> None:
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        # Shared by every RequestOutput of the request (not copied per step): do not mutate.
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # key of full block i of token_ids (chained)
        self.num_keyed_blocks = 0  # blocks of block_table already offered to the prefix cache
        # Prompt tokens whose KV came from the prefix cache at the first admission; -1 before it.
        self.num_cached_tokens = -1
        self.status = SequenceStatus.WAITING
        self.params = params
        self.stream = stream
        self.finish_reason: FinishReason | None = None
        self.num_sent_tokens = 0  # output tokens already reported in a streamed delta
        self.num_sent_chars = 0  # output text already reported in a streamed delta
        # One entry per output token when params.logprobs is set (the engine appends them).
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.guide: Any = None  # the llguidance matcher of a structured-output request
        # One entry per prompt token when params.prompt_logprobs is set (None for the first).
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        self.detokenizer: IncrementalDetokenizer | None = None
        # A private generator makes a seeded request's samples independent of the batch.
        self.generator: torch.Generator | None = None
        if params.seed is not None and not params.greedy:
            self.generator = torch.Generator().manual_seed(params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)}, "
            f"{self.status.value})"
        )
