"""router/reasoning.py: thinking split from the answer, whole and streamed.

Every output is also fed to ReasoningStream cut at every position and in single characters:
the reasoning and answer deltas must add up to what `split` gives the whole output (for qwen3,
when both tags are there), so a tag cut by a delta boundary is never sent as text."""

from __future__ import annotations

import pytest
from moeray.router.reasoning import ReasoningStream, split

CASES = [  # parser, output, (reasoning, answer)
    ("deepseek_r1", "weigh it</think>Paris", ("weigh it", "Paris")),
    ("deepseek_r1", "<think>weigh it</think>\n\nParis", ("weigh it", "\n\nParis")),
    ("deepseek_r1", "still thinking", ("still thinking", None)),
    ("deepseek_r1", "done</think>", ("done", None)),
    ("deepseek_r1", "a < b </thin k> </think>x</think>y", ("a < b </thin k> ", "x</think>y")),
    ("qwen3", "<think>\nweigh it\n</think>\n\nParis", ("\nweigh it\n", "\n\nParis")),
    ("qwen3", "  <think>x</think>y", ("x", "y")),
    ("qwen3", "Paris", (None, "Paris")),
    ("qwen3", "<thin", (None, "<thin")),
]


@pytest.mark.parametrize(("parser", "text", "expected"), CASES)
def test_split(parser: str, text: str, expected: tuple[str | None, str | None]) -> None:
    assert split(parser, text) == expected


def _streamed(parser: str, pieces: list[str]) -> tuple[str, str]:
    stream = ReasoningStream(parser)
    reasoning = answer = ""
    for i, piece in enumerate(pieces):
        r, a = stream.feed(piece, final=i == len(pieces) - 1)
        reasoning, answer = reasoning + r, answer + a
    return reasoning, answer


@pytest.mark.parametrize(("parser", "text", "expected"), CASES)
def test_stream_adds_up_to_split(parser: str, text: str, expected: tuple) -> None:
    want = tuple(part or "" for part in expected)
    cuts = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    cuts += [[text[:i], text[i:j], text[j:]] for i in range(len(text)) for j in range(i, len(text))]
    cuts.append(list(text))
    for pieces in cuts:
        assert _streamed(parser, pieces) == want, pieces


def test_a_tag_is_held_back_until_it_is_decided() -> None:
    stream = ReasoningStream("deepseek_r1")
    assert stream.feed("think</th") == ("think", "")  # "</th" may be the end tag
    assert stream.feed("ink>ans") == ("", "ans")
    stream = ReasoningStream("qwen3")
    assert stream.feed("<thi") == ("", "")  # may be <think>
    assert stream.feed("nk>x") == ("x", "")
    stream = ReasoningStream("qwen3")
    assert stream.feed("<b>") == ("", "<b>")


def test_qwen3_unclosed_thinking() -> None:
    """Whole, an output that opens <think> and never closes it is all answer; streamed, it was
    sent as reasoning before the end could tell (vLLM's Qwen3 parser does the same)."""
    assert split("qwen3", "<think>abc") == (None, "<think>abc")
    assert _streamed("qwen3", ["<think>ab", "c"]) == ("abc", "")
