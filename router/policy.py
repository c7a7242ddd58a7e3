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
SCAN_CHARS = 1000
#: The fitted default weights (written by `python -m moeray.router.classifier fit-features`).
DEFAULT_WEIGHTS_PATH = Path(__file__).resolve().parent / "data" / "feature_weights.json"

# Cue lexicon: per feature, space-separated entries; "a_b" is the phrase "a b", "x*" a prefix.
# Matching is by words (one dict lookup per word), not by regex alternation, which costs ~250 ns
# per character per pattern in CPython and would blow the latency budget on long prompts.
_LEXICON: dict[str, str] = {
    "math": "solve equation equations integra* derivative differentia* probabilit* expected"
    " how_many_ways how_many_integer how_many_positive combination combinations permutation"
    " permutations sum_of series converge* eigen* matrix matrices modulo remainder divisible"
    " divisor divisors prime primes logarithm* log2 log10 sqrt factorial recurrence maximize"
    " maximise minimize minimise compounded interest rate area minimum_number maximum_number"
    " fastest how_long how_far how_fast how_old percent ratio",
    "code": "def class return function null none setstate useeffect segfault segfaults exception"
    " traceback recursionerror bug bugs debug stack_trace stacktrace compile compiler runtime"
    " thread threads deadlock deadlocks race_condition leak leaks complexity algorithm algorithms"
    " implement* refactor* recursive pointer pointers latency throughput p99 oomkilled kubernetes"
    " pod pods database sql query indexes caching cache jvm gpu schema shard sharding replication"
    " failover",
    "proof": "prove proof proving show_that lemma theorem induction inductive rigorous* justify"
    " derive derivation contradiction if_and_only_if iff irrational for_every impossible optimal"
    " correctness invariant terminates",
    "multi_step": "plan planning design architect* trade-off trade-offs tradeoff tradeoffs compare"
    " comparison analyze analyse analysis evaluate strategy strategies optimi* schedul* migrat*"
    " roadmap phase phases pros_and_cons weigh diagnos* investigat* root_cause hypothesis"
    " hypotheses experiment walk_through walk_me_through explain_why explain_how why_does why_is"
    " why_do why_did why_can't why_cant why_would figure_out assumption assumptions estimate"
    " approach structured systematic* constraint constraints recommend_a_plan step",
    "think": "think_step_by_step thinking_step_by_step think_carefully think_hard think_deeply"
    " think_it_through think_through let's_think lets_think reason_carefully reason_through"
    " reason_it_out reason_step_by_step reasoning_about reason_about take_your_time"
    " show_your_work show_the_work show_all_work show_your_reasoning work_it_out work_out"
    " work_through carefully rigorously in_detail step_by_step step-by-step reason",
    "constraints": "must without at_most at_least exactly such_that given no_more_than within"
    " budget requirement requirements guarantee guarantees worst_case never only",
    "fast_task": "translate translation rewrite rephrase paraphrase summarize summarise summary"
    " shorten proofread grammar spelling spell synonym synonyms antonym opposite_of define"
    " definition stand_for mean format capitalize capitalise alphabetical title tagline slogan"
    " caption tweet hashtag haiku poem limerick joke riddle fun_fact name names suggest recommend"
    " list one_sentence one_line briefly in_simple_terms one_word emoji note message email reply"
    " rhyme rhymes pronounce plural past_tense say",
}
_STARTS: dict[str, re.Pattern[str]] = {  # anchored: match() reads only the first words
    "lookup": re.compile(
        r"\s*(what('?s| is| are| does| was)|who|when|where|which|is|are|can"
        r"|how (do|tall|many|long))\b",
        re.IGNORECASE,
    ),
    "chitchat": re.compile(
        r"\s*(hi|hey|hello|yo|thanks|thank you|ok|okay|cool|lol|good (morning|night|evening)"
        r"|what'?s up|how are you|are you|tell me about yourself|i'?m bored|i just)\b",
        re.IGNORECASE,
    ),
}
_TOKEN = re.compile(r"[a-z0-9][a-z0-9'-]*")  # on lowercased text
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_DIGIT_OP = re.compile(r"\d ?[-+*/^<>] ?[\d(]")
_SYMBOL_CHARS = "=^≤≥∑∫√π"
_VARIABLES = frozenset("xyzn")
_CODE_MARKS = ("```", "o(n", "o(log", "()", "{")
_CODE_INDEX = list(_LEXICON).index("code")

