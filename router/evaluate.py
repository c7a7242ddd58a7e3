"""Held-out accuracy of the routing policies on a labeled JSONL; prints one JSON object.

    python -m moeray.router.evaluate [--data router/data/default_routing.jsonl] [--no-classifier]
    python -m moeray.router.evaluate --test-data router/data/fresh_routing.jsonl

The feature policy is scored with its shipped weights (router/data/feature_weights.json, fitted
on the train split only); the embedding classifier is trained on the train split here and scored
on the test split (skipped, and said so, when the `router-classifier` extra is missing). Also
reports the threshold that would send 30 % / 50 % of the held-out traffic to the reasoning tier.
--test-data scores every row of another file (router/data/fresh_routing.jsonl: 40 requests
written after the features were frozen) with the models fitted on --data's train split.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moeray.router.classifier import DEFAULT_DATA_PATH, LabeledExample, load_labeled_jsonl
from moeray.router.features import FeatureScorer
from moeray.router.messages import RouteInput
from moeray.router.policy import calibrate_threshold


def binary_report(
    scores: Sequence[float], examples: Sequence[LabeledExample], threshold: float = 0.5
) -> dict[str, Any]:
    """Accuracy, and precision/recall of the reasoning label, at a threshold."""
    pred = [s >= threshold for s in scores]
    gold = [e.label == "reasoning" for e in examples]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    return {
        "n": len(examples),
        "accuracy": round(sum(p == g for p, g in zip(pred, gold)) / max(len(gold), 1), 4),
        "reasoning_precision": round(tp / max(tp + fp, 1), 4),
        "reasoning_recall": round(tp / max(tp + fn, 1), 4),
        "reasoning_share": round(sum(pred) / max(len(pred), 1), 4),
    }


def evaluate_features(test: Sequence[LabeledExample]) -> dict[str, Any]:
    scorer = FeatureScorer()
    scores = [scorer.score(RouteInput(prompt=e.text)) for e in test]
    report = binary_report(scores, test)
    report["threshold_for_share"] = {
        str(share): round(calibrate_threshold(scores, share), 4) for share in (0.3, 0.5)
    }
    return report


def evaluate_classifier(
    train: Sequence[LabeledExample], test: Sequence[LabeledExample]
) -> dict[str, Any]:
    try:
        from moeray.router.classifier import EmbeddingClassifier, _embedder

        _embedder()
    except ImportError as e:
        return {"skipped": str(e)}
    clf = EmbeddingClassifier.train(train)
    scores = [float(s) for s in clf.score_texts([e.text for e in test])]
    return binary_report(scores, test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_PATH)
    parser.add_argument(
        "--test-data", type=Path, default=None, help="score every row of this file instead"
    )
    parser.add_argument("--no-classifier", action="store_true")
    args = parser.parse_args(argv)
    train = load_labeled_jsonl(args.data, split="train")
    if args.test_data is not None:
        test = load_labeled_jsonl(args.test_data)
    else:
        test = load_labeled_jsonl(args.data, split="test")
    if not test:
        raise SystemExit(f'{args.data} has no examples with "split": "test"')
    out: dict[str, Any] = {
        "data": str(args.data),
        "test_data": str(args.test_data or args.data),
        "train": len(train),
        "test": len(test),
        "features": evaluate_features(test),
    }
    if not args.no_classifier:
        out["classifier"] = evaluate_classifier(train, test)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
