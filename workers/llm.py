"""Offline batch generation: `LLM(model=path).generate(prompts, params)` (vLLM's interface).

Adds every prompt to one LLMEngine and steps it until all finish, so prompts share batches
(continuous batching) exactly as concurrent requests to a server would.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence as SequenceABC
from pathlib import Path
from typing import Any

from moeray.cluster.config import (
    EngineConfig,
    ExpertsConfig,
    StateConfig,
    describe_validation_error,
)
from moeray.workers.engine import LLMEngine, Prompt
from moeray.workers.io_struct import RequestOutput, SamplingParams
from pydantic import ValidationError


def _is_token_ids(x: object) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) for t in x)


def normalize_prompts(prompts: Any) -> list[Prompt]:
    """A string, a list of strings, one list of token ids, or a list of them -> list of prompts."""
    if isinstance(prompts, str) or _is_token_ids(prompts):
        return [prompts]
    if not isinstance(prompts, list) or not prompts:
        raise ValueError("prompts must be a string, a list of strings or token-id lists, non-empty")
    for i, p in enumerate(prompts):
        if not isinstance(p, (str, list)):
            raise ValueError(f"prompts[{i}] must be a string or a list of token ids")
    return list(prompts)


class LLM:
    def __init__(
        self,
        model: str | Path,
        dtype: str = "auto",
        expert_shards: int = 0,
        expert_replicas: int = 1,
        redis_url: str | None = None,
        enable_prefix_caching: bool = True,
        device: str = "auto",
        **engine_options: Any,
    ) -> None:
        """model: a local Hugging Face checkpoint; engine_options: EngineConfig fields.
        enable_prefix_caching=False turns the engine's automatic prefix caching off.
        device: auto | cpu | cuda (auto = cuda when torch sees a GPU).
        expert_shards > 0 serves the routed experts from that many Ray actors (a local Ray is
        started if none runs), each expert on expert_replicas of them, with Redis at redis_url
        as the control plane (None = a private redis-server); `close()` stops what was started."""
        try:
            config = EngineConfig(enable_prefix_caching=enable_prefix_caching, **engine_options)
            experts = ExpertsConfig(shards=expert_shards, replicas=expert_replicas)
            state = StateConfig(redis_url=redis_url)
        except ValidationError as e:
            raise ValueError(describe_validation_error(e)) from None
        self.engine = LLMEngine(model, config, dtype=dtype, device=device)
        self.tokenizer = self.engine.tokenizer
        self._counter = 0
        self._close = weakref.finalize(self, lambda: None)
        if experts.shards:
            # The offline API is a composition root (like the CLI): the only place in workers/
            # that reaches into cluster/, lazily, to wire Ray shards and the Redis state in.
            from moeray.cluster.expert_parallel import ExpertParallelRuntime

            runtime = ExpertParallelRuntime.start(
                self.engine.model, str(model), experts, state, dtype=dtype
            )
            self._close = weakref.finalize(self, runtime.close)  # at close() or at exit

    def close(self) -> None:
        """Stops the expert shards, and the Ray and Redis this LLM started (idempotent)."""
        self._close()

    def generate(
        self,
        prompts: Any,
        params: SamplingParams | SequenceABC[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One finished RequestOutput per prompt, in the prompts' order."""
        items = normalize_prompts(prompts)
        if params is None or isinstance(params, SamplingParams):
            per_prompt = [params or SamplingParams()] * len(items)
        else:
            per_prompt = list(params)
            if len(per_prompt) != len(items):
                raise ValueError(
                    f"params must be one SamplingParams or one per prompt "
                    f"({len(items)}), got {len(per_prompt)}"
                )
        ids = [f"llm-{self._counter + i}" for i in range(len(items))]
        self._counter += len(items)
        engine = self.engine
        try:
            for rid, prompt, p in zip(ids, items, per_prompt):
                engine.add_request(rid, prompt, p, stream=False)
        except ValueError:
            for rid in ids:
                engine.abort(rid)
            raise
        results: dict[str, RequestOutput] = {}
        while len(results) < len(ids):
            for out in engine.step():
                results[out.request_id] = out
        return [results[rid] for rid in ids]
