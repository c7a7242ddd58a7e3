"""The gRPC servicer of moeray.v1.Inference: thin, on the router replica's event loop.

It only converts (router/convert.py) and maps errors to status codes: a body that is no valid
protobuf, or a RequestError ->
INVALID_ARGUMENT, Overloaded -> RESOURCE_EXHAUSTED, EngineUnavailable -> UNAVAILABLE (retryable),
DeadlineExceeded -> DEADLINE_EXCEEDED, anything else -> INTERNAL with one sentence (never a
traceback). Generate passes the client's deadline on to the engine call. Requests refused
before routing are counted in moeray_requests_total with tier "" (InferenceService counts the
rest). Health and reflection
are grpcio's own servicers, wired in router/front_door.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from moeray.router import convert
from moeray.router.chat_stream import ChatDelta, ChatStream
from moeray.router.convert import RequestError
from moeray.router.messages import GenerateCall
from moeray.router.service import (
    DeadlineExceeded,
    EngineUnavailable,
    InferenceService,
    Overloaded,
    TierSnapshot,
)
from moeray.router.tools import forced_tools, unparsed_tiers
from moeray.v1 import inference_pb2 as pb
from moeray.v1 import inference_pb2_grpc as pb_grpc
from moeray.workers.io_struct import InvalidRequest, RequestOutput, SamplingParams

log = logging.getLogger(__name__)

#: Trailing metadata of Generate: the engine's own time for the request, in ms, so clients and
#: bench/frontdoor.py can compute the front door's overhead per request.
ENGINE_TIME_KEY = "moeray-engine-time-ms"
#: A Generate call that ends without its message is refused as missing `request` after this
#: long, unless it turns out to be cancelled meanwhile (grpc.aio reads a cancel as the end of
#: the messages and cancels the handler a moment later).
MISSING_REQUEST_GRACE_S = 0.05
#: SamplingParams' fields: an engine names them bare, the proto within `sampling`.
SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def _status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, InvalidRequest):  # RequestError, or one the engine raised
        if e.field in SAMPLING_FIELDS:  # the engine's refusal (logit_bias beyond the
            # vocabulary, a schema llguidance cannot follow) names the field as the proto does
            return grpc.StatusCode.INVALID_ARGUMENT, f"sampling.{e}"
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
    if isinstance(e, EngineUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(e)
    if isinstance(e, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(e)
    log.exception("request failed")
    return grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}"


def _set_status(context: grpc.aio.ServicerContext, e: BaseException) -> None:
    """The call's status for `e`, sent when the handler returns: for a streaming handler that is
    cheaper than context.abort (whose exception unwinds through grpc.aio), 0.48 against 0.56 ms
    of the router's CPU per refusal under overload (2026-11-30)."""
    code, details = _status_of(e)
    context.set_code(code)
    context.set_details(details)


def _with_tools(
    service: InferenceService, msg: pb.GenerateRequest, call: GenerateCall
) -> tuple[GenerateCall, str, bool]:
    """(the call with the request's tools for the chat template and, for a forced tool_choice,
    the JSON Schema its output must follow; the forced mode; whether the tier's
    tool_call_parser applies (tools with tool_choice auto)), as the OpenAI chat API has them
    (router/tools.py); RequestError naming the proto's field."""
    tools, choice, parallel = convert.tools_from_proto(msg)
    if tools is None and choice is None:
        return call, "", False
    if call.input.messages is None:
        raise RequestError("tools" if tools else "tool_choice", "need a chat (input = messages)")
    unparsed = unparsed_tiers(service.config, service.limits, call.input.tier) if tools else []
    try:
        specs, schema, mode = forced_tools(tools, choice, parallel, unparsed)
    except RequestError as e:  # OpenAI's paths (tools[0].function.name) -> the proto's
        raise RequestError(e.field.replace(".function.", "."), e.message) from None
    sampling = call.sampling
    if schema is not None:
        if sampling.json_schema is not None:
            raise RequestError(
                "tool_choice", "cannot force a tool call and a sampling.json_schema at once"
            )
        sampling = dataclasses.replace(sampling, json_schema=schema)
    inp = dataclasses.replace(call.input, tools=specs)
    auto = bool(tools) and choice in (None, "auto")
    if auto:  # the tier's tool_call_parser reads the text: its control tokens are kept
        sampling = dataclasses.replace(sampling, skip_special_tokens=False)
    return dataclasses.replace(call, input=inp, sampling=sampling), mode, auto


