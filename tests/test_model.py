"""The peers' models: trained on Iris without downloads, fast paths equal to scikit-learn's."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier

from p2pml import model
from p2pml.config import MODEL_KINDS
from p2pml.ledger import PROBA_ONE
from p2pml.model import Model, _Guarded, _split, fast_predict_proba, forest_proba, held_out


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


# Fast paths: Model.predict_proba computes each kind's answer with numpy from the fitted
# parameters; it must give scikit-learn's answer (to 1e-9, same argmax) on every kind of row.

TOLERANCE = 1e-9


@functools.cache
def _model(kind: str) -> Model:
    return Model(kind)


def _rows_on_thresholds(estimator) -> np.ndarray:
    """Iris rows with one feature moved exactly onto a split's threshold, onto its float32
    rounding and onto the float32 values either side (the trees compare in float32)."""
    trees = (estimator.estimators_ if isinstance(estimator, RandomForestClassifier)
             else estimator.estimators_.ravel())
    features, thresholds = [], []
    for tree in trees:
        split = tree.tree_.children_left != -1
        features.append(tree.tree_.feature[split])
        thresholds.append(tree.tree_.threshold[split])
    feature, threshold = np.concatenate(features), np.concatenate(thresholds)
    t32 = threshold.astype(np.float32)
    values = [threshold, t32, np.nextafter(t32, np.float32(np.inf)), np.nextafter(t32, np.float32(-np.inf))]
    x = load_iris().data
    rows = []
    for v in values:
        r = x[np.arange(len(threshold)) % len(x)].copy()
        r[np.arange(len(threshold)), feature] = v.astype(np.float64)
        rows.append(r)
    return np.vstack(rows)


def _test_rows(kind: str) -> dict[str, np.ndarray]:
    x = load_iris().data
    lo, hi = x.min(axis=0), x.max(axis=0)
    rng = np.random.default_rng(0)
    spread = rng.uniform(lo - 0.25 * (hi - lo), hi + 0.25 * (hi - lo), size=(3000, 4))
    rows = {
        "held out": held_out()[0],
        "iris (every training point)": x,
        "random": spread,
        "random on Iris's 0.1 grid (ties)": np.round(spread, 1),
        "duplicates": np.repeat(x[::7], 3, axis=0),
    }
    if kind in ("random_forest", "gradient_boosting"):
        rows["on thresholds"] = _rows_on_thresholds(_model(kind).estimator)
    return {name: np.ascontiguousarray(r, dtype=np.float64) for name, r in rows.items()}


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_fast_path_equals_scikit_learn(kind):
    m = _model(kind)
    assert isinstance(m.predict_proba, _Guarded)  # the fast path was chosen
    for name, rows in _test_rows(kind).items():
        got, want = m.predict_proba(rows), m.estimator.predict_proba(rows)
        assert got.shape == want.shape and got.dtype == np.float64, name
        np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE, err_msg=name)
        np.testing.assert_array_equal(got.argmax(axis=1), want.argmax(axis=1), err_msg=name)
    # one row and small batches, as the node calls it (scikit-learn's answer on the same call)
    rows = _test_rows(kind)["random"][:64]
    for n in (1, 8, 64):
        for start in range(0, 64, max(n, 4)):
            batch = rows[start : start + n]
            np.testing.assert_allclose(m.predict_proba(batch), m.estimator.predict_proba(batch),
                                       rtol=0, atol=TOLERANCE)


def test_fast_path_is_deterministic_across_models():
    rows = _test_rows("knn")["random"][:200]
    for kind in MODEL_KINDS:
        np.testing.assert_array_equal(Model(kind).predict_proba(rows), _model(kind).predict_proba(rows))


def test_knn_ties_that_decide_the_vote_go_to_scikit_learn():
    """Midpoints between training points put different classes at the same distance: where that
    tie is at the 7th neighbour, scikit-learn's search order decides, so the fast path asks it."""
    m = _model("knn")
    x_train = _split()[0]
    i, j = np.triu_indices(len(x_train), 1)
    mid = (x_train[i] + x_train[j]) / 2
    asked = []

    def slow(rows):
        asked.append(len(rows))
        return m.estimator.predict_proba(rows)

    fast = fast_predict_proba(m.estimator, slow)
    np.testing.assert_array_equal(fast(mid), m.estimator.predict_proba(mid))
    assert 0 < sum(asked) < len(mid) / 20  # some rows, and only a few


def _outcome(fn, rows):
    try:
        return "ok", np.asarray(fn(rows)).tolist()
    except Exception as e:  # noqa: BLE001 - whatever it is, it must be the same one
        return type(e).__name__, str(e)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_odd_input_is_handled_as_before(kind):
    m = _model(kind)
    before = ((lambda rows: forest_proba(m.estimator, rows)) if kind == "random_forest"
              else m.estimator.predict_proba)
    x = held_out()[0][:3]
    odd = [x.tolist(), x.astype(np.float32), np.asfortranarray(x), x[:, :3], x[0], x[:0],
           np.where(np.eye(3, 4, dtype=bool), np.nan, x[:, :4]), np.full((2, 4), np.inf),
           np.full((1, 4), 1e39), x.astype(np.int64)]
    for rows in odd:
        assert _outcome(m.predict_proba, rows) == _outcome(before, rows)


