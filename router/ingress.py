"""The router's Serve ingress deployment: the gRPC servicer of moeray.v1.Inference and
grpc.health.v1.Health, plus the OpenAI HTTP app, in one thin class.

Serve's gRPC proxy (on --grpc-port) deserializes each call with the registered service's types
and invokes the method of the same name here (Generate, Route, ..., Check, Watch, List); it also
answers server reflection itself. Serve's HTTP proxy (on --http-port) sends HTTP requests to the
FastAPI app that `__serve_build_asgi_app__` builds (router/http_app.py). Both transports share one
`InferenceService`, so admission counts and metrics cover both.

This class only converts (router/convert.py) and maps errors to status codes:
RequestError -> INVALID_ARGUMENT, Overloaded -> RESOURCE_EXHAUSTED, anything else -> INTERNAL
with one sentence (never a traceback). For streams the code is set on the context and the error
re-raised: Serve's replica then forwards the user-set code and details (gRPCStatusError).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2
from moeray.cluster.config import MoerayConfig
from moeray.protos import SERVICE_NAME
from moeray.router import convert
from moeray.router.convert import RequestError
from moeray.router.service import InferenceService, Overloaded, TierSnapshot
from moeray.v1 import inference_pb2 as pb
from moeray.workers.io_struct import RequestOutput

log = logging.getLogger(__name__)

HEALTH_WATCH_POLL_S = 1.0
#: Trailing metadata of Generate: the engine's own time for the request, in ms, so clients and
#: bench/frontdoor.py can compute the front door's overhead per request.
ENGINE_TIME_KEY = "moeray-engine-time-ms"
#: See workers/engine_deployment.py: a short GIL switch interval shortens thread hand-offs.
GIL_SWITCH_INTERVAL_S = 2e-4
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class RpcError(Exception):
    """Raised after the status is set on the context, to end a stream with that status."""


def _fail(grpc_context: Any, code: grpc.StatusCode, details: str) -> NoReturn:
    grpc_context.set_code(code)
    grpc_context.set_details(details)
    raise RpcError(details)


def _status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, RequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
    log.exception("request failed")
    return grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}"


class RouterIngress:
    """Serve ingress of the moeray app (cluster/app.py applies serve.ingress + serve.deployment).

    config: the validated root config; engines: tier name -> engine DeploymentHandle.
    """

    def __init__(self, config: MoerayConfig, engines: Mapping[str, Any]) -> None:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        state = None
        if config.state.redis_url:
            from moeray.cluster.state import ClusterState

            state = ClusterState.from_config(config.state, config.state.redis_url)
        self.config = config
        self.service = InferenceService(config, engines, state=state)

    def __serve_build_asgi_app__(self) -> Any:
        from moeray.router.http_app import build_http_app

        return build_http_app(self.service)

    # ---- moeray.v1.Inference -----------------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Streams GenerateResponses; the route decision rides on the first."""
        try:
            call = convert.generate_call_from_proto(request, self.service.limits)
            first = True
            async for decision, out in self.service.generate(call, "grpc"):
                if out.finished and grpc_context is not None:  # rides with the last message
                    grpc_context.set_trailing_metadata([(ENGINE_TIME_KEY, _ms(out))])
                yield convert.output_to_proto(out, decision.tier, decision if first else None)
                first = False
        except Exception as e:  # mapped to a status code with one sentence, never a traceback
            _fail(grpc_context, *_status_of(e))

    async def Route(self, request: pb.RouteRequest, grpc_context: Any = None) -> pb.RouteResponse:
        try:
            inp = convert.route_input_from_proto(request, self.service.limits)
            decision = self.service.decide(inp)
        except RequestError as e:
            _fail(grpc_context, *_status_of(e))
        return convert.route_response_to_proto(decision, self.service.features(inp))

    async def ListTiers(
        self, request: pb.ListTiersRequest, grpc_context: Any = None
    ) -> pb.ListTiersResponse:
        return convert.tiers_to_proto(self.config)

    async def GetClusterStatus(
        self, request: pb.GetClusterStatusRequest, grpc_context: Any = None
    ) -> pb.GetClusterStatusResponse:
        try:
            snaps = await self.service.snapshot(request.tier)
        except RequestError as e:
            _fail(grpc_context, *_status_of(e))
        return pb.GetClusterStatusResponse(
            cluster=self.config.state.cluster, tiers=[_tier_status(s) for s in snaps]
        )

    async def Abort(self, request: pb.AbortRequest, grpc_context: Any = None) -> pb.AbortResponse:
        return pb.AbortResponse(found=self.service.abort(request.request_id))

    # ---- grpc.health.v1.Health ---------------------------------------------------------------

    async def _health(self, service: str) -> int | None:
        """SERVING when every tier's engine answers; None for a service this server lacks."""
        if service not in ("", SERVICE_NAME):
            return None
        stats = await asyncio.gather(*(self.service.engine_stats(t) for t in self.service.engines))
        return _SERVING if all(stats) else _NOT_SERVING

    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None
    ) -> health_pb2.HealthCheckResponse:
        status = await self._health(request.service)
        if status is None:
            _fail(grpc_context, grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The current status, then every change, until the client goes away."""
        last = None
        while True:
            status = await self._health(request.service)
            if status is None:
                status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(HEALTH_WATCH_POLL_S)

    async def List(
        self, request: health_pb2.HealthListRequest, grpc_context: Any = None
    ) -> health_pb2.HealthListResponse:
        status = await self._health("")
        assert status is not None
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status) for name in ("", SERVICE_NAME)
            }
        )


def _ms(out: RequestOutput) -> str:
    return f"{out.engine_time_s * 1e3:.3f}"


def _tier_status(s: TierSnapshot) -> pb.TierStatus:
    msg = pb.TierStatus(
        name=s.name,
        model=s.model,
        placement_epoch=s.placement_epoch,
        inflight=s.inflight,
        max_inflight=s.max_inflight,
        saturated=s.inflight >= s.max_inflight,
        replicas=[
            pb.ReplicaInfo(replica_id=e.replica_id, kind="engine", node=e.node, device=e.device,
                           state="running")
            for e in s.engines
        ] + [
            pb.ReplicaInfo(replica_id=str(r.replica_id), kind="expert_shard", node=r.node,
                           device=r.device, state=r.state, num_experts=len(r.experts))
            for r in s.shards
        ],
    )  # fmt: skip
    if s.expert_load is not None:
        msg.expert_load.CopyFrom(_load_summary(s.expert_load, s.load_window_s))
    return msg


def _load_summary(load: Any, window_s: float, top: int = 8) -> pb.ExpertLoadSummary:
    """[L, E] token counts -> total, imbalance (max / mean) and the hottest pairs."""
    total = int(load.sum())
    mean = total / load.size if load.size else 0.0
    flat = sorted(
        ((int(load[li, e]), li, e) for li in range(load.shape[0]) for e in range(load.shape[1])),
        reverse=True,
    )
    return pb.ExpertLoadSummary(
        total_tokens=total,
        imbalance=float(load.max() / mean) if mean else 1.0,
        window_s=window_s,
        hottest=[pb.ExpertLoad(layer=li, expert=e, tokens=n) for n, li, e in flat[:top] if n],
    )
