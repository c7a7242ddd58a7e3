"""The expert autoscaler under faults: the tier's controller and one of its shards are killed in
the middle of the first active plan (after it started the plan's new shards, before it published
the epoch) while 100 streams run (sent as the plan starts, after the load that made it). No request fails or changes a token; Serve restarts the
controller, which takes the lease over, records the half-done plan as rolled back (or finishes a
later one), and the killed shard is replaced.

Same served tier as tests/cluster/test_autoscaler.py (skewed gate, three expert nodes, two engine
replicas), with `experts.autoscale: active` from the start, so the first plan starts new shards.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from moeray.cluster.app import LocalStack
from moeray.cluster.expert_parallel import shard_namespace
from moeray.cluster.state import ClusterState

from tests.cluster.test_autoscaler import (
    SLOT,
    TIER,
    Traffic,
    make_skewed_checkpoint,
    oracle,
    single_thread,  # noqa: F401 (an autouse fixture)
    skewed_config,
    wait_for,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_skewed_checkpoint(tmp_path_factory.mktemp("skewed-faults"))


@pytest.fixture(scope="module")
def expected(checkpoint: Path) -> dict[tuple[int, ...], list[int]]:
    return oracle(checkpoint)


@pytest.fixture(scope="module")
def stack(checkpoint: Path) -> Iterator[LocalStack]:
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    config = skewed_config(checkpoint, "active")
    st = LocalStack(config, ray_address=cluster.address)
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=4, resources={SLOT: 4})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
        st.start(timeout_s=600)
        yield st
    finally:
        st.close()
        ray.shutdown()
        cluster.shutdown()


def test_controller_and_a_shard_killed_mid_plan_fail_no_request(
    stack: LocalStack, state: ClusterState, expected: Any
) -> None:
    owner = wait_for(lambda: state.lease_owner(TIER), 60)
    assert owner, "no controller holds the lease"
    pid = int(owner.split("/")[1])
    base = state.read_epoch(TIER)
    traffic = Traffic(stack, expected)
    killed: dict[str, Any] = {}
    try:
        traffic.send(100)

        def plan_started() -> bool:
            # The skew makes the controller plan: it records "starting", then starts the new
            # shards. It plans on the load of its last window: keep the skewed load coming
            # until it does (100 streams can end before its first look on a fast engine).
            record = state.read_plan(TIER)
            if record is not None and record.outcome == "starting":
                return True
            if traffic.idle():
                traffic.send(24)
            return False

        starting = wait_for(plan_started, 120, every_s=0.02)
        assert starting, f"no plan started: {state.read_plan(TIER)}"
        traffic.send(100)  # under way through both kills
        os.kill(pid, signal.SIGKILL)  # the controller, mid-plan
        placement = state.read_placement(TIER)
        assert placement is not None and placement.epoch == base  # not yet published
        victim = placement.replica_ids()[0]  # a shard both engines dispatch to
        name = state.shard_directory(TIER)[victim]
        ray.kill(ray.get_actor(name, namespace=shard_namespace(stack.config.state.cluster)))
        killed.update(victim=victim, name=name)
        traffic.wait()
        assert traffic.failures == [] and traffic.done == len(traffic.futures) >= 200
    finally:
        traffic.close()
    # Serve restarted the controller: a new owner holds the lease and rolled the plan back (or,
    # with the skew still there, applied a new one).
    new_owner = wait_for(lambda: (o := state.lease_owner(TIER)) not in (None, owner) and o, 120)
    assert new_owner and int(new_owner.split("/")[1]) != pid
    done = wait_for(
        lambda: (
            {o for (_, o), n in state.read_plan_counts(TIER).items() if n}
            & {"rolled_back", "applied"}
        ),
        120,
    )
    assert done, state.read_plan_counts(TIER)
    assert state.read_plan_counts(TIER).get(("active", "rolled_back"), 0) >= 1
    # The killed shard was replaced: every shard of the current placement is in the directory
    # and its actor answers (the victim's id included, if the placement still uses it).
    namespace = shard_namespace(stack.config.state.cluster)

    def all_answer() -> bool:
        current = state.read_placement(TIER)
        directory = state.shard_directory(TIER)
        if current is None or not set(current.replica_ids()) <= set(directory):
            return False
        try:
            handles = [ray.get_actor(directory[r], namespace=namespace)
                       for r in current.replica_ids()]  # fmt: skip
            ray.get([h.ready.remote() for h in handles], timeout=10)
        except Exception:  # not (yet) there, or dead: ask again
            return False
        return True

    assert wait_for(all_answer, 120), (state.read_placement(TIER), state.shard_directory(TIER))
    # and the tier still serves the in-process tokens
    after = Traffic(stack, expected)
    try:
        after.send(16)
        after.wait()
        assert after.failures == [] and after.done == 16
    finally:
        after.close()
