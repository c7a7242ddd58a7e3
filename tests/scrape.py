"""The live stack's Prometheus endpoint as the tests read it: one scrape, parsed by
prometheus_client's own parser (the format Prometheus reads, not a regex over the text).

    samples(stack)                   every sample of one scrape of the front door's /metrics
    by_name(stack)                   the same samples grouped by sample name
    metric_sum(stack, name, **labels) the sum of the samples called `name` whose labels match
"""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def samples(stack: Any, timeout_s: float = 60.0) -> list[Sample]:
    """stack: a running cluster.app.LocalStack."""
    url = stack.endpoints()["http"].removesuffix("/v1") + "/metrics"
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        text = r.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def by_name(stack: Any) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for sample in samples(stack):
        out.setdefault(sample.name, []).append(sample)
    return out


def metric_sum(stack: Any, name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples(stack)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )
