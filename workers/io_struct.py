"""Typed messages exchanged between the front door, the engine and its callers.

Every message that crosses a process boundary (router <-> engine deployment, engine <-> caller) is
one of these dataclasses; nothing travels as a loose dict. Validation errors are `ValueError`s
whose message names the field, so the front door can turn them into INVALID_ARGUMENT / HTTP 400.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context reached
    ABORT = "abort"  # cancelled by the client or by shutdown


@dataclass
class SamplingParams:
    """How to sample one request (vLLM's names and meanings).

    temperature == 0 means greedy. top_k <= 0 (or -1) disables top-k; top_p == 1 disables top-p.
    seed makes sampling reproducible per request, independent of what else is in the batch.
    stop: strings that end generation (not included in the output text).
    stop_token_ids: token ids that end generation (in addition to EOS unless ignore_eos).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    def validate(self, max_tokens_limit: int | None = None) -> None:
        """Raises ValueError naming the field when a value is out of range."""
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool):
            raise ValueError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if max_tokens_limit is not None and self.max_tokens > max_tokens_limit:
            raise ValueError(
                f"max_tokens must be at most {max_tokens_limit}, got {self.max_tokens}"
            )
        if not (self.temperature >= 0.0):  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(
                f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k}"
            )
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(
                f"stop must have at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}"
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError("stop strings must be non-empty strings")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {t!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestOutput:
    """What the engine reports for one request.

    From `LLM.generate` (offline): the whole result. From a streaming engine: one message per step
    with only the new `delta_token_ids` / `delta_text`, while `token_ids` / `text` stay cumulative.
    `finish_reason` is set on the last message only.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage = field(default_factory=Usage)
    #: Seconds the engine deployment spent on the request (entry to last delta), set on the
    #: last message only; the front door reports it so overhead is measured per request.
    engine_time_s: float = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestRejected:
    """An engine deployment's answer instead of a first RequestOutput when it refuses a request.

    Sent as a value, not raised: an exception crossing Ray arrives wrapped in a traceback, and a
    refusal is an expected outcome the front door maps to a status code.
    kind: "invalid" (bad input; `message` names the field -> INVALID_ARGUMENT / HTTP 400) or
    "overloaded" (the waiting queue is full -> RESOURCE_EXHAUSTED / HTTP 429).
    """

    kind: str
    message: str


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of one engine replica (for GetClusterStatus, /metrics and tests).

    free_blocks == total_blocks and running == waiting == 0 means no request holds KV memory.
    """

    replica_id: str
    node: str
    device: str
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    max_model_len: int
