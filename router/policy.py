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

THE DECISION IS ON THE HOT PATH of every request: regexes are compiled once at import, and only
the head and tail of long prompts are scanned (asks sit at the start or the end), so a decision
costs tens of microseconds whatever the prompt length (bench/routing.py measures it).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from moeray.cluster.config import MoerayConfig, RouterConfig
from moeray.router.messages import RouteDecision, RouteInput, TierLoad

#: Characters of a long prompt scanned for cues, at the head and again at the tail.
SCAN_CHARS = 2000
#: The fitted default weights (written by `python -m moeray.router.classifier fit-features`).
DEFAULT_WEIGHTS_PATH = Path(__file__).resolve().parent / "data" / "feature_weights.json"

_I = re.IGNORECASE
_CUES: dict[str, re.Pattern[str]] = {
    "math": re.compile(
        r"\b(solve|equations?|integra\w*|derivative|differentia\w*|probabilit\w*|expected"
        r"|how many (ways|integer|positive)|combinations?|permutations?|sum of|series|converge\w*"
        r"|eigen\w*|matri(x|ces)|modulo|remainder|divisible|divisors?|primes?|logarithm\w*|log\d"
        r"|sqrt|factorial|recurrence|maximi[sz]e|minimi[sz]e|compounded|interest|rate|area"
        r"|minimum number|maximum number|fastest|how (long|far|fast|old)|percent|ratio)\b",
        _I,
    ),
    "symbols": re.compile(r"\d\s*[-+*/^=<>]\s*[\d(a-z]|[a-z]\s*\^\s*\d|[=≤≥∑∫√π]|\b[xyzn]\b", _I),
    "code": re.compile(
        r"```|\b(def|class|return|function|null|none|setstate|useeffect|segfaults?|exception"
        r"|traceback|recursionerror|bugs?|debug|stack ?trace|compiler?|runtime|threads?|deadlocks?"
        r"|race condition|leaks?|o\(n|o\(log|complexity|algorithms?|implement\w*|refactor\w*"
        r"|recursive|pointers?|latency|throughput|p99|oomkilled|kubernetes|pods?|database"
        r"|sql|query|indexes|caching|cache|jvm|gpu|schema|sharding?|replication|failover)\b",
        _I,
    ),
    "proof": re.compile(
        r"\b(prove|proof|proving|show that|lemma|theorem|induction|inductive|rigorous\w*"
        r"|justify|derive|derivation|contradiction|if and only if|iff|irrational|for every"
        r"|impossible|optimal|correctness|invariant|terminates)\b",
        _I,
    ),
    "multi_step": re.compile(
        r"\b(plan|planning|design|architect\w*|trade-?offs?|compare|comparison|analy[sz]e"
        r"|analysis|evaluate|strateg(y|ies)|optimi[sz]\w*|schedul\w*|migrat\w*|roadmap|phases?"
        r"|pros and cons|weigh|diagnos\w*|investigat\w*|root cause|hypothes[ie]s|experiment"
        r"|walk (me )?through|explain (why|how)|why (does|is|do|did|can'?t|would)|figure out"
        r"|assumptions?|estimate|approach|structured|systematic\w*|constraints?|recommend a plan"
        r"|step)\b",
        _I,
    ),
    "think": re.compile(
        r"\b(think(ing)? (step[- ]by[- ]step|carefully|hard|deeply|it through|through)"
        r"|let'?s think|reason(ing)? (carefully|through|it out|step[- ]by[- ]step|about)"
        r"|take your time|show (your|the|all) work|show your reasoning|work (it )?(out|through)"
        r"|carefully|rigorously|in detail|step[- ]by[- ]step|reason)\b",
        _I,
    ),
    "constraints": re.compile(
        r"\b(must|without|at most|at least|exactly|such that|given|no more than|within|budget"
        r"|requirements?|guarantees?|worst case|never|only)\b",
        _I,
    ),
    "fast_task": re.compile(
        r"\b(translate|translation|rewrite|rephrase|paraphrase|summari[sz]e|summary|shorten"
        r"|proofread|grammar|spelling|spell|synonyms?|antonym|opposite of|define|definition"
        r"|stand for|mean|format|capitali[sz]e|alphabetical|title|tagline|slogan|caption|tweet"
        r"|hashtag|haiku|poem|limerick|joke|riddle|fun fact|names?|suggest|recommend|list"
        r"|one sentence|one line|briefly|in simple terms|one word|emoji|note|message|email"
        r"|reply|rhymes?|pronounce|plural|past tense|say)\b",
        _I,
    ),
    "lookup": re.compile(
        r"^\s*(what('?s| is| are| does| was)|who|when|where|which|is|are|can|how (do|tall"
        r"|many|long) (i|you|is|are|should|in|cups|ounces|bones|days|players)?)\b",
        _I,
    ),
    "chitchat": re.compile(
        r"^\s*(hi|hey|hello|yo|thanks|thank you|ok|okay|cool|lol|good (morning|night|evening)"
        r"|what'?s up|how are you|are you|tell me about yourself|i'?m bored|i just)\b",
        _I,
    ),
}
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_WORD = re.compile(r"\S+")

#: The features, in the order of the weight vector.
FEATURE_NAMES: tuple[str, ...] = (
    "length",
    "depth",
    "questions",
    "numbers",
    *_CUES.keys(),
)

#: Hand-set priors: the fit pulls the weights from here toward the data (ridge around the prior),
#: so a feature the training data never exercises (e.g. depth, with single-turn data) keeps it.
PRIOR_BIAS = -1.0
PRIOR_WEIGHTS: dict[str, float] = {
    "length": 1.5,
    "depth": 1.0,
    "questions": 0.3,
    "numbers": 1.0,
    "math": 1.5,
    "symbols": 1.0,
    "code": 1.0,
    "proof": 2.0,
    "multi_step": 1.5,
    "think": 2.5,
    "constraints": 0.8,
    "fast_task": -1.5,
    "lookup": -1.0,
    "chitchat": -1.5,
}


