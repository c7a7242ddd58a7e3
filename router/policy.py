"""The query-routing policy: which tier serves a request (fast or reasoning), as a pure function.

`route(request, config, tiers, load, scorer)` depends on nothing but its arguments: no Ray, no
gRPC, no clock. The steps, in order:

1. An explicit tier in the request wins ("fast" / "reasoning" name the configured roles, any other
   name must be a configured tier; otherwise ValueError naming `tier`).
2. Otherwise a scorer gives a reasoning score in [0, 1]: by default the feature scorer below (a
   logistic model over hand-made features, its weights fitted on router/data/default_routing.jsonl
   by `python -m moeray.router.classifier fit-features`), or the optional embedding classifier.
3. score >= RouterConfig.threshold -> the reasoning tier, else the fast tier.
4. When the reasoning tier is saturated (in-flight >= max_inflight_per_tier) and allow_fallback,
   the request goes to the fast tier with fallback=True.

The threshold can be calibrated to a target share of reasoning traffic (RouteLLM's method: the
score quantile on a sample of requests), see `calibrate_threshold`.

The features and their fitted weights live in router/features.py (the cue lexicon is data, in
router/data/cue_lexicon.json).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from moeray.cluster.config import MoerayConfig, RouterConfig
from moeray.router.features import FEATURE_NAMES, default_scorer, extract_features
from moeray.router.messages import RouteDecision, RouteInput, TierLoad


class Scorer(Protocol):
    """Anything that gives a request a reasoning score in [0, 1], with the cues behind it."""

    name: str

    def explain(self, request: RouteInput) -> tuple[float, list[str]]: ...


def resolve_tier(requested: str, config: RouterConfig, tiers: Collection[str]) -> str | None:
    """The tier a request names, or None for "" / "auto". Raises ValueError naming `tier`."""
    if requested in ("", "auto"):
        return None
    if requested in tiers:
        return requested
    role = {"fast": config.fast_tier, "reasoning": config.reasoning_tier}.get(requested)
    if role is not None and role in tiers:
        return role
    known = sorted({*tiers, "auto"})
    raise ValueError(f"tier {requested!r} is not configured; choose one of {known}")


def route(
    request: RouteInput,
    config: RouterConfig,
    tiers: Collection[str],
    load: TierLoad | None = None,
    scorer: Scorer | None = None,
) -> RouteDecision:
    """Decides the tier of one request (see the module docstring for the protocol)."""
    explicit = resolve_tier(request.tier, config, tiers)
    if explicit is not None:
        score = 1.0 if explicit == config.reasoning_tier else 0.0
        return RouteDecision(explicit, score, f"the request asked for tier {explicit!r}")
    fast, reasoning = config.fast_tier, config.reasoning_tier
    if fast not in tiers and reasoning not in tiers:
        raise ValueError(
            f"router.fast_tier {fast!r} and router.reasoning_tier {reasoning!r} are both "
            f"missing from the configured tiers {sorted(tiers)}"
        )
    score, cues = (scorer or default_scorer()).explain(request)
    why = f" ({', '.join(cues)})" if cues else ""
    if reasoning not in tiers:
        return RouteDecision(fast, score, "no reasoning tier is configured")
    if fast not in tiers:
        return RouteDecision(reasoning, score, "no fast tier is configured")
    if score < config.threshold:
        reason = f"score {score:.2f} < threshold {config.threshold:.2f}{why}"
        return RouteDecision(fast, score, reason)
    inflight = (load or TierLoad()).of(reasoning)
    if config.allow_fallback and inflight >= config.max_inflight_per_tier:
        reason = (
            f"score {score:.2f} >= threshold {config.threshold:.2f}{why}, but the reasoning tier "
            f"is saturated ({inflight} in flight, limit {config.max_inflight_per_tier}): "
            f"fallback to the fast tier"
        )
        return RouteDecision(fast, score, reason, fallback=True)
    reason = f"score {score:.2f} >= threshold {config.threshold:.2f}{why}"
    return RouteDecision(reasoning, score, reason)


def calibrate_threshold(scores: Collection[float], target_share: float) -> float:
    """The threshold that sends `target_share` of these requests to the reasoning tier.

    RouteLLM's calibration: on a representative sample of scores, the threshold is the score of
    the k-th highest request, k = round(target_share * n). When ties make that send too many,
    the next higher distinct score is taken if it lands closer to k.
    """
    if not 0.0 <= target_share <= 1.0:
        raise ValueError(f"target_share must be in [0, 1], got {target_share}")
    if not scores:
        raise ValueError("scores must not be empty")
    ranked = sorted(scores, reverse=True)
    k = round(target_share * len(ranked))
    if k == 0:
        return 1.0  # nothing reaches 1.0 except an explicit request: no reasoning traffic
    threshold = ranked[k - 1]
    n_higher = sum(1 for v in ranked if v > threshold)  # what the next distinct score would send
    n_at = n_higher + ranked.count(threshold)
    if n_higher > 0 and abs(n_higher - k) < abs(n_at - k):
        threshold = min(v for v in ranked if v > threshold)
    return float(threshold)


class QueryRouter:
    """The policy bound to a config and a scorer: what the front door calls per request."""

    def __init__(
        self, config: RouterConfig, tiers: Collection[str], scorer: Scorer | None = None
    ) -> None:
        self.config = config
        self.tiers = tuple(tiers)
        self.scorer: Scorer = scorer or default_scorer()

    @classmethod
    def from_config(cls, cfg: MoerayConfig) -> QueryRouter:
        """Features or classifier per cfg.router.policy; ValueError names the field at fault."""
        rc = cfg.router
        scorer: Scorer | None = None
        if rc.policy == "classifier":
            if not rc.classifier_path:
                raise ValueError(
                    "router.classifier_path must be set when router.policy is 'classifier'"
                )
            from moeray.router.classifier import EmbeddingClassifier  # optional extra

            scorer = EmbeddingClassifier.load(rc.classifier_path)
        return cls(rc, [t.name for t in cfg.tiers], scorer)

    def decide(self, request: RouteInput, load: TierLoad | None = None) -> RouteDecision:
        return route(request, self.config, self.tiers, load, self.scorer)

    def features(self, request: RouteInput) -> dict[str, float]:
        """The feature values (for the Route RPC's dry run), whatever the scorer."""
        return dict(zip(FEATURE_NAMES, extract_features(request)))
