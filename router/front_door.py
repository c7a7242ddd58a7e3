"""The router replica: serves the front-door ports itself, gRPC and HTTP, on one event loop.

cluster/app.py deploys `FrontDoor` as the app's ingress Serve deployment (at most one replica per
node, since each replica listens on the configured ports of its node). Serve places, restarts and
health-checks the replica; the ports are this replica's own servers, started on a thread with
one asyncio loop:

- gRPC (grpc.aio) on serve.host:serve.grpc_port: moeray.v1.Inference (router/ingress.py),
  grpc.health.v1.Health (grpcio's servicer; SERVING while every tier has an engine replica that
  answers, re-checked every HEALTH_POLL_S) and server reflection;
- HTTP (uvicorn) on serve.host:serve.http_port: the OpenAI API, /health, /metrics
  (router/http_app.py).

Both share one InferenceService, so admission counts and metrics cover both protocols. Requests
reach the engines over the one internal transport (router/engine_links.py); nothing goes through
Serve's proxies or handles.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import threading
from collections.abc import Mapping
from typing import Any

import grpc
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from moeray.cluster.config import MoerayConfig
from moeray.cluster.logs import setup_logging
from moeray.protos import SERVICE_NAME
from moeray.router.http_app import build_http_app
from moeray.router.ingress import InferenceServicer, add_to_server
from moeray.router.service import InferenceService

log = logging.getLogger(__name__)

HEALTH_POLL_S = 0.5
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def grpc_server_options(config: MoerayConfig) -> list[tuple[str, int]]:
    """The front door's gRPC server arguments.

    grpc-core queues calls that arrived but that the asyncio server has not picked up yet; past
    `grpc.server.max_pending_requests` (default 1000) it drops a random share of new ones with a
    bare CANCELLED (random early detection), before any moeray code can answer. A 10x burst
    against the router's admission limit lost ~300 of 2304 calls that way, so the queue holds
    10,000 calls or sixteen times everything the tiers admit, whichever is more: the router
    refuses the excess itself, with RESOURCE_EXHAUSTED and a reason. Beyond three times that,
    grpc-core still sheds load."""
    admitted = config.router.max_inflight_per_tier * max(1, len(config.tiers))
    pending = max(10_000, 16 * admitted)
    return [
        ("grpc.max_receive_message_length", config.router.max_message_bytes + 1024),
        ("grpc.so_reuseport", 0),
        ("grpc.server.max_pending_requests", pending),
        ("grpc.server.max_pending_requests_hard_limit", 3 * pending),
    ]


class FrontDoor:
    """One router replica. config: the validated root config (state.redis_url set).

    engines: the tiers' engine deployments, bound here only so that Serve deploys them as part of
    this application; requests reach engine replicas over gRPC, never through these handles.
    """

    def __init__(self, config: MoerayConfig, engines: Mapping[str, Any] | None = None) -> None:
        from moeray.cluster.state import ClusterState

        setup_logging()
        if not config.state.redis_url:
            raise ValueError(
                "state.redis_url must be set: engine replicas announce themselves there"
            )
        self.config = config
        self._http_socket = _listen(config.serve.host, config.serve.http_port, "serve.http_port")
        state = ClusterState.from_config(config.state, config.state.redis_url)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="moeray-front-door",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        self._tasks: list[asyncio.Task[Any]] = []
        started = asyncio.run_coroutine_threadsafe(self._start(state), self._loop)
        started.result(60.0)
        # What startup built (Ray, gRPC, the policy) lives as long as the process: moved out of
        # the collector's view, a full collection no longer walks it. Measured under 10x
        # overload: a 145 ms gen-2 pause before, none over 2 ms after (docs/RELIABILITY.md).
        gc.collect()
        gc.freeze()

    async def _start(self, state: Any) -> None:
        self.service = InferenceService(self.config, state)
        self.service.links.start()
        # gRPC
        server = grpc.aio.server(options=grpc_server_options(self.config))
        add_to_server(InferenceServicer(self.service), server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server,
        )  # fmt: skip
        address = f"{_bracket(self.config.serve.host)}:{self.config.serve.grpc_port}"
        try:
            server.add_insecure_port(address)
        except RuntimeError as e:
            raise ValueError(f"serve.grpc_port: cannot listen on {address}: {e}") from None
        await server.start()
        self.grpc_server = server
        # HTTP
        cfg = uvicorn.Config(build_http_app(self.service), log_level="warning",
                             access_log=False, lifespan="off")  # fmt: skip
        self.http_server = uvicorn.Server(cfg)
        self._tasks.append(asyncio.create_task(self.http_server.serve(sockets=[self._http_socket])))
        self._tasks.append(asyncio.create_task(self._watch_health()))
        log.info("front door: gRPC on %s, HTTP on %s:%s", address, self.config.serve.host,
                 self.config.serve.http_port)  # fmt: skip

    async def _watch_health(self) -> None:
        """Keeps the Health service's statuses current (the overall one and moeray.v1.Inference)."""
        last = None
        while True:
            try:
                ok = await self.service.healthy()
            except Exception as e:  # never let the watcher die; report not serving
                log.warning("health check failed: %s", e)
                ok = False
            status = _SERVING if ok else _NOT_SERVING
            if status != last:
                for name in ("", SERVICE_NAME):
                    await self.health.set(name, status)
                last = status
            await asyncio.sleep(HEALTH_POLL_S)

    def check_health(self) -> None:
        """Serve's periodic health check: the servers' thread and tasks must be alive."""
        if not self._thread.is_alive() or any(t.done() for t in self._tasks):
            raise RuntimeError("the front door's servers have stopped")

    def close(self, timeout_s: float = 5.0) -> None:
        """Stops both servers and the loop's thread (idempotent)."""
        if not self._thread.is_alive():
            return

        async def stop() -> None:
            self.http_server.should_exit = True
            await self.grpc_server.stop(0.5)
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.service.links.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)

    def __del__(self) -> None:
        if hasattr(self, "_thread"):
            self.close()


def _listen(host: str, port: int, field: str) -> socket.socket:
    """A socket bound to host:port; a clear error naming the config field when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"{field}: cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(1024)
    return sock


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
