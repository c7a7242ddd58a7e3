"""The private redis-server: starts on a free loopback port, restarts empty on the same port,
always stops, and says clearly when the binary is missing; and free_port itself."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis
from moeray.cluster.redis_server import PORT_RANGE, RedisServer, RedisServerError, free_port


def _client(srv: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(srv.url, socket_timeout=1, socket_connect_timeout=1)


def test_start_answers_ping_on_loopback(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    c = _client(redis_server)
    assert c.ping()
    # No persistence: nothing is saved, so a restart must come back empty.
    assert c.config_get("save")["save"] == ""
    assert c.config_get("appendonly")["appendonly"] == "no"
    c.close()


def test_restart_keeps_the_port_and_loses_the_data(redis_server: RedisServer) -> None:
    c = _client(redis_server)
    c.set("k", "v")
    port, pid = redis_server.port, redis_server.pid
    redis_server.restart(down_s=0.05)
    assert redis_server.port == port and redis_server.pid != pid
    assert c.get("k") is None  # the client reconnects to the new, empty server
    c.close()


def test_stop_terminates_the_process() -> None:
    with RedisServer() as srv:
        proc = srv._proc
        assert proc is not None and srv.is_running()
        c = _client(srv)
        assert c.ping()
    assert proc.poll() is not None and not srv.is_running()
    with pytest.raises(redis.ConnectionError):
        c.ping()
    srv.stop()  # idempotent


def test_two_servers_get_different_ports() -> None:
    with RedisServer() as a, RedisServer() as b:
        assert a.port != b.port
        assert _client(a).ping() and _client(b).ping()


def test_missing_binary_is_a_clear_error() -> None:
    with pytest.raises(RedisServerError, match="not found on PATH"):
        RedisServer(binary="redis-server-that-does-not-exist").start()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"port": 70000}, "port"), ({"startup_timeout_s": 0}, "startup_timeout_s")],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RedisServer(**kwargs)  # type: ignore[arg-type]


def test_free_ports_lie_outside_the_ephemeral_range_and_are_not_repeated() -> None:
    """A port from the OS's ephemeral range can be taken by any outgoing connection before its
    user binds it; free_port hands out ports below that range, bindable, never twice lately."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(PORT_RANGE[0] <= p < PORT_RANGE[1] for p in ports)
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert max(ports) < low  # the machine's own ephemeral range starts above them
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", ports[-1]))
