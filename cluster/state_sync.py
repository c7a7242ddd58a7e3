"""Background helpers that keep Redis off an engine's and a shard's hot path.

Each runs on one daemon thread that `close()` stops within a bounded time, sleeps with capped
exponential backoff after an error, and never lets an exception escape (errors are counted in
`.errors` and the last one kept in `.last_error`):

- `PlacementWatcher`: caches the latest placement (pub/sub + cheap epoch poll); after Redis loses
  its memory it republishes the cached placement (`republish` never lowers an epoch).
- `LoadReporter`: sums [L, E] token counts locally, pushes them every N steps; keeps them on errors.
- `Heartbeater`: refreshes a replica's TTL and re-registers it after a Redis restart.
- `EndpointAnnouncer`: keeps an engine replica's gRPC endpoint registered (and removes
  it on close); `EngineRegistry` is the picklable recipe an engine deployment receives.

Shape letters (docs/SHAPES.md): L MoE layers, E routed experts per layer.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import redis
from moeray.cluster.state_messages import (
    EngineEndpoint,
    Placement,
    ReplicaInfo,
    ReplicaState,
    as_count_matrix,
    check_name,
)

if TYPE_CHECKING:
    from moeray.cluster.config import StateConfig
    from moeray.cluster.state import ClusterState

log = logging.getLogger(__name__)
_B = TypeVar("_B", bound="_Background")


class _Background(abc.ABC):
    """One daemon thread running `_run_once` until close(), sleeping with capped backoff on
    errors. Subclasses implement `_run_once() -> float` (seconds to wait before the next call)."""

    def __init__(self, name: str, backoff_initial_s: float, backoff_max_s: float) -> None:
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError(
                "backoff_initial_s and backoff_max_s must satisfy 0 < initial <= max, got "
                f"{backoff_initial_s}, {backoff_max_s}"
            )
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self.connected = False
        self.last_error: str | None = None
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self: _B) -> _B:
        """Starts the thread; returns self, so `w = PlacementWatcher(...).start()` reads well."""
        self._thread.start()
        return self

    @abc.abstractmethod
    def _run_once(self) -> float:
        """One round of work; returns the seconds to wait before the next."""

    def _on_error(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Hook: drop connections after an error (runs on the background thread)."""

    def _loop(self) -> None:
        backoff = self.backoff_initial_s
        while not self._stop.is_set():
            try:
                wait_s = self._run_once()
                self.connected, backoff = True, self.backoff_initial_s
            except Exception as e:  # a background thread must never die: log, back off, retry
                self.connected, self.errors = False, self.errors + 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.debug("%s: %s; retrying in %.2f s", self._thread.name, e, backoff)
                self._on_error()
                wait_s, backoff = backoff, min(backoff * 2, self.backoff_max_s)
            self._stop.wait(wait_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stops the thread; returns within timeout_s (the thread is a daemon either way)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def __enter__(self: _B) -> _B:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class PlacementWatcher(_Background):
    """Keeps the latest placement of `model` in `self.placement` for an engine's hot path.

    The engine reads `watcher.placement` (an attribute: never blocks, never raises) between
    steps. A new epoch arrives by pub/sub, or by a poll of the epoch every poll_interval_s. When
    Redis is down the cached placement stays; the thread reconnects with capped exponential
    backoff and re-subscribes. With republish_on_loss, if Redis comes back holding an older
    epoch (or none: it restarted empty), the watcher writes its cached placement back.
    """

    def __init__(
        self,
        state: ClusterState,
        model: str,
        *,
        poll_interval_s: float = 1.0,
        republish_on_loss: bool = True,
        initial: Placement | None = None,
        on_change: Callable[[Placement], None] | None = None,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
    ) -> None:
        super().__init__(f"moeray-placement-{model}", backoff_initial_s, backoff_max_s)
        if not poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        self.state, self.model = state, check_name("model", model)
        self.poll_interval_s = poll_interval_s
        self.republish_on_loss = republish_on_loss
        self.on_change = on_change
        self.placement: Placement | None = initial
        self.republished = 0
        self._cond = threading.Condition()
        self._pubsub: Any = None

    @property
    def epoch(self) -> int:
        p = self.placement
        return p.epoch if p is not None else 0

    def wait_for_epoch(self, epoch: int, timeout_s: float) -> bool:
        """Blocks until the cached epoch is >= `epoch` (startup and tests; not the hot path)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.epoch >= epoch, timeout_s)

    def _run_once(self) -> float:
        if self._pubsub is None:
            pubsub = self.state.client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(self.state.placement_channel(self.model))
            self._pubsub = pubsub
        self._refresh()  # after (re)subscribing, so no announcement falls in between
        self.connected = True
        deadline = time.monotonic() + self.poll_interval_s
        while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
            msg = self._pubsub.get_message(timeout=min(left, 0.25))
            if msg is not None and msg.get("type") == "message" and int(msg["data"]) > self.epoch:
                self._refresh()
        return 0.0

    def _refresh(self) -> None:
        remote = self.state.read_epoch(self.model)
        cached = self.placement
        if remote > self.epoch:
            p = self.state.read_placement(self.model)
            if p is not None and p.epoch > self.epoch:
                self._set(p)
        elif remote < self.epoch and cached is not None and self.republish_on_loss:
            # Redis lost its memory (restart) or holds a stale epoch: restore ours.
            self.state.republish(self.model, cached)
            self.republished += 1

    def _set(self, p: Placement) -> None:
        with self._cond:
            self.placement = p
            self._cond.notify_all()
        if self.on_change is not None:
            self.on_change(p)

    def _on_error(self) -> None:
        if self._pubsub is not None:
            # The connection may already be broken; there is nothing more to release then.
            with contextlib.suppress(Exception):
                self._pubsub.close()
            self._pubsub = None

    def close(self, timeout_s: float = 5.0) -> None:
        super().close(timeout_s)
        self._on_error()


class LoadReporter(_Background):
    """Accumulates per-step [L, E] token counts locally and pushes them in batches.

    `add(counts)` is the hot-path call: a numpy add under a lock, never a network call. Every
    push_every_steps adds (and at least every max_interval_s) the background thread sends the
    sum in one round trip. On a Redis error the sum is kept and retried with backoff: the buffer
    is one int64 [L, E] matrix, so memory is bounded and no counts are lost; counts held over an
    outage are credited to the window in which they are finally pushed. Delivery is
    at-least-once: a push whose reply is lost (a timeout after Redis applied it) is sent again.
    """

    def __init__(
        self,
        state: ClusterState,
        model: str,
        num_layers: int,
        num_experts: int,
        *,
        push_every_steps: int = 16,
        max_interval_s: float = 5.0,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
    ) -> None:
        super().__init__(f"moeray-load-{model}", backoff_initial_s, backoff_max_s)
        if num_layers < 1 or num_experts < 1:
            raise ValueError(
                f"num_layers and num_experts must be >= 1, got {num_layers}, {num_experts}"
            )
        if push_every_steps < 1:
            raise ValueError(f"push_every_steps must be >= 1, got {push_every_steps}")
        if not max_interval_s > 0:
            raise ValueError(f"max_interval_s must be > 0, got {max_interval_s}")
        self.state, self.model = state, check_name("model", model)
        self.shape = (num_layers, num_experts)
        self.push_every_steps, self.max_interval_s = push_every_steps, max_interval_s
        self.pushed_total = 0
        self._pending = np.zeros(self.shape, dtype=np.int64)
        self._steps = 0
        self._in_flight = 0  # tokens of the batch being pushed now
        self._lock = threading.Lock()
        self._push_lock = threading.Lock()
        self._wake = threading.Event()

    def add(self, counts: Any) -> None:
        """Adds one step's counts [L, E] (non-negative ints); never blocks on Redis."""
        arr = as_count_matrix(counts)
        if arr.shape != self.shape:
            raise ValueError(f"counts must have shape {self.shape} [L, E], got {arr.shape}")
        with self._lock:
            self._pending += arr
            self._steps += 1
            due = self._steps >= self.push_every_steps
        if due:
            self._wake.set()

    @property
    def pending_total(self) -> int:
        """Tokens counted but not yet acknowledged by Redis (including a push in progress)."""
        with self._lock:
            return int(self._pending.sum()) + self._in_flight

    def flush(self) -> bool:
        """Pushes what is pending now, on the caller's thread; False (counts kept) on error."""
        try:
            self._push()
            return True
        except (redis.RedisError, OSError) as e:
            self.last_error = f"{type(e).__name__}: {e}"
            return False

    def _push(self) -> None:
        with self._push_lock:
            with self._lock:
                batch, self._pending = self._pending, np.zeros(self.shape, dtype=np.int64)
                self._steps, self._in_flight = 0, int(batch.sum())
            if not self._in_flight:
                return
            try:
                self.state.push_load(self.model, batch)
            except BaseException:
                with self._lock:
                    self._pending += batch  # keep them for the next try
                    self._in_flight = 0
                raise
            with self._lock:
                self.pushed_total += self._in_flight
                self._in_flight = 0

    def _run_once(self) -> float:
        self._wake.wait(self.max_interval_s)
        self._wake.clear()
        self._push()
        return 0.0

    def close(self, timeout_s: float = 5.0, flush: bool = True) -> None:
        """Stops the thread, then (flush=True) tries one last push of what is pending."""
        self._stop.set()
        self._wake.set()
        super().close(timeout_s)
        if flush:
            self.flush()


def _refresh_interval(state: ClusterState, interval_s: float | None) -> float:
    """interval_s (default: a third of the TTL), checked to be shorter than the TTL."""
    interval = interval_s if interval_s is not None else state.heartbeat_ttl_s / 3
    if not 0 < interval < state.heartbeat_ttl_s:
        raise ValueError(
            f"interval_s must be in (0, heartbeat_ttl_s={state.heartbeat_ttl_s}), got {interval}"
        )
    return interval


class Heartbeater(_Background):
    """Keeps one replica registered: heartbeats every interval_s; re-registers it (with its
    current state) when Redis has forgotten it, e.g. after a restart."""

    def __init__(
        self,
        state: ClusterState,
        model: str,
        info: ReplicaInfo,
        *,
        interval_s: float | None = None,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
    ) -> None:
        super().__init__(
            f"moeray-heartbeat-{model}-{info.replica_id}", backoff_initial_s, backoff_max_s
        )
        self.state, self.model, self.info = state, check_name("model", model), info
        self.interval_s = _refresh_interval(state, interval_s)
        self.registrations = 0
        self._force = True  # the first beat registers

    def set_state(self, state: ReplicaState) -> None:
        """Changes the advertised state now (kept across re-registrations); if Redis is down
        the next beat writes it."""
        self.info = dataclasses.replace(self.info, state=state)
        try:
            if self.state.set_replica_state(self.model, self.info.replica_id, state):
                return
        except (redis.RedisError, OSError):
            pass
        self._force = True

    def _run_once(self) -> float:
        if self._force or not self.state.heartbeat(self.model, self.info.replica_id):
            self.state.register_replica(self.model, self.info)
            self._force = False
            self.registrations += 1
        return self.interval_s


class EndpointAnnouncer(_Background):
    """Keeps one engine endpoint registered: rewrites it (with its TTL) every interval_s, which
    also restores it after a Redis restart; close() removes it (best effort)."""

    def __init__(
        self,
        state: ClusterState,
        endpoint: EngineEndpoint,
        *,
        interval_s: float | None = None,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
    ) -> None:
        super().__init__(f"moeray-endpoint-{endpoint.tier}", backoff_initial_s, backoff_max_s)
        self.state, self.endpoint = state, endpoint
        self.owns_state = False  # close() also closes `state` (set by EngineRegistry.announce)
        self.interval_s = _refresh_interval(state, interval_s)

    def _run_once(self) -> float:
        self.state.register_engine(self.endpoint)
        return self.interval_s

    def close(self, timeout_s: float = 5.0) -> None:
        super().close(timeout_s)
        with contextlib.suppress(redis.RedisError, OSError):
            self.state.remove_engine(self.endpoint.tier, self.endpoint.replica_id)
        if self.owns_state:
            self.state.close()


@dataclasses.dataclass(frozen=True)
class EngineRegistry:
    """What an engine deployment needs to announce its gRPC endpoint, as a picklable value
    (workers/ may not import the Redis side: cluster/app.py hands this to the deployment)."""

    redis_url: str
    cluster: str = "default"
    heartbeat_ttl_s: float = 10.0
    load_window_s: float = 10.0
    load_push_every_steps: int = 16

    @classmethod
    def from_config(cls, cfg: StateConfig) -> EngineRegistry:
        """From the state config (its redis_url filled in)."""
        if not cfg.redis_url:
            raise ValueError("state.redis_url must be set for engines to announce themselves")
        return cls(
            cfg.redis_url, cfg.cluster, cfg.heartbeat_ttl_s, cfg.load_window_s,
            cfg.load_push_every_steps,
        )  # fmt: skip

    def cluster_state(self) -> ClusterState:
        """A new ClusterState on this registry's Redis (the caller closes it)."""
        from moeray.cluster.state import ClusterState

        return ClusterState(
            self.redis_url, self.cluster, heartbeat_ttl_s=self.heartbeat_ttl_s,
            load_window_s=self.load_window_s,
        )  # fmt: skip

    def announce(
        self, tier: str, replica_id: str, address: str, token: str, max_prompt_bytes: int = 0
    ) -> EndpointAnnouncer:
        """Starts announcing; the caller closes the returned announcer on shutdown."""
        state = self.cluster_state()
        endpoint = EngineEndpoint(tier, replica_id, address, token, max_prompt_bytes)
        announcer = EndpointAnnouncer(state, endpoint)
        announcer.owns_state = True
        return announcer.start()
