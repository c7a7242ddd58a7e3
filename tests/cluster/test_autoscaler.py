"""The expert autoscaler on a served tier: a local multi-node Ray cluster (a head and three
worker raylets advertising the expert slot, `ray.cluster_utils.Cluster`), a real redis-server,
real gRPC, two engine replicas sharing the shards their tier's controller owns.

The checkpoint's gate sends most tokens to experts 0 and 3 of eight (written by transformers
with a biased gate); the initial placement stripes experts over three shards, so both hot experts
share shard 0 and balancedness starts near 1/3. In file order, on ONE served app:

1. advisory: the controller publishes a plan (Redis, `moeray experts --plan`, metrics) and
   changes nothing (the epoch stays);
2. active (switched on the running controller): the same plan is applied while 200 streams
   run across the rebalance; every stream ends with the in-process tokens, and balancedness
   on /metrics reaches >= 0.9; the old shards are retired once both engines acknowledged;
3. scale-down: traffic stops; the hot experts' extra replicas are given back within the idle
   period;

Pure tests of the autoscaler's placement bookkeeping come first (no cluster).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
from moeray.cluster.app import APP_NAME, LocalStack
from moeray.cluster.config import EngineConfig, ExpertsConfig, MoerayConfig
from moeray.cluster.expert_autoscaler import controller_deployment_name
from moeray.cluster.placement import (
    bind_replica_ids,
    drop_replicas,
    initial_placement,
    plan_rebalance,
    positional,
)
from moeray.cluster.state import ClusterState
from moeray.cluster.state_messages import Placement
from moeray.router.client import MoerayClient
from moeray.workers.engine import LLMEngine
from moeray.workers.io_struct import SamplingParams

from tests.checkpoints import tiny_config, write_demo_tokenizer
from tests.scrape import by_name

SLOT = "moeray_expert_slot"
TIER = "skewed"
HOT = (0, 3)  # the experts the gate prefers; both on shard 0 of the initial striping
PROMPTS = [[(11 * i + 7 * j) % 300 + 1 for j in range(2 + i % 5)] for i in range(8)]
MAX_TOKENS = 12
ENGINE = {"num_kv_blocks": 400, "block_size": 8, "max_num_seqs": 32}
IDLE_S = 4.0  # experts.scale_down_idle_s


# ---- pure: the placement bookkeeping ------------------------------------------------------------
def test_bind_replica_ids_reuses_shards_that_hold_the_plan_and_names_new_ones() -> None:
    cur = Placement.from_lists([[[0], [1], [2], [0]]], epoch=3)
    held = {0: [[0, 3]], 1: [[1]], 2: [[2]]}
    pos, rids = positional(cur)
    assert rids == [0, 1, 2] and pos.same_layout(cur)
    # expert 0 gains a replica on position 1: shard 1 lacks it, so position 1 is a new shard
    planned = Placement.from_lists([[[0, 1], [1], [2], [0]]])
    target, new = bind_replica_ids(planned, rids, held, next_id=7)
    assert target.mapping == (((0, 7), (7,), (2,), (0,)),)
    assert new == {7: [[0, 1]]}
    # giving a replica back never needs a new shard: a shard may hold more than it serves
    fewer = Placement.from_lists([[[0], [1], [2], [2]]])
    target, new = bind_replica_ids(fewer, rids, {**held, 2: [[2, 3]]}, next_id=7)
    assert new == {} and target.mapping == (((0,), (1,), (2,), (2,)),)


def test_drop_replicas_keeps_the_asked_count_emptying_the_fullest_shards() -> None:
    cur = Placement.from_lists([[[0, 1, 2], [0], [1, 2], [2]]], epoch=5)
    out = drop_replicas(cur, np.array([[1, 1, 1, 1]]))
    assert [len(r) for r in out.mapping[0]] == [1, 1, 1, 1]
    assert out.epoch == 5 and out.mapping[0][1] == (0,) and out.mapping[0][3] == (2,)
    assert drop_replicas(cur, np.array([[0, 0, 0, 0]])).mapping[0][0]  # never below one


def test_plan_for_two_hot_experts_on_one_shard_replicates_them() -> None:
    cur = initial_placement(1, 8, 3)
    loads = np.ones((1, 8))
    loads[0, list(HOT)] = 100
    plan = plan_rebalance(loads, cur, num_shards=3, slots_per_shard=4, max_replicas=3)
    assert [len(plan.mapping[0][e]) for e in HOT] == [3, 3]


def test_autoscale_mode_replaces_the_boolean_and_errors_name_the_field() -> None:
    assert ExpertsConfig(autoscale=False).autoscale == "off"  # YAML's bare `off`
    with pytest.raises(ValueError, match=r"experts\.autoscale is a mode now"):
        ExpertsConfig(autoscale=True)
    with pytest.raises(ValueError, match="autoscale"):
        ExpertsConfig(autoscale="on")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"experts\.max_shards must be >= experts\.shards"):
        ExpertsConfig(shards=3, max_shards=2)
    with pytest.raises(ValueError, match="rebalance_interval_s"):
        ExpertsConfig(rebalance_interval_s=0)


# ---- the served tier ------------------------------------------------------------------------------
def make_skewed_checkpoint(directory: Path, **sizes: int) -> Path:
    """A tiny Mixtral (8 experts, top-2) whose gate sends most tokens to experts 0 and 3: every
    embedding gets a constant component, and those two gate rows read it. sizes: config fields
    that differ from tests/checkpoints.py's tiny ones (bench/autoscale.py uses a bigger one)."""
    import transformers

    config = tiny_config("mixtral", num_local_experts=8, num_experts_per_tok=2, **sizes)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] += 2.0
        for layer in model.model.layers:
            for e in HOT:
                layer.mlp.gate.weight[e, 0] += 3.0
    model.config.dtype = "float32"
    model.save_pretrained(directory)
    write_demo_tokenizer(directory, config.vocab_size)
    return directory


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the engine replicas and shards: the same oneDNN bits
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """Head (no expert slots) + three expert nodes with 4 slots each."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=4, resources={SLOT: 4})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_skewed_checkpoint(tmp_path_factory.mktemp("skewed"))


@pytest.fixture(scope="module")
def expected(checkpoint: Path) -> dict[tuple[int, ...], list[int]]:
    return oracle(checkpoint)


def oracle(checkpoint: Path) -> dict[tuple[int, ...], list[int]]:
    """The in-process engine's greedy tokens of every prompt."""
    engine = LLMEngine(checkpoint, EngineConfig(**ENGINE))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params)
    final: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            final[out.request_id] = out.token_ids
    return {tuple(p): final[f"r{i}"] for i, p in enumerate(PROMPTS)}


