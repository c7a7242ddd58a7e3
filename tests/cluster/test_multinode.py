"""Expert parallelism across Ray nodes: a local multi-node Ray cluster (a head and two worker
raylets on this machine, `ray.cluster_utils.Cluster`), the expert-slot resource on the workers
only, a real redis-server, real gRPC.

1. Served: one moeray app (LocalStack joining the cluster) with a sharded tier per MoE
   architecture, top-k 1, 2, 4 and 8 over the four, expert counts no shard count divides, plus
   one tier served in-process. Greedy tokens over gRPC equal the in-process engine's (the
   in-process tier's too); the shards run on the worker nodes; afterwards /metrics and
   `moeray experts` show load on every shard.
2. Failures: a shard stopped with SIGSTOP (on the backend, the engine in this process, its
   shards on the workers) is detected within its dispatch deadline and replaced; a worker node
   removed in the middle of 20 gRPC streams of a served sharded tier. Every request ends with
   the in-process tokens.

One cluster serves the module (its start takes most of the time); tests run in file order, the
node removal last. Torch runs on one thread here, in the engine replicas (`num_cpus: 1`) and in
the shards (half a CPU each): the dense layers' one-row path follows the thread count
(kernels/cpu_packed.py), so the oracle and the served engines must run the same count.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from moeray.cluster.app import LocalStack
from moeray.cluster.config import EngineConfig, ExpertsConfig, MoerayConfig
from moeray.cluster.expert_parallel import apply_expert_parallel
from moeray.cluster.redis_server import free_port
from moeray.cluster.state import ClusterState
from moeray.router.client import MoerayClient
from moeray.workers.engine import LLMEngine
from moeray.workers.io_struct import SamplingParams

from tests.checkpoints import make_tiny_checkpoint
from tests.scrape import by_name

SLOT = "moeray_expert_slot"
#: Only the head advertises it; the router and every tier's engine ask for it, so they run on the
#: head and the workers hold shards only (Serve would otherwise spread its replicas over the
#: workers, and the node-removal test may then find no worker that holds a tier's shards alone).
HEAD = "moeray_head"
# tier -> (architecture, config overrides, shards): every architecture, K in {1, 2, 4, 8}, and
# expert counts that the tier's shard count does not divide
TIERS: dict[str, tuple[str, dict[str, Any], int]] = {
    "mixtral-k8": ("mixtral", {"num_local_experts": 9, "num_experts_per_tok": 8}, 2),
    "qwen2-k4": ("qwen2_moe", {"num_experts": 7, "num_experts_per_tok": 4}, 3),
    "qwen3-k1": ("qwen3_moe", {"num_experts": 5, "num_experts_per_tok": 1}, 2),
    "olmoe-k2": ("olmoe", {"num_experts": 7, "num_experts_per_tok": 2}, 2),
}
LOCAL_TIER = "mixtral-k8-local"  # the mixtral-k8 checkpoint served in-process
PROMPTS = [[5, 17, 99, 3], [200, 11, 45, 46, 47, 60, 61, 62, 63, 70, 71, 300, 301], [42]]
MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
ENGINE = {"num_kv_blocks": 160, "block_size": 8, "max_num_seqs": 24}


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[Any, list[Any]]]:
    """Head (no expert slots; HEAD resource for the router and the engine replicas) + two
    workers with 10 slots each (the served app's 9 shards, the failure tests' 5, and room for
    replacements when one worker is gone); this process joins."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # another module's instance: this module needs its own cluster
    # the dashboard serves Ray's public state API (where the Serve replicas run)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 8, "include_dashboard": True, "resources": {HEAD: 10}},
    )
    try:
        workers = [cluster.add_node(num_cpus=8, resources={SLOT: 10}) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


def expert_nodes() -> set[str]:
    """Ray node ids of the live nodes that advertise the expert slot (the workers)."""
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and SLOT in n["Resources"]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        tier: make_tiny_checkpoint(tmp_path_factory.mktemp(tier), arch, **overrides)
        for tier, (arch, overrides, _) in TIERS.items()
    }


def in_process_tokens(path: Path, prompts: list[list[int]] = PROMPTS) -> list[list[int]]:
    """The oracle: the in-process engine, all prompts in one batch, streaming."""
    return generate(LLMEngine(path, EngineConfig(**ENGINE)), prompts)


def generate(
    engine: LLMEngine,
    prompts: list[list[int]],
    on_step: Callable[[int], None] | None = None,
) -> list[list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, GREEDY, stream=True)
    final: dict[str, list[int]] = {}
    for step in range(500):
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.token_ids
        if on_step is not None:
            on_step(step)
        if not engine.has_unfinished():
            break
    return [final[f"r{i}"] for i in range(len(prompts))]


def wait_for(cond: Callable[[], bool], timeout_s: float = 60.0, every_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every_s)
    return cond()


