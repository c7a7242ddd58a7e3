"""Typed messages exchanged between the front door, the engine and its callers, defined once.

- The engine's API (offline `LLM`, `LLMEngine`, `AsyncLLMEngine`): `SamplingParams`,
  `RequestOutput`, `FinishReason`, `Usage`.
- The wire between a router replica and an engine replica (workers/engine_service.py, ZeroMQ
  with msgspec-encoded bodies): `GenerateRequest` in, a stream of `GenerateDelta`s (deltas only)
  or one `GenerateRejected` out; `EngineStats` for a Stats message.
- Refusals: `InvalidRequest(field, message)`, a ValueError that carries the field's name as data,
  so no caller ever parses it back out of the sentence.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import Any

import msgspec

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
#: The most alternatives per token a request may ask log-probabilities for (OpenAI's chat limit).
MAX_LOGPROBS = 20
#: The longest JSON Schema text a request may give (structured output).
MAX_JSON_SCHEMA_CHARS = 65536
PENALTIES = ("repetition_penalty", "presence_penalty", "frequency_penalty")
MAX_LOGIT_BIAS = 300  # OpenAI's limit


class InvalidRequest(ValueError):
    """A request field is invalid. `field` is its dotted name; str(e) is "<field> <message>"."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field
        self.message = message


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context reached
    ABORT = "abort"  # cancelled by the client or by shutdown
    #: The front doors' only: a chat's output was tool calls (router/chat_stream.py).
    TOOL_CALLS = "tool_calls"


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
    #: vLLM's min_tokens: until this many tokens are out, EOS and stop_token_ids cannot be
    #: sampled (their logits are -inf) and stop strings are not looked for.
    min_tokens: int = 0
    #: None: no log-probabilities; k >= 0: each generated token's, with the k likeliest tokens'.
    logprobs: int | None = None
    #: vLLM's prompt_logprobs: None, or k >= 0: each prompt token's log-probability given the
    #: tokens before it (none for the first), with the k likeliest tokens'. Such a request
    #: computes its whole prompt (its prefix is not read from the prefix cache).
    prompt_logprobs: int | None = None
    #: vLLM's (and OpenAI's) penalties, applied to the logits before temperature: a token seen
    #: in the prompt or the output has its logit divided by repetition_penalty when positive
    #: (multiplied when negative); each output occurrence subtracts frequency_penalty, and any
    #: occurrence presence_penalty once.
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: token id -> a value in [-100, 100] added to its logit, after the penalties and before
    #: temperature (as vLLM applies it).
    logit_bias: dict[int, float] = field(default_factory=dict)
    #: Structured output: the text of a JSON Schema the output must be a JSON value of
    #: ('{"type": "object"}' is OpenAI's json_object); each step, llguidance gives the tokens
    #: that keep the output on the grammar and the others get -inf (workers/guided.py).
    json_schema: str | None = None
    #: vLLM's: special tokens (the tokenizer's control tokens) are left out of the output text.
    #: Off where they carry meaning, e.g. a tool-call parser reading Mistral's [TOOL_CALLS].
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)

    def validate(self, max_tokens_limit: int | None = None) -> SamplingParams:
        """Returns self; raises InvalidRequest naming the field when a value is out of range.

        Called once per request, where it is admitted: the front door for served requests
        (router/convert.py), `LLMEngine.process_input` for direct callers of the engine.
        """
        if not _is_int(self.max_tokens):
            raise InvalidRequest("max_tokens", f"must be an integer, got {self.max_tokens!r}")
        if self.max_tokens <= 0:
            raise InvalidRequest("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if max_tokens_limit is not None and self.max_tokens > max_tokens_limit:
            raise InvalidRequest(
                "max_tokens", f"must be at most {max_tokens_limit}, got {self.max_tokens}"
            )
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequest(
                "min_tokens",
                f"must be an integer in [0, max_tokens = {self.max_tokens}], got {self.min_tokens!r}",
            )
        for name in ("temperature", "top_p", *PENALTIES):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidRequest(name, f"must be a number, got {value!r}")
            if not math.isfinite(value):
                raise InvalidRequest(name, f"must be a finite number, got {value}")
        if self.temperature < 0.0:
            raise InvalidRequest("temperature", f"must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise InvalidRequest(
                "top_k", f"must be -1, 0 (disabled) or a positive integer, got {self.top_k}"
            )
        if self.seed is not None and not (_is_int(self.seed) and -(2**63) <= self.seed < 2**64):
            raise InvalidRequest("seed", f"must be an integer in [-2^63, 2^64), got {self.seed!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(
                "stop", f"must have at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}"
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequest("stop", "strings must be non-empty strings")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise InvalidRequest(
                    "stop", f"strings must be at most {MAX_STOP_STRING_CHARS} characters"
                )
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise InvalidRequest("stop_token_ids", f"must be non-negative integers, got {t!r}")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequest("ignore_eos", f"must be a boolean, got {self.ignore_eos!r}")
        if self.repetition_penalty <= 0.0:
            raise InvalidRequest(
                "repetition_penalty", f"must be > 0, got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequest(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequest(
                "logit_bias", f"must map at most {MAX_LOGIT_BIAS} token ids to biases"
            )
        for token, bias in self.logit_bias.items():
            if not _is_int(token) or token < 0:
                raise InvalidRequest("logit_bias", f"keys must be token ids >= 0, got {token!r}")
            if (
                isinstance(bias, bool)
                or not isinstance(bias, (int, float))
                or not (-100.0 <= bias <= 100.0)
            ):
                raise InvalidRequest(
                    "logit_bias", f"values must be numbers in [-100, 100], got {bias!r}"
                )
        if self.json_schema is not None:
            _check_json_schema(self.json_schema)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value <= MAX_LOGPROBS):
                raise InvalidRequest(
                    name, f"must be an integer in [0, {MAX_LOGPROBS}], got {value!r}"
                )
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether any penalty or bias changes the logits."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0 or bool(self.logit_bias))  # fmt: skip


class TopLogprob(msgspec.Struct, frozen=True, array_like=True):
    """One candidate token: its id, its text (the token decoded alone) and log-probability."""

    token_id: int
    text: str
    logprob: float


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """A generated token's log-probability under the model's distribution for that position
    (log_softmax of the raw logits: before temperature, top-k and top-p, as vLLM reports
    them), with the `SamplingParams.logprobs` likeliest tokens there, likeliest first."""

    token_id: int
    text: str
    logprob: float
    top: list[TopLogprob]


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
    #: With SamplingParams.logprobs set: one entry per token of token_ids / delta_token_ids.
    logprobs: list[TokenLogprob] | None = None
    delta_logprobs: list[TokenLogprob] | None = None
    #: With SamplingParams.prompt_logprobs set: one entry per prompt token, None for the first.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    #: The prompt's text, for a served request that asked to echo it (HTTP completions' echo).
    prompt: str | None = None
    #: Seconds the engine deployment spent on the request (entry to last delta), set on the
    #: last message only; the front door reports it so overhead is measured per request.
    engine_time_s: float = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _check_json_schema(text: object) -> None:
    """InvalidRequest("json_schema") unless `text` is the JSON text of a schema object, at most
    MAX_JSON_SCHEMA_CHARS long. Whether llguidance can follow it is the engine's to say when it
    compiles it (workers/guided.py), once, off the router's event loop."""
    if not isinstance(text, str) or len(text) > MAX_JSON_SCHEMA_CHARS:
        raise InvalidRequest(
            "json_schema", f"must be the text of a JSON Schema of at most {MAX_JSON_SCHEMA_CHARS} "
            "characters"
        )  # fmt: skip
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise InvalidRequest("json_schema", f"is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequest("json_schema", "must be a JSON object (a JSON Schema)")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---- the wire between router and engine replicas (msgspec structs, encoded as msgpack) -------


class ChatMessage(msgspec.Struct, frozen=True):
    """One chat turn. An assistant turn that called tools carries them as chat templates take
    them ({"id", "type": "function", "function": {"name", "arguments": {...}}}); a tool turn
    names the call it answers."""

    role: str
    content: str
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class GenerateRequest(msgspec.Struct, frozen=True):
    """Router -> engine: one request. Exactly one of prompt / prompt_token_ids / messages."""

    request_id: str
    sampling: SamplingParams
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    #: Tools (OpenAI's function specs) the chat template shows the model, with messages.
    tools: list[dict[str, Any]] | None = None
    #: Send the prompt's text (token ids decoded) with the first delta (completions' echo).
    echo: bool = False


class GenerateDelta(msgspec.Struct, frozen=True, tag="delta"):
    """Engine -> router: what one engine step added to a request (deltas only).

    prompt_token_ids (and prompt_logprobs) ride on the first delta only; finish_reason and engine_time_s (the engine
    replica's time from receiving the request to this message) on the last.
    """

    delta_token_ids: list[int]
    delta_text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    prompt_token_ids: list[int] | None = None
    engine_time_s: float = 0.0
    delta_logprobs: list[TokenLogprob] | None = None
    #: First delta only, when asked; None for the prompt's first token, except for an echoed
    #: request: that token's text, logprob 0 and no alternatives.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_text: str | None = None  # first delta only, when the request asked for echo


class GenerateRejected(msgspec.Struct, frozen=True, tag="rejected"):
    """Engine -> router, instead of any delta: the engine refused the request.

    kind: "invalid" (`field` names the bad field -> INVALID_ARGUMENT / HTTP 400) or "overloaded"
    (the waiting queue is full -> RESOURCE_EXHAUSTED / HTTP 429; field is "").
    """

    kind: str
    field: str
    message: str


GenerateEvent = GenerateDelta | GenerateRejected


class EngineStats(msgspec.Struct, frozen=True):
    """Engine -> router: a snapshot of one engine replica (GetClusterStatus, /metrics, health).

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
    # Prefix cache since the engine started (workers/scheduler.py PrefillCounters).
    prompt_tokens: int = 0  # prompt tokens of the requests admitted
    prompt_tokens_computed: int = 0  # of the prompts, tokens run through the model
    prefix_cache_hit_tokens: int = 0  # of the prompts, tokens whose KV was reused
    prefix_cache_hit_ratio: float = 0.0  # prefix_cache_hit_tokens / prompt_tokens