def quiet_port() -> int:
    """A free port below Linux's ephemeral range: a port the OS hands out for bind(0) (what
    free_port returns) can be taken by a Ray worker's own server before the router binds it."""
    import random
    import socket

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def skewed_config(checkpoint: Path, autoscale: str) -> MoerayConfig:
    """The served skewed tier: three shards, two engine replicas, short autoscaler intervals."""
    experts = {
        "shards": 3, "autoscale": autoscale, "rebalance_interval_s": 1.0,
        "rebalance_threshold": 0.05, "rebalance_cooldown_s": 2.0, "scale_down_idle_s": IDLE_S,
        "slots_per_shard": 4, "max_replicas": 3, "dispatch_deadline_s": 5.0,
    }  # fmt: skip
    return MoerayConfig(
        tiers=[{"name": TIER, "model": str(checkpoint), "experts": experts,
                "engine": {**ENGINE, "replicas": 2}}],
        router={"fast_tier": TIER, "reasoning_tier": TIER},
        state={"load_window_s": 1.0, "load_push_every_steps": 2},
        serve={"grpc_port": quiet_port(), "http_port": quiet_port()},
    )  # fmt: skip


@pytest.fixture(scope="module")
def stack(ray_cluster: Any, checkpoint: Path) -> Iterator[LocalStack]:
    config = skewed_config(checkpoint, "advisory")
    st = LocalStack(config, ray_address=ray_cluster.address)
    try:
        st.start(timeout_s=600)
        yield st
    finally:
        st.close()


