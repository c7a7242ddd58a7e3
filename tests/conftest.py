"""Shared pytest fixtures: a real, private redis-server per test, and a guard against leaks.

- `redis_server`: a started `moeray.cluster.redis_server.RedisServer` (`.url`, `.stop()`,
  `.restart()`), empty, stopped when the test ends whatever happens.
- `redis_url`: just its URL, for tests that never stop or restart Redis.
- `cluster_state`: a `ClusterState` on that server, closed at the end.

Every RedisServer the fixtures create is stopped at teardown; if a redis-server child of this
process is still alive when the session ends, it is killed and the session fails.

FOOTGUN: this one process holds gRPC channels and servers (many modules test them in-process)
and also starts Ray instances, which fork its GCS and raylet from here. With gRPC's fork support
on, a fork while a gRPC thread is busy ("skipping fork() handlers") once left the forked child
stuck before it could exec the GCS (ray.init timed out). gRPC's fork handlers are for children
that keep using gRPC, which none of ours do: they are turned off for the test process, before
anything imports grpc.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from moeray.cluster.redis_server import RedisServer
from moeray.cluster.state import ClusterState


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    srv = RedisServer().start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def cluster_state(redis_server: RedisServer) -> Iterator[ClusterState]:
    state = ClusterState(redis_server.url, cluster="test")
    try:
        yield state
    finally:
        state.close()


def _redis_children(pid: int) -> list[int]:
    """Pids of live redis-server processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may contain spaces, so split at ')'
        comm = text[text.find("(") + 1 : text.rfind(")")]
        fields = text[text.rfind(")") + 2 :].split()
        if comm.startswith("redis-server") and fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fails the session if a test left a redis-server child running, and kills those."""
    leaked = _redis_children(os.getpid()) if Path("/proc").exists() else []
    if not leaked:
        return
    for pid in leaked:  # our own children, started by a test that forgot to stop them
        os.kill(pid, signal.SIGKILL)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"ERROR: tests leaked redis-server processes {leaked}", red=True)
