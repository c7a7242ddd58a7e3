"""Reasoning content: a reasoning model's thinking split from its answer, as vLLM's
`--reasoning-parser` does, for chat's `reasoning_content` (a tier's `reasoning_parser`).

Both formats put the thinking between <think> and </think>:

- deepseek_r1: the chat template opens <think> itself, so the output is thinking from its first
  token (a leading <think> is dropped) until </think>, then the answer; an output without
  </think> is all thinking.
- qwen3: the output holds both tags when the model thinks (it starts with <think>); without them
  it is all answer.

`split` does it for a whole output; `ReasoningStream` for one streamed delta at a time, holding
back text that may be the start of a tag, so a tag cut by a delta boundary is never sent.
"""

from __future__ import annotations

START, END = "<think>", "</think>"
PARSERS = ("deepseek_r1", "qwen3")


def split(parser: str, text: str) -> tuple[str | None, str | None]:
    """(reasoning, answer) of a whole output; None where there is none."""
    if parser == "qwen3":
        body = text.lstrip()
        if not body.startswith(START) or END not in body:
            return None, text
        reasoning, answer = body[len(START) :].split(END, 1)
        return reasoning, answer or None
    body = text.lstrip()[len(START) :] if text.lstrip().startswith(START) else text
    if END not in body:
        return body, None
    reasoning, answer = body.split(END, 1)
    return reasoning, answer or None


def held_back(text: str, tag: str) -> int:
    """How many characters at text's end could be the start of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningStream:
    """Splits one streamed output into reasoning and answer deltas as they come."""

    def __init__(self, parser: str) -> None:
        self.parser = parser
        self.state = "start"  # start (the opening tag undecided) | reasoning | answer
        self.pending = ""  # received, not yet sent

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, answer) text to send for this delta; final=True flushes what is held."""
        self.pending += delta
        reasoning = answer = ""
        if self.state == "start":
            body = self.pending.lstrip()
            if START.startswith(body) and body != START and not final:
                return "", ""  # may still become <think>
            if body.startswith(START):
                self.pending, self.state = body[len(START) :], "reasoning"
            else:
                self.state = "reasoning" if self.parser == "deepseek_r1" else "answer"
        if self.state == "reasoning":
            if END in self.pending:
                reasoning, self.pending = self.pending.split(END, 1)
                self.state = "answer"
            else:
                keep = 0 if final else held_back(self.pending, END)
                reasoning = self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep :]
        if self.state == "answer":
            answer, self.pending = self.pending, ""
        return reasoning, answer
