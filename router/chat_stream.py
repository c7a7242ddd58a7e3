"""One chat choice's engine outputs as an answer, thinking and tool calls, a delta at a time.

The tier's reasoning_parser splits the thinking off (router/reasoning.py); with tool_choice
"auto" its tool_call_parser tells calls from text (router/tools.py); a forced tool_choice
("required" or a named function, router/tools.py's modes) holds the output to the calls' JSON,
which becomes the calls when the output ends. Both front doors use it: the gRPC servicer for each
GenerateResponse (router/ingress.py) and the OpenAI stream for each chunk
(router/openai_responses.py), so the two give the same calls for the same output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moeray.router.reasoning import ReasoningStream
from moeray.router.tools import REQUIRED, ToolCallStream, tool_calls
from moeray.workers.io_struct import FinishReason, RequestOutput

#: OpenAI's finish reasons for the engine's (an abort ends a choice as "stop", as vLLM does).
FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "stop",
          FinishReason.TOOL_CALLS: "tool_calls"}  # fmt: skip


def finish_of(out: RequestOutput) -> str | None:
    return FINISH[out.finish_reason] if out.finish_reason is not None else None


def forced_call(
    tool: str, out: RequestOutput, text: str
) -> tuple[list[dict[str, Any]] | None, str | None]:
    """(the tool calls, the finish reason) of a finished choice forced to call a tool: the calls
    and "tool_calls" ("stop" for a named function, as OpenAI), or None and the engine's reason
    when the output is no complete call."""
    calls = tool_calls(tool, text)
    if calls is None:
        return None, finish_of(out)
    return calls, "tool_calls" if tool == REQUIRED else "stop"


def parsed_finish(out: RequestOutput, called: bool) -> str | None:
    """The finish reason of a choice whose calls a tool_call_parser told from its text: as
    vLLM, "tool_calls" when it made any and stopped by itself."""
    finish = finish_of(out)
    return "tool_calls" if called and finish == "stop" else finish


@dataclass(frozen=True)
class ChatDelta:
    """What one engine delta adds to a chat choice: answer text, thinking, the calls completed
    (OpenAI's shape: id, type, function {name, arguments as JSON text}), the index of the first
    of them among the choice's calls, and OpenAI's finish reason on the last delta."""

    content: str
    reasoning: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    first_call: int = 0
    finish: str | None = None


class ChatStream:
    """Feeds one choice's RequestOutputs (deltas); each gives a ChatDelta.

    reasoning / calls_parser: the tier's parsers in use ("" = none); tool: a forced tool mode
    (REQUIRED or a function's name), which turns both parsers off."""

    def __init__(self, reasoning: str = "", calls_parser: str = "", tool: str = "") -> None:
        self.tool = tool
        self.thinking = ReasoningStream(reasoning) if reasoning and not tool else None
        self.calling = ToolCallStream(calls_parser) if calls_parser and not tool else None
        self.text = ""  # a forced call's output so far
        self.calls = 0  # calls sent so far

    def feed(self, out: RequestOutput) -> ChatDelta:
        if self.tool:  # held whole: the calls when the output ends, or the text if it is none
            self.text += out.delta_text
            if not out.finished:
                return ChatDelta("")
            forced, finish = forced_call(self.tool, out, self.text)
            self.calls = len(forced or ())
            return ChatDelta("" if forced else self.text, calls=forced or [], finish=finish)
        reasoning, content = "", out.delta_text
        if self.thinking is not None:
            reasoning, content = self.thinking.feed(content, final=out.finished)
        calls: list[dict[str, Any]] = []
        if self.calling is not None:
            content, calls = self.calling.feed(content, final=out.finished)
        first, self.calls = self.calls, self.calls + len(calls)
        finish = parsed_finish(out, self.calls > 0) if self.calling else finish_of(out)
        return ChatDelta(content, reasoning, calls, first, finish)