def _chat_fields(msg: pb.GenerateResponse, d: ChatDelta) -> None:
    """A GenerateResponse's text as a chat's answer only, with its thinking and calls apart."""
    msg.text, msg.reasoning_text = d.content, d.reasoning
    msg.tool_calls.extend(convert.tool_call_to_proto(c) for c in d.calls)
    if d.finish == "tool_calls":
        msg.finish_reason = pb.FINISH_REASON_TOOL_CALLS


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Registers moeray.v1.Inference like the generated `add_InferenceServicer_to_server`, but
    with request deserializers that never raise (convert.request_decoder): a body that is no
    valid protobuf, or whose prompt no tier takes, reaches the method as `Undecodable` and is
    refused with INVALID_ARGUMENT naming the field, not UNKNOWN."""
    service = pb.DESCRIPTOR.services_by_name["Inference"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        if method.name == "Generate":  # request-streaming on this side: see Generate
            make = grpc.stream_stream_rpc_method_handler
        elif method.server_streaming:
            make = grpc.unary_stream_rpc_method_handler
        else:
            make = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=convert.request_decoder(
                request_cls, servicer.service.links.largest_prompt_limit
            ),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


async def _refuse_undecodable(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, convert.Undecodable):
        await context.abort(*_status_of(request.error))


class InferenceServicer(pb_grpc.InferenceServicer):
    """moeray.v1.Inference on one InferenceService (grpc.aio)."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service
        self.config = service.config
        self._tiers = {t.name: t for t in service.config.tiers}

    # ---- moeray.v1.Inference -----------------------------------------------------------------

    async def Generate(
        self, requests: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Streams GenerateResponses; the route decision rides on the first.

        Registered request-streaming (add_to_server): on the wire that is the same call as the
        proto's unary-stream one (one message, then the client half-closes), but grpc.aio runs
        this handler when the call starts instead of after its message arrives, so a client
        that cancels before its message is read is counted (a unary handler would never run).
        `requests` is not iterated: the one message is read with context.read()."""
        try:
            request = await context.read()
            if request is grpc.aio.EOF:
                # A cancel reads as EOF too, and cancels this task just after: wait for it.
                await asyncio.sleep(MISSING_REQUEST_GRACE_S)
        except asyncio.CancelledError:  # the client left before its message arrived
            self.service.metrics.requests.labels("", "grpc", "cancelled").inc()
            raise
        try:
            if request is grpc.aio.EOF:  # half-closed without a message
                raise RequestError("request", "is missing: Generate takes one GenerateRequest")
            if isinstance(request, convert.Undecodable):
                raise request.error
            call = convert.generate_call_from_proto(request, self.service.limits)
            call, tool, auto = _with_tools(self.service, request, call)
        except RequestError as e:  # refused before routing: no tier yet
            self.service.metrics.requests.labels("", "grpc", "invalid").inc()
            _set_status(context, e)
            return
        stream = self.service.generate(call, "grpc", context.time_remaining())
        try:
            first, chat = True, None
            async for decision, out in stream:
                if first and call.input.messages is not None:
                    chat = self._chat_stream(decision.tier, tool, auto)
                if out.finished:  # rides with the last message
                    context.set_trailing_metadata(((ENGINE_TIME_KEY, _ms(out)),))
                msg = convert.output_to_proto(out, decision.tier, decision if first else None)
                if chat is not None:
                    _chat_fields(msg, chat.feed(out))
                yield msg
                first = False
        except Exception as e:  # mapped to a status code with one sentence, never a traceback
            _set_status(context, e)
        finally:  # a cancel that hit while a message was being written: the outcome counts now
            await stream.aclose()

    def _chat_stream(self, tier: str, tool: str, auto: bool) -> ChatStream | None:
        """A chat's parsers on the tier it landed on: its reasoning_parser (unless a tool call
        is forced), its tool_call_parser (tool_choice auto), or the forced tool mode."""
        cfg = self._tiers.get(tier)
        reasoning = (cfg.reasoning_parser or "") if cfg is not None and not tool else ""
        calls = (cfg.tool_call_parser or "") if cfg is not None and auto else ""
        return ChatStream(reasoning, calls, tool) if reasoning or calls or tool else None

    async def Route(
        self, request: pb.RouteRequest, context: grpc.aio.ServicerContext
    ) -> pb.RouteResponse:
        await _refuse_undecodable(request, context)
        try:
            inp = convert.route_input_from_proto(request, self.service.limits)
            decision = self.service.decide(inp)
        except RequestError as e:
            await context.abort(*_status_of(e))
        return convert.route_response_to_proto(decision, self.service.features(inp))

    async def ListTiers(
        self, request: pb.ListTiersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTiersResponse:
        await _refuse_undecodable(request, context)
        return convert.tiers_to_proto(self.config)

    async def GetClusterStatus(
        self, request: pb.GetClusterStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetClusterStatusResponse:
        await _refuse_undecodable(request, context)
        try:
            snaps = await self.service.snapshot(request.tier)
        except RequestError as e:
            await context.abort(*_status_of(e))
        return pb.GetClusterStatusResponse(
            cluster=self.config.state.cluster, tiers=[_tier_status(s) for s in snaps]
        )

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        await _refuse_undecodable(request, context)
        return pb.AbortResponse(found=self.service.abort(request.request_id))


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
