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
from moeray.workers.expert_shard import ExpertShard, ShardBatch, unpack_result
from moeray.workers.moe import LocalExperts
from moeray.workers.ray_experts import build_routes

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


@pytest.mark.parametrize(("E", "S", "replicas"), [(5, 2, 1), (7, 3, 1), (5, 3, 2)])
@pytest.mark.parametrize("T", [1, 9, 33])
def test_shards_sum_to_the_in_process_layer(
    E: int, S: int, replicas: int, T: int, single_thread: None
) -> None:
    """Routing by build_routes + one ExpertShard per replica (in-process) == LocalExperts, for
    expert counts that do not divide the shard count and with replicated experts."""
    layers = [0, 2]
    weights = _weights(E, layers)
    mapping = [[[(e + r) % S for r in range(replicas)] for e in range(E)] for _ in layers]
    routes, assignments = build_routes(mapping, layers, list(range(S)))
    shards = [ExpertShard(assignments[s], weights=weights) for s in range(S)]
    oracle = LocalExperts(weights)
    hidden = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
    w, ids = _routing(T, E, 2, seed=T + E)
    for layer in layers:
        route = routes[layer]
        owner = route.owners(ids.numpy(), S)[ids.numpy()]  # [T, K]
        out = torch.zeros(T, D)
        for s, shard in enumerate(shards):
            local = torch.from_numpy(np.where(owner == s, route.slots[s][ids.numpy()], -1))
            reply = shard.run(ShardBatch(layer, hidden, w, local).pack())
            out += unpack_result(reply, T, D)
        assert torch.equal(out, oracle.forward_layer(layer, hidden, w, ids))


def test_replicated_experts_go_to_the_least_loaded_shard() -> None:
    # expert 0 only on shard 0, expert 1 on shards 0 and 1: expert 1's tokens must avoid shard 0
    routes, assignments = build_routes([[[0], [0, 1]]], [3], [0, 1])
    assert assignments == {0: {3: [0, 1]}, 1: {3: [1]}}
    ids = np.array([[0, 1], [0, 1], [0, 1]])
    assert routes[3].owners(ids, 2).tolist() == [0, 1]
    # now expert 0 is cold, and expert 1 (hot) still picks one replica for all its tokens
    routes, _ = build_routes([[[0, 1], [1]]], [3], [0, 1])
    ids = np.array([[1, 0], [1, 1], [1, 1]])
    assert routes[3].owners(ids, 2).tolist() == [0, 1]


def test_placement_shape_mismatch_names_the_layers() -> None:
    with pytest.raises(ValueError, match="MoE layers"):
        build_routes([[[0]]], [0, 1], [0])
    with pytest.raises(ValueError, match="checkpoint= or weights="):
        ExpertShard({0: [0]})
