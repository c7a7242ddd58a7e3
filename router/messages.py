"""Typed messages of the query router (router-internal; the transport converts protobuf to these).

`RouteInput` is what the routing policy sees of a request: its input in one of three forms and
the tier the client asked for. `RouteDecision` is what the policy answers. `GenerateCall` is a
validated Generate request on its way to an engine deployment. Nothing here imports protobuf or
Ray, so the policy stays a pure function that tests call directly. `ChatMessage` is the engine
wire's (workers/io_struct.py), so a chat reaches the engine without a conversion.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moeray.workers.io_struct import ChatMessage, GenerateRequest, SamplingParams

#: Requested-tier values that mean "the router decides".
AUTO_TIERS = frozenset({"", "auto"})


@dataclass(frozen=True)
class RouteInput:
    """A request as the router sees it. Exactly one of prompt / messages / prompt_token_ids is set.

    tier: what the client asked for; "" or "auto" lets the policy decide.
    """

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    tier: str = ""
    #: Function specs the chat template shows the model (HTTP chat's `tools`), with messages.
    tools: tuple[dict[str, Any], ...] | None = None

    @property
    def auto(self) -> bool:
        return self.tier in AUTO_TIERS

    def text(self) -> str:
        """The text view the policy scores: the prompt, or the user turns of a chat joined.

        Pre-tokenized input has no text view (the router never holds a tokenizer): "".
        """
        if self.prompt is not None:
            return self.prompt
        if self.messages:
            return "\n".join(m.content for m in self.messages if m.role != "system")
        return ""

    def last_user_text(self) -> str:
        """The newest user turn (or the whole text when the input is not a chat)."""
        if self.messages:
            for m in reversed(self.messages):
                if m.role == "user":
                    return m.content
        return self.text()

    def engine_request(
        self, request_id: str, sampling: SamplingParams, echo: bool = False
    ) -> GenerateRequest:
        """The message an engine replica receives for this input."""
        return GenerateRequest(
            request_id=request_id,
            sampling=sampling,
            echo=echo,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids) if self.prompt_token_ids else None,
            messages=list(self.messages) if self.messages is not None else None,
            tools=list(self.tools) if self.tools is not None else None,
        )


@dataclass(frozen=True)
class RouteDecision:
    """The router's answer for one request.

    score: reasoning score in [0, 1] (1.0 / 0.0 when the client named the tier).
    fallback: the reasoning tier was saturated and the fast tier took the request instead.
    """

    tier: str
    score: float
    reason: str
    fallback: bool = False


@dataclass(frozen=True)
class GenerateCall:
    """A validated Generate request: what the front door hands to the router and an engine."""

    request_id: str
    input: RouteInput
    sampling: SamplingParams = field(default_factory=SamplingParams)
    #: Return the prompt's text with the first output (RequestOutput.prompt): completions' echo.
    echo: bool = False


@dataclass(frozen=True)
class TierLoad:
    """Requests in flight per tier name, as the front door counts them (input of the policy)."""

    inflight: Mapping[str, int] = field(default_factory=dict)

    def of(self, tier: str) -> int:
        return int(self.inflight.get(tier, 0))
