"""The peers' models: trained on Iris without downloads, fast paths equal to scikit-learn's."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_iris

from p2pml.config import MODEL_KINDS
from p2pml.ledger import PROBA_ONE
from p2pml.model import Model, forest_proba, held_out


def test_forest_fast_path_equals_predict_proba():
    m = Model("random_forest")
    x = load_iris().data
    np.testing.assert_allclose(forest_proba(m.estimator, x), m.estimator.predict_proba(x), atol=1e-12)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_honest_votes_are_the_models_answer(kind):
    m = Model(kind)
    x, y = held_out()
    votes = m.vote(x, [b"r%d" % i for i in range(len(x))])
    labels = np.array([label for label, _ in votes])
    np.testing.assert_array_equal(labels, m.estimator.predict_proba(x).argmax(axis=1))
    assert (labels == y).mean() >= 0.9
    for _, proba in votes:
        assert len(proba) == 3 and all(0 <= p <= PROBA_ONE for p in proba)
        assert abs(sum(proba) - PROBA_ONE) <= 3  # rounding of three terms


def test_misbehaving_votes_are_deterministic_per_key_and_round():
    x, _ = held_out()
    rounds = [b"round-%d" % i for i in range(len(x))]
    a = Model("knn", "random", key=b"k1").vote(x, rounds)
    assert a == Model("knn", "random", key=b"k1").vote(x, rounds)  # a restart votes the same
    assert a != Model("knn", "random", key=b"k2").vote(x, rounds)
    assert len({label for label, _ in a}) == 3
    assert {label for label, _ in Model("knn", "constant").vote(x, rounds)} == {0}
    with pytest.raises(ValueError, match="unknown behavior"):
        Model("knn", "sneaky")
