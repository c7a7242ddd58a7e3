"""Prometheus metrics of the front door (served at GET /metrics by the HTTP app).

One `FrontDoorMetrics` per router replica, on its own CollectorRegistry (so two services in one
process, as in tests, never collide). Counters and histograms are updated on the request path;
the engine gauges (KV blocks, queue) and per-expert load are refreshed when /metrics is scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Request latencies on CPU range from milliseconds to minutes.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
#: A routing decision costs tens of microseconds; anything near a millisecond is a regression.
DECISION_BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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
        self.prefix_cache_hit_ratio = Gauge(
            "moeray_prefix_cache_hit_ratio", "Prompt tokens whose KV was reused from the prefix "
            "cache / prompt tokens, over the tier's engine replicas since they started",
            ["tier"], registry=r,
        )  # fmt: skip
        self.expert_tokens = Gauge(
            "moeray_expert_tokens", "Tokens routed per (layer, expert) in the load window "
            "(tiers with expert shards)", ["tier", "layer", "expert"], registry=r,
        )  # fmt: skip

    def render(self) -> bytes:
        """The Prometheus text exposition of every family."""
        return generate_latest(self.registry)