# ---- 1. served ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(ray_cluster: Any, checkpoints: dict[str, Path]) -> Iterator[LocalStack]:
    cluster, _ = ray_cluster
    tiers = [
        {"name": tier, "model": str(checkpoints[tier]), "engine": ENGINE, "resource": HEAD,
         "num_cpus": 1, "experts": {"shards": shards, "dispatch_deadline_s": 5.0}}
        for tier, (_, _, shards) in TIERS.items()
    ] + [{"name": LOCAL_TIER, "model": str(checkpoints["mixtral-k8"]), "engine": ENGINE,
          "resource": HEAD, "num_cpus": 1}]  # fmt: skip
    config = MoerayConfig(
        tiers=tiers,
        router={"fast_tier": LOCAL_TIER, "reasoning_tier": "mixtral-k8"},
        serve={"grpc_port": free_port(), "http_port": free_port(), "router_resource": HEAD},
    )
    st = LocalStack(config, ray_address=cluster.address)
    try:
        st.start(timeout_s=600)
        yield st
    finally:
        st.close()


def served_tokens(stack: LocalStack, tier: str, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens of every prompt over gRPC, the prompts sent concurrently."""

    def one(prompt: list[int]) -> list[int]:
        with MoerayClient(stack.endpoints()["grpc"], timeout=300) as client:
            deltas = client.generate(
                prompt_token_ids=prompt, tier=tier, max_tokens=MAX_TOKENS, temperature=0,
                ignore_eos=True,
            )  # fmt: skip
            return [t for d in deltas for t in d.token_ids]

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def test_served_sharded_tiers_equal_in_process_on_worker_nodes(
    stack: LocalStack, checkpoints: dict[str, Path]
) -> None:
    state = ClusterState(stack.config.state.redis_url or "", stack.config.state.cluster)
    try:
        workers = expert_nodes()
        assert len(workers) == 2
        for tier, (_, _, shards) in TIERS.items():
            expected = in_process_tokens(checkpoints[tier])
            assert served_tokens(stack, tier, PROMPTS) == expected, tier
            replicas = state.live_replicas(tier)
            assert len(replicas) == shards, tier
            assert {r.node_id for r in replicas} <= workers, tier  # never on the head
        # tiers[].resource and serve.router_resource keep the engines and the router off them
        actors = alive_actor_nodes()
        for name in ["router", *(f"engine-{t}" for t in [*TIERS, LOCAL_TIER])]:
            assert actors[f"ServeReplica:moeray:{name}"] not in workers, name
        # the same checkpoint served in-process, over the same front door
        local = served_tokens(stack, LOCAL_TIER, PROMPTS)
        assert local == in_process_tokens(checkpoints["mixtral-k8"])
        assert state.read_placement(LOCAL_TIER) is None  # no shards for it
    finally:
        state.close()


def test_metrics_and_cli_show_load_on_every_shard(
    stack: LocalStack, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from moeray.cluster.cli import main
    from moeray.cluster.expert_load import read_expert_status

    tier = "mixtral-k8"  # K = 8 of 9 experts: every shard gets tokens of every step
    served_tokens(stack, tier, PROMPTS)
    state = ClusterState(stack.config.state.redis_url or "", stack.config.state.cluster)
    try:  # engines push their counts every few steps; the last ones within max_interval_s
        assert wait_for(lambda: read_expert_status(state, tier).total.sum() > 0)  # type: ignore[union-attr]
        status = read_expert_status(state, tier)
    finally:
        state.close()
    assert status is not None
    shards = status.shard_tokens()
    assert len(shards) == 2 and all(n > 0 for n in shards.values())

    metrics = by_name(stack)
    totals = [s for s in metrics["moeray_expert_tokens_total"] if s.labels["tier"] == tier]
    assert {(int(s.labels["layer"]), int(s.labels["expert"])) for s in totals} == {
        (li, e) for li in range(status.placement.num_layers) for e in range(9)
    }
    assert sum(s.value for s in totals) > 0
    per_shard = {r: 0.0 for r in status.placement.replica_ids()}
    for s in totals:
        for r in status.placement.replicas(int(s.labels["layer"]), int(s.labels["expert"])):
            per_shard[r] += s.value
    assert all(v > 0 for v in per_shard.values())  # every shard served tokens
    bal = {s.labels["tier"]: s.value for s in metrics["moeray_expert_balancedness"]}
    assert 0.5 < bal[tier] <= 1.0
    epochs = {s.labels["tier"]: s.value for s in metrics["moeray_expert_placement_epoch"]}
    assert epochs[tier] >= 1 and LOCAL_TIER not in epochs

    config = tmp_path / "cluster.yaml"
    config.write_text(json.dumps(stack.config.model_dump(mode="json")))  # JSON is YAML
    assert main(["experts", "--config", str(config), "--tier", tier, "--output", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    (view,) = got["tiers"]
    assert view["tier"] == tier and view["epoch"] >= 1
    assert all(int(v) > 0 for v in view["shard_tokens"].values())
    assert {r["node_id"] for r in view["replicas"]} <= expert_nodes()
    assert main(["experts", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    for name in TIERS:
        assert f"tier {name} · epoch" in text
    assert "balancedness" in text and "layer 0" in text


# ---- 2. failures -------------------------------------------------------------------------------
def test_sigstopped_shard_is_caught_by_its_deadline(
    ray_cluster: Any, checkpoints: dict[str, Path], redis_url: str
) -> None:
    """A shard whose process is stopped (alive, silent): the dispatch deadline catches it, the
    shard is replaced on the workers, and the requests end with the in-process tokens."""
    path = checkpoints["olmoe-k2"]
    expected = in_process_tokens(path)
    engine = LLMEngine(path, EngineConfig(**ENGINE))
    state = ClusterState(redis_url)
    deadline_s = 0.3
    ep = apply_expert_parallel(
        engine.model, str(path), ExpertsConfig(shards=2, dispatch_deadline_s=deadline_s), state
    )
    stopped: list[int] = []
    try:
        victim = ep.backend.shards[1]
        assert {s.node_id for s in ep.backend.shards} <= expert_nodes()

        def stop_once(step: int) -> None:
            if step == 2:
                os.kill(victim.pid, signal.SIGSTOP)
                stopped.append(victim.pid)

        assert generate(engine, PROMPTS, stop_once) == expected
        (rec,) = ep.backend.recoveries
        assert rec.reason == "timeout" and rec.replaced == (victim.rid,)
        assert deadline_s <= rec.detected_after_s < deadline_s + 0.5
        assert ep.backend.shards[1].pid != victim.pid
        assert ep.backend.shards[1].node_id in expert_nodes()
    finally:
        for pid in stopped:  # (the replacement killed it; this covers a failure before that)
            with _no_such_process():
                os.kill(pid, signal.SIGCONT)
        ep.close()
        state.close()


class _no_such_process:
    def __enter__(self) -> None:
        return None

    def __exit__(self, t: type[BaseException] | None, *_: object) -> bool:
        return t is ProcessLookupError


def alive_actor_nodes() -> dict[str, str]:
    """Class name -> Ray node id of the live actors (Ray's public state API), e.g.
    "ServeReplica:moeray:router"."""
    from ray.util.state import list_actors

    return {
        a.class_name: a.node_id
        for a in list_actors(
            filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False
        )
    }


def test_worker_node_removed_mid_20_streams(
    ray_cluster: Any, stack: LocalStack, checkpoints: dict[str, Path]
) -> None:
    """A worker node holding shards of a served tier goes away while 20 gRPC streams of that
    tier decode: its shards are replaced on the surviving worker and every stream ends with
    the in-process tokens. (The node chosen holds neither the router nor that tier's engine:
    losing those is Serve's business, not expert parallelism's.)"""
    cluster, workers = ray_cluster
    actors = alive_actor_nodes()
    state = ClusterState(stack.config.state.redis_url or "", stack.config.state.cluster)
    try:
        choice = None
        for w in workers:
            if actors.get("ServeReplica:moeray:router") == w.node_id:
                continue
            for tier in TIERS:
                engine_node = actors.get(f"ServeReplica:moeray:engine-{tier}")
                shards = {r.node_id for r in state.live_replicas(tier)}
                if engine_node != w.node_id and w.node_id in shards:
                    choice = (w, tier)
                    break
            if choice:
                break
        assert choice is not None, "no worker without the router holds a tier's shards only"
        doomed, tier = choice
        prompts = [[(7 * i + j) % 300 + 1 for j in range(1 + i % 6)] for i in range(20)]
        n = 48  # 20 x (6 + 48) tokens fit the 1280 slots of ENGINE's KV cache
        expected = generate_n(LLMEngine(checkpoints[tier], EngineConfig(**ENGINE)), prompts, n)
        got: list[list[int]] = [[] for _ in prompts]

        def stream(i: int) -> None:
            with MoerayClient(stack.endpoints()["grpc"], timeout=600) as client:
                deltas = client.generate(
                    prompt_token_ids=prompts[i], tier=tier, max_tokens=n, temperature=0,
                    ignore_eos=True,
                )  # fmt: skip
                for d in deltas:
                    got[i].extend(d.token_ids)

        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(stream, i) for i in range(len(prompts))]
            # every stream past its prefill and none finished: remove the node mid-decode
            # (polled closely: the tiny model decodes a stream in a fraction of a second, and
            # a 0.2 s poll once found all 32 tokens of every stream done, CI 2026-12-01)
            assert wait_for(lambda: all(len(g) >= 2 for g in got), 300, every_s=0.005)
            assert not all(len(g) == n for g in got)
            cluster.remove_node(doomed)
            for f in futures:
                f.result(timeout=600)
        assert got == expected
        assert wait_for(
            lambda: doomed.node_id not in {r.node_id for r in state.live_replicas(tier)}
        )
        assert {r.node_id for r in state.live_replicas(tier)} <= expert_nodes()
    finally:
        state.close()


def generate_n(engine: LLMEngine, prompts: list[list[int]], n: int) -> list[list[int]]:
    """In-process greedy tokens, n per prompt."""
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"n{i}", prompt, params, stream=False)
    final: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            final[out.request_id] = out.token_ids
    return [final[f"n{i}"] for i in range(len(prompts))]
