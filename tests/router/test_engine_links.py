"""router/engine_links.py against real parts: engine channels on loopback serving a tiny model,
their endpoints in a real redis-server, the links refreshed from it."""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from moeray.cluster.redis_server import RedisServer
from moeray.cluster.state import ClusterState, EngineRegistry
from moeray.cluster.state_messages import EngineEndpoint
from moeray.router.engine_links import RETRY_AFTER_S, EngineLinks
from moeray.workers import SamplingParams
from moeray.workers.async_engine import AsyncLLMEngine
from moeray.workers.engine import LLMEngine
from moeray.workers.engine_channel import ChannelError, EngineChannelServer

from tests.checkpoints import make_tiny_checkpoint

PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[EngineChannelServer]]:
    path: Path = make_tiny_checkpoint(tmp_path_factory.mktemp("links"), "mixtral")
    servers = []
    try:
        for _ in range(2):
            server = EngineChannelServer(AsyncLLMEngine(LLMEngine(path)), secrets.token_hex(8))
            server.start()
            servers.append(server)
        yield servers
    finally:
        for server in servers:
            server.close()
            server.engine.shutdown()


def announce(state: ClusterState, servers: list[EngineChannelServer]) -> None:
    for i, s in enumerate(servers):
        state.register_engine(EngineEndpoint("fast", f"rep-{i}", s.address, s.token))


def test_links_follow_redis_and_balance_open_streams(
    cluster_state: ClusterState, engines: list[EngineChannelServer]
) -> None:
    announce(cluster_state, engines)

    async def main() -> None:
        links = EngineLinks(cluster_state, ["fast", "reasoning"])
        try:
            assert links.pick("fast") is None  # nothing read yet: the caller uses the handle
            await links.refresh()
            assert sorted(lk.replica_id for lk in links.links("fast")) == ["rep-0", "rep-1"]
            assert links.pick("reasoning") is None
            # Two long streams land on different replicas (fewest open streams first).
            a = links.pick("fast")
            assert a is not None
            it_a = a.generate("a", "hello", LONG).__aiter__()
            await it_a.__anext__()
            b = links.pick("fast")
            assert b is not None and b is not a
            out = [o async for o in b.generate("b", "hi", PARAMS)]
            assert out[-1].usage.completion_tokens == 4
            # rep-0 leaves Redis: it is retired, closed only once its open stream has ended.
            cluster_state.remove_engine("fast", a.replica_id)
            await links.refresh()
            assert [lk.replica_id for lk in links.links("fast")] == [b.replica_id]
            assert not a.closed and a.inflight == 1
            await it_a.aclose()  # type: ignore[attr-defined]
            await links.refresh()
            assert a.closed
        finally:
            await links.close()

    asyncio.run(main())


def test_a_failed_link_is_skipped_then_retried(
    cluster_state: ClusterState, engines: list[EngineChannelServer]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    cluster_state.register_engine(EngineEndpoint("fast", "dead", f"127.0.0.1:{dead_port}", "t"))
    cluster_state.register_engine(
        EngineEndpoint("fast", "live", engines[0].address, engines[0].token)
    )

    async def main() -> None:
        links = EngineLinks(cluster_state, ["fast"])
        try:
            await links.refresh()
            dead = next(lk for lk in links.links("fast") if lk.replica_id == "dead")
            with pytest.raises(ChannelError, match="cannot reach"):
                async for _ in dead.generate("x", "hi", PARAMS):
                    pass
            for _ in range(10):  # the failed link is not picked again for RETRY_AFTER_S
                picked = links.pick("fast")
                assert picked is not None and picked.replica_id == "live"
            dead.failed_at -= RETRY_AFTER_S + 1  # time passes
            picks = {lk.replica_id for _ in range(50) if (lk := links.pick("fast")) is not None}
            assert picks == {"dead", "live"}
        finally:
            await links.close()

    asyncio.run(main())


def test_refresh_task_survives_redis_going_away(
    redis_server: RedisServer, engines: list[EngineChannelServer]
) -> None:
    """The background task keeps the links it has while Redis is down and picks up new ones
    after it returns (the engine's announcer re-registers within a third of its TTL)."""
    srv = redis_server
    state = ClusterState(srv.url, "test", socket_timeout_s=0.3)
    registry = EngineRegistry(srv.url, "test", heartbeat_ttl_s=0.9)
    announcer = registry.announce("fast", "rep-0", engines[0].address, engines[0].token)

    async def main() -> None:
        links = EngineLinks(state, ["fast"], refresh_s=0.1)
        links.start()
        try:
            await wait_for(lambda: len(links.links("fast")) == 1)
            srv.stop()
            await asyncio.sleep(0.5)
            assert [lk.replica_id for lk in links.links("fast")] == ["rep-0"]  # kept
            link = links.pick("fast")
            assert link is not None
            out = [o async for o in link.generate("r", "hi", PARAMS)]  # serving goes on
            assert out[-1].finished
            srv.start()
            state.register_engine(
                EngineEndpoint("fast", "rep-1", engines[1].address, engines[1].token)
            )
            await wait_for(lambda: len(links.links("fast")) == 2, timeout_s=15)
        finally:
            await links.close()

    try:
        asyncio.run(main())
    finally:
        announcer.close()
        state.close()


async def wait_for(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)
