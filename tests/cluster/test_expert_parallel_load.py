"""Per-expert load as operators see it, on a real redis-server: balancedness (a pure function of
the load and the placement), the all-time totals beside the windows, ExpertStatus as Redis holds
it, and `moeray experts` printing it as text and JSON. (Its run against a live multi-node
cluster is in tests/cluster/test_multinode.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from moeray.cluster.cli import main
from moeray.cluster.cli_experts import heat_strip
from moeray.cluster.expert_load import balancedness, layer_shard_loads, read_expert_status
from moeray.cluster.placement import initial_placement
from moeray.cluster.state import ClusterState
from moeray.cluster.state_messages import Placement, ReplicaInfo


def test_balancedness_is_mean_over_max_shard_load_summed_over_layers() -> None:
    p = Placement.from_lists([[[0], [1], [0, 1]], [[0], [1], [1]]])  # 2 layers, 3 experts
    even = np.array([[10, 10, 0], [5, 3, 2]])
    assert balancedness(even, p) == 1.0
    skewed = np.array([[30, 0, 10], [0, 0, 0]])  # shard loads 35 / 5
    assert balancedness(skewed, p) == pytest.approx(20 / 35)
    # an expert's tokens are split over its replicas; shard ids index the columns
    assert layer_shard_loads(skewed, p).tolist() == [[35.0, 5.0], [0.0, 0.0]]
    assert balancedness(np.zeros((2, 3)), p) == 1.0  # no traffic is not imbalance
    one_shard = Placement.from_lists([[[0], [0], [0]]])
    assert balancedness(np.array([[1, 2, 3]]), one_shard) == 1.0
    with pytest.raises(ValueError, match=r"\[L, E\]"):
        balancedness(np.zeros((3, 3)), p)


def test_totals_count_every_push_and_outlive_the_windows(cluster_state: ClusterState) -> None:
    counts = np.array([[1, 0, 2], [0, 4, 0]])
    cluster_state.push_load("m", counts, now=0.0)
    cluster_state.push_load("m", counts, now=1000.0)  # another window, long after
    assert cluster_state.read_load_total("m", 2, 3).tolist() == (2 * counts).tolist()
    assert cluster_state.read_load("m", 2, 3, now=1000.0).tolist() == counts.tolist()
    assert cluster_state.read_load_total("other", 2, 3).sum() == 0


def _publish(state: ClusterState) -> Placement:
    placement = state.publish_placement("fast", initial_placement(2, 5, num_shards=2))
    for rid in placement.replica_ids():
        experts = tuple((li, e) for li, es in placement.experts_of(rid).items() for e in es)
        info = ReplicaInfo(rid, f"shard-{rid}", node="10.0.0.7", node_id=f"{rid}abcdef00" * 4,
                           experts=experts, state="ready")  # fmt: skip
        state.register_replica("fast", info)
    state.push_load("fast", np.array([[8, 1, 0, 3, 2], [0, 0, 5, 5, 1]]))
    return placement


def test_expert_status_from_redis(cluster_state: ClusterState) -> None:
    assert read_expert_status(cluster_state, "fast") is None  # nothing published yet
    placement = _publish(cluster_state)
    status = read_expert_status(cluster_state, "fast")
    assert status is not None and status.placement == placement
    assert status.total.tolist() == status.load.tolist()
    # striping e % 2: shard 0 holds experts 0, 2, 4 and shard 1 holds 1, 3
    assert status.shard_tokens() == {0: 8 + 0 + 2 + 0 + 5 + 1, 1: 1 + 3 + 0 + 5}
    assert status.balancedness == pytest.approx((7 + 5.5) / (10 + 6))
    view = status.to_json()
    assert view["layers"][0][3] == {
        "expert": 3, "replicas": [1], "nodes": ["1abcdef00" * 4], "tokens": 3, "total": 3,
    }  # fmt: skip
    assert [r["node"] for r in view["replicas"]] == ["10.0.0.7", "10.0.0.7"]


def _config(tmp_path: Path, redis_url: str) -> Path:
    path = tmp_path / "moeray.yaml"
    path.write_text(
        "tiers:\n"
        "  - {name: fast, model: /models/f, experts: {shards: 2}}\n"
        "  - {name: reasoning, model: /models/r}\n"
        f"state: {{redis_url: '{redis_url}', cluster: test}}\n"
    )
    return path


def test_cli_experts_text_and_json(
    cluster_state: ClusterState, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _publish(cluster_state)
    config = _config(tmp_path, cluster_state.redis_url)
    assert main(["experts", "--config", str(config), "--output", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cluster"] == "test" and [t["tier"] for t in out["tiers"]] == ["fast"]
    assert out["tiers"][0]["shard_tokens"] == {"0": 16, "1": 9}
    assert main(["experts", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "tier fast · epoch 1 · balancedness 0.781" in text
    assert "|█▁ ▃▂|" in text  # layer 0: tokens 8 1 0 3 2 on the tier's 0..8 scale
    assert "expert:shards 0:0 1:1 2:0 3:1 4:0" in text
    assert main(["experts", "--config", str(config), "--tier", "reasoning"]) == 0
    assert "no expert placement" in capsys.readouterr().out
    assert main(["experts", "--config", str(config), "--tier", "nope"]) == 2
    assert "--tier" in capsys.readouterr().err


def test_heat_strip_scales_to_the_peak() -> None:
    assert heat_strip([0, 1, 4, 8], 8) == " ▁▄█"
    assert heat_strip([0, 0], 0) == "  "
