"""Engine replicas scaled on LLM signals: the Ray Serve autoscaling policy of a tier.

Every engine replica reports, through Serve's custom autoscaling metrics
(`EngineServer.record_autoscaling_stats`), its waiting requests, the fraction of its KV-cache
blocks in use and its recent TTFT p90. Serve's controller averages them per replica over
`look_back_period_s` and calls `EnginePolicy` with them; the policy is a pure function of those
numbers and the tier's targets (`EngineAutoscalingConfig`), `EnginePolicy`:

    want = max(ceil(total waiting / target_waiting),
               ceil(sum of KV use / target_kv_use),
               current + 1 if TTFT p90 > target_ttft_p90_s else 0,
               1 if any request is running or waiting else min)

Serve then applies the bounds and the delays (upscale_delay_s, downscale_delay_s), so an idle
tier goes back to min_replicas after downscale_delay_s, and a replica being removed drains first
(`EngineServer.__del__`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from moeray.cluster.config import EngineAutoscalingConfig, EngineConfig

#: The custom metrics an engine replica reports (EngineServer.record_autoscaling_stats).
WAITING, RUNNING, KV_USE, TTFT_P90 = "waiting", "running", "kv_use", "ttft_p90_s"
POLICY = "moeray.cluster.autoscaling:EnginePolicy"
#: Seconds between a replica's metric reports (Serve's metrics_interval_s).
METRICS_INTERVAL_S = 1.0


def desired_replicas(
    metrics: Mapping[str, Mapping[Any, float]], current: int, targets: Mapping[str, Any]
) -> int:
    """Replicas the signals ask for (before Serve's bounds and delays).

    metrics: metric name -> replica id -> value (averaged over the look-back window).
    targets: target_waiting, target_kv_use, target_ttft_p90_s (or None), min_replicas.
    """
    waiting = sum(metrics.get(WAITING, {}).values())
    running = sum(metrics.get(RUNNING, {}).values())
    kv_use = sum(metrics.get(KV_USE, {}).values())
    want = max(
        math.ceil(waiting / targets["target_waiting"] - 1e-9),
        math.ceil(kv_use / targets["target_kv_use"] - 1e-9),
        1 if waiting + running > 0 else int(targets["min_replicas"]),
    )
    ttft_target = targets.get("target_ttft_p90_s")
    ttfts = list(metrics.get(TTFT_P90, {}).values())
    if ttft_target is not None and ttfts and max(ttfts) > ttft_target:
        want = max(want, current + 1)
    return want


class EnginePolicy:
    """Serve's custom policy (AutoscalingConfig.policy): Serve builds it once with the
    policy_kwargs from `engine_deployment_options` and calls it with an AutoscalingContext."""

    def __init__(self, **targets: Any) -> None:
        self.targets = targets

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        want = desired_replicas(metrics, ctx.current_num_replicas, self.targets)
        return want, dict(ctx.policy_state or {})


def engine_deployment_options(engine: EngineConfig) -> dict[str, Any]:
    """The Serve deployment options that size a tier: a fixed `num_replicas`, or an
    `autoscaling_config` with this module's policy; and the drain time of a removed replica."""
    options: dict[str, Any] = {
        "graceful_shutdown_timeout_s": engine.drain_timeout_s + 5.0,
        "graceful_shutdown_wait_loop_s": 0.5,
    }
    a = engine.autoscaling
    if not a.enabled:
        options["num_replicas"] = engine.replicas
        return options
    options["autoscaling_config"] = _autoscaling_config(a)
    return options


def _autoscaling_config(a: EngineAutoscalingConfig) -> dict[str, Any]:
    return {
        "min_replicas": a.min_replicas,
        "initial_replicas": a.min_replicas,
        "max_replicas": a.max_replicas,
        "upscale_delay_s": a.upscale_delay_s,
        "downscale_delay_s": a.downscale_delay_s,
        "metrics_interval_s": METRICS_INTERVAL_S,
        "look_back_period_s": a.look_back_period_s,
        "policy": {
            "policy_function": POLICY,
            "policy_kwargs": {
                "target_waiting": a.target_waiting,
                "target_kv_use": a.target_kv_use,
                "target_ttft_p90_s": a.target_ttft_p90_s,
                "min_replicas": a.min_replicas,
            },
        },
    }
