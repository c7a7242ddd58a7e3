"""Fixtures shared by the live-cluster modules of tests/cluster."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from moeray.cluster.app import LocalStack
from moeray.cluster.state import ClusterState


@pytest.fixture(scope="module")
def state(stack: LocalStack) -> Iterator[ClusterState]:
    """The Redis state of the module's `stack` fixture, as the router and the controller read it."""
    s = stack.config.state
    cs = ClusterState(s.redis_url or "", s.cluster, load_window_s=s.load_window_s)
    yield cs
    cs.close()
