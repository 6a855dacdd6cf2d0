"""Truncated sentence embeddings and a linear probe: the downstream score as a function of the dimensions kept.

* `label_pairs()`: pairs of texts with a similarity score (1 for the same label, 0 for
  different labels), half of each, drawn with a seeded generator; what the recipe trains on.
* `truncation_indices()` / `Truncation`: how ``k`` of the ``p`` dimensions are kept:

  - ``"variance"``: the ``k`` units of largest variance on the probe's training embeddings, no
    rotation (what a decorrelated embedding is meant to allow);
  - ``"pca"``: the first ``k`` principal components of the probe's training embeddings (a
    rotation fitted after training: the best linear ``k``-dimensional reconstruction);
  - ``"first"``: the first ``k`` dimensions (what ``MatryoshkaLoss`` trains for).

* `probe_accuracy()`: a logistic-regression probe on the kept dimensions (features
  standardised on the probe's training set); its inverse regularisation ``C`` is chosen on the
  development set, and the test set is scored once, with the chosen ``C``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["TRUNCATIONS", "Truncation", "accuracy_vs_k", "fit_truncation", "label_pairs", "probe_accuracy"]

TRUNCATIONS = ("variance", "pca", "first")


def label_pairs(texts: Sequence[str], labels: Sequence[int], n_pairs: int, seed: int) -> dict[str, list]:
    """``n_pairs`` pairs ``(sentence_0, sentence_1, score)``: half with equal labels (score 1.0), half not (0.0).

    Pairs are drawn with ``random.Random(seed)``, without pairing a text with itself.
    """
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    by_label: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(int(label), []).append(i)
    classes = sorted(by_label)
    if len(classes) < 2 or any(len(v) < 2 for v in by_label.values()):
        raise ValueError("label_pairs needs at least two labels with two texts each")
    rng = random.Random(seed)
    first, second, score = [], [], []
    for n in range(n_pairs):
        same = n % 2 == 0
        a_label = rng.choice(classes)
        if same:
            i, j = rng.sample(by_label[a_label], 2)
        else:
            b_label = rng.choice([c for c in classes if c != a_label])
            i, j = rng.choice(by_label[a_label]), rng.choice(by_label[b_label])
        first.append(texts[i])
        second.append(texts[j])
        score.append(1.0 if same else 0.0)
    order = list(range(n_pairs))
    rng.shuffle(order)
    return {"sentence_0": [first[i] for i in order], "sentence_1": [second[i] for i in order],
            "score": [score[i] for i in order]}


@dataclass
class Truncation:
    """A fitted way of keeping ``k`` dimensions: ``apply(x (n, p), k) → (n, k)``."""

    method: str
    mean: np.ndarray
    basis: np.ndarray | None  # (p, p) principal directions as columns (pca)
    order: np.ndarray  # unit order (variance: by decreasing variance; first: 0..p-1)

    def apply(self, x: np.ndarray, k: int) -> np.ndarray:
        if not 1 <= k <= x.shape[1]:
            raise ValueError(f"k={k} must be between 1 and the embedding width {x.shape[1]}")
        if self.method == "pca" and self.basis is not None:
            return (x - self.mean) @ self.basis[:, :k]
        return x[:, self.order[:k]]


def fit_truncation(method: str, train: np.ndarray) -> Truncation:
    """Fit a `Truncation` on the probe's training embeddings ``train (n, p)``."""
    if method not in TRUNCATIONS:
        raise ValueError(f"truncation {method!r} is not valid; choose one of {list(TRUNCATIONS)}")
    train = np.asarray(train, dtype=np.float64)
    mean = train.mean(axis=0)
    p = train.shape[1]
    if method == "first":
        return Truncation(method, mean, None, np.arange(p))
    if method == "variance":
        return Truncation(method, mean, None, np.argsort(-train.var(axis=0, ddof=1), kind="stable"))
    centred = train - mean
    _, _, vt = np.linalg.svd(centred, full_matrices=True)
    return Truncation(method, mean, vt.T, np.arange(p))


def probe_accuracy(
    train: tuple[np.ndarray, np.ndarray],
    dev: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray] | None,
    c_grid: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
    seed: int = 0,
) -> dict[str, float]:
    """Logistic-regression probe: ``C`` chosen on ``dev``; ``test`` scored once with it.

    Returns ``{"dev": accuracy, "test": accuracy or nan, "C": chosen C}``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train[0])
    xs = {name: scaler.transform(split[0]) for name, split in (("train", train), ("dev", dev))}
    best = None
    for c in c_grid:
        probe = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(xs["train"], train[1])
        accuracy = float((probe.predict(xs["dev"]) == dev[1]).mean())
        if best is None or accuracy > best[0]:
            best = (accuracy, c, probe)
    if best is None:
        raise ValueError("c_grid is empty: give at least one value of C")
    accuracy, c, probe = best
    test_accuracy = float("nan")
    if test is not None:
        test_accuracy = float((probe.predict(scaler.transform(test[0])) == test[1]).mean())
    return {"dev": accuracy, "test": test_accuracy, "C": c}


def accuracy_vs_k(
    embeddings: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    method: str,
    ks: Sequence[int],
    seed: int = 0,
) -> dict[int, dict[str, float]]:
    """``k → probe_accuracy`` with ``k`` dimensions kept by ``method``; splits ``train``, ``dev``, ``test``."""
    truncation = fit_truncation(method, embeddings["train"])
    out = {}
    for k in ks:
        cut = {split: truncation.apply(np.asarray(x, dtype=np.float64), k) for split, x in embeddings.items()}
        out[int(k)] = probe_accuracy(
            (cut["train"], labels["train"]), (cut["dev"], labels["dev"]),
            (cut["test"], labels["test"]) if "test" in cut else None, seed=seed,
        )
    return out