def wait_for(cond: Callable[[], Any], timeout_s: float = 60.0, every_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every_s)
    return cond()


class Traffic:
    """Greedy gRPC streams of PROMPTS (cycled) on worker threads; each result is checked
    against the oracle when the stream ends. `failures` holds what went wrong."""

    def __init__(self, stack: LocalStack, expected: dict[tuple[int, ...], list[int]]) -> None:
        self.address = stack.endpoints()["grpc"]
        self.expected = expected
        self.pool = ThreadPoolExecutor(24)
        self.futures: list[Any] = []
        self.failures: list[str] = []
        self.done = 0

    def _one(self, i: int) -> None:
        prompt = PROMPTS[i % len(PROMPTS)]
        try:
            with MoerayClient(self.address, timeout=300) as client:
                deltas = client.generate(
                    prompt_token_ids=prompt, tier=TIER, max_tokens=MAX_TOKENS, temperature=0,
                    ignore_eos=True,
                )  # fmt: skip
                got = [t for d in deltas for t in d.token_ids]
        except Exception as exc:  # a failed request is what the tests count
            self.failures.append(f"stream {i}: {type(exc).__name__}: {exc}")
            return
        if got != self.expected[tuple(prompt)]:
            self.failures.append(f"stream {i}: tokens {got} != {self.expected[tuple(prompt)]}")
        self.done += 1

    def send(self, n: int) -> None:
        start = len(self.futures)
        self.futures += [self.pool.submit(self._one, start + i) for i in range(n)]

    def idle(self) -> bool:
        """Whether every stream sent so far has ended."""
        return all(f.done() for f in self.futures)

    def wait(self, timeout_s: float = 600) -> None:
        for f in self.futures:
            f.result(timeout=timeout_s)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def tier_value(m: dict[str, list[Any]], name: str, **labels: str) -> float | None:
    for s in m.get(name, []):
        if s.labels.get("tier") == TIER and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return None


def controller(method: str, *args: Any) -> Any:
    from ray import serve

    handle = serve.get_deployment_handle(controller_deployment_name(TIER), APP_NAME)
    return getattr(handle, method).remote(*args).result(timeout_s=120)


def replica_counts(p: Placement) -> list[list[int]]:
    return [[len(r) for r in layer] for layer in p.mapping]


ADVISED: dict[str, Placement] = {}


