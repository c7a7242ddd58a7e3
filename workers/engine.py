"""The inference engine: requests in, tokens out, one step at a time (nano-vllm's shape).

`step()` is three calls: the scheduler picks sequences and token counts, the model runner runs
them, and postprocessing samples, appends, detokenizes and checks stop conditions. Requests join
and leave the batch between any two steps. Not thread-safe: one thread drives it
(`AsyncLLMEngine` runs it on a background thread; `LLM` runs it inline).
"""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path
from typing import Any, TypedDict

from moeray.cluster.config import EngineConfig
from moeray.workers.block_manager import BlockManager
from moeray.workers.cpu_tuning import apply_cpu_tuning
from moeray.workers.detokenizer import IncrementalDetokenizer
from moeray.workers.guided import Guides, mask_disallowed
from moeray.workers.io_struct import (
    FinishReason,
    InvalidRequest,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from moeray.workers.model_runner import ModelRunner, resolve_device
from moeray.workers.sampler import Sampler, apply_penalties, token_logprobs
from moeray.workers.scheduler import Scheduler
from moeray.workers.sequence import Sequence
from moeray.workers.tokenizer import Tokenizer

Prompt = str | list[int]
#: prompt_logprobs are computed over at most this many prompt positions at once ([rows, vocab]
#: float32 logits: 64 MiB for a 32K vocabulary).
PROMPT_LOGITS_ROWS = 512


class StatsSnapshot(TypedDict):
    """`LLMEngine.stats()`: the load now, and prompt-token counters since start (prefix cache:
    workers/scheduler.py PrefillCounters; the hit ratio is hit tokens / prompt tokens)."""

    running: int
    waiting: int
    free_blocks: int  # blocks no request holds, cached ones included (evicted on demand)
    total_blocks: int
    prompt_tokens: int
    prompt_tokens_computed: int
    prefix_cache_hit_tokens: int
    prefix_cache_hit_ratio: float


def kv_cache_blocks(config: EngineConfig, bytes_per_token: int, max_model_len: int) -> int:
    """N: the configured count, else what kv_cache_memory_gb holds, capped at what
    max_num_seqs sequences of max_model_len tokens can ever use."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = bytes_per_token * config.block_size
    fit = int(config.kv_cache_memory_gb * 2**30) // per_block
    useful = config.max_num_seqs * math.ceil(max_model_len / config.block_size)
    if fit < 1:
        raise ValueError(
            f"kv_cache_memory_gb={config.kv_cache_memory_gb} holds no block of "
            f"{config.block_size} tokens ({per_block} bytes)"
        )
    return min(fit, useful)


def max_token_bytes(tokenizer: Tokenizer) -> int:
    """The most UTF-8 bytes of text one token of the vocabulary stands for, from the tokens'
    string forms (which never understate it: byte-level and byte-fallback tokens spell one
    byte with several), and at least 4 (one character that falls back to an unknown token).
    FOOTGUN: a WordPiece/WordLevel vocabulary maps a whole unknown word to one token, so this
    bound holds only for BPE and Unigram vocabularies (every LLM checkpoint moeray loads)."""
    longest = 4
    for i in range(tokenizer.vocab_size):
        token = tokenizer.id_to_token(i)
        if token is not None:
            longest = max(longest, len(token.encode("utf-8", "surrogatepass")))
    return longest


class LLMEngine:
    def __init__(
        self,
        model_path: str | Path,
        config: EngineConfig | None = None,
        dtype: str = "auto",
        *,
        device: str = "auto",
        model: Any = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        """Loads `model_path` on `device` (auto | cpu | cuda; auto = cuda when torch sees a GPU)
        unless a finished `model` is given; a CPU model gets workers/cpu_tuning.py when
        config.cpu_tuning is on."""
        from moeray.workers.loader import load_model

        self.config = config = config or EngineConfig()
        if model is None:
            model = load_model(str(model_path), dtype=dtype, device=resolve_device(device))
            if config.cpu_tuning:
                apply_cpu_tuning(model)
        self.model = model
        self.tokenizer = tokenizer or Tokenizer.from_pretrained(model_path)
        self._token_texts: dict[int, str] = {}  # token id -> its text alone (logprobs)
        args = self.model.args
        self.vocab_size: int = args.vocab_size
        self.max_model_len = self._max_model_len(config, args.max_position_embeddings)
        self.eos_token_ids = frozenset(args.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        num_blocks = kv_cache_blocks(config, self.model.kv_bytes_per_token(), self.max_model_len)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            min(config.prefill_chunk_size, config.max_num_batched_tokens),
        )
        self.runner = ModelRunner(self.model, num_blocks, config.block_size)
        self.sampler = Sampler()
        self._requests: dict[str, Sequence] = {}

    @staticmethod
    def _max_model_len(config: EngineConfig, model_limit: int) -> int:
        if config.max_model_len is None:
            return model_limit
        if config.max_model_len > model_limit:
            raise ValueError(
                f"max_model_len={config.max_model_len} exceeds the model's "
                f"max_position_embeddings ({model_limit})"
            )
        return config.max_model_len

    # ---- requests ----------------------------------------------------------------------------

    @cached_property
    def max_prompt_bytes(self) -> int:
        """A text longer than this (UTF-8 bytes) cannot fit the context (max_model_len tokens
        of at most `max_token_bytes` each): it is refused before it is tokenized."""
        return self.max_model_len * max_token_bytes(self.tokenizer)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Validated prompt token ids; InvalidRequest naming the field otherwise."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt", "must not be empty")
            try:
                size = len(prompt.encode("utf-8")) if len(prompt) <= self.max_prompt_bytes else 0
            except UnicodeEncodeError:
                raise InvalidRequest("prompt", "is not valid UTF-8 text") from None
            if not size or size > self.max_prompt_bytes:  # refused without tokenizing
                raise InvalidRequest(
                    "prompt",
                    f"is over {self.max_prompt_bytes} bytes of UTF-8; no text that long fits "
                    f"the context of {self.max_model_len} tokens",
                )
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list):
            ids = prompt
            for t in ids:
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                    raise InvalidRequest(
                        "prompt_token_ids", f"must be integers in [0, {self.vocab_size}), got {t!r}"
                    )
        else:
            raise InvalidRequest(
                "prompt", f"must be a string or a list of token ids, got {type(prompt).__name__}"
            )
        if not ids:
            raise InvalidRequest("prompt", "must not be empty (it has no tokens)")
        if len(ids) >= self.max_model_len:
            raise InvalidRequest(
                "prompt",
                f"has {len(ids)} tokens; the context limit (max_model_len) is "
                f"{self.max_model_len}, which must leave room for one generated token",
            )
        if self.block_manager.blocks_for(len(ids) + 1) > self.block_manager.num_blocks:
            raise InvalidRequest(
                "prompt",
                f"has {len(ids)} tokens, more than the KV cache holds "
                f"(num_kv_blocks={self.block_manager.num_blocks} of {self.config.block_size})",
            )
        return list(ids)

    def process_input(
        self, prompt: Prompt, params: SamplingParams | None = None
    ) -> tuple[list[int], SamplingParams]:
        """(prompt token ids, params), both checked once; InvalidRequest naming the field."""
        params = (params or SamplingParams()).validate(self.config.max_tokens_limit)
        beyond = [t for t in params.logit_bias if t >= self.vocab_size]
        if beyond:
            raise InvalidRequest(
                "logit_bias", f"token id {beyond[0]} is not in the vocabulary ({self.vocab_size})"
            )
        if params.json_schema is not None:
            self.guides.matcher(params.json_schema)  # refused here, before it is queued
        return self.encode_prompt(prompt), params

    @cached_property
    def guides(self) -> Guides:
        """Structured-output matchers over this engine's tokenizer (built on first use)."""
        return Guides(self.tokenizer, self.vocab_size, sorted(self.eos_token_ids))

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None = None,
        stream: bool = True,
    ) -> None:
        """Checks and queues a request. stream=False reports it once, when it finishes."""
        ids, params = self.process_input(prompt, params)
        self.add_processed(request_id, ids, params, stream)

    def add_processed(
        self, request_id: str, ids: list[int], params: SamplingParams, stream: bool = True
    ) -> None:
        """Queues a request whose input `process_input` has already checked."""
        if request_id in self._requests:
            raise InvalidRequest("request_id", f"{request_id!r} is already in use")
        seq = Sequence(request_id, ids, params, stream)
        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer, ids, params.stop, params.skip_special_tokens
        )
        if params.json_schema is not None:
            seq.guide = self.guides.matcher(params.json_schema)
        self._requests[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops a request and frees its KV blocks; its final output, or None if unknown."""
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq, FinishReason.ABORT)
        return self._output(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> StatsSnapshot:
        counters = self.scheduler.counters
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "free_blocks": self.block_manager.num_free_blocks,
            "total_blocks": self.block_manager.num_blocks,
            "prompt_tokens": counters.prompt_tokens,
            "prompt_tokens_computed": counters.prompt_tokens_computed,
            "prefix_cache_hit_tokens": counters.prefix_cache_hit_tokens,
            "prefix_cache_hit_ratio": counters.hit_ratio,
        }

    # ---- the step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedules, runs and postprocesses one step -> outputs of requests that advanced
        (streaming ones) or finished."""
        plan = self.scheduler.schedule()
        outputs = [self._finished_output(seq) for seq in plan.finished]
        if not plan:
            return outputs
        experts = self.model.expert_backend  # None for a dense model
        if experts is not None:
            experts.begin_step()  # the one point where experts may move (between steps)
        logits, prompt_rows = self.runner.run(plan.seqs, plan.num_new_tokens)
        for rows in prompt_rows:
            self._record_prompt_logprobs(plan.seqs[rows.seq], rows.first, rows.hidden)
        if experts is not None:
            experts.end_step(self.model.take_expert_counts())  # [L, E] this step's load
        sampling = self.scheduler.finish_step(plan)
        if logits is None:
            return outputs
        params = [s.params for s in sampling]
        scored = logits
        banned = {b: self._stop_ids(s.params) for b, s in enumerate(sampling)
                  if s.num_output_tokens < s.params.min_tokens}  # fmt: skip
        guided = [(b, s.guide) for b, s in enumerate(sampling) if s.guide is not None]
        if banned or guided or any(p.penalized for p in params):
            scored = apply_penalties(logits, params, [s.token_ids for s in sampling],
                                     [s.num_prompt_tokens for s in sampling], banned)  # fmt: skip
            for b, guide in guided:
                mask_disallowed(scored[b], guide)
        tokens = self.sampler(scored, params, [s.generator for s in sampling])
        if any(s.logprobs is not None for s in sampling):
            self._record_logprobs(logits, tokens, sampling)
        for seq, token in zip(sampling, tokens):
            reason = self._append_token(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                outputs.append(self._finished_output(seq))
            elif seq.stream:
                outputs.append(self._output(seq))
        return outputs

    def _record_logprobs(self, logits: Any, tokens: list[int], seqs: list[Sequence]) -> None:
        """Appends, for each sequence that asked, its sampled token's log-probability and its
        params.logprobs likeliest tokens (row b of logits [B, V] is seqs[b]'s)."""
        rows = [b for b, s in enumerate(seqs) if s.logprobs is not None]
        counts = [seqs[b].params.logprobs or 0 for b in rows]
        found = token_logprobs(logits, rows, [tokens[b] for b in rows], max(counts))
        for b, n, (chosen, top) in zip(rows, counts, found):
            seq = seqs[b]
            assert seq.logprobs is not None
            alternatives = [TopLogprob(i, self._token_text(i), v) for i, v in top[:n]]
            seq.logprobs.append(
                TokenLogprob(tokens[b], self._token_text(tokens[b]), chosen, alternatives)
            )

    def _record_prompt_logprobs(self, seq: Sequence, first: int, hidden: Any) -> None:
        """Appends the log-probabilities of prompt tokens first+1.. given the hidden states
        [n, D] of positions first.. (logits computed PROMPT_LOGITS_ROWS rows at a time, so a
        long prompt never holds [prompt, vocab] float32 at once)."""
        entries = seq.prompt_logprobs
        assert entries is not None and len(entries) == first + 1
        k = seq.params.prompt_logprobs or 0
        prompt = seq.prompt_token_ids
        for i in range(0, hidden.shape[0], PROMPT_LOGITS_ROWS):
            part = hidden[i : i + PROMPT_LOGITS_ROWS]
            targets = prompt[first + i + 1 : first + i + 1 + part.shape[0]]
            logits = self.model.compute_logits(part)
            found = token_logprobs(logits, list(range(len(targets))), targets, k)
            for t, (chosen, top) in zip(targets, found):
                alternatives = [TopLogprob(j, self._token_text(j), v) for j, v in top]
                entries.append(TokenLogprob(t, self._token_text(t), chosen, alternatives))

    def _token_text(self, token: int) -> str:
        """A token's text decoded alone (special tokens included), memoized."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.decode(
                [token], skip_special_tokens=False
            )
        return text

    def _stop_ids(self, params: SamplingParams) -> list[int]:
        """The token ids that end a request with these params (EOS unless ignored, and its
        stop_token_ids)."""
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= self.eos_token_ids
        return sorted(ids)

    def _append_token(self, seq: Sequence, token: int) -> FinishReason | None:
        """Appends a sampled token; the finish reason it causes, if any. Until min_tokens are
        out, no stop token can have been sampled and stop strings are not looked for (vLLM)."""
        seq.token_ids.append(token)
        params = seq.params
        if (token in self.eos_token_ids and not params.ignore_eos) or (
            token in params.stop_token_ids
        ):
            return FinishReason.STOP  # the stop token's text is not part of the output
        if seq.guide is not None:
            seq.guide.consume_token(token)
        detok = seq.detokenizer
        assert detok is not None
        detok.add(token, find_stop=seq.num_output_tokens > params.min_tokens)
        if detok.stopped:
            return FinishReason.STOP
        if seq.guide is not None and (seq.guide.is_stopped() or seq.guide.is_error()):
            return FinishReason.STOP  # its grammar allows nothing more (an ignored EOS included)
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finished_output(self, seq: Sequence) -> RequestOutput:
        self._requests.pop(seq.request_id, None)
        assert seq.detokenizer is not None
        seq.detokenizer.flush()
        return self._output(seq)

    def _output(self, seq: Sequence) -> RequestOutput:
        """The request's state, with what changed since its last output as the deltas."""
        detok = seq.detokenizer
        assert detok is not None
        finished = seq.finish_reason is not None
        text_end = detok.stream_len(finished)
        out_ids = seq.token_ids[seq.num_prompt_tokens :]
        out = RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=out_ids,
            text=detok.text[:text_end],
            delta_token_ids=out_ids[seq.num_sent_tokens :],
            delta_text=detok.text[seq.num_sent_chars : text_end],
            finish_reason=seq.finish_reason,
            usage=Usage(seq.num_prompt_tokens, len(out_ids)),
        )
        out.prompt_logprobs = seq.prompt_logprobs  # complete once the prompt is; do not mutate
        if seq.logprobs is not None:
            out.logprobs = list(seq.logprobs)
            out.delta_logprobs = seq.logprobs[seq.num_sent_tokens :]
        seq.num_sent_tokens = len(out_ids)
        seq.num_sent_chars = max(seq.num_sent_chars, text_end)
        return out