def test_a_fast_path_that_disagrees_is_not_used(monkeypatch):
    monkeypatch.setitem(model._PROBA, "logistic", lambda params, slow: lambda rows: 1 - slow(rows))
    m = Model("logistic_regression")
    assert m.predict_proba == m.estimator.predict_proba


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_a_model_trained_in_a_child_process_votes_exactly_the_same(kind):
    """What a node runs: the fast path's parameters from `python -m p2pml.model KIND`, numpy
    here; scikit-learn only for what the fast path leaves to it (trained then, on first use)."""
    child = Model(kind, separate=True)
    assert child.estimator is None and isinstance(child.predict_proba, _Guarded)
    assert isinstance(child.predict_proba.slow, model._Sklearn) and child.predict_proba.slow._proba is None
    here = _model(kind)
    for name, rows in _test_rows(kind).items():
        np.testing.assert_array_equal(child.predict_proba(rows), here.predict_proba(rows), err_msg=name)
    x, _ = held_out()
    assert child.vote(x, [b""] * len(x)) == here.vote(x, [b""] * len(x))
    if kind == "knn":  # a tie that decides the vote: scikit-learn, loaded for it
        x_train = _split()[0]
        i, j = np.triu_indices(len(x_train), 1)
        mid = np.ascontiguousarray((x_train[i] + x_train[j]) / 2)
        np.testing.assert_array_equal(child.predict_proba(mid), here.estimator.predict_proba(mid))
        assert child.predict_proba.slow._proba is not None


def test_on_the_event_loop_a_vote_that_needs_scikit_learn_is_left_to_a_thread():
    """``vote_inline`` (what a node calls on its event loop) gives None instead of loading
    scikit-learn for a knn tie (about 0.8 s); ``vote`` in a worker thread loads it, and from
    then on ``vote_inline`` answers, the same as scikit-learn."""
    import concurrent.futures

    child = Model("knn", separate=True)
    x_train = _split()[0]
    i, j = np.triu_indices(len(x_train), 1)
    mid = np.ascontiguousarray((x_train[i] + x_train[j]) / 2)
    x = held_out()[0]
    assert child.vote_inline(x, [b""] * len(x)) == child.vote(x, [b""] * len(x))  # no tie: fast
    assert child.vote_inline(mid, [b""] * len(mid)) is None
    assert child.predict_proba.slow._proba is None  # not loaded by it
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two threads at once train it once
        first, second = (pool.submit(child.vote, mid, [b""] * len(mid)) for _ in range(2))
        assert first.result() == second.result() == _model("knn").vote(mid, [b""] * len(mid))
    assert child.vote_inline(mid, [b""] * len(mid)) == first.result()


def test_parameters_cross_processes_exactly():
    m = _model("svm")
    found = model.fast_params(m.estimator)
    (name, params), card = model._unpack(model._pack(*found, m.card))
    assert card == m.card and card.framework == "builtin" and card.model == "svm"
    assert name == found[0] and params.keys() == found[1].keys()
    for key, value in found[1].items():
        np.testing.assert_array_equal(params[key], value)
        assert np.asarray(params[key]).dtype == np.asarray(value).dtype
    with pytest.raises(ValueError):
        model._unpack(model._pack("pickle", {}, m.card))


def test_training_child_refuses_an_unknown_kind_clearly():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "p2pml.model", "resnet"], capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 2 and "unknown model kind 'resnet'" in r.stderr
    assert Model("knn", separate=True).kind == "knn"  # and a good one works


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_a_row_gets_the_same_answer_alone_and_in_any_batch(kind):
    """A restarted node recomputes its commitments in other batches than the first time: the
    fast path must give a row the same bits whatever rows come with it."""
    m = _model(kind)
    rows = _test_rows(kind)["random"][:64]
    together = m.predict_proba(rows)
    for i in range(len(rows)):
        np.testing.assert_array_equal(m.predict_proba(rows[i : i + 1])[0], together[i])
    np.testing.assert_array_equal(m.predict_proba(np.ascontiguousarray(rows[::-1]))[::-1], together)


def test_a_nodes_model_trains_in_its_child_while_the_node_goes_on():
    """``separate``: the child starts at once and is waited for at the first use (a node reads
    its log meanwhile: about 1.5 s off every start-up)."""
    m = Model("random_forest", separate=True)
    assert m._training is not None and m._training._child.poll() is None  # still training
    x, _ = held_out()
    assert m.vote(x, [b""] * len(x)) == _model("random_forest").vote(x, [b""] * len(x))  # waits
    assert m._training is None and isinstance(m.predict_proba, _Guarded)
    m.finish()  # once is enough
    assert m._training is None
