"""The routing features: what the feature scorer reads in a request, and its logistic model.

`extract_features(request)` maps a request to FEATURE_NAMES values (length, conversation depth,
questions, numbers, symbols, one per cue family of the lexicon in router/data/cue_lexicon.json,
and two opening patterns); `FeatureScorer` turns them into a reasoning score with weights fitted
on router/data/default_routing.jsonl (`python -m moeray.router.classifier fit-features`, stored
in router/data/feature_weights.json). router/policy.py decides the tier from the score.

THIS IS ON THE HOT PATH of every request: the lexicon is compiled once at import, and only the
head and tail of long prompts are scanned (asks sit at the start or the end), so scoring costs
tens of microseconds whatever the prompt length (bench/routing.py measures it).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from moeray.router.messages import RouteInput

#: Characters of a long prompt scanned for cues, at the head and again at the tail.
SCAN_CHARS = 1000
#: The fitted default weights (written by `python -m moeray.router.classifier fit-features`).
DEFAULT_WEIGHTS_PATH = Path(__file__).resolve().parent / "data" / "feature_weights.json"

#: The cue lexicon (data, not code): per feature, its entries; "a_b" is the phrase "a b", "x*" a
#: prefix. Matching is by words (one dict lookup per word), not by regex alternation, which costs
#: ~250 ns per character per pattern in CPython and would blow the latency budget on long prompts.
LEXICON_PATH = Path(__file__).resolve().parent / "data" / "cue_lexicon.json"
_LEXICON: dict[str, list[str]] = json.loads(LEXICON_PATH.read_text())["features"]
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
        for entry in entries:
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
def default_scorer() -> FeatureScorer:
    return FeatureScorer()