def _saturating(count: int) -> float:
    """0 -> 0, 1 -> 0.5, 2 -> 0.75, ...: the first cue counts most."""
    return 1.0 - 0.5**count


def _scan_view(text: str) -> str:
    if len(text) <= 2 * SCAN_CHARS:
        return text
    return text[:SCAN_CHARS] + "\n" + text[-SCAN_CHARS:]


def extract_features(request: RouteInput) -> tuple[float, ...]:
    """The feature vector of a request, in FEATURE_NAMES order, each in [0, ~1.5].

    Cues are read from the newest user turn (the ask); length counts the whole text view.
    """
    whole = request.text()
    ask = _scan_view(request.last_user_text())
    words = len(_WORD.findall(whole)) if len(whole) < 4 * SCAN_CHARS else len(whole) // 6
    user_turns = sum(1 for m in request.messages or () if m.role == "user")
    base = (
        min(math.log1p(words) / math.log(200.0), 1.5),  # length: 1.0 at 200 words
        min(max(user_turns - 1, 0) / 4.0, 1.0),  # depth: follow-ups of a conversation
        _saturating(ask.count("?")),
        _saturating(len(_NUMBER.findall(ask)) // 2),
    )
    cues = []
    for name, pattern in _CUES.items():
        if name in ("lookup", "chitchat"):
            cues.append(1.0 if pattern.search(ask) else 0.0)
        else:
            cues.append(_saturating(len(pattern.findall(ask))))
    return base + tuple(cues)


@dataclass(frozen=True)
class FeatureWeights:
    """A logistic model over FEATURE_NAMES: score = sigmoid(bias + sum(w * f))."""

    bias: float
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.weights) != len(FEATURE_NAMES):
            raise ValueError(
                f"weights must have {len(FEATURE_NAMES)} values ({', '.join(FEATURE_NAMES)}), "
                f"got {len(self.weights)}"
            )

    @classmethod
    def prior(cls) -> FeatureWeights:
        return cls(PRIOR_BIAS, tuple(PRIOR_WEIGHTS[n] for n in FEATURE_NAMES))

    def to_json(self) -> dict[str, Any]:
        return {"bias": self.bias, "weights": dict(zip(FEATURE_NAMES, self.weights))}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FeatureWeights:
        named = data.get("weights")
        if not isinstance(named, Mapping):
            raise ValueError("feature weights file: `weights` must be a mapping of feature names")
        missing = [n for n in FEATURE_NAMES if n not in named]
        if missing:
            raise ValueError(f"feature weights file: `weights` lacks {missing}")
        return cls(float(data["bias"]), tuple(float(named[n]) for n in FEATURE_NAMES))

    @classmethod
    def load(cls, path: str | Path) -> FeatureWeights:
        return cls.from_json(json.loads(Path(path).read_text()))


def sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


class Scorer(Protocol):
    """Anything that gives a request a reasoning score in [0, 1], with the cues behind it."""

    name: str

    def explain(self, request: RouteInput) -> tuple[float, list[str]]: ...


class FeatureScorer:
    """The default scorer: a logistic model over `extract_features`."""

    name = "features"

    def __init__(self, weights: FeatureWeights | None = None) -> None:
        self.weights = weights or default_weights()

    def score(self, request: RouteInput) -> float:
        return self.explain(request)[0]

    def explain(self, request: RouteInput) -> tuple[float, list[str]]:
        """Returns (score, the features pushing hardest toward the side the score lands on)."""
        f = extract_features(request)
        contrib = [w * x for w, x in zip(self.weights.weights, f)]
        score = sigmoid(self.weights.bias + sum(contrib))
        sign = 1.0 if score >= 0.5 else -1.0
        ranked = sorted(range(len(f)), key=lambda i: -sign * contrib[i])
        cues = [FEATURE_NAMES[i] for i in ranked[:3] if sign * contrib[i] > 0.05]
        return score, cues

    def features(self, request: RouteInput) -> dict[str, float]:
        return dict(zip(FEATURE_NAMES, extract_features(request)))


@lru_cache(maxsize=1)
def default_weights() -> FeatureWeights:
    """The fitted weights shipped in router/data, or the priors when the file is absent."""
    if DEFAULT_WEIGHTS_PATH.exists():
        return FeatureWeights.load(DEFAULT_WEIGHTS_PATH)
    return FeatureWeights.prior()


@lru_cache(maxsize=1)
def _default_scorer() -> FeatureScorer:
    return FeatureScorer()


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
    score, cues = (scorer or _default_scorer()).explain(request)
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
    the k-th highest request, k = round(target_share * n); ties may send a few more.
    """
    if not 0.0 <= target_share <= 1.0:
        raise ValueError(f"target_share must be in [0, 1], got {target_share}")
    if not scores:
        raise ValueError("scores must not be empty")
    ranked = sorted(scores, reverse=True)
    k = round(target_share * len(ranked))
    if k == 0:
        return 1.0  # nothing reaches 1.0 except an explicit request: no reasoning traffic
    return float(ranked[k - 1])


class QueryRouter:
    """The policy bound to a config and a scorer: what the front door calls per request."""

    def __init__(
        self, config: RouterConfig, tiers: Collection[str], scorer: Scorer | None = None
    ) -> None:
        self.config = config
        self.tiers = tuple(tiers)
        self.scorer: Scorer = scorer or _default_scorer()

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
