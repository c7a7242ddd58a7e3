"""The query-routing policy as a pure function: explicit tiers, thresholds, fallback, calibration."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from moeray.cluster.config import RouterConfig
from moeray.router.features import (
    FEATURE_NAMES,
    SCAN_CHARS,
    FeatureScorer,
    FeatureWeights,
    extract_features,
)
from moeray.router.messages import ChatMessage, RouteInput, TierLoad
from moeray.router.policy import QueryRouter, calibrate_threshold, route

TIERS = ("fast", "reasoning")
CFG = RouterConfig()
PROOF = "Prove that there are infinitely many primes, and justify every step rigorously."
HELLO = "hi there, how are you?"


def score(text: str) -> float:
    return FeatureScorer().score(RouteInput(prompt=text))


def test_obvious_requests_go_to_the_obvious_tier() -> None:
    assert route(RouteInput(prompt=PROOF), CFG, TIERS).tier == "reasoning"
    d = route(RouteInput(prompt=HELLO), CFG, TIERS)
    assert d.tier == "fast" and not d.fallback
    assert "threshold" in d.reason


def test_score_is_a_probability_and_deterministic() -> None:
    for text in (PROOF, HELLO, "x" * 50_000, "?" * 10, "1 + 1 = 2 " * 300):
        s = score(text)
        assert 0.0 <= s <= 1.0
        assert s == score(text)


def test_explicit_request_to_think_raises_the_score() -> None:
    base = "A store sells apples for $2 and pears for $3; I spend $19 on 8 fruits. How many pears?"
    for ask in ("Think step by step.", "Please reason carefully.", "Show your work."):
        assert score(f"{base} {ask}") > score(base) + 0.05, ask


def test_conversation_depth_raises_the_score() -> None:
    turns = [ChatMessage("user", "Can you look at my sorting code?")]
    shallow = FeatureScorer().score(RouteInput(messages=tuple(turns)))
    for _ in range(4):
        turns += [ChatMessage("assistant", "Sure."), ChatMessage("user", "It still fails.")]
    deep_req = RouteInput(
        messages=(*turns[:-1], ChatMessage("user", "Can you look at my sorting code?"))
    )
    assert FeatureScorer().score(deep_req) > shallow


def test_cues_at_the_tail_of_a_long_prompt_are_read() -> None:
    filler = "The committee met and reviewed the figures. " * 2000  # ~90 kB, no cues
    head_only = RouteInput(prompt=filler)
    with_ask = RouteInput(
        prompt=filler + " Now prove rigorously, step by step, that the total is optimal."
    )
    assert len(with_ask.prompt or "") > 4 * SCAN_CHARS
    assert FeatureScorer().score(with_ask) > FeatureScorer().score(head_only)


@pytest.mark.parametrize("asked", ["fast", "reasoning"])
def test_explicit_tier_wins_over_the_score(asked: str) -> None:
    for text in (PROOF, HELLO):
        d = route(RouteInput(prompt=text, tier=asked), CFG, TIERS)
        assert d.tier == asked and not d.fallback
        assert "asked for" in d.reason


def test_role_names_map_to_configured_tiers_and_other_tiers_are_reachable_by_name() -> None:
    cfg = RouterConfig(fast_tier="small", reasoning_tier="big")
    tiers = ("small", "big", "code")
    assert route(RouteInput(prompt=PROOF, tier="fast"), cfg, tiers).tier == "small"
    assert route(RouteInput(prompt=HELLO, tier="reasoning"), cfg, tiers).tier == "big"
    assert route(RouteInput(prompt=HELLO, tier="code"), cfg, tiers).tier == "code"
    assert route(RouteInput(prompt=PROOF, tier="auto"), cfg, tiers).tier == "big"


@pytest.mark.parametrize("bad", ["turbo", "Fast", "reasoning-xl"])
def test_unknown_tier_is_a_value_error_naming_tier(bad: str) -> None:
    with pytest.raises(ValueError, match=r"^tier .*not configured"):
        route(RouteInput(prompt=HELLO, tier=bad), CFG, TIERS)


def test_threshold_decides() -> None:
    req = RouteInput(prompt=PROOF)
    s = FeatureScorer().score(req)
    just_above = RouterConfig(threshold=min(1.0, s + 1e-6))
    at = RouterConfig(threshold=s)
    assert route(req, just_above, TIERS).tier == "fast"
    assert route(req, at, TIERS).tier == "reasoning"  # score >= threshold -> reasoning
    assert route(RouteInput(prompt=HELLO), RouterConfig(threshold=0.0), TIERS).tier == "reasoning"


def test_fallback_when_the_reasoning_tier_is_saturated() -> None:
    cfg = RouterConfig(max_inflight_per_tier=4, allow_fallback=True)
    req = RouteInput(prompt=PROOF)
    free = route(req, cfg, TIERS, TierLoad({"reasoning": 3, "fast": 100}))
    assert free.tier == "reasoning" and not free.fallback
    full = route(req, cfg, TIERS, TierLoad({"reasoning": 4}))
    assert full.tier == "fast" and full.fallback
    assert "saturated" in full.reason and "fallback" in full.reason
    assert full.score == free.score
    strict = RouterConfig(max_inflight_per_tier=4, allow_fallback=False)
    assert route(req, strict, TIERS, TierLoad({"reasoning": 9})).tier == "reasoning"
    # an explicit request for the reasoning tier is never rerouted
    explicit = route(
        RouteInput(prompt=PROOF, tier="reasoning"), cfg, TIERS, TierLoad({"reasoning": 9})
    )
    assert explicit.tier == "reasoning" and not explicit.fallback


def test_single_tier_configs() -> None:
    assert route(RouteInput(prompt=PROOF), CFG, ("fast",)).tier == "fast"
    assert route(RouteInput(prompt=HELLO), CFG, ("reasoning",)).tier == "reasoning"
    with pytest.raises(ValueError, match=r"router\.fast_tier"):
        route(RouteInput(prompt=HELLO), CFG, ("other",))


def test_pre_tokenized_input_is_routed_without_text() -> None:
    d = route(RouteInput(prompt_token_ids=(1, 2, 3)), CFG, TIERS)
    assert d.tier == "fast" and 0.0 <= d.score < 0.5


def test_feature_vector_matches_names_and_weights_round_trip() -> None:
    f = extract_features(RouteInput(prompt=PROOF))
    assert len(f) == len(FEATURE_NAMES)
    named = dict(zip(FEATURE_NAMES, f))
    assert named["proof"] > 0 and named["think"] > 0 and named["chitchat"] == 0
    w = FeatureWeights(0.25, tuple(float(i) for i in range(len(FEATURE_NAMES))))
    assert FeatureWeights.from_json(w.to_json()) == w
    with pytest.raises(ValueError, match="weights must have"):
        FeatureWeights(0.0, (1.0, 2.0))


def test_query_router_binds_config_and_tiers() -> None:
    qr = QueryRouter(CFG, TIERS)
    assert qr.decide(RouteInput(prompt=PROOF)) == route(RouteInput(prompt=PROOF), CFG, TIERS)
    assert set(qr.features(RouteInput(prompt=PROOF))) == set(FEATURE_NAMES)


def test_policy_imports_neither_ray_nor_grpc() -> None:
    code = (
        "import sys, moeray.router.policy as p; from moeray.router.messages import RouteInput;"
        "from moeray.cluster.config import RouterConfig;"
        "p.route(RouteInput(prompt='hi'), RouterConfig(), ('fast', 'reasoning'));"
        "bad = [m for m in ('ray', 'grpc', 'torch') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---- calibration -----------------------------------------------------------------------


def test_calibration_hits_the_target_share_on_a_sample() -> None:
    from moeray.router.classifier import DEFAULT_DATA_PATH, load_labeled_jsonl

    scorer = FeatureScorer()
    scores = [
        scorer.score(RouteInput(prompt=e.text)) for e in load_labeled_jsonl(DEFAULT_DATA_PATH)
    ]
    for share in (0.1, 0.25, 0.5, 0.8):
        thr = calibrate_threshold(scores, share)
        cfg = RouterConfig(threshold=thr)
        routed = [
            route(RouteInput(prompt=e.text), cfg, TIERS).tier
            for e in load_labeled_jsonl(DEFAULT_DATA_PATH)
        ]
        got = routed.count("reasoning") / len(routed)
        assert abs(got - share) <= 0.02, (share, got)


@given(
    st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=200),
    st.floats(0.0, 1.0),
)
def test_calibration_property(scores: list[float], share: float) -> None:
    thr = calibrate_threshold(scores, share)
    k = round(share * len(scores))
    above = sum(s >= thr for s in scores)
    assert 0.0 <= thr <= 1.0
    if k > 0:  # the count sent is the achievable one closest to k (ties limit what is possible)
        achievable = {sum(s >= v for s in scores) for v in scores}
        assert abs(above - k) == min(abs(c - k) for c in achievable)


def test_calibration_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="target_share"):
        calibrate_threshold([0.5], 1.5)
    with pytest.raises(ValueError, match="scores"):
        calibrate_threshold([], 0.5)
