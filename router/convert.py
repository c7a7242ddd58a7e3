"""Protobuf <-> internal dataclasses, with request validation. The only module that does both.

Inbound: `generate_call_from_proto` / `route_input_from_proto` turn moeray.v1 requests into
`GenerateCall` / `RouteInput` (moeray.router.messages) and `SamplingParams`
(moeray.workers.io_struct), checking every field against the configured limits. Outbound:
`output_to_proto` turns the engine's `RequestOutput` deltas into `GenerateResponse`s.

Every refusal is a `RequestError(field, message)` (a ValueError) whose text names the field, e.g.
"sampling.top_p must be in (0, 1], got 1.5"; the transport maps it to gRPC INVALID_ARGUMENT or
HTTP 400. `build_route_input` and `check_sampling` take plain values, so the OpenAI HTTP app
validates with the same rules.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError
from moeray.cluster.config import MoerayConfig, RouterConfig
from moeray.router.messages import ChatMessage, GenerateCall, RouteDecision, RouteInput
from moeray.router.policy import resolve_tier
from moeray.v1 import inference_pb2 as pb
from moeray.workers.io_struct import (
    PENALTIES,
    FinishReason,
    InvalidRequest,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_REQUEST_ID_CHARS = 128
MAX_MESSAGES = 1024


class RequestError(InvalidRequest):
    """A request field is invalid (found by the front door). `field` is the dotted field name as
    the client sent it; str(e) is a sentence that starts with it."""


@dataclass(frozen=True)
class RequestLimits:
    """What a request may ask for: tiers, per-tier max_tokens and context, message size."""

    router: RouterConfig
    tiers: tuple[str, ...]
    max_tokens_limit: Mapping[str, int] = field(default_factory=dict)
    max_model_len: Mapping[str, int] = field(default_factory=dict)  # tiers whose limit is known

    @classmethod
    def from_config(cls, cfg: MoerayConfig) -> RequestLimits:
        return cls(
            router=cfg.router,
            tiers=tuple(t.name for t in cfg.tiers),
            max_tokens_limit={t.name: t.engine.max_tokens_limit for t in cfg.tiers},
            max_model_len={
                t.name: t.engine.max_model_len for t in cfg.tiers if t.engine.max_model_len
            },
        )

    @property
    def max_message_bytes(self) -> int:
        return self.router.max_message_bytes

    def candidate_tiers(self, requested: str) -> list[str]:
        """The tiers a request may land on: the named one, or (auto) the fast and reasoning tiers."""
        try:
            named = resolve_tier(requested, self.router, self.tiers)
        except ValueError as e:
            raise RequestError("tier", str(e).removeprefix("tier ")) from None
        if named is not None:
            return [named]
        auto = [t for t in (self.router.fast_tier, self.router.reasoning_tier) if t in self.tiers]
        return auto or list(self.tiers)

    def tokens_limit(self, requested: str) -> int | None:
        """The smallest max_tokens limit over the candidate tiers (auto may land on either)."""
        limits = [
            self.max_tokens_limit[t]
            for t in self.candidate_tiers(requested)
            if t in self.max_tokens_limit
        ]
        return min(limits) if limits else None


# ---- inbound ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Undecodable:
    """What the gRPC server hands a method for a body that is no valid protobuf of its request
    type (see `request_decoder`): the refusal to answer with, naming the field."""

    error: RequestError


#: Bodies up to this size are parsed before their prompt's length is checked (in microseconds).
PARSE_BEFORE_CHECK_BYTES = 65536


def request_decoder(message: Any, prompt_limit: Callable[[], int] | None = None) -> Any:
    """A gRPC request deserializer for the protobuf class `message` that never raises: bytes
    that do not parse become `Undecodable(RequestError(field, ...))`, so the servicer answers
    INVALID_ARGUMENT naming the field (grpcio answers a raising deserializer with UNKNOWN and
    the exception's class name).

    prompt_limit: the longest prompt text (UTF-8 bytes) any tier takes, 0 while unknown. A body
    whose `prompt` or `prompt_bytes` field is longer is refused as that field from its wire
    header, unparsed: parsing and copying megabytes on the router's event loop would stall every
    stream it forwards (the service checks shorter bodies after parsing, per tier)."""
    prompts = {
        fd.number: fd.name
        for fd in message.DESCRIPTOR.fields
        if fd.name in ("prompt", "prompt_bytes")
    }

    def decode(data: bytes) -> Any:
        if prompt_limit is not None and prompts and len(data) > PARSE_BEFORE_CHECK_BYTES:
            limit = prompt_limit()
            name = _field_longer_than(data, prompts, limit) if limit else None
            if name is not None:
                return Undecodable(RequestError(
                    name, f"is over {limit} bytes of UTF-8; no text that long fits the "
                    "context of any tier",
                ))  # fmt: skip
        try:
            return message.FromString(data)
        except DecodeError:
            return Undecodable(_locate(message.DESCRIPTOR, data))

    return decode


class _Broken(Exception):
    """The protobuf wire structure ends or breaks where a field should be."""


def _locate(descriptor: Any, data: bytes) -> RequestError:
    """Why `data` is no valid `descriptor` message: the string field holding bad UTF-8, else
    the (sub)message whose wire structure is broken; "request" at the top."""
    try:
        field = _bad_field(descriptor, data)
    except _Broken:
        field = None
    if field is None:
        return RequestError("request", f"is not a valid {descriptor.full_name} protobuf message")
    for wrapper, plain in (("messages.messages", "messages"), ("prompt_token_ids.ids",
                                                               "prompt_token_ids")):  # fmt: skip
        field = field.replace(wrapper, plain)
    if field.endswith("!"):
        return RequestError(field[:-1], "is not a valid protobuf message")
    return RequestError(field, "is not valid UTF-8")


def _bad_field(descriptor: Any, data: bytes) -> str | None:
    """Walks the wire format (varint keys; wire types 0, 1, 2, 5): the dotted name of the first
    string field that is not UTF-8 ("name!" for a broken submessage); None if none is found;
    _Broken if the structure itself is broken at this level."""
    pos, seen = 0, Counter[int]()
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Broken
        if wire == 0:
            _, pos = _varint(data, pos)
            continue
        if wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > len(data):
                raise _Broken
            continue
        if wire != 2:
            raise _Broken
        length, pos = _varint(data, pos)
        payload, pos = data[pos : pos + length], pos + length
        if pos > len(data):
            raise _Broken
        fd = descriptor.fields_by_number.get(number)
        if fd is None:
            continue
        name = fd.name
        if fd.is_repeated:
            name, seen[number] = f"{name}[{seen[number]}]", seen[number] + 1
        if fd.type == fd.TYPE_STRING:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                return name
        elif fd.type == fd.TYPE_MESSAGE:
            try:
                inner = _bad_field(fd.message_type, payload)
            except _Broken:
                return name + "!"
            if inner is not None:
                return f"{name}.{inner}"
    return None


def _field_longer_than(data: bytes, fields: Mapping[int, str], limit: int) -> str | None:
    """The name of a top-level length-delimited field among `fields` (number -> name) whose
    payload is over `limit` bytes, read from the wire headers alone; None if none is (or the
    structure is broken: the parser then says why)."""
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            elif wire == 2:
                length, pos = _varint(data, pos)
                if length > limit and number in fields:
                    return fields[number]
                pos += length
            else:
                return None
    except _Broken:
        return None
    return None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            raise _Broken
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
    raise _Broken


def _decode_utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError("prompt", f"is not valid UTF-8 (bad byte at offset {e.start})") from None


def _check_messages(messages: Sequence[ChatMessage]) -> tuple[ChatMessage, ...]:
    if not messages:
        raise RequestError("messages", "must hold at least one message")
    if len(messages) > MAX_MESSAGES:
        raise RequestError("messages", f"must hold at most {MAX_MESSAGES} messages")
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise RequestError(
                f"messages[{i}].role", f"must be one of {sorted(CHAT_ROLES)}, got {m.role!r}"
            )
    if not any(m.content.strip() for m in messages):
        raise RequestError("messages", "must have at least one non-empty content")
    return tuple(messages)


def build_route_input(
    limits: RequestLimits,
    *,
    prompt: str | None = None,
    messages: Sequence[ChatMessage] | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    prompt_bytes: bytes | None = None,
    tier: str = "",
) -> RouteInput:
    """Validates one input form and the tier; the shared core of the gRPC and HTTP paths."""
    given = [x is not None for x in (prompt, messages, prompt_token_ids, prompt_bytes)]
    if sum(given) != 1:
        raise RequestError("input", "must be exactly one of prompt, messages or prompt_token_ids")
    candidates = limits.candidate_tiers(tier)  # raises for an unknown tier first
    if prompt_bytes is not None:
        prompt = _decode_utf8(prompt_bytes)
    size = len(prompt.encode("utf-8", "surrogatepass")) if prompt is not None else 0
    size += sum(len(m.content) + len(m.role) for m in messages or ())
    size += 4 * len(prompt_token_ids or ())
    if size > limits.max_message_bytes:
        raise RequestError(
            "input", f"is {size} bytes, above the limit of {limits.max_message_bytes} bytes"
        )
    if prompt is not None:
        if not prompt.strip():
            raise RequestError("prompt", "must not be empty")
        return RouteInput(prompt=prompt, tier=tier)
    if messages is not None:
        return RouteInput(messages=_check_messages(messages), tier=tier)
    ids = tuple(int(t) for t in prompt_token_ids or ())
    if not ids:
        raise RequestError("prompt_token_ids", "must not be empty")
    known = [limits.max_model_len[t] for t in candidates if t in limits.max_model_len]
    if known and len(ids) >= min(known):
        raise RequestError(
            "prompt_token_ids",
            f"has {len(ids)} tokens; the context of tier {candidates[0]!r} is {min(known)}",
        )
    return RouteInput(prompt_token_ids=ids, tier=tier)


def check_prompt_size(inp: RouteInput, limit: int, where: str) -> None:
    """Refuses a prompt text that the engines of `where` ("tier 'fast'", "any tier") would
    refuse untokenized (limit: their announced max_prompt_bytes, see LLMEngine.encode_prompt),
    so that it never crosses to an engine or reaches the policy."""
    text = inp.prompt
    if text is not None and (  # encoded only when its length alone cannot settle it
        len(text) > limit
        or (4 * len(text) > limit and len(text.encode("utf-8", "surrogatepass")) > limit)
    ):
        raise RequestError(
            "prompt",
            f"is over {limit} bytes of UTF-8; no text that long fits the context of {where}",
        )
    if inp.messages is not None and sum(len(m.content) for m in inp.messages) > limit:
        raise RequestError(
            "messages",
            f"hold over {limit} characters; no text that long fits the context of {where}",
        )


def check_sampling(
    params: SamplingParams, max_tokens_limit: int | None, prefix: str = "sampling."
) -> SamplingParams:
    """Validates params (and max_tokens against the tier's limit), re-raising as RequestError."""
    try:
        return params.validate(max_tokens_limit)
    except InvalidRequest as e:
        raise RequestError(prefix + e.field, e.message) from None


def sampling_from_proto(msg: pb.SamplingParams, max_tokens_limit: int | None) -> SamplingParams:
    """Proto -> SamplingParams; absent optional fields take io_struct's defaults (max_tokens:
    at most the tier's limit, as over HTTP)."""
    kwargs: dict[str, Any] = {
        name: getattr(msg, name)
        for name in (
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "logprobs",
            "min_tokens",
            "prompt_logprobs",
            "json_schema",
            "skip_special_tokens",
            *PENALTIES,
        )
        if msg.HasField(name)
    }
    if "max_tokens" not in kwargs and max_tokens_limit is not None:
        kwargs["max_tokens"] = min(SamplingParams.max_tokens, max_tokens_limit)
    params = SamplingParams(
        **kwargs,
        stop=list(msg.stop),
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logit_bias=dict(msg.logit_bias),
    )
    return check_sampling(params, max_tokens_limit)


def _input_from_proto(
    msg: pb.GenerateRequest | pb.RouteRequest, limits: RequestLimits
) -> RouteInput:
    kind = msg.WhichOneof("input")
    if kind is None:
        raise RequestError("input", "must be one of prompt, messages or prompt_token_ids")
    if msg.ByteSize() > limits.max_message_bytes:
        raise RequestError(
            "request", f"is {msg.ByteSize()} bytes, above the limit of {limits.max_message_bytes}"
        )
    if kind == "messages":
        chat = [_message_from_proto(i, m) for i, m in enumerate(msg.messages.messages)]
        return build_route_input(limits, messages=chat, tier=msg.tier)
    if kind == "prompt_token_ids":
        return build_route_input(
            limits, prompt_token_ids=list(msg.prompt_token_ids.ids), tier=msg.tier
        )
    if kind == "prompt_bytes":
        return build_route_input(limits, prompt_bytes=msg.prompt_bytes, tier=msg.tier)
    return build_route_input(limits, prompt=msg.prompt, tier=msg.tier)


def _message_from_proto(i: int, m: pb.ChatMessage) -> ChatMessage:
    calls = [
        template_tool_call(f"messages[{i}].tool_calls[{j}]", c.id, c.name, c.arguments or "{}")
        for j, c in enumerate(m.tool_calls)
    ]
    return ChatMessage(m.role, m.content, tool_calls=calls or None,
                       tool_call_id=m.tool_call_id or None)  # fmt: skip


def template_tool_call(where: str, call_id: str, name: Any, arguments: Any) -> dict[str, Any]:
    """One call of an assistant turn in the form chat templates take (arguments as an object,
    as vLLM passes them); RequestError naming `where`.name or .arguments otherwise.
    arguments: JSON text (or the object itself)."""
    if not isinstance(name, str) or not name:
        raise RequestError(f"{where}.name", "must be a non-empty string")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        raise RequestError(f"{where}.arguments", "must be JSON text") from None
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": parsed}}


def tools_from_proto(
    msg: pb.GenerateRequest,
) -> tuple[list[dict[str, Any]] | None, str | dict[str, Any] | None, bool]:
    """(tools, tool_choice, parallel_tool_calls) of a GenerateRequest in OpenAI's form, which
    router/tools.py checks; RequestError for parameters that are no JSON."""
    tools = []
    for j, t in enumerate(msg.tools):
        fn: dict[str, Any] = {"name": t.name}
        if t.description:
            fn["description"] = t.description
        if t.parameters:
            try:
                fn["parameters"] = json.loads(t.parameters)
            except ValueError:
                raise RequestError(f"tools[{j}].parameters", "must be the JSON text of a JSON "
                                   "Schema object") from None  # fmt: skip
        tools.append({"type": "function", "function": fn})
    choice: str | dict[str, Any] | None = None
    which = msg.tool_choice.WhichOneof("choice") if msg.HasField("tool_choice") else None
    if which == "function":
        choice = {"type": "function", "function": {"name": msg.tool_choice.function}}
    elif which == "mode":
        choice = msg.tool_choice.mode
    parallel = msg.parallel_tool_calls if msg.HasField("parallel_tool_calls") else True
    return tools or None, choice, parallel


def route_input_from_proto(msg: pb.RouteRequest, limits: RequestLimits) -> RouteInput:
    return _input_from_proto(msg, limits)


def generate_call_from_proto(msg: pb.GenerateRequest, limits: RequestLimits) -> GenerateCall:
    """A validated GenerateCall; request_id is generated when empty."""
    request_id = msg.request_id or uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestError("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters")
    inp = _input_from_proto(msg, limits)
    sampling = sampling_from_proto(msg.sampling, limits.tokens_limit(msg.tier))
    return GenerateCall(request_id, inp, sampling)


def route_input_to_proto(inp: RouteInput) -> pb.RouteRequest:
    """The inverse of route_input_from_proto (the client and tests use it)."""
    msg = pb.RouteRequest(tier=inp.tier)
    if inp.prompt is not None:
        msg.prompt = inp.prompt
    elif inp.messages is not None:
        msg.messages.messages.extend(
            pb.ChatMessage(role=m.role, content=m.content, tool_call_id=m.tool_call_id or "",
                           tool_calls=[tool_call_to_proto(c) for c in m.tool_calls or ()])
            for m in inp.messages
        )  # fmt: skip
    else:
        msg.prompt_token_ids.ids.extend(inp.prompt_token_ids or ())
    return msg


# ---- outbound -----------------------------------------------------------------------------

_FINISH_TO_PROTO = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}


def finish_reason_to_proto(reason: FinishReason | None) -> int:
    return int(_FINISH_TO_PROTO[reason])


def finish_reason_from_proto(value: int) -> FinishReason | None:
    if value not in _FINISH_FROM_PROTO:
        raise ValueError(f"finish_reason {value} is not a known FinishReason")
    return _FINISH_FROM_PROTO[value]  # type: ignore[index]


def route_decision_to_proto(d: RouteDecision) -> pb.RouteDecision:
    return pb.RouteDecision(tier=d.tier, score=d.score, reason=d.reason, fallback=d.fallback)


def route_decision_from_proto(msg: pb.RouteDecision) -> RouteDecision:
    return RouteDecision(msg.tier, float(msg.score), msg.reason, msg.fallback)


def route_response_to_proto(d: RouteDecision, features: Mapping[str, float]) -> pb.RouteResponse:
    return pb.RouteResponse(route=route_decision_to_proto(d), features=dict(features))


def output_to_proto(
    out: RequestOutput, tier: str, route: RouteDecision | None = None
) -> pb.GenerateResponse:
    """One streamed engine delta -> GenerateResponse (pass route on the first message only)."""
    msg = pb.GenerateResponse(
        request_id=out.request_id,
        tier=tier,
        text=out.delta_text,
        token_ids=out.delta_token_ids,
        finish_reason=_FINISH_TO_PROTO[out.finish_reason],
        usage=pb.Usage(
            prompt_tokens=out.usage.prompt_tokens,
            completion_tokens=out.usage.completion_tokens,
        ),
    )
    msg.logprobs.extend(token_logprob_to_proto(e) for e in out.delta_logprobs or ())
    if route is not None and out.prompt_logprobs is not None:  # the first message
        msg.prompt_logprobs.extend(token_logprob_to_proto(e) for e in out.prompt_logprobs[1:] if e)
    if route is not None:
        msg.route.CopyFrom(route_decision_to_proto(route))
    return msg


def tool_call_to_proto(call: dict[str, Any]) -> pb.ToolCall:
    """A call in OpenAI's shape (or a chat template's, arguments as an object) -> ToolCall."""
    fn = call["function"]
    args = fn["arguments"]
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return pb.ToolCall(id=call.get("id", ""), name=fn["name"], arguments=text)


def token_logprob_to_proto(e: TokenLogprob) -> pb.TokenLogprob:
    top = [pb.TopLogprob(token_id=t.token_id, text=t.text, logprob=t.logprob) for t in e.top]
    return pb.TokenLogprob(token_id=e.token_id, text=e.text, logprob=e.logprob, top=top)


def token_logprob_from_proto(msg: pb.TokenLogprob) -> TokenLogprob:
    top = [TopLogprob(t.token_id, t.text, t.logprob) for t in msg.top]
    return TokenLogprob(msg.token_id, msg.text, msg.logprob, top)


def tiers_to_proto(cfg: MoerayConfig) -> pb.ListTiersResponse:
    """The ListTiers answer for a config (roles from router.fast_tier / reasoning_tier)."""
    roles = {cfg.router.fast_tier: "fast", cfg.router.reasoning_tier: "reasoning"}
    infos = [
        pb.TierInfo(
            name=t.name,
            model=t.model,
            description=t.description,
            role=roles.get(t.name, ""),
            max_model_len=t.engine.max_model_len or 0,
            max_tokens_limit=t.engine.max_tokens_limit,
        )
        for t in cfg.tiers
    ]
    return pb.ListTiersResponse(
        tiers=infos,
        fast_tier=cfg.router.fast_tier,
        reasoning_tier=cfg.router.reasoning_tier,
        threshold=cfg.router.threshold,
        policy=cfg.router.policy,
    )
