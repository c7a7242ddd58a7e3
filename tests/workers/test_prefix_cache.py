"""Automatic prefix caching in the engine, on a real tiny checkpoint written by transformers.

Tokens with the cache on equal tokens with it off (and transformers' own greedy output), and the
prefill work, read from the engine's counters (never from timing), drops to the uncached suffix:
a shared 200-token system prompt over 20 requests, chunked prefill after a cached prefix, a
multi-turn chat reusing the blocks its answer filled while decoding, eviction under memory
pressure, and preemption of sequences that share blocks. Also the switch: `LLM(...,
enable_prefix_caching=False)`, `moeray generate --no-prefix-caching` and the counters in stats.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from moeray.cluster.config import MoerayConfig
from moeray.workers import LLM, SamplingParams
from moeray.workers.async_engine import AsyncLLMEngine
from moeray.workers.io_struct import EngineStats

ARCH = "qwen3_moe"
SYSTEM_LEN = 200
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 320) for _ in range(n)]  # 0 is the tiny checkpoint's BOS/EOS


def shared_prompts(seed: int = 0, count: int = 20) -> tuple[list[int], list[list[int]]]:
    """A 200-token system prompt, then `count` prompts: it plus a distinct 3..22-token suffix."""
    rng = random.Random(seed)
    system = tokens(rng, SYSTEM_LEN)
    return system, [system + tokens(rng, 3 + i) for i in range(count)]


@pytest.fixture(scope="module")
def path(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint(ARCH)


@pytest.fixture(scope="module")
def reference(path: Path) -> Callable[[list[list[int]], SamplingParams], list[list[int]]]:
    """Greedy tokens with prefix caching off and a KV cache big enough for everything."""
    llm = LLM(model=path, block_size=8, enable_prefix_caching=False)
    done: dict[tuple[tuple[int, ...], int, bool], list[int]] = {}

    def run(prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        todo = [p for p in prompts if (tuple(p), params.max_tokens, params.ignore_eos) not in done]
        for p, out in zip(todo, llm.generate(todo, params) if todo else []):
            done[(tuple(p), params.max_tokens, params.ignore_eos)] = out.token_ids
        stats = llm.engine.stats()
        assert stats["prefix_cache_hit_tokens"] == 0
        assert stats["prompt_tokens_computed"] == stats["prompt_tokens"]
        return [done[(tuple(p), params.max_tokens, params.ignore_eos)] for p in prompts]

    return run


def hf_greedy(path: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy continuation (stops at the checkpoint's EOS like moeray)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def counters(llm: LLM) -> tuple[int, int, int]:
    s = llm.engine.stats()
    return s["prompt_tokens"], s["prefix_cache_hit_tokens"], s["prompt_tokens_computed"]


def test_a_shared_system_prompt_is_computed_once_and_tokens_do_not_change(
    path: Path, reference: Callable[..., list[list[int]]]
) -> None:
    _, prompts = shared_prompts()
    llm = LLM(model=path, block_size=8)  # 200 tokens = 25 full blocks
    outs = llm.generate(prompts, GREEDY)  # all 20 arrive together
    assert [o.token_ids for o in outs] == reference(prompts, GREEDY)
    assert outs[0].token_ids == hf_greedy(path, prompts[0], GREEDY.max_tokens)
    suffixes = sum(len(p) - SYSTEM_LEN for p in prompts)
    # The first request computes the system prompt; the 19 others (admitted in the same step)
    # reuse its blocks and compute only their suffix.
    assert counters(llm) == (SYSTEM_LEN * 20 + suffixes, SYSTEM_LEN * 19, SYSTEM_LEN + suffixes)
    assert llm.engine.stats()["prefix_cache_hit_ratio"] == pytest.approx(
        SYSTEM_LEN * 19 / (SYSTEM_LEN * 20 + suffixes)
    )
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_one_request_after_another_prefills_only_its_suffix(
    path: Path, reference: Callable[..., list[list[int]]]
) -> None:
    _, prompts = shared_prompts(seed=1)
    llm = LLM(model=path, block_size=8)
    want = reference(prompts, GREEDY)
    for i, prompt in enumerate(prompts):
        before = counters(llm)
        assert llm.generate(prompt, GREEDY)[0].token_ids == want[i]
        requested, hits, computed = (a - b for a, b in zip(counters(llm), before))
        assert requested == len(prompt)
        assert (hits, computed) == ((0, len(prompt)) if i == 0 else (200, len(prompt) - 200))


def test_chunked_prefill_after_a_cached_prefix(
    path: Path, reference: Callable[..., list[list[int]]]
) -> None:
    """Block size 16 (200 is not a multiple: 192 tokens reusable), chunks of 16 tokens in a
    24-token step budget: computation resumes at the first uncached token, in chunks."""
    _, prompts = shared_prompts(seed=2, count=6)
    prompts = [p + list(range(40, 40 + 6 * i)) for i, p in enumerate(prompts)]  # longer suffixes
    llm = LLM(model=path, block_size=16, prefill_chunk_size=16, max_num_batched_tokens=24)
    first = llm.generate(prompts[0], GREEDY)[0]
    before = counters(llm)
    rest = llm.generate(prompts[1:], GREEDY)
    assert [first.token_ids] + [o.token_ids for o in rest] == reference(prompts, GREEDY)
    requested, hits, computed = (a - b for a, b in zip(counters(llm), before))
    assert hits == 192 * 5 and computed == requested - hits


def test_a_chat_turn_reuses_the_blocks_its_previous_answer_filled(
    path: Path, reference: Callable[..., list[list[int]]]
) -> None:
    rng = random.Random(3)
    turn1 = tokens(rng, 37)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    llm = LLM(model=path, block_size=4)
    answer = llm.generate(turn1, params)[0].token_ids
    assert answer == reference([turn1], params)[0]
    turn2 = turn1 + answer + tokens(rng, 9)
    before = counters(llm)
    assert llm.generate(turn2, params)[0].token_ids == reference([turn2], params)[0]
    # Turn 1 computed its prompt and all but its last sampled token: (37 + 20 - 1) // 4 blocks.
    hits = counters(llm)[1] - before[1]
    assert hits == (37 + 20 - 1) // 4 * 4 == 56


def test_eviction_under_memory_pressure_keeps_tokens_right(
    path: Path, reference: Callable[..., list[list[int]]]
) -> None:
    """40 blocks of 8: a second system prompt evicts the first one's cached blocks (tail first);
    coming back to the first reuses only what is left, and every token stays the same."""
    _, group_a = shared_prompts(seed=4, count=3)
    _, group_b = shared_prompts(seed=5, count=3)
    llm = LLM(model=path, block_size=8, num_kv_blocks=40, max_num_seqs=2)
    got = []
    hits_per_phase = []
    for group in (group_a, group_b, group_a):
        before = counters(llm)[1]
        got += [o.token_ids for o in llm.generate(group, GREEDY)]
        hits_per_phase.append(counters(llm)[1] - before)
    assert got == reference(group_a + group_b + group_a, GREEDY)
    # Phase 3 finds part of group A's system prompt still cached, not all of it.
    assert hits_per_phase[0] == hits_per_phase[1] == 2 * SYSTEM_LEN
    assert 0 < hits_per_phase[2] < 3 * SYSTEM_LEN
    assert llm.engine.block_manager.num_free_blocks == 40


def test_preemption_of_sequences_sharing_blocks(
    path: Path, reference: Callable[..., list[list[int]]]
) -> None:
    """20 requests over one system prompt in 36 blocks of 8: eight at a time cannot all grow, so
    sequences holding shared blocks are preempted and resume from the cache."""
    _, prompts = shared_prompts(seed=6)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    llm = LLM(model=path, block_size=8, num_kv_blocks=36, max_num_seqs=8)
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == reference(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free_blocks == 36


def test_the_switch_turns_the_cache_off(path: Path) -> None:
    _, prompts = shared_prompts(seed=7, count=4)
    llm = LLM(model=path, block_size=8, enable_prefix_caching=False)
    llm.generate(prompts, GREEDY)
    requested, hits, computed = counters(llm)
    assert hits == 0 and computed == requested == sum(map(len, prompts))
    assert llm.engine.block_manager.num_cached_blocks == 0
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        LLM(model=path, enable_prefix_caching="sometimes")
    config = MoerayConfig.model_validate(
        {
            "tiers": [
                {"name": "fast", "model": str(path), "engine": {"enable_prefix_caching": False}}
            ]
        }
    )
    assert config.tiers[0].engine.enable_prefix_caching is False


def test_generate_cli_flag(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moeray.cluster.cli import _engine_options, build_parser, main

    argv = ["generate", "--model", str(path), "--prompt-token-ids", "5,6,7,8,9"]
    assert _engine_options(build_parser().parse_args(argv))["enable_prefix_caching"] is True
    off = [*argv, "--no-prefix-caching"]
    assert _engine_options(build_parser().parse_args(off))["enable_prefix_caching"] is False
    assert main([*off, "--max-tokens", "5", "--output", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = LLM(model=path).generate([5, 6, 7, 8, 9], SamplingParams(temperature=0, max_tokens=5))
    assert got["token_ids"] == want[0].token_ids


def test_the_counters_reach_the_async_engine_and_engine_stats(path: Path) -> None:
    engine = AsyncLLMEngine.from_pretrained(path)
    try:
        s: dict[str, Any] = dict(engine.stats())
    finally:
        engine.shutdown()
    assert s["prompt_tokens"] == s["prefix_cache_hit_tokens"] == s["prompt_tokens_computed"] == 0
    assert s["prefix_cache_hit_ratio"] == 0.0
    stats = EngineStats(
        replica_id="r",
        node="n",
        device="cpu",
        running=0,
        waiting=0,
        free_blocks=1,
        total_blocks=1,
        max_model_len=8,
    )
    assert (stats.prompt_tokens, stats.prefix_cache_hit_ratio) == (0, 0.0)
