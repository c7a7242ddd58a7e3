"""Expert parallelism on a real local Ray instance and a real redis-server.

The oracle is the in-process engine on the same checkpoint: for every MoE architecture, greedy
tokens with 2 and 3 shards (expert counts that do not divide the shard count), with replicas,
with compiled graphs and with plain actor calls, must be the in-process tokens. Then the failure
cases: a shard killed with ray.kill in the middle of a batch of streaming requests, and Redis
stopped and restarted mid-run; every request must finish with the in-process tokens.

One Ray instance serves the whole module (ray.init takes seconds). The driver runs torch on one
thread, like the shard actors (Ray gives them OMP_NUM_THREADS=1): oneDNN's GEMMs can differ in
the last bit between thread counts, and the comparison is exact.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from moeray.cluster.config import EngineConfig, ExpertsConfig
from moeray.cluster.expert_parallel import ExpertParallel, apply_expert_parallel
from moeray.cluster.placement import initial_placement
from moeray.cluster.redis_server import RedisServer
from moeray.cluster.state import ClusterState
from moeray.workers.engine import LLMEngine
from moeray.workers.io_struct import SamplingParams
from moeray.workers.moe import LocalExperts

from tests.checkpoints import make_tiny_checkpoint

# Expert counts chosen so that neither 2 nor 3 shards divide them.
MOE_ARCHS: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 5},
    "qwen2_moe": {"num_experts": 7},  # + shared expert, which stays with the engine
    "qwen3_moe": {"num_experts": 5},
    "olmoe": {"num_experts": 7},
}
PROMPTS = [[5, 17, 99, 3], [200, 11, 45, 46, 47, 60, 61, 62, 63, 70, 71, 300, 301], [42], [7, 8]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
ENGINE = EngineConfig(num_kv_blocks=64, block_size=8, max_num_seqs=8)


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    if ray.is_initialized():  # another module's instance: share it, leave it to its owner
        yield
        return
    ray.init(
        address="local", num_cpus=8, resources={"moeray_expert_slot": 32}, include_dashboard=False,
        log_to_driver=False, logging_level=logging.ERROR,
    )  # fmt: skip
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = make_tiny_checkpoint(
                tmp_path_factory.mktemp(arch), arch, **MOE_ARCHS[arch]
            )
        return cache[arch]

    return get


def generate(engine: LLMEngine, on_step: Callable[[int], None] | None = None) -> list[list[int]]:
    """Runs PROMPTS as one batch of streaming requests; the final token ids of each."""
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, GREEDY, stream=True)
    final: dict[str, list[int]] = {}
    for step in range(200):
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.token_ids
        if on_step is not None:
            on_step(step)
        if not engine.has_unfinished():
            break
    return [final[f"r{i}"] for i in range(len(PROMPTS))]


def in_process(engine: LLMEngine) -> list[list[int]]:
    """The oracle: the same engine with every expert in-process."""
    assert isinstance(engine.model.moe_blocks()[0].backend, LocalExperts)
    return generate(engine)


def wait_for(cond: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def registered(state: ClusterState) -> dict[int, tuple[str, tuple[tuple[int, int], ...]]]:
    return {i.replica_id: (i.actor_name, i.experts) for i in state.live_replicas("default")}


@pytest.mark.parametrize("arch", list(MOE_ARCHS))
def test_sharded_greedy_equals_in_process(
    arch: str, ray_local: None, checkpoint: Callable[[str], Path], redis_url: str
) -> None:
    path = checkpoint(arch)
    engine = LLMEngine(path, ENGINE)
    expected = in_process(engine)
    state = ClusterState(redis_url)
    try:
        for shards, replicas in ((2, 1), (3, 2)):
            ep = apply_expert_parallel(
                engine.model, str(path), ExpertsConfig(shards=shards, replicas=replicas), state
            )
            try:
                assert generate(engine) == expected, f"{shards} shards x {replicas} replicas"
                for route in ep.backend.routes.values():  # every expert on `replicas` shards
                    held = (route.slots >= 0).sum(axis=0)  # [E] replicas per expert
                    assert held.tolist() == [replicas] * len(held)
                n = shards
                assert wait_for(lambda: len(registered(state)) == n)  # noqa: B023
            finally:
                ep.close()
        # the engines' expert counts reached Redis (flushed by close at the latest)
        args = engine.model.args
        assert state.read_load("default", len(args.moe_layers), args.num_experts).sum() > 0
    finally:
        state.close()


@pytest.mark.parametrize("transport", ["socket", "plain"])
def test_shard_killed_mid_batch_requests_finish_identically(
    transport: str, ray_local: None, checkpoint: Callable[[str], Path], redis_url: str
) -> None:
    path = checkpoint("qwen2_moe")
    engine = LLMEngine(path, ENGINE)
    expected = in_process(engine)
    state = ClusterState(redis_url)
    ep = apply_expert_parallel(
        engine.model, str(path), ExpertsConfig(shards=3), state, transport=transport
    )
    try:
        assert wait_for(lambda: len(registered(state)) == 3)
        victim = 1
        old_name = registered(state)[victim][0]

        def kill_once(step: int) -> None:
            if step == 3:  # prefill done, mid-decode of every request
                ray.kill(ep.backend.source.pool.handles[victim])  # type: ignore[attr-defined]

        assert generate(engine, kill_once) == expected
        assert [r.replaced for r in ep.backend.recoveries] == [(victim,)]
        # the dead actor left the registry; its restarted successor holds the same experts
        assert wait_for(lambda: registered(state).get(victim, (old_name,))[0] != old_name)
        assert registered(state)[victim][1] == tuple(
            sorted(
                (li, e)
                for li, layer in enumerate(ep.backend.moe_layers)
                for e in ep.backend.shards[victim].assignment[layer]
            )
        )
    finally:
        ep.close()
        state.close()


def test_redis_restart_mid_run_fails_no_request(
    ray_local: None, checkpoint: Callable[[str], Path], redis_server: RedisServer
) -> None:
    path = checkpoint("mixtral")
    engine = LLMEngine(path, ENGINE)
    expected = in_process(engine)
    state = ClusterState(redis_server.url, heartbeat_ttl_s=1.5)
    ep: ExpertParallel = apply_expert_parallel(
        engine.model, str(path), ExpertsConfig(shards=2), state, load_push_every_steps=1
    )
    try:
        epoch = ep.backend.epoch
        assert epoch >= 1 and state.read_epoch("default") == epoch

        def outage(step: int) -> None:
            if step == 1:
                redis_server.stop()
            elif step == 4:
                redis_server.restart()

        assert generate(engine, outage) == expected
        # Redis came back empty: the watcher republishes the placement, heartbeats re-register
        assert wait_for(lambda: state.read_epoch("default") == epoch)
        assert wait_for(lambda: len(registered(state)) == 2)
        assert generate(engine) == expected  # and serving goes on
    finally:
        ep.close()
        state.close()


def test_llm_api_with_expert_shards_and_a_private_redis(
    ray_local: None, checkpoint: Callable[[str], Path]
) -> None:
    from moeray.workers import LLM

    path = str(checkpoint("olmoe"))
    prompts = [list(p) for p in PROMPTS]
    expected = [o.token_ids for o in LLM(model=path).generate(prompts, GREEDY)]
    llm = LLM(model=path, expert_shards=3, expert_replicas=2, num_kv_blocks=64)
    try:
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected
    finally:
        llm.close()
    assert ray.is_initialized()  # the module's Ray was not ours to stop
    with pytest.raises(ValueError, match="shards"):
        LLM(model=path, expert_shards=-1)


def test_new_placement_epoch_is_swapped_in_between_steps(
    ray_local: None, checkpoint: Callable[[str], Path], redis_url: str
) -> None:
    """An autoscaler only publishes a placement: the backend starts the new replica (shard 2)
    and reloads the shards whose experts changed in the background, swaps between steps (or at
    once when idle), and the requests in flight keep their tokens."""
    path = checkpoint("qwen3_moe")
    engine = LLMEngine(path, ENGINE)
    expected = in_process(engine)
    state = ClusterState(redis_url)
    ep = apply_expert_parallel(engine.model, str(path), ExpertsConfig(shards=2), state)
    args = engine.model.args
    wider = initial_placement(len(args.moe_layers), args.num_experts, num_shards=3, replicas=2)
    published: list[int] = []
    try:

        def rebalance(step: int) -> None:
            if step == 2:
                published.append(state.publish_placement("default", wider).epoch)
                assert ep.watcher is not None and ep.watcher.wait_for_epoch(published[0], 10)

        assert generate(engine, rebalance) == expected
        assert wait_for(lambda: ep.backend.epoch == published[0], 60)
        assert ep.backend.replica_ids == [0, 1, 2]
        assert wait_for(lambda: len(registered(state)) == 3)
    finally:
        ep.close()
        state.close()


def test_cli_expert_shards_flag(
    ray_local: None, checkpoint: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from moeray.cluster.cli import main

    argv = ["generate", "--model", str(checkpoint("mixtral")), "--prompt-token-ids", "5,17,99"]
    argv += ["--max-tokens", "6", "--ignore-eos", "--output", "json", "--num-kv-blocks", "32"]
    assert main(argv) == 0
    expected = json.loads(capsys.readouterr().out)["token_ids"]
    assert main([*argv, "--expert-shards", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == expected
