"""Prometheus metrics of the front door (served at GET /metrics by the HTTP app).

One `FrontDoorMetrics` per router replica, on its own CollectorRegistry (so two services in one
process, as in tests, never collide). Counters and histograms are updated on the request path;
the engine gauges (KV blocks, queue) and per-expert load are refreshed when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

#: Request latencies on CPU range from milliseconds to minutes.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
#: A routing decision costs tens of microseconds; anything near a millisecond is a regression.
DECISION_BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ExpertTokens:
    """moeray_expert_tokens_total{tier,layer,expert}: tokens routed to each expert of a sharded
    tier since it started, a counter whose values live in Redis (the engines push them), so
    it is a custom collector exporting the last totals read rather than a Counter to inc()."""

    def __init__(self) -> None:
        self.totals: dict[str, np.ndarray] = {}  # tier -> int64 [L, E]

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "moeray_expert_tokens", "Tokens routed per (MoE layer, expert) of tiers with "
            "expert shards, since their shards started", labels=["tier", "layer", "expert"],
        )  # fmt: skip
        for tier, total in sorted(self.totals.items()):
            for (layer, expert), n in np.ndenumerate(total):
                family.add_metric([tier, str(layer), str(expert)], float(n))
        yield family


class ExpertLayout:
    """moeray_expert_replicas{tier,layer,expert} (a gauge: replicas of each expert in the
    published placement) and moeray_autoscaler_plans_total{tier,mode,outcome} (the expert
    autoscaler's plans, a counter kept in Redis): the last values read from Redis per tier
    (`update(tier, ExpertStatus)` at scrape time), exported as they are."""

    def __init__(self) -> None:
        self.replicas: dict[str, np.ndarray] = {}  # tier -> int [L, E]
        self.plans: dict[str, dict[tuple[str, str], int]] = {}  # tier -> (mode, outcome) -> n

    def update(self, tier: str, status: Any) -> None:
        """From a cluster.expert_load.ExpertStatus."""
        self.replicas[tier] = status.replica_counts()
        self.plans[tier] = dict(status.plans or {})

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        replicas = GaugeMetricFamily(
            "moeray_expert_replicas", "Replicas of each (MoE layer, expert) in the published "
            "expert placement of a sharded tier", labels=["tier", "layer", "expert"],
        )  # fmt: skip
        for tier, counts in sorted(self.replicas.items()):
            for (layer, expert), n in np.ndenumerate(counts):
                replicas.add_metric([tier, str(layer), str(expert)], float(n))
        yield replicas
        plans = CounterMetricFamily(
            "moeray_autoscaler_plans", "Plans of the expert autoscaler by mode (advisory|"
            "active) and outcome (applied, advised, below_threshold, cooldown, scaled_down, "
            "failed, rolled_back, starting)", labels=["tier", "mode", "outcome"],
        )  # fmt: skip
        for tier, plan_counts in sorted(self.plans.items()):
            for (mode, outcome), n in sorted(plan_counts.items()):
                plans.add_metric([tier, mode, outcome], float(n))
        yield plans


class FrontDoorMetrics:
    """The front door's metric families (names prefixed `moeray_`)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "moeray_requests", "Requests by tier, protocol and outcome",
            ["tier", "protocol", "outcome"], registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "moeray_tokens", "Tokens by tier and kind (prompt|completion)",
            ["tier", "kind"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "moeray_request_latency_seconds", "End-to-end latency of finished requests",
            ["tier"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "moeray_time_to_first_token_seconds", "Time to the first streamed token",
            ["tier"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.decisions = Counter(
            "moeray_route_decisions", "Routing decisions by tier and mode (auto|named|fallback)",
            ["tier", "mode"], registry=r,
        )  # fmt: skip
        self.decision_latency = Histogram(
            "moeray_route_decision_seconds", "Time the routing policy takes per request",
            buckets=DECISION_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.inflight = Gauge(
            "moeray_inflight", "Requests in flight per tier", ["tier"], registry=r
        )
        self.engine = Gauge(
            "moeray_engine", "Engine state per tier: running, waiting, kv_blocks_free, "
            "kv_blocks_total", ["tier", "field"], registry=r,
        )  # fmt: skip
        self.replicas = Gauge(
            "moeray_engine_replicas", "Engine replicas of the tier this router can reach",
            ["tier"], registry=r,
        )  # fmt: skip
        self.replica = Gauge(
            "moeray_engine_replica", "Per engine replica: running, waiting, kv_use (0..1); "
            "refreshed per scrape", ["tier", "replica", "field"], registry=r,
        )  # fmt: skip
        self.replica_changes = Counter(
            "moeray_engine_replica_changes", "Engine replicas that joined (added) or left "
            "(removed) the tier, as this router saw them (autoscaling decisions carried out)",
            ["tier", "direction"], registry=r,
        )  # fmt: skip
        self.replica_choices = Counter(
            "moeray_replica_choices", "How each request's engine replica was chosen: prefix "
            "(holds its prefix), overloaded (the holder was too busy), least_loaded",
            ["tier", "reason"], registry=r,
        )  # fmt: skip
        self.prefix_cache_hit_ratio = Gauge(
            "moeray_prefix_cache_hit_ratio", "Prompt tokens whose KV was reused from the prefix "
            "cache / prompt tokens, over the tier's engine replicas since they started",
            ["tier"], registry=r,
        )  # fmt: skip
        # Per-expert load of sharded tiers, read from Redis at scrape time (service._with_state)
        self.expert_tokens = ExpertTokens()
        r.register(self.expert_tokens)
        self.expert_balancedness = Gauge(
            "moeray_expert_balancedness", "Mean over expert shards of their token load / the "
            "max, summed over MoE layers, over the recent load windows (1.0 = perfect)",
            ["tier"], registry=r,
        )  # fmt: skip
        self.expert_layout = ExpertLayout()
        r.register(self.expert_layout)
        self.expert_placement_epoch = Gauge(
            "moeray_expert_placement_epoch", "Epoch of the tier's published expert placement",
            ["tier"], registry=r,
        )  # fmt: skip

    def render(self) -> bytes:
        """The Prometheus text exposition of every family."""
        return generate_latest(self.registry)
