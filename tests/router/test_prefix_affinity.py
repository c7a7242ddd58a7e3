"""The router's approximate prefix view: keys chain over chunks, the longest holder wins, the
view is bounded and forgets replicas that leave."""

from __future__ import annotations

from moeray.router.prefix_affinity import CHUNK_CHARS, CHUNK_IDS, PrefixAffinity, prefix_keys
from moeray.workers.io_struct import ChatMessage, GenerateRequest, SamplingParams

P = SamplingParams()
SYSTEM = "You are a careful assistant. " * 10  # 290 characters: 4 full chunks


def text(prompt: str) -> GenerateRequest:
    return GenerateRequest("r", P, prompt=prompt)


def test_keys_are_chained_over_full_chunks() -> None:
    a, b = prefix_keys(text(SYSTEM + "Question one?")), prefix_keys(text(SYSTEM + "Other?"))
    assert len(a) == len(SYSTEM + "Question one?") // CHUNK_CHARS
    n = len(SYSTEM) // CHUNK_CHARS
    assert a[:n] == b[:n]  # the shared system prompt
    # The same chunk after a different prefix is a different key (keys are chained).
    shifted = prefix_keys(text("x" * CHUNK_CHARS + SYSTEM))
    assert not set(shifted[1:]) & set(a)
    assert prefix_keys(text("short")) == []
    ids = prefix_keys(GenerateRequest("r", P, prompt_token_ids=list(range(3 * CHUNK_IDS + 5))))
    assert len(ids) == 3
    chat = [ChatMessage("system", SYSTEM), ChatMessage("user", "hi")]
    chat2 = [ChatMessage("system", SYSTEM), ChatMessage("user", "bye")]
    ka, kb = (
        prefix_keys(GenerateRequest("r", P, messages=chat)),
        prefix_keys(GenerateRequest("r", P, messages=chat2)),
    )
    assert ka[:4] == kb[:4] and ka != prefix_keys(text(SYSTEM + "hi"))  # roles are part of it


def test_longest_holder_wins_among_live_replicas() -> None:
    view = PrefixAffinity()
    short = prefix_keys(text(SYSTEM[:130]))  # 2 chunks
    long = prefix_keys(text(SYSTEM + "Question one?"))
    view.record(short, "a")
    view.record(long, "b")  # b served the longer request (and now holds the shared head too)
    assert view.match(long, {"a", "b"}) == ("b", len(long))
    assert view.match(prefix_keys(text(SYSTEM + "Different question")), {"a", "b"})[0] == "b"
    assert view.match(long, {"a"}) == (None, 0)  # b's keys overwrote a's
    assert view.match(prefix_keys(text("z" * 200)), {"a", "b"}) == (None, 0)
    view.forget("b")
    assert view.match(long, {"a", "b"}) == (None, 0) and len(view) == 0


def test_view_is_bounded_lru() -> None:
    view = PrefixAffinity(capacity=4)
    first = prefix_keys(text("a" * 4 * CHUNK_CHARS))
    view.record(first, "r1")
    view.record(prefix_keys(text("b" * 2 * CHUNK_CHARS)), "r2")  # evicts first's two oldest
    assert len(view) == 4
    assert view.match(first, {"r1"}) == (None, 0)  # its head is gone: no match from the start
