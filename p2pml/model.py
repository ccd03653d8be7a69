"""The peer's own model: scikit-learn classifiers trained on Iris, and the voting behaviours.

Training uses the dataset that ships inside scikit-learn (no download) and a fixed split, so
every run of every peer sees the same training rows and ``held_out()`` rows are never trained on.
Behaviours other than ``honest`` exist so that slashing can be seen and tested; their "random"
choice is a hash of the key and the round, so a restarted node votes exactly as before and never
equivocates by accident.
"""

from __future__ import annotations

import hashlib

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import load_iris
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from p2pml.ledger import CLASSES, PROBA_ONE

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
# honest: the model's answer. random: a class drawn from hash(key, round). constant: always
# CONSTANT_LABEL. wrong: the class after the model's answer (two such peers collude on the same
# wrong class). equivocate: votes honestly, and also signs a conflicting commit for every round,
# which it sends to half of the peers. copycat: runs no model; waits for another peer's reveal,
# then commits to and reveals the class most reveals show. withhold: commits honestly and never
# reveals. (The node does the last three; see service.Node.)
BEHAVIORS = ("honest", "random", "constant", "wrong", "equivocate", "copycat", "withhold")
CONSTANT_LABEL = 0  # what the "constant" behaviour always votes
SPLIT_SEED = 0  # held-out accuracy varies with the split: see docs/ledger.md
TEST_FRACTION = 0.3


def build(kind: str):
    """A fresh, unfitted estimator of one of config.MODEL_KINDS."""
    if kind == "logistic_regression":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    if kind == "random_forest":
        return RandomForestClassifier(n_estimators=100, random_state=0)
    if kind == "gradient_boosting":
        return GradientBoostingClassifier(random_state=0)
    if kind == "knn":
        return make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=7))
    if kind == "svm":
        return make_pipeline(StandardScaler(), CalibratedClassifierCV(SVC(), ensemble=False))
    raise ValueError(f"unknown model kind {kind!r}")


def forest_proba(forest: RandomForestClassifier, rows: np.ndarray) -> np.ndarray:
    """``forest.predict_proba(rows)``, computed by summing the trees directly.

    The forest's own method dispatches every tree through joblib, which costs about 3.5 ms for
    one row against about 0.25 ms for the trees themselves; the result is the same (tested)."""
    x = np.ascontiguousarray(rows, dtype=np.float32)  # what the trees compare against
    trees = forest.estimators_
    total = trees[0].tree_.predict(x)[:, : forest.n_classes_].copy()
    for tree in trees[1:]:
        total += tree.tree_.predict(x)[:, : forest.n_classes_]
    return total / len(trees)


def _split():
    data = load_iris()
    return train_test_split(data.data, data.target, test_size=TEST_FRACTION,
                            random_state=SPLIT_SEED, stratify=data.target)


def held_out() -> tuple[np.ndarray, np.ndarray]:
    """Iris rows no peer trained on, with their true labels."""
    _, x_test, _, y_test = _split()
    return x_test, y_test


class Model:
    """One peer's voter: ``vote(rows, rounds)`` gives ``(label, probabilities in millionths)``."""

    def __init__(self, kind: str, behavior: str = "honest", key: bytes = b""):
        if behavior not in BEHAVIORS:
            raise ValueError(f"unknown behavior {behavior!r}; choose one of {', '.join(BEHAVIORS)}")
        self.kind = kind
        self.behavior = behavior
        self._key = key
        x_train, _, y_train, _ = _split()
        self.estimator = build(kind).fit(x_train, y_train)
        if kind == "random_forest":
            self.predict_proba = lambda rows: forest_proba(self.estimator, rows)
        else:
            self.predict_proba = self.estimator.predict_proba

    def vote(self, rows: np.ndarray, rounds: list[bytes]) -> list[tuple[int, tuple[int, ...]]]:
        if self.behavior in ("honest", "equivocate", "withhold", "copycat"):
            proba = self.predict_proba(rows)
            labels = proba.argmax(axis=1)
            ppm = np.rint(proba * PROBA_ONE).astype(np.int64).clip(0, PROBA_ONE)
            return [(int(lab), tuple(int(p) for p in row)) for lab, row in zip(labels, ppm)]
        if self.behavior == "wrong":
            labels = (self.predict_proba(rows).argmax(axis=1) + 1) % len(CLASSES)
        elif self.behavior == "random":
            labels = [hashlib.sha256(self._key + rid).digest()[0] % len(CLASSES) for rid in rounds]
        else:
            labels = [CONSTANT_LABEL] * len(rounds)
        return [(int(label), one_hot(int(label))) for label in labels]


def one_hot(label: int) -> tuple[int, ...]:
    return tuple(PROBA_ONE if c == label else 0 for c in range(len(CLASSES)))
