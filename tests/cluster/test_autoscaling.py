"""The engine autoscaling policy (a pure function of the replicas' signals) and the deployment
options it gives Serve."""

from __future__ import annotations

import pytest
from moeray.cluster.autoscaling import (
    POLICY,
    EnginePolicy,
    desired_replicas,
    engine_deployment_options,
)
from moeray.cluster.config import EngineConfig
from pydantic import ValidationError

TARGETS = {"target_waiting": 2.0, "target_kv_use": 0.8, "target_ttft_p90_s": 1.0,
           "min_replicas": 1}  # fmt: skip


def m(**per_metric: list[float]) -> dict[str, dict[str, float]]:
    return {k: {f"r{i}": v for i, v in enumerate(vals)} for k, vals in per_metric.items()}


@pytest.mark.parametrize(
    ("metrics", "current", "want"),
    [
        (m(waiting=[0, 0], running=[0, 0], kv_use=[0, 0], ttft_p90_s=[0, 0]), 2, 1),  # idle
        (m(waiting=[0], running=[3], kv_use=[0.3], ttft_p90_s=[0.2]), 1, 1),
        (m(waiting=[5], running=[8], kv_use=[0.5], ttft_p90_s=[0.5]), 1, 3),  # queue: 5 / 2
        (m(waiting=[0, 0], running=[8, 8], kv_use=[0.9, 0.9], ttft_p90_s=[0.1, 0.1]), 2, 3),
        (m(waiting=[0], running=[4], kv_use=[0.2], ttft_p90_s=[3.0]), 1, 2),  # slow first tokens
        ({}, 3, 1),  # no metrics yet: the minimum
    ],
)
def test_desired_replicas(metrics: dict, current: int, want: int) -> None:
    assert desired_replicas(metrics, current, TARGETS) == want


def test_policy_reads_serve_context() -> None:
    class Ctx:  # the two attributes of Serve's AutoscalingContext the policy reads
        aggregated_metrics = m(waiting=[6], running=[8], kv_use=[0.5], ttft_p90_s=[0.1])
        current_num_replicas = 1
        policy_state = {"k": 1}

    assert EnginePolicy(**TARGETS)(Ctx()) == (3, {"k": 1})


def test_deployment_options() -> None:
    fixed = engine_deployment_options(EngineConfig(replicas=3))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    auto = engine_deployment_options(
        EngineConfig(
            autoscaling={
                "enabled": True,
                "min_replicas": 1,
                "max_replicas": 3,
                "downscale_delay_s": 7,
            }
        )
    )
    cfg = auto["autoscaling_config"]
    assert (cfg["min_replicas"], cfg["max_replicas"], cfg["downscale_delay_s"]) == (1, 3, 7)
    assert cfg["policy"]["policy_function"] == POLICY and "num_replicas" not in auto
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**cfg)  # Serve accepts it, policy import path included
    assert "num_replicas" in engine_deployment_options(
        EngineConfig(autoscaling={"max_replicas": 3})
    )
    with pytest.raises(ValidationError, match=r"engine\.replicas must stay 1"):
        EngineConfig(replicas=2, autoscaling={"enabled": True})
    with pytest.raises(ValidationError, match="max_replicas"):
        EngineConfig(autoscaling={"min_replicas": 3, "max_replicas": 2})
