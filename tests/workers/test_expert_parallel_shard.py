"""The pieces of expert parallelism that need no Ray: the wire format, the shard's compute and the
routing tables, each checked against the in-process `LocalExperts` (the oracle).

The Ray backend itself (real actors, compiled graphs, failures, Redis) is tested in
tests/cluster/test_expert_parallel.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from moeray.workers.expert_routing import (
    LayerRoute,
    NoLiveReplica,
    build_routes,
    combine_in_expert_order,
    dispatch_plan,
)
from moeray.workers.expert_shard import ExpertShard, ShardBatch
from moeray.workers.moe import LocalExperts

D, F = 24, 16


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Shard actors run their GEMMs on one thread (Ray sets OMP_NUM_THREADS=1 for them), and the
    oracle must too: oneDNN's results can differ in the last bit between thread counts."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _weights(num_experts: int, layers: list[int], dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        layer: (
            (torch.randn(num_experts, 2 * F, D, generator=g) / 4).to(dtype),
            (torch.randn(num_experts, D, F, generator=g) / 4).to(dtype),
        )
        for layer in layers
    }


def _routing(T: int, E: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scores = torch.softmax(torch.randn(T, E, generator=g), dim=-1)
    w, ids = torch.topk(scores, K)  # [T, K]
    return w, ids.to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [0, 1, 7])
def test_shard_batch_round_trips_bit_exactly(dtype: torch.dtype, T: int) -> None:
    g = torch.Generator().manual_seed(T)
    hidden = torch.randn(T, D, generator=g).to(dtype)
    w = torch.rand(T, 3, generator=g)
    ids = torch.randint(-1, 5, (T, 3), generator=g, dtype=torch.int32)
    back = ShardBatch.unpack(ShardBatch(4, hidden, w, ids).pack())
    assert back.layer == 4 and back.hidden.dtype == dtype
    assert torch.equal(back.hidden, hidden)
    assert torch.equal(back.topk_weights, w) and back.topk_weights.dtype == torch.float32
    assert torch.equal(back.local_ids, ids) and back.local_ids.dtype == torch.int32


def _sharded_layer(
    shards: list[ExpertShard],
    route: LayerRoute,
    layer: int,
    hidden: torch.Tensor,
    w: torch.Tensor,
    ids: torch.Tensor,
    step: int = 0,
) -> torch.Tensor:
    """What RayExperts.forward_layer does, with the shards in-process: dispatch_plan, one packed
    message per shard, the shards' per-slot rows combined in global expert order."""
    D = hidden.shape[1]
    parts = dispatch_plan(route, ids.numpy(), step)
    replies = []
    for shard, part in zip(shards, parts):
        rows = slice(None) if part.rows is None else torch.from_numpy(part.rows)
        msg = ShardBatch(layer, hidden[rows], w[rows], torch.from_numpy(part.local_ids)).pack()
        replies.append(np.frombuffer(shard.run(msg), dtype=np.float32).reshape(-1, D))
    out = combine_in_expert_order(ids.numpy(), parts, replies, D)
    return torch.from_numpy(out).to(hidden.dtype)


@pytest.mark.parametrize(
    ("E", "S", "replicas", "K"),
    [
        (E, S, r, K)
        for E, S, r in [(5, 2, 1), (7, 3, 1), (5, 3, 2), (9, 2, 1), (9, 4, 2)]
        for K in (1, 2, 4, 8)
        if K <= E
    ],
)
@pytest.mark.parametrize("T", [1, 9, 33])
def test_sharded_layer_equals_in_process_bit_for_bit(
    E: int, S: int, replicas: int, K: int, T: int, single_thread: None
) -> None:
    """build_routes + one ExpertShard per replica (in-process) + the exact combine ==
    LocalExperts, bit for bit in fp32, for every top-k (K >= 3 puts a token's experts on
    several shards in interleaved order), expert counts no shard count divides, replicas."""
    layers = [0, 2]
    weights = _weights(E, layers)
    mapping = [[[(e + r) % S for r in range(replicas)] for e in range(E)] for _ in layers]
    routes, assignments = build_routes(mapping, layers, list(range(S)))
    shards = [ExpertShard(assignments[s], weights=weights) for s in range(S)]
    oracle = LocalExperts(weights)
    hidden = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
    w, ids = _routing(T, E, K, seed=T + E)
    for layer in layers:
        got = _sharded_layer(shards, routes[layer], layer, hidden, w, ids)
        assert torch.equal(got, oracle.forward_layer(layer, hidden, w, ids)), (layer, K)


@pytest.mark.parametrize("K", [2, 4, 8])
def test_sharded_layer_equals_in_process_in_bf16(K: int, single_thread: None) -> None:
    """bf16 weights and activations: sharded == in-process, bit for bit."""
    E, S, T, layer = 9, 3, 17, 1
    weights = _weights(E, [layer], torch.bfloat16)
    mapping = [[[e % S] for e in range(E)]]
    routes, assignments = build_routes(mapping, [layer], list(range(S)))
    shards = [ExpertShard(assignments[s], weights=weights) for s in range(S)]
    hidden = torch.randn(T, D, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    w, ids = _routing(T, E, K, seed=K)
    got = _sharded_layer(shards, routes[layer], layer, hidden, w, ids)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, LocalExperts(weights).forward_layer(layer, hidden, w, ids))


def test_a_sum_in_shard_order_would_differ() -> None:
    """The reason for the exact combine (this test can fail if fp32 addition were associative):
    three experts of one token on two shards, summed per shard first, differ from the sum in
    expert order in the last bits for some values."""
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(10_000, generator=g) * 1e3 for _ in range(3))
    in_order = (a + b) + c  # experts 0, 1, 2: shard 0 holds 0 and 2, shard 1 holds 1
    by_shard = (a + c) + b
    assert not torch.equal(in_order, by_shard)


def test_replicated_experts_go_to_the_least_loaded_shard() -> None:
    # expert 0 only on shard 0, expert 1 on shards 0 and 1: expert 1's tokens must avoid shard 0
    routes, assignments = build_routes([[[0], [0, 1]]], [3], [0, 1])
    assert assignments == {0: {3: [0, 1]}, 1: {3: [1]}}
    ids = np.array([[0, 1], [0, 1], [0, 1]])
    assert routes[3].owners(ids).tolist() == [0, 1]
    # now expert 0 is cold, and expert 1 (hot) still picks one replica for all its tokens
    routes, _ = build_routes([[[0, 1], [1]]], [3], [0, 1])
    ids = np.array([[1, 0], [1, 1], [1, 1]])
    assert routes[3].owners(ids).tolist() == [0, 1]
    # a dead shard is never chosen; an expert held only there cannot be served
    assert routes[3].owners(ids, exclude={0}).tolist() == [1, 1]
    routes, _ = build_routes([[[0], [0, 1]]], [3], [0, 1])
    with pytest.raises(NoLiveReplica, match="experts \\[0\\]"):
        routes[3].owners(ids, exclude={0})


def test_placement_shape_mismatch_names_the_layers() -> None:
    with pytest.raises(ValueError, match="MoE layers"):
        build_routes([[[0]]], [0, 1], [0])
    with pytest.raises(ValueError, match="checkpoint= or weights="):
        ExpertShard({0: [0]})
