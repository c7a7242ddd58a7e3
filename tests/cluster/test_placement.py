"""The placement planner, property-tested with hypothesis plus a few worked examples.

Oracles: the invariants a placement must keep (coverage, capacity, distinct replicas, balance),
determinism, a brute-force max-shard-load computation, and the initial placement as the bound a
rebalance must never do worse than.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moeray.cluster.placement import (
    NoLiveReplica,
    assign_replicas,
    choose_replica,
    initial_placement,
    max_shard_loads,
    plan_rebalance,
)
from moeray.cluster.state_messages import Placement


def slot_counts(p: Placement, layer: int, num_shards: int) -> list[int]:
    c = Counter(s for reps in p.mapping[layer] for s in reps)
    return [c[s] for s in range(num_shards)]


def brute_max_load(loads: np.ndarray, p: Placement, num_shards: int) -> list[float]:
    """Per layer, the largest sum over a shard of load / replica count: the oracle."""
    out = []
    for li in range(p.num_layers):
        per = [0.0] * num_shards
        for e, reps in enumerate(p.mapping[li]):
            for s in reps:
                per[s] += loads[li, e] / len(reps)
        out.append(max(per))
    return out


@st.composite
def problems(draw: st.DrawFn) -> tuple:
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(1, 12))
    shards = draw(st.integers(1, 6))
    min_r = draw(st.integers(1, 3))
    max_r = draw(st.integers(min_r, 4))
    need = -(-experts * min(min_r, shards) // shards)  # slots needed for min replicas
    slots = draw(st.integers(need, need + 4))
    loads = np.array(
        draw(st.lists(st.integers(0, 1000), min_size=layers * experts, max_size=layers * experts))
    ).reshape(layers, experts)
    cur_r = draw(st.integers(1, 3))
    return loads, shards, slots, min_r, max_r, cur_r


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 3), st.integers(1, 20), st.integers(1, 8), st.integers(1, 4))
def test_initial_placement_properties(
    layers: int, experts: int, shards: int, replicas: int
) -> None:
    p = initial_placement(layers, experts, shards, replicas)
    r = min(replicas, shards)
    assert (p.epoch, p.num_layers, p.num_experts) == (0, layers, experts)
    for li in range(layers):
        assert all(len(reps) == r for reps in p.mapping[li])  # distinct (sets), r of each
        assert all(0 <= s < shards for reps in p.mapping[li] for s in reps)
        counts = slot_counts(p, li, shards)
        assert max(counts) - min(counts) <= 1 and sum(counts) == experts * r
    assert p == initial_placement(layers, experts, shards, replicas)


@settings(max_examples=200, deadline=None)
@given(problems())
def test_plan_rebalance_properties(problem: tuple) -> None:
    loads, shards, slots, min_r, max_r, cur_r = problem
    layers, experts = loads.shape
    current = initial_placement(
        layers, experts, shards, min(cur_r, max(1, slots * shards // experts))
    )
    plan = plan_rebalance(loads, current, shards, slots, min_r, max_r)
    again = plan_rebalance(loads, current, shards, slots, min_r, max_r)
    assert plan == again  # deterministic
    assert (plan.num_layers, plan.num_experts, plan.epoch) == (layers, experts, current.epoch)
    for li in range(layers):
        for reps in plan.mapping[li]:
            # >= 1 replica, within [min, max] clamped to the shard count; a tuple of distinct ids
            assert min(min_r, shards) <= len(reps) <= min(max_r, shards)
            assert len(set(reps)) == len(reps) and all(0 <= s < shards for s in reps)
        assert max(slot_counts(plan, li, shards)) <= slots  # no shard over capacity
    baseline = initial_placement(layers, experts, shards, min_r)
    got, bound = brute_max_load(loads, plan, shards), brute_max_load(loads, baseline, shards)
    assert all(g <= b + 1e-6 for g, b in zip(got, bound))
    np.testing.assert_allclose(max_shard_loads(loads, plan, shards), got)


def test_hot_expert_is_replicated_and_max_load_drops() -> None:
    loads = np.array([[900, 10, 10, 10, 10, 10, 10, 40]])
    current = initial_placement(1, 8, 4)
    plan = plan_rebalance(loads, current, num_shards=4, slots_per_shard=3, max_replicas=4)
    assert len(plan.replicas(0, 0)) == 4  # the hot expert everywhere
    assert brute_max_load(loads, plan, 4)[0] < brute_max_load(loads, current, 4)[0] / 2
    # Balanced enough: 900/4 + the cold experts spread out.
    assert brute_max_load(loads, plan, 4)[0] <= 900 / 4 + 40 + 10


def test_uniform_load_keeps_the_current_layout() -> None:
    current = initial_placement(2, 8, 4).with_epoch(7)
    plan = plan_rebalance(np.full((2, 8), 5), current, 4, 2)
    assert plan == current  # nothing to gain: nothing moves


def test_current_layout_is_dropped_when_it_no_longer_fits() -> None:
    current = initial_placement(1, 6, 3)  # uses shard 2
    plan = plan_rebalance(np.ones((1, 6)), current, num_shards=2, slots_per_shard=3)
    assert plan.replica_ids() == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"loads": np.ones((2, 3))}, "loads"),
        ({"loads": -np.ones((1, 4))}, "loads"),
        ({"num_shards": 0}, "num_shards"),
        ({"slots_per_shard": 1}, "slots_per_shard"),
        ({"min_replicas": 3, "max_replicas": 2}, "max_replicas"),
    ],
)
def test_plan_rebalance_bad_input_names_the_argument(kwargs: dict, field: str) -> None:
    args = {"loads": np.ones((1, 4)), "current": initial_placement(1, 4, 2), "num_shards": 2}
    args |= {"slots_per_shard": 2, **kwargs}
    if field == "slots_per_shard":
        args["min_replicas"] = 2  # 4 experts x 2 replicas cannot fit in 2 x 1 slots
    with pytest.raises(ValueError, match=field):
        plan_rebalance(**args)


def test_initial_placement_bad_input() -> None:
    with pytest.raises(ValueError, match="num_shards"):
        initial_placement(1, 4, 0)


def test_choose_replica_least_outstanding_then_round_robin() -> None:
    assert choose_replica([2, 5, 7], {2: 10, 5: 3, 7: 3}, step=0) == 5
    assert choose_replica([2, 5, 7], {2: 10, 5: 3, 7: 3}, step=2) == 7  # tie rotates
    assert [choose_replica([2, 5, 7], None, step=s) for s in range(4)] == [2, 5, 7, 2]
    assert choose_replica([2, 5, 7], [0, 0, 9, 0, 0, 1, 0, 4], exclude={5}) == 7
    with pytest.raises(NoLiveReplica):
        choose_replica([1, 2], exclude={1, 2})


def test_assign_replicas_spreads_a_step_over_replicas() -> None:
    layout = [[0, 1], [0, 1], [1], [0]]
    got = assign_replicas(layout, [50, 40, 5, 5])
    assert got[2] == 1 and got[3] == 0
    assert {got[0], got[1]} == {0, 1}  # the two heavy experts on different shards
    assert assign_replicas(layout[:3], [50, 40, 5], exclude={0}) == [1, 1, 1]  # shard 0 died
    with pytest.raises(NoLiveReplica):
        assign_replicas(layout, [50, 40, 5, 5], exclude={0})  # expert 3 lived only there
    with pytest.raises(ValueError, match="tokens_per_expert"):
        assign_replicas(layout, [1, 2])
