"""ClusterState and its background helpers against a real redis-server.

Oracles: what was written (placement round trip, counts pushed), plain Python arithmetic (load
sums, histograms), and the rules of the control plane (exactly one CAS winner per epoch, one
lease holder, TTL expiry, epochs never going backwards across a Redis restart).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import redis
from moeray.cluster.placement import initial_placement
from moeray.cluster.redis_server import RedisServer
from moeray.cluster.state import (
    ENGINE_WIRE,
    ClusterState,
    EndpointAnnouncer,
    EngineRegistry,
    EpochConflict,
    Heartbeater,
    LoadReporter,
    PlacementWatcher,
)
from moeray.cluster.state_messages import (
    EngineEndpoint,
    Placement,
    ReplicaInfo,
)


def wait_until(cond: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def placement(shift: int = 0) -> Placement:
    """A 2-layer, 5-expert placement over 3 shards; `shift` makes distinct layouts."""
    return Placement.from_lists([[[(e + shift + li) % 3] for e in range(5)] for li in range(2)])


# ---- messages and bad input ---------------------------------------------------------------------


def test_placement_round_trips_compactly() -> None:
    p = initial_placement(3, 7, 4, replicas=2).with_epoch(5)
    q = Placement.from_json(p.to_json(), 5)
    assert q == p and q.replicas(1, 6) == p.mapping[1][6]
    assert p.experts_of(0) == {
        li: [e for e in range(7) if 0 in p.mapping[li][e]] for li in range(3)
    }
    assert len(p.to_json()) < 200  # nested arrays, not one record per expert


@pytest.mark.parametrize(
    ("mapping", "message"),
    [([[[0], []]], "mapping\\[0\\]\\[1\\]"), ([[[0], [-1]]], "mapping\\[0\\]\\[1\\]")],
)
def test_placement_rejects_bad_mappings(mapping: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Placement.from_lists(mapping)
    with pytest.raises(ValueError, match="num_experts"):
        Placement(0, 1, 3, [[[0], [1]]])


@pytest.mark.parametrize(
    "url", ["", "localhost:6379", "http://localhost:6379", "redis://", "redis://h:notaport/0"]
)
def test_malformed_url_names_redis_url(url: str) -> None:
    with pytest.raises(ValueError, match="redis_url"):
        ClusterState(url)


def test_bad_names_and_shapes_name_the_argument(cluster_state: ClusterState) -> None:
    with pytest.raises(ValueError, match="cluster"):
        ClusterState("redis://127.0.0.1:1/0", cluster="a b")
    with pytest.raises(ValueError, match="model"):
        cluster_state.read_placement("bad model")
    with pytest.raises(ValueError, match="counts"):
        cluster_state.push_load("m", np.ones(4, dtype=np.int64))
    with pytest.raises(ValueError, match="counts"):
        cluster_state.push_load("m", -np.ones((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="counts"):
        cluster_state.push_load("m", np.ones((2, 2)) * 0.5)
    with pytest.raises(ValueError, match="num_windows"):
        cluster_state.read_load("m", 2, 2, num_windows=0)
    with pytest.raises(ValueError, match="expected_epoch"):
        cluster_state.publish_placement("m", placement(), expected_epoch=-2)
    with pytest.raises(ValueError, match="ttl_s"):
        cluster_state.acquire_lease("m", "a", ttl_s=0)
    reporter = LoadReporter(cluster_state, "m", 2, 3)
    with pytest.raises(ValueError, match="counts"):
        reporter.add(np.ones((3, 2), dtype=np.int64))


# ---- placement ----------------------------------------------------------------------------------


def test_publish_assigns_increasing_epochs_and_reads_back(cluster_state: ClusterState) -> None:
    assert cluster_state.read_placement("m") is None and cluster_state.read_epoch("m") == 0
    p1 = cluster_state.publish_placement("m", placement(0), expected_epoch=0)
    p2 = cluster_state.publish_placement("m", placement(1), expected_epoch=1)
    assert (p1.epoch, p2.epoch) == (1, 2)
    assert cluster_state.read_placement("m") == p2 and cluster_state.read_epoch("m") == 2
    with pytest.raises(EpochConflict) as err:
        cluster_state.publish_placement("m", placement(2), expected_epoch=1)
    assert err.value.current_epoch == 2 and cluster_state.read_placement("m") == p2
    keys = sorted(cluster_state.client.keys("*"))
    assert keys == ["moeray:test:placement:m"]  # one key per model, namespaced


def test_compare_and_set_has_one_winner_per_epoch(redis_server: RedisServer) -> None:
    writers = [ClusterState(redis_server.url, cluster="cas") for _ in range(2)]
    rounds, wins = 15, [0, 0]
    for r in range(rounds):
        barrier = threading.Barrier(2)

        def write(i: int, r: int = r, barrier: threading.Barrier = barrier) -> None:
            barrier.wait(timeout=5)
            try:
                writers[i].publish_placement("m", placement(i), expected_epoch=r)
                wins[i] += 1
            except EpochConflict:
                pass

        threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
    assert sum(wins) == rounds  # exactly one of the two won each round
    assert writers[0].read_epoch("m") == rounds
    for w in writers:
        w.close()


def test_republish_never_lowers_the_epoch(cluster_state: ClusterState) -> None:
    p = cluster_state.publish_placement("m", placement(0))
    p = cluster_state.publish_placement("m", placement(1))
    cluster_state.client.flushall()  # what a restart does
    assert cluster_state.republish("m", p) == 2 and cluster_state.read_placement("m") == p
    assert cluster_state.republish("m", placement(0).with_epoch(1)) == 2  # stale: ignored
    assert cluster_state.read_placement("m") == p


def test_watcher_learns_new_epochs_by_pubsub(cluster_state: ClusterState) -> None:
    seen: list[int] = []
    # A poll interval far beyond the test: only the pub/sub announcement can deliver in time.
    with PlacementWatcher(
        cluster_state, "m", poll_interval_s=60, on_change=lambda p: seen.append(p.epoch)
    ) as w:
        assert wait_until(lambda: w.connected, 5)
        for i in range(3):
            p = cluster_state.publish_placement("m", placement(i))
            assert w.wait_for_epoch(p.epoch, timeout_s=5)
            assert w.placement == p
    assert seen == [1, 2, 3]


def test_watcher_falls_back_to_polling(cluster_state: ClusterState) -> None:
    with PlacementWatcher(cluster_state, "m", poll_interval_s=0.1) as w:
        # Written without an announcement (as if the message were lost): the poll finds it.
        key = cluster_state.key("placement", "m")
        cluster_state.client.hset(key, mapping={"epoch": 4, "body": placement(2).to_json()})
        assert w.wait_for_epoch(4, timeout_s=5)
        assert w.placement == placement(2).with_epoch(4)


# ---- replicas -----------------------------------------------------------------------------------


def _info(i: int, state: str = "ready") -> ReplicaInfo:
    return ReplicaInfo(i, f"shard-{i}", node="n0", experts=((0, i), (1, i)), state=state)  # type: ignore[arg-type]


def test_replica_registry_and_heartbeat_expiry(cluster_state: ClusterState) -> None:
    cluster_state.register_replica("m", _info(0), ttl_s=0.3)
    cluster_state.register_replica("m", _info(1), ttl_s=5)
    got = cluster_state.live_replicas("m")
    assert [i.replica_id for i in got] == [0, 1] and got[0].experts == ((0, 0), (1, 0))
    assert got[0].actor_name == "shard-0" and got[0].heartbeat_ms > 0
    assert wait_until(lambda: [i.replica_id for i in cluster_state.live_replicas("m")] == [1], 3)
    assert not cluster_state.heartbeat("m", 0)  # expired: it must register again
    assert cluster_state.client.smembers(cluster_state.key("replicas", "m")) == {"1"}
    assert cluster_state.heartbeat("m", 1, ttl_s=5)
    assert cluster_state.set_replica_state("m", 1, "draining")
    assert cluster_state.live_replicas("m")[0].state == "draining"
    assert cluster_state.mark_dead("m", 1)
    assert cluster_state.live_replicas("m") == [] and len(cluster_state.replicas("m")) == 1
    cluster_state.remove_replica("m", 1)
    assert cluster_state.replicas("m") == []


def test_heartbeats_keep_a_replica_alive(cluster_state: ClusterState) -> None:
    cluster_state.register_replica("m", _info(3), ttl_s=0.3)
    for _ in range(8):  # 0.8 s, well past the TTL
        time.sleep(0.1)
        assert cluster_state.heartbeat("m", 3, ttl_s=0.3)
    assert [i.replica_id for i in cluster_state.live_replicas("m")] == [3]


def test_heartbeater_registers_and_advertises_state(cluster_state: ClusterState) -> None:
    with Heartbeater(cluster_state, "m", _info(2, state="starting"), interval_s=0.1) as beat:
        assert wait_until(
            lambda: [i.state for i in cluster_state.live_replicas("m")] == ["starting"]
        )
        beat.set_state("ready")  # written at once, and kept by later beats
        assert cluster_state.live_replicas("m")[0].state == "ready"
        cluster_state.client.flushall()  # Redis forgot it: the next beat registers it again
        assert wait_until(lambda: [i.state for i in cluster_state.live_replicas("m")] == ["ready"])
    assert beat.registrations >= 2
    with pytest.raises(ValueError, match="state"):
        ReplicaInfo(0, "shard-0", state="gone")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interval_s"):
        Heartbeater(cluster_state, "m", _info(0), interval_s=cluster_state.heartbeat_ttl_s)


# ---- engine endpoints ---------------------------------------------------------------------------


def test_engine_endpoints_register_expire_and_leave(cluster_state: ClusterState) -> None:
    a = EngineEndpoint("fast", "rep-a", "10.0.0.1:4000", "tok-a")
    b = EngineEndpoint("fast", "rep-b", "10.0.0.2:4001", "tok-b", max_prompt_bytes=57344)
    cluster_state.register_engine(a, ttl_s=0.3)
    cluster_state.register_engine(b, ttl_s=5)
    cluster_state.register_engine(EngineEndpoint("reasoning", "rep-c", "h:1", "t"))
    assert cluster_state.engine_endpoints("fast") == [a, b]  # max_prompt_bytes 0 and 57344
    assert wait_until(lambda: cluster_state.engine_endpoints("fast") == [b], 3)
    assert cluster_state.client.smembers(cluster_state.key("engines", ENGINE_WIRE, "fast")) == {
        "rep-b"
    }
    cluster_state.remove_engine("fast", "rep-b")
    assert cluster_state.engine_endpoints("fast") == []
    # An engine of the previous wire protocol (keys without it, as a release before ENGINE_WIRE
    # wrote them, sharing the namespace during an upgrade) is not one this router can talk to.
    cluster_state.client.set(cluster_state.key("engine", "fast", "old"), a.to_json())
    cluster_state.client.sadd(cluster_state.key("engines", "fast"), "old")
    assert cluster_state.engine_endpoints("fast") == []
    assert [e.replica_id for e in cluster_state.engine_endpoints("reasoning")] == ["rep-c"]
    for bad, field in ((("fast", "r", "nohost", "t"), "address"), (("fast", "r", "h:0", "t"), "address"),
                       (("fast", "r", "h:1", ""), "token"), (("fa st", "r", "h:1", "t"), "tier"),
                       (("fast", "r/../x y", "h:1", "t"), "replica_id"),
                       (("fast", "r", "h:1", "t", -1), "max_prompt_bytes"),
                       (("fast", "r", "h:1", "t", True), "max_prompt_bytes")):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            EngineEndpoint(*bad)
    # Fields a newer version appends are ignored; a record short of four fields is refused.
    assert EngineEndpoint.from_json('["fast", "r", "h:1", "t", 9, "later"]').max_prompt_bytes == 9
    assert EngineEndpoint.from_json('["fast", "r", "h:1", "t"]').max_prompt_bytes == 0
    with pytest.raises(ValueError, match="record"):
        EngineEndpoint.from_json('["fast", "r", "h:1"]')


def test_announcer_keeps_an_endpoint_and_removes_it_on_close(redis_server: RedisServer) -> None:
    state = ClusterState(redis_server.url, "test", heartbeat_ttl_s=0.6)
    reader = ClusterState(redis_server.url, "test")
    try:
        ep = EngineEndpoint("fast", "rep-a", "127.0.0.1:4000", "tok")
        with EndpointAnnouncer(state, ep, interval_s=0.1):
            assert wait_until(lambda: reader.engine_endpoints("fast") == [ep])
            time.sleep(1.0)  # past the TTL: refreshed
            assert reader.engine_endpoints("fast") == [ep]
            reader.client.flushall()  # Redis lost its memory: announced again
            assert wait_until(lambda: reader.engine_endpoints("fast") == [ep])
        assert reader.engine_endpoints("fast") == []  # close() removed it
        registry = EngineRegistry(redis_server.url, "test", heartbeat_ttl_s=5.0)
        announcer = registry.announce("fast", "rep-b", "127.0.0.1:4001", "tok-b")
        try:
            assert wait_until(lambda: [e.replica_id for e in reader.engine_endpoints("fast")]
                              == ["rep-b"])  # fmt: skip
        finally:
            announcer.close()
        assert reader.engine_endpoints("fast") == []
    finally:
        reader.close()
        state.close()


# ---- load ---------------------------------------------------------------------------------------


def test_load_windows_sum(cluster_state: ClusterState) -> None:
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, 5, size=(3, 4)) for _ in range(3))
    now = 1_000_000.0
    w = cluster_state.load_window_s
    cluster_state.push_load("m", a, now=now - w)  # previous window
    cluster_state.push_load("m", b, now=now)
    cluster_state.push_load("m", c, now=now + 0.5)  # same window as b
    assert cluster_state.push_load("m", np.zeros((3, 4), dtype=np.int64), now=now) == 0
    np.testing.assert_array_equal(cluster_state.read_load("m", 3, 4, num_windows=1, now=now), b + c)
    np.testing.assert_array_equal(
        cluster_state.read_load("m", 3, 4, num_windows=2, now=now), a + b + c
    )
    with pytest.raises(ValueError, match="outside"):
        cluster_state.read_load("m", 2, 4, num_windows=2, now=now)


def test_load_windows_expire(redis_server: RedisServer) -> None:
    state = ClusterState(redis_server.url, "exp", load_window_s=0.1, load_windows_kept=2)
    now = time.time()
    state.push_load("m", np.ones((2, 2), dtype=np.int64), now=now)
    assert state.read_load("m", 2, 2, num_windows=1, now=now).sum() == 4
    assert wait_until(lambda: state.read_load("m", 2, 2, num_windows=1, now=now).sum() == 0, 3)
    state.close()


def test_load_reporter_batches_without_losing_counts(cluster_state: ClusterState) -> None:
    total = np.zeros((2, 3), dtype=np.int64)
    with LoadReporter(cluster_state, "m", 2, 3, push_every_steps=4, max_interval_s=60) as rep:
        for step in range(3):  # fewer steps than a batch: nothing travels yet
            counts = np.arange(6).reshape(2, 3) + step
            rep.add(counts)
            total += counts
        time.sleep(0.2)
        assert rep.pushed_total == 0 and rep.pending_total == total.sum()
        rep.add(np.ones((2, 3), dtype=np.int64))  # the 4th step makes a batch due
        total += 1
        assert wait_until(lambda: rep.pushed_total == total.sum())
        rep.add(np.full((2, 3), 2, dtype=np.int64))
        total += 2
        assert rep.flush() and rep.pending_total == 0
    np.testing.assert_array_equal(cluster_state.read_load("m", 2, 3, num_windows=2), total)


# ---- leases -------------------------------------------------------------------------------------


def test_lease_is_exclusive_renewable_and_expires(cluster_state: ClusterState) -> None:
    s = cluster_state
    assert s.acquire_lease("m", "a", ttl_s=0.3)
    assert not s.acquire_lease("m", "b", ttl_s=5) and s.lease_owner("m") == "a"
    assert s.acquire_lease("m", "a", ttl_s=0.3)  # re-acquiring one's own lease renews it
    assert not s.renew_lease("m", "b", ttl_s=5) and not s.release_lease("m", "b")
    for _ in range(4):  # renewals keep it past its TTL
        time.sleep(0.1)
        assert s.renew_lease("m", "a", ttl_s=0.3)
    assert wait_until(lambda: s.lease_owner("m") is None, 3)  # not renewed: it lapses
    assert s.acquire_lease("m", "b", ttl_s=5)
    assert not s.release_lease("m", "a") and s.lease_owner("m") == "b"
    assert s.release_lease("m", "b") and s.lease_owner("m") is None


def test_lease_race_has_one_winner(redis_server: RedisServer) -> None:
    states = [ClusterState(redis_server.url, "race") for _ in range(4)]
    barrier, won = threading.Barrier(4), [False] * 4

    def grab(i: int) -> None:
        barrier.wait(timeout=5)
        won[i] = states[i].acquire_lease("m", f"owner-{i}", ttl_s=5)

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sum(won) == 1 and states[0].lease_owner("m") == f"owner-{won.index(True)}"
    for s in states:
        s.close()


# ---- tiers --------------------------------------------------------------------------------------


def test_redis_restart_while_watcher_reporter_and_heartbeater_run(
    redis_server: RedisServer,
) -> None:
    """Redis dies and comes back empty: nothing raises, the engine keeps its placement, the
    watcher republishes it (same epoch) and re-subscribes, the replica re-registers, and the
    counts added during the outage reach Redis once it is back."""
    state = ClusterState(redis_server.url, "rs", socket_timeout_s=0.5, heartbeat_ttl_s=1.0)
    escaped: list[str] = []
    old_hook = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        escaped.append(f"{args.exc_type.__name__}: {args.exc_value}")

    threading.excepthook = hook
    watcher = PlacementWatcher(state, "m", poll_interval_s=60, backoff_max_s=0.2).start()
    reporter = LoadReporter(state, "m", 2, 5, push_every_steps=1, backoff_max_s=0.2).start()
    beat = Heartbeater(state, "m", _info(7), interval_s=0.1, backoff_max_s=0.2).start()
    try:
        state.publish_placement("m", placement(0))
        p2 = state.publish_placement("m", placement(1))
        assert watcher.wait_for_epoch(2, timeout_s=5)
        assert wait_until(lambda: len(state.live_replicas("m")) == 1)

        redis_server.stop()
        outage = np.zeros((2, 5), dtype=np.int64)
        for step in range(5):  # the engine keeps stepping during the outage
            counts = np.full((2, 5), step + 1, dtype=np.int64)
            reporter.add(counts)
            outage += counts
            assert watcher.placement == p2  # cached, never blocks
            time.sleep(0.05)
        assert wait_until(lambda: not watcher.connected and reporter.errors > 0, 5)
        assert reporter.pending_total == outage.sum()  # kept, not dropped

        redis_server.start()
        assert wait_until(lambda: state.read_epoch("m") == 2, 10)  # republished, same epoch
        assert state.read_placement("m") == p2 and watcher.republished >= 1
        assert wait_until(lambda: reporter.pending_total == 0, 10)
        np.testing.assert_array_equal(state.read_load("m", 2, 5, num_windows=2), outage)
        assert wait_until(lambda: [i.replica_id for i in state.live_replicas("m")] == [7], 5)
        # Re-subscribed: a new epoch arrives by pub/sub (the poll is 60 s away).
        p3 = state.publish_placement("m", placement(2), expected_epoch=2)
        assert watcher.wait_for_epoch(3, timeout_s=5) and watcher.placement == p3
    finally:
        t0 = time.monotonic()
        for bg in (watcher, reporter, beat):
            bg.close(timeout_s=3)
        closing_s = time.monotonic() - t0
        threading.excepthook = old_hook
        state.close()
    assert escaped == [] and closing_s < 5
    assert not any(t.is_alive() for t in (watcher._thread, reporter._thread, beat._thread))


def test_client_errors_are_redis_errors_when_down(redis_server: RedisServer) -> None:
    state = ClusterState(redis_server.url, "down", socket_timeout_s=0.3, retries=0)
    redis_server.stop()
    assert not state.ping()
    with pytest.raises(redis.ConnectionError):
        state.read_placement("m")
    state.close()