def test_advisory_publishes_the_plan_and_changes_nothing(
    stack: LocalStack, state: ClusterState, expected: Any, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from moeray.cluster.cli import main

    epoch = state.read_epoch(TIER)
    assert epoch == 1
    traffic = Traffic(stack, expected)
    try:
        record = None
        for _ in range(10):  # traffic until a plan is advised (bounded)
            traffic.send(16)
            traffic.wait()
            record = state.read_plan(TIER)
            if record is not None and record.outcome == "advised":
                break
        assert traffic.failures == []
    finally:
        traffic.close()
    assert record is not None and record.mode == "advisory" and record.outcome == "advised"
    assert record.balancedness_before < 0.7 and record.balancedness_after >= 0.9
    for layer in replica_counts(record.placement):
        assert [layer[e] for e in HOT] == [3, 3]
    ADVISED["plan"] = record.placement
    assert state.read_epoch(TIER) == epoch  # nothing changed
    assert len(state.shard_directory(TIER)) == 3

    m = by_name(stack)
    assert (tier_value(m, "moeray_autoscaler_plans_total", mode="advisory", outcome="advised")
            or 0) >= 1  # fmt: skip
    assert (tier_value(m, "moeray_expert_balancedness") or 1.0) < 0.7
    assert tier_value(m, "moeray_expert_replicas", layer="0", expert="0") == 1.0

    config = tmp_path / "cluster.yaml"
    config.write_text(json.dumps(stack.config.model_dump(mode="json")))
    assert main(["experts", "--config", str(config), "--plan", "--output", "json"]) == 0
    (view,) = json.loads(capsys.readouterr().out)["tiers"]
    assert view["plan"]["outcome"] in ("advised", "below_threshold", "cooldown")
    assert main(["experts", "--config", str(config), "--plan"]) == 0
    assert f"tier {TIER} · advisory" in capsys.readouterr().out


def test_active_applies_the_advised_plan_under_200_streams(
    stack: LocalStack, state: ClusterState, expected: Any
) -> None:
    assert "plan" in ADVISED, "the advisory test runs first"
    old = set(state.shard_directory(TIER))
    traffic = Traffic(stack, expected)
    try:
        traffic.send(60)  # under way when the controller turns active
        assert wait_for(lambda: traffic.done >= 10, 300)
        assert controller("set_mode", "active") == "active"
        traffic.send(140)
        applied = wait_for(
            lambda: (r := state.read_plan(TIER)) is not None and r.outcome == "applied" and r,
            300,
        )
        traffic.wait()
        assert traffic.failures == [] and traffic.done == 200
    finally:
        traffic.close()
    assert applied, "the controller did not apply a plan"
    assert applied.placement.same_layout(ADVISED["plan"])  # what advisory mode had advised
    assert state.read_epoch(TIER) == applied.to_epoch >= 2
    placement = state.read_placement(TIER)
    assert placement is not None
    for layer in replica_counts(placement):
        assert [layer[e] for e in HOT] == [3, 3]
    # both engine replicas acknowledged; the shards no longer used are retired
    assert wait_for(lambda: not (set(state.shard_directory(TIER)) - set(placement.replica_ids())))
    acks = state.read_acks(TIER)
    assert len(acks) == 2 and all(e >= applied.to_epoch for e in acks.values())
    assert old - set(placement.replica_ids()), "the plan moved experts onto new shards"

    traffic = Traffic(stack, expected)  # balancedness over the windows after the change

    def balanced() -> bool:
        traffic.send(8)
        traffic.wait()
        return (tier_value(by_name(stack), "moeray_expert_balancedness") or 0) >= 0.9

    try:
        assert wait_for(balanced, 120, every_s=0.5)
        assert traffic.failures == []
    finally:
        traffic.close()
    m = by_name(stack)
    assert (tier_value(m, "moeray_autoscaler_plans_total", mode="active", outcome="applied")
            or 0) >= 1  # fmt: skip
    assert tier_value(m, "moeray_expert_replicas", layer="0", expert="3") == 3.0
    assert tier_value(m, "moeray_expert_placement_epoch") == applied.to_epoch


def test_cold_replicas_are_given_back_within_the_idle_period(state: ClusterState) -> None:
    stopped = time.monotonic()  # no traffic from here on
    epoch = state.read_epoch(TIER)

    def scaled_down() -> bool:
        p = state.read_placement(TIER)
        return p is not None and all(n == 1 for layer in replica_counts(p) for n in layer)

    # the load windows that still hold traffic expire (1 s each, a second read), then the idle
    # period runs, then one tick: well within twice the idle period on this machine
    assert wait_for(scaled_down, 60)
    took = time.monotonic() - stopped
    assert took < 3 * IDLE_S + 5, f"scale-down took {took:.1f} s"
    record = state.read_plan(TIER)
    assert state.read_epoch(TIER) > epoch
    counts = state.read_plan_counts(TIER)
    assert counts.get(("active", "scaled_down"), 0) >= 1, (record, counts)