Lexicon = tuple[dict[str, list[tuple[int, tuple[str, ...]]]], tuple[tuple[str, int], ...]]


def _compile_lexicon() -> Lexicon:
    """first word -> [(feature index, the phrase's following words)], and (prefix, index)."""
    first: dict[str, list[tuple[int, tuple[str, ...]]]] = {}
    prefixes: list[tuple[str, int]] = []
    for idx, entries in enumerate(_LEXICON.values()):
        for entry in entries.split():
            if entry.endswith("*"):
                prefixes.append((entry[:-1], idx))
                continue
            words = tuple(entry.split("_"))
            first.setdefault(words[0], []).append((idx, words[1:]))
    return first, tuple(prefixes)


_FIRST, _PREFIXES = _compile_lexicon()
_PREFIX_TUPLE = tuple(p for p, _ in _PREFIXES)


@lru_cache(maxsize=1 << 16)
def _word_hits(word: str) -> tuple[int, ...]:
    """Feature indices a single word hits (whole-word entries and prefixes); memoised."""
    hits = [idx for idx, rest in _FIRST.get(word, ()) if not rest]
    if word.startswith(_PREFIX_TUPLE):
        hits += [idx for p, idx in _PREFIXES if word.startswith(p)]
    return tuple(hits)


_PHRASE_HEADS = {w: [(i, r) for i, r in entries if r] for w, entries in _FIRST.items()}
_PHRASE_HEADS = {w: entries for w, entries in _PHRASE_HEADS.items() if entries}


def _count_cues(words: list[str]) -> list[int]:
    """Occurrences of each _LEXICON feature's entries in a word list (a phrase needs all words)."""
    counts = [0] * len(_LEXICON)
    for i, w in enumerate(words):
        for idx in _word_hits(w):
            counts[idx] += 1
        for idx, rest in _PHRASE_HEADS.get(w, ()):
            if tuple(words[i + 1 : i + 1 + len(rest)]) == rest:
                counts[idx] += 1
    return counts


#: The features, in the order of the weight vector.
FEATURE_NAMES: tuple[str, ...] = (
    "length",
    "depth",
    "questions",
    "numbers",
    "symbols",
    *_LEXICON.keys(),
    *_STARTS.keys(),
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


def scan_view(text: str) -> str:
    """The head and tail of a long text (SCAN_CHARS each), where the ask usually sits."""
    if len(text) <= 2 * SCAN_CHARS:
        return text
    return text[:SCAN_CHARS] + "\n" + text[-SCAN_CHARS:]


def extract_features(request: RouteInput) -> tuple[float, ...]:
    """The feature vector of a request, in FEATURE_NAMES order, each in [0, 1.5].

    Cues are read from the newest user turn (the ask); length counts the whole text view.
    """
    whole = request.text()
    ask = scan_view(request.last_user_text())
    low = ask.lower()
    words = _TOKEN.findall(low)
    # words of the ask; for a chat or a clipped document, ~6 characters a word of the whole
    n_words = len(words) if len(whole) == len(ask) else len(whole) // 6
    user_turns = sum(1 for m in request.messages or () if m.role == "user")
    symbols = sum(low.count(c) for c in _SYMBOL_CHARS) + len(_DIGIT_OP.findall(low))
    symbols += sum(1 for w in words if w in _VARIABLES)
    cues = _count_cues(words)
    cues[_CODE_INDEX] += sum(low.count(m) for m in _CODE_MARKS)
    return (
        min(math.log1p(n_words) / math.log(200.0), 1.5),  # length: 1.0 at 200 words
        min(max(user_turns - 1, 0) / 4.0, 1.0),  # depth: follow-ups of a conversation
        _saturating(ask.count("?")),
        _saturating(len(_NUMBER.findall(ask)) // 2),
        _saturating(symbols),
        *(_saturating(c) for c in cues),
        *(1.0 if p.match(ask) else 0.0 for p in _STARTS.values()),
    )


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
