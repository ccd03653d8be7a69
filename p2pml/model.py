"""The peer's own model: a built-in scikit-learn kind trained on the task, or a model file of
the operator's own (p2pml.modelfile), its signed card, and the voting behaviours.

Training uses the task's fixed split (p2pml.task), so every run of every peer sees the same
training rows and the held-out rows are never trained on.
Behaviours other than ``honest`` exist so that slashing can be seen and tested; their "random"
choice is a hash of the key and the round, so a restarted node votes exactly as before and never
equivocates by accident.

A node trains a built-in kind in a child process (``python -m p2pml.model KIND``), which sends back
the fitted parameters its numpy fast path needs: scikit-learn and scipy, about 90 MB resident,
are then never loaded in the node (unless a row needs scikit-learn itself, see ``_Sklearn``).
This module imports scikit-learn only inside the functions that train or inspect an estimator.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from p2pml.ledger import BPS, IRIS_FEATURES, MAX_VALUE, PROBA_ONE, VALUE_ONE, Card, Task
from p2pml.task import TaskData, TaskSource, cached, rows_root

FEATURES = IRIS_FEATURES  # the default task's
# honest: the model's answer. random: a class (or a value within the training targets' range)
# drawn from hash(key, round). constant: always CONSTANT_LABEL (regression: the lowest training
# target). wrong: the class after the model's answer (two such peers collude on the same wrong
# class); regression: the answer plus a fixed bias (half the training targets' range). equivocate: votes honestly, and also signs a conflicting commit for every round,
# which it sends to half of the peers. copycat: runs no model; waits for another peer's reveal,
# then commits to and reveals the class most reveals show. withhold: commits honestly and never
# reveals. (The node does the last three; see service.Node.)
BEHAVIORS = ("honest", "random", "constant", "wrong", "equivocate", "copycat", "withhold")
CONSTANT_LABEL = 0  # what the "constant" behaviour always votes
CHILD_TIMEOUT_S = 120  # training in a child process takes 1-3 s; this long only if it is stuck
PARAMS_FORMAT = 2  # of what the child sends back

log = logging.getLogger(__name__)


def build(kind: str, regression: bool = False):
    """A fresh, unfitted estimator of one of config.MODEL_KINDS (REGRESSION_KINDS)."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if regression:
        from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
        from sklearn.linear_model import Ridge
        from sklearn.neighbors import KNeighborsRegressor
        from sklearn.svm import SVR

        makers = {"linear_regression": lambda: make_pipeline(StandardScaler(), Ridge(alpha=1.0)),
                  "random_forest": lambda: RandomForestRegressor(n_estimators=100, random_state=0),
                  "gradient_boosting": lambda: GradientBoostingRegressor(random_state=0),
                  "knn": lambda: make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=7)),
                  "svm": lambda: make_pipeline(StandardScaler(), SVR(C=100.0))}
        if kind not in makers:
            raise ValueError(f"unknown regression model kind {kind!r}")
        return makers[kind]()
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
    if kind == "linear_regression":
        raise ValueError("linear_regression is for regression tasks (logistic_regression classifies)")
    raise ValueError(f"unknown model kind {kind!r}")


def forest_proba(forest, rows: np.ndarray) -> np.ndarray:
    """``forest.predict_proba(rows)``, computed by summing the trees directly.

    The forest's own method dispatches every tree through joblib, which costs about 3.5 ms for
    one row against about 0.25 ms for the trees themselves; the result is the same (tested)."""
    x = np.ascontiguousarray(rows, dtype=np.float32)  # what the trees compare against
    trees = forest.estimators_
    total = trees[0].tree_.predict(x)[:, : forest.n_classes_].copy()
    for tree in trees[1:]:
        total += tree.tree_.predict(x)[:, : forest.n_classes_]
    return total / len(trees)


# Fast paths: each kind's predict_proba from the fitted parameters with numpy. For one row,
# scikit-learn's validation, pipelines and dispatch cost 0.3-1.2 ms per call (the forest's joblib
# 3.5 ms) against 10-40 us for the arithmetic. Each fast path repeats scikit-learn's operations in
# its order, so the results equal its own to 1e-9 (tested; in practice bit for bit, except that
# numpy's exp differs from libm's, which libsvm and scipy use, by an ulp at times: the svm is
# within ~2e-16). Model checks each against scikit-learn on all Iris rows before using it.

_F32_MAX = float(np.finfo(np.float32).max)
_GRID_CELLS_MAX = 1_000_000  # beyond this many cells, the trees stay with scikit-learn


class _Guarded:
    """``fast(rows)`` for what the callers pass, ``slow(rows)`` (the scikit-learn path) otherwise.

    Plain means a C-ordered float64 ``ndarray`` of shape (n >= 1, n_features) whose values are
    finite also as float32 (trees compare in float32). Anything else (NaN, lists, other dtypes or
    shapes) goes where it went before, and is converted or refused exactly as before."""

    __slots__ = ("fast", "n_features", "slow")

    def __init__(self, fast, slow, n_features: int):
        self.fast, self.slow, self.n_features = fast, slow, n_features

    def __call__(self, rows):
        if (type(rows) is np.ndarray and rows.dtype == np.float64 and rows.ndim == 2
                and rows.shape[0] > 0 and rows.shape[1] == self.n_features
                and rows.flags.c_contiguous and np.abs(rows).max() <= _F32_MAX):  # NaN: False
            return self.fast(rows)
        return self.slow(rows)


def _softmax(x: np.ndarray) -> np.ndarray:
    """``sklearn.utils.extmath.softmax`` in place; ``x`` C-ordered like scikit-learn's (numpy adds
    a contiguous row of 8 or more values pairwise, a strided one in order)."""
    x -= x.max(axis=1).reshape(-1, 1)
    np.exp(x, out=x)
    x /= x.sum(axis=1).reshape(-1, 1)
    return x


def _squared_distances(x: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Squared distances between rows ``x`` and points given as ``columns`` (features, 1, points),
    added feature by feature in order, as libsvm's RBF kernel and the k-d tree's loop add them.
    Features outermost: summing 4 values along the last axis is ~6x slower for 64 rows."""
    d = x.T[:, :, None] - columns
    d *= d
    return np.add.reduce(d, axis=0)


def _scaler_params(scaler) -> dict | None:
    from sklearn.preprocessing import StandardScaler

    if not (isinstance(scaler, StandardScaler) and scaler.with_mean and scaler.with_std):
        return None
    return {"mean": scaler.mean_, "scale": scaler.scale_}


def _standardize(p: dict):
    """``scaler.transform`` for plain rows (a copy, then ``-= mean_`` and ``/= scale_``)."""
    mean, scale = p["mean"], p["scale"]

    def transform(rows):
        x = rows - mean
        x /= scale
        return x
    return transform


class _TreeGrid:
    """Many decision trees as lookup tables, giving every tree's leaf for a row in a fixed number
    of numpy operations instead of one traversal (or one ``tree_.predict`` call) per tree.

    A tree's leaf depends only on where each feature falls among that tree's thresholds on it, so
    each tree becomes a table over those intervals (its "cells"). A row is placed once among all
    the trees' thresholds per feature (``searchsorted``), and per-tree tables turn those places
    into each tree's cell. The comparison is scikit-learn's: the row in float32, against float64
    thresholds, left when ``x <= threshold``."""

    def __init__(self, trees, n_features: int):
        """``trees``: (children_left, children_right, feature, threshold, value) arrays per tree;
        ``value`` has one row per node (what a row reaching that leaf gets)."""
        local, strides, offsets, cells = [], [], [], []
        offset = 0
        for left, right, feature, threshold, value in trees:
            split = left != -1
            thresholds = [np.unique(threshold[split & (feature == f)]) for f in range(n_features)]
            shape = [len(t) + 1 for t in thresholds]
            n_cells = int(np.prod(shape))
            if offset + n_cells > _GRID_CELLS_MAX:
                raise ValueError("too many cells")
            # rank of each split's threshold among its tree's thresholds on its feature
            rank = np.zeros(len(threshold), dtype=np.intp)
            for f in range(n_features):
                on_f = split & (feature == f)
                rank[on_f] = np.searchsorted(thresholds[f], threshold[on_f])
            where = np.indices(shape).reshape(n_features, n_cells)  # each cell's interval per feature
            cell_ids = np.arange(n_cells)
            node = np.zeros(n_cells, dtype=np.intp)
            feat = np.where(split, feature, 0)
            while split[node].any():  # interval i lies below threshold k exactly when i <= k
                go_left = where[feat[node], cell_ids] <= rank[node]
                node = np.where(split[node], np.where(go_left, left[node], right[node]), node)
            cells.append(value[node])
            stride = np.cumprod([1, *shape[:0:-1]])[::-1]
            local.append(thresholds)
            strides.append(stride)
            offsets.append(offset)
            offset += n_cells
        self.edges, self.tables = [], []
        for f in range(n_features):
            edges = np.unique(np.concatenate([t[f] for t in local]))
            table = np.empty((len(trees), len(edges) + 1), dtype=np.intp)
            places = np.arange(len(edges) + 1)
            for i, thresholds in enumerate(local):
                # place among all thresholds -> place among this tree's own
                own = np.searchsorted(np.searchsorted(edges, thresholds[f]), places)
                table[i] = own * strides[i][f] + (offsets[i] if f == 0 else 0)
            self.edges.append(edges)
            self.tables.append(np.ascontiguousarray(table.T))  # row per place
        self.cells = np.concatenate(cells)

    def arrays(self) -> dict:
        return {"edges": self.edges, "tables": self.tables, "cells": self.cells}

    @classmethod
    def from_arrays(cls, p: dict) -> _TreeGrid:
        grid = cls.__new__(cls)
        grid.edges, grid.tables, grid.cells = list(p["edges"]), list(p["tables"]), p["cells"]
        return grid

    def leaves(self, rows: np.ndarray) -> np.ndarray:
        """Each tree's leaf value for each row: shape (n_trees, n_rows) + value's shape."""
        x = rows.astype(np.float32).astype(np.float64)
        cell = self.tables[0][np.searchsorted(self.edges[0], x[:, 0])]
        for f in range(1, len(self.edges)):
            cell += self.tables[f][np.searchsorted(self.edges[f], x[:, f])]
        return np.take(self.cells, cell.T, axis=0)  # take: ~4x faster than indexing for rows


def _tree_arrays(tree, value):
    return tree.children_left, tree.children_right, tree.feature, tree.threshold, value


# Each kind in two halves: ``_<kind>_params(estimator)`` reads the fitted parameters (in the
# process that trained it; None for a layout this code does not know), ``_<kind>_proba(params,
# slow)`` computes with them (anywhere: numpy only). Parameters cross between processes as
# arrays, exactly (``_pack``), and each half derives its views the same way in both places.


def _forest_params(forest) -> dict | None:
    if forest.n_outputs_ != 1:
        return None
    k = forest.n_classes_
    grid = _TreeGrid([_tree_arrays(t.tree_, t.tree_.value[:, 0, :k]) for t in forest.estimators_],
                     forest.n_features_in_)
    return {**grid.arrays(), "n_trees": len(forest.estimators_)}


def _forest_proba(p: dict, slow):
    """``predict_proba`` of a forest: each tree's leaf fractions, added in tree order from zero,
    divided by the number of trees (as scikit-learn's forest does)."""
    grid, n_trees = _TreeGrid.from_arrays(p), int(p["n_trees"])

    def proba(rows):
        return np.add.reduce(grid.leaves(rows), axis=0) / n_trees  # sums trees in order
    return proba


def _boosting_params(gb) -> dict | None:
    from sklearn.dummy import DummyClassifier

    stages, k = gb.estimators_.shape
    if k < 3 or not isinstance(gb.init_, DummyClassifier) or gb.init_.strategy != "prior":
        return None
    probe = np.zeros((2, gb.n_features_in_))
    probe[1] = 1.0
    init = gb._raw_predict_init(probe)  # a constant: the class priors' raw prediction
    if not (init.shape == (2, k) and (init[0] == init[1]).all()):
        return None
    leaf = -np.ones(1, dtype=np.intp)
    trees = [(leaf, leaf, leaf, np.zeros(1), init[:1, c]) for c in range(k)]  # one-leaf "trees"
    trees += [_tree_arrays(t.tree_, gb.learning_rate * t.tree_.value[:, 0, 0])
              for t in gb.estimators_.ravel()]  # stage by stage, class by class
    return {**_TreeGrid(trees, gb.n_features_in_).arrays(), "stages": stages, "k": k}


def _boosting_proba(p: dict, slow):
    """``predict_proba`` of gradient boosting: the init estimator's (constant) raw prediction,
    plus ``learning_rate * leaf value`` of each stage's tree per class in stage order, then softmax."""
    grid, stages, k = _TreeGrid.from_arrays(p), int(p["stages"]), int(p["k"])

    def proba(rows):
        raw = np.add.reduce(grid.leaves(rows).reshape(stages + 1, k, -1), axis=0)  # in order
        return _softmax(np.ascontiguousarray(raw.T))
    return proba


def _logistic_params(lr) -> dict | None:
    if len(lr.classes_) < 3:
        return None
    return {"coef": lr.coef_, "intercept": lr.intercept_}


def _logistic_proba(p: dict, slow):
    """``predict_proba`` of a multinomial logistic regression: softmax of ``x @ coef_.T + intercept_``,
    the products added feature by feature in order. Not ``@``: BLAS takes another route for one
    row than for many, which changes the last bits, and a node must get the same vote for a row
    whatever batch it comes in (a restart recomputes its commitments)."""
    transform, intercept = _standardize(p), p["intercept"]
    coef_t = np.ascontiguousarray(p["coef"].T)[:, None, :]  # (features, 1, classes)

    def proba(rows):
        logits = np.add.reduce(transform(rows).T[:, :, None] * coef_t, axis=0)
        return _softmax(logits + intercept)
    return proba


def _knn_params(knn) -> dict | None:
    if not (knn.weights == "uniform" and knn.metric == "minkowski" and knn.p == 2
            and knn.metric_params is None and not knn.outputs_2d_):
        return None
    points, k = knn._fit_X, knn.n_neighbors
    if not (isinstance(points, np.ndarray) and len(points) > k):
        return None
    return {"points": points, "labels": knn._y, "k": k, "n_classes": len(knn.classes_)}


def _knn_proba(p: dict, slow):
    """``predict_proba`` of k nearest neighbours with uniform weights: the neighbours' class counts
    over k. Where the k-th and (k+1)-th nearest are at the same distance (within 1e-9) and a tie
    changes the counts, which point scikit-learn keeps depends on its tree's search order: those
    rows alone go to ``slow`` (scikit-learn)."""
    transform, k = _standardize(p), int(p["k"])
    onehot = np.eye(int(p["n_classes"]))[p["labels"]]
    columns = np.ascontiguousarray(p["points"].T)[:, None, :]

    def proba(rows):
        dist = _squared_distances(transform(rows), columns)
        kth = np.partition(dist, (k - 1, k), axis=1)
        last, after = kth[:, k - 1 : k], kth[:, k : k + 1]
        tol = 1e-9 * (1.0 + last)
        counts = (dist <= last) @ onehot
        undecided = []
        for i in np.flatnonzero(after - last <= tol):
            tied = np.abs(dist[i] - last[i]) <= tol[i]
            inside = dist[i] < last[i] - tol[i]
            classes = np.flatnonzero(onehot[tied].any(axis=0))
            if len(classes) == 1:  # all tied points have one class: the counts are known
                counts[i] = onehot[inside].sum(axis=0)
                counts[i, classes[0]] += k - inside.sum()
            else:
                undecided.append(i)
        out = counts / counts.sum(axis=1).reshape(-1, 1)  # the sum is k, as scikit-learn's
        if undecided:
            out[undecided] = slow(rows[undecided])
        return out
    return proba


def _svm_params(calibrated) -> dict | None:
    from sklearn.svm import SVC

    if len(calibrated.calibrated_classifiers_) != 1:
        return None
    cal = calibrated.calibrated_classifiers_[0]
    svc = cal.estimator
    n = len(calibrated.classes_)
    if not (cal.method == "sigmoid" and isinstance(svc, SVC) and svc.kernel == "rbf"
            and svc.decision_function_shape == "ovr" and n >= 3 and not svc._sparse
            and np.array_equal(svc.classes_, calibrated.classes_)):
        return None
    n_support = svc._n_support
    start = np.concatenate(([0], np.cumsum(n_support)))
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    # Pair (i, j) sums dual_coef[j-1] over class i's vectors, then dual_coef[i] over class j's
    # (libsvm's svm_predict_values), then subtracts rho = -intercept. Padding adds zeros last.
    terms = [(np.r_[start[i] : start[i + 1], start[j] : start[j + 1]],
              np.r_[svc._dual_coef_[j - 1, start[i] : start[i + 1]],
                    svc._dual_coef_[i, start[j] : start[j + 1]]]) for i, j in pairs]
    width = max(len(idx) for idx, _ in terms)
    index = np.zeros((width, len(pairs)), dtype=np.intp)
    coef = np.zeros((width, len(pairs)))
    for p, (idx, c) in enumerate(terms):
        index[: len(idx), p], coef[: len(c), p] = idx, c
    # one-vs-rest (sklearn.utils.multiclass._ovr_decision_function): class c's confidence sums
    # -dec of its pairs in pair order, minus where it is the first class; votes are counts
    depth = n - 1
    conf_index = np.zeros((depth, n), dtype=np.intp)
    conf_sign = np.zeros((depth, n))
    votes_base = np.zeros(n)
    votes_step = np.zeros((len(pairs), n))  # votes = base + (dec < 0) @ step
    seen = [0] * n
    for p, (i, j) in enumerate(pairs):
        conf_index[seen[i], i], conf_sign[seen[i], i] = p, -1.0
        conf_index[seen[j], j], conf_sign[seen[j], j] = p, 1.0
        seen[i] += 1
        seen[j] += 1
        votes_base[i] += 1
        votes_step[p, i] -= 1
        votes_step[p, j] += 1
    return {"gamma": float(svc._gamma), "support": svc.support_vectors_, "index": index,
            "coef": coef, "intercept": svc._intercept_, "conf_index": conf_index,
            "conf_sign": conf_sign, "votes_base": votes_base, "votes_step": votes_step,
            "a": np.array([c.a_ for c in cal.calibrators], dtype=np.float64),
            "b": np.array([c.b_ for c in cal.calibrators], dtype=np.float64), "n": n}


def _svm_proba(p: dict, slow):
    """``predict_proba`` of sigmoid-calibrated RBF SVC (ensemble=False): libsvm's one-vs-one
    decision values (kernel against the support vectors, each pair's sum in libsvm's order),
    SVC's one-vs-rest transformation, each class's sigmoid, then the normalization."""
    transform, gamma, n = _standardize(p), float(p["gamma"]), int(p["n"])
    columns = np.ascontiguousarray(p["support"].T)[:, None, :]
    index, coef, intercept = p["index"], p["coef"], p["intercept"]
    conf_index, conf_sign = p["conf_index"], p["conf_sign"]
    votes_base, votes_step, a, b = p["votes_base"], p["votes_step"], p["a"], p["b"]

    def proba(rows):
        kernel = np.exp(-gamma * _squared_distances(transform(rows), columns))
        dec = np.add.reduce(np.take(kernel, index, axis=1) * coef, axis=1) + intercept  # in order
        total = np.add.reduce(np.take(-dec, conf_index, axis=1) * conf_sign, axis=1)  # in order
        ovr = (votes_base + (dec < 0) @ votes_step) + total / (3 * (np.abs(total) + 1))
        p = 1.0 / (1.0 + np.exp(a * ovr + b))  # scipy's expit(-(a * ovr + b))
        denominator = p.sum(axis=1)[:, None]
        if denominator.all():
            out = p / denominator
        else:  # all calibrators gave 0: uniform, as scikit-learn does
            out = np.divide(p, denominator, out=np.full_like(p, 1 / n), where=denominator != 0)
        if out.max() > 1.0:
            out[(1.0 < out) & (out <= 1.0 + 1e-5)] = 1.0
        return out
    return proba


_PROBA = {"forest": _forest_proba, "boosting": _boosting_proba, "logistic": _logistic_proba,
          "knn": _knn_proba, "svm": _svm_proba}


def fast_params(estimator) -> tuple[str, dict] | None:
    """What the numpy fast path of ``estimator`` (one that ``build`` makes, fitted) needs, as
    (its name in _PROBA, parameters); None where there is none."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline

    try:
        if isinstance(estimator, RandomForestClassifier):
            p = _forest_params(estimator)
            return None if p is None else ("forest", p)
        if isinstance(estimator, GradientBoostingClassifier):
            p = _boosting_params(estimator)
            return None if p is None else ("boosting", p)
        if not (isinstance(estimator, Pipeline) and len(estimator.steps) == 2):
            return None
        scaler, final = _scaler_params(estimator[0]), estimator[-1]
        if scaler is None:
            return None
        for cls, name, params in ((LogisticRegression, "logistic", _logistic_params),
                                  (KNeighborsClassifier, "knn", _knn_params),
                                  (CalibratedClassifierCV, "svm", _svm_params)):
            if isinstance(final, cls):
                p = params(final)
                return None if p is None else (name, {**scaler, **p})
    except (AttributeError, IndexError, TypeError, ValueError):  # a layout this code does not know
        return None
    return None


def fast_predict_proba(estimator, slow=None):
    """A numpy function equal to ``estimator.predict_proba`` on plain rows (see ``_Guarded``)
    for the estimators ``build`` makes once fitted, or None where there is none. ``slow`` is
    what rows it cannot decide go to (knn ties); scikit-learn's own method by default."""
    found = fast_params(estimator)
    if found is None:
        return None
    return _PROBA[found[0]](found[1], estimator.predict_proba if slow is None else slow)


def _pack(name: str, params: dict, card: Card) -> bytes:
    """Parameters and card as an ``.npz`` (arrays, lists of arrays, numbers): exact, and no
    pickle."""
    arrays = {"kind": np.array(name), "format": np.array(PARAMS_FORMAT),
              "card": np.array([card.framework, card.model, card.params.hex(), card.data_root.hex(),
                                str(card.rows), str(card.score_bps)])}
    for key, value in params.items():
        if isinstance(value, list):
            arrays.update({f"list:{key}:{i}": v for i, v in enumerate(value)})
            arrays[f"len:{key}"] = np.array(len(value))
        else:
            arrays[f"value:{key}"] = np.asarray(value)
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def _unpack(data: bytes) -> tuple[tuple[str, dict], Card]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        if "format" not in z.files or int(z["format"]) != PARAMS_FORMAT:
            raise ValueError("parameters of another format (another p2pml version?)")
        name, params = str(z["kind"]), {}
        for key in z.files:
            if key.startswith("value:"):
                value = z[key]
                params[key[6:]] = value.item() if value.ndim == 0 else value
            elif key.startswith("len:"):
                field = key[4:]
                params[field] = [z[f"list:{field}:{i}"] for i in range(int(z[key]))]
        framework, model, params_hex, root, rows, score = (str(v) for v in z["card"])
    if name not in _PROBA:
        raise ValueError(f"unknown fast path {name!r}")
    return (name, params), Card(framework, model, bytes.fromhex(params_hex), bytes.fromhex(root),
                                int(rows), int(score))


def _agrees(fast, estimator, rows: np.ndarray) -> bool:
    """Whether ``fast`` gives scikit-learn's answer on ``rows`` (to 1e-9, same argmax): a check
    at start-up, so that a scikit-learn whose internals changed falls back to its own path."""
    try:
        want, got = estimator.predict_proba(rows), fast(np.ascontiguousarray(rows, dtype=np.float64))
    except (ArithmeticError, IndexError, TypeError, ValueError):
        return False
    return (got.shape == want.shape and bool(np.abs(got - want).max() <= 1e-9)
            and (got.argmax(axis=1) == want.argmax(axis=1)).all())


def _fit(kind: str, data: TaskData):
    """The estimator of ``kind`` trained on the task's split; and scikit-learn's own answer
    for it (predict_proba, the forest's summed directly, see ``forest_proba``; or predict)."""
    x_train, _, y_train, _ = data.split()
    regression = data.spec.regression
    estimator = build(kind, regression).fit(x_train, y_train)
    if regression:
        return estimator, estimator.predict
    if kind == "random_forest":
        return estimator, lambda rows: forest_proba(estimator, rows)
    return estimator, estimator.predict_proba


def held_out(source: TaskSource | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the task no peer trained on, with their truth (Iris by default)."""
    return cached(source).held_out()


def _split(source: TaskSource | None = None):
    return cached(source).split()


def score_bps(predict, data: TaskData) -> int:
    """The held-out score in basis points: accuracy, or for regression R^2 (may be negative)."""
    x_test, y_test = data.held_out()
    out = predict(np.ascontiguousarray(x_test, dtype=np.float64))
    if data.spec.regression:
        residual = float(((y_test - out) ** 2).sum())
        total = float(((y_test - y_test.mean()) ** 2).sum()) or 1.0
        return max(-MAX_VALUE, int(round((1 - residual / total) * BPS)))
    return int(round(float((out.argmax(axis=1) == y_test).mean()) * BPS))


def card_for(framework: str, model: str, params: str, data: TaskData, score: int,
             trained_on: tuple[bytes, int] | None = None) -> Card:
    """A registration's card. ``trained_on``: (Merkle root, rows) of the training rows; by
    default the task's training split."""
    if trained_on is None:
        x_train, _, y_train, _ = data.split()
        trained_on = rows_root(x_train, y_train, data.spec.regression), len(x_train)
    return Card(framework, model, bytes.fromhex(params), trained_on[0], trained_on[1], score)


def train_fast(kind: str, source: TaskSource | None = None):
    """Train ``kind``; return (estimator, its scikit-learn answer, fast path parameters or None
    if there is none equal to scikit-learn's on every row of the task)."""
    data = cached(source)
    estimator, slow = _fit(kind, data)
    found = None if data.spec.regression else fast_params(estimator)
    if found is not None:
        if not _agrees(_PROBA[found[0]](found[1], slow), estimator, data.x):
            found = None
    return estimator, slow, found


class _NotLoaded(Exception):
    """Raised inside ``Model.vote_inline`` where scikit-learn would have to be loaded first."""


_inline = threading.local()  # .active: within vote_inline on this thread


class _Sklearn:
    """scikit-learn's own ``predict_proba`` for ``kind``, trained on first use: for the rows a
    fast path in a node without scikit-learn leaves to it (knn ties, odd input)."""

    def __init__(self, kind: str, source: TaskSource | None = None):
        self.kind, self.source, self._proba, self._lock = kind, source, None, threading.Lock()

    def __call__(self, rows):
        if self._proba is None:
            if getattr(_inline, "active", False):
                raise _NotLoaded
            with self._lock:  # two worker threads must not both train it
                if self._proba is None:
                    log.info("%s: loading scikit-learn for a row the fast path leaves to it", self.kind)
                    self._proba = _fit(self.kind, cached(self.source))[1]
        return self._proba(rows)


class Model:
    """One peer's voter: ``vote(rows, rounds)`` gives ``(label, probabilities in millionths)``
    for a classification, ``(value in VALUE_ONE units, ())`` for a regression.

    ``kind``: a built-in kind, or ``file:PATH`` (a skops or ONNX file, p2pml.modelfile).
    ``separate``: train a built-in kind in a child process and keep only the fast path's
    parameters here (what a node does; ``estimator`` is then None). The child starts at once
    and is waited for at the first use (or ``finish``): a node reads its log meanwhile.
    Otherwise train here (tests, tools). ``card`` is this model's card once finished."""

    def __init__(self, kind: str, behavior: str = "honest", key: bytes = b"", separate: bool = False,
                 source: TaskSource | None = None, task: Task | None = None):
        if behavior not in BEHAVIORS:
            raise ValueError(f"unknown behavior {behavior!r}; choose one of {', '.join(BEHAVIORS)}")
        from p2pml.ledger import IRIS

        self.kind = kind
        self.behavior = behavior
        self.source = source
        self.task = task or (IRIS if source is None else cached(source).spec)
        self.n_classes = len(self.task.classes)
        self._key = key
        self.estimator = None
        self.card: Card | None = None
        self._proba = None
        self._range = (0, 0)  # regression: the training targets' range, in VALUE_ONE units
        self._finishing = threading.Lock()
        self._training = None
        if kind.startswith("file:"):
            self._load_file(kind[len("file:"):])
        elif separate:
            self._training = _Training(kind, source)
        else:
            self._install(None)

    def finish(self) -> None:
        """Wait for the child's training, if any is under way, and take its parameters."""
        with self._finishing:
            if self._training is not None:
                found = self._training.result()
                self._training = None
                self._install(found)

    def _load_file(self, path: str) -> None:
        """A model file of the operator's own: checked against the task (ModelFileError)."""
        from p2pml import modelfile

        data = cached(self.source)
        loaded = modelfile.load(path, n_features=len(self.task.features), kind=self.task.kind,
                                n_classes=self.n_classes)
        self._set_predict(loaded.predict, data)
        self.card = card_for(loaded.framework, loaded.kind, loaded.params_sha256, data,
                             score_bps(loaded.predict, data), _trained_on(path))

    def _set_predict(self, predict, data: TaskData | None) -> None:
        if self.task.regression:
            lo, hi = float(data.y.min()), float(data.y.max())
            self._range = (int(round(lo * VALUE_ONE)), int(round(hi * VALUE_ONE)))
        self._proba = predict

    def _install(self, found) -> None:
        from p2pml import modelfile

        if found is not None:
            (name, params), card = found
            slow = _Sklearn(self.kind, self.source)
            self._proba = _Guarded(_PROBA[name](params, slow), slow, len(self.task.features))
            self.card = card
            return
        data = cached(self.source)
        self.estimator, slow, fast = train_fast(self.kind, self.source)
        if fast is not None:
            self._set_predict(_Guarded(_PROBA[fast[0]](fast[1], slow), slow, len(self.task.features)), data)
        else:
            self._set_predict(slow, data)
            if not self.task.regression and self.task.name == "iris":
                log.warning("%s: no fast path equal to scikit-learn's; using scikit-learn's", self.kind)
        self.card = card_for("builtin", self.kind, modelfile.params_hash(self.estimator), data,
                             score_bps(slow, data))

    @property
    def predict_proba(self):
        """Class probabilities (regression: values) of rows: the fast path where it is exact,
        else scikit-learn (or the model file's runtime)."""
        if self._proba is None:
            self.finish()
        return self._proba

    def own(self, rows: np.ndarray) -> list[dict]:
        """This model's own answer on ``rows``, whatever its behaviour: {"prediction",
        "probabilities"} (classification) or {"prediction"} (regression)."""
        out = self.predict_proba(rows)
        if self.task.regression:
            return [{"prediction": float(v)} for v in np.asarray(out, dtype=np.float64).reshape(-1)]
        classes = self.task.classes
        return [{"prediction": classes[int(p.argmax())],
                 "probabilities": {c: round(float(x), 6) for c, x in zip(classes, p)}} for p in out]

    def vote_inline(self, rows: np.ndarray, rounds: list[bytes]) -> list[tuple[int, tuple[int, ...]]] | None:
        """``vote``, or None where it would first have to load scikit-learn (about 0.8 s and
        90 MB, once): a caller on the event loop then runs ``vote`` in a worker thread instead
        of stalling every connection of the node."""
        _inline.active = True
        try:
            return self.vote(rows, rounds)
        except _NotLoaded:
            return None
        finally:
            _inline.active = False

    def vote(self, rows: np.ndarray, rounds: list[bytes]) -> list[tuple[int, tuple[int, ...]]]:
        if self.task.regression:
            return self._vote_value(rows, rounds)
        n = self.n_classes
        if self.behavior in ("honest", "equivocate", "withhold", "copycat"):
            proba = self.predict_proba(rows)
            ppm = np.rint(proba * PROBA_ONE).astype(np.int64)
            np.maximum(ppm, 0, out=ppm)  # the ufuncs: np.clip costs more than the model on few rows
            np.minimum(ppm, PROBA_ONE, out=ppm)
            return list(zip(ppm.argmax(axis=1).tolist(), map(tuple, ppm.tolist())))
        if self.behavior == "wrong":
            labels = (self.predict_proba(rows).argmax(axis=1) + 1) % n
        elif self.behavior == "random":
            labels = [hashlib.sha256(self._key + rid).digest()[0] % n for rid in rounds]
        else:
            labels = [CONSTANT_LABEL] * len(rounds)
        return [(int(label), one_hot(int(label), n)) for label in labels]

    def _vote_value(self, rows: np.ndarray, rounds: list[bytes]) -> list[tuple[int, tuple]]:
        lo, hi = self._range
        if self.behavior == "random":
            values = [lo + int.from_bytes(hashlib.sha256(self._key + rid).digest()[:8], "big") % (hi - lo + 1)
                      for rid in rounds]
        elif self.behavior == "constant":
            values = [lo] * len(rounds)
        else:
            out = np.asarray(self.predict_proba(rows), dtype=np.float64).reshape(-1)
            values = [int(v) for v in np.rint(np.clip(out * VALUE_ONE, -MAX_VALUE, MAX_VALUE))]
            if self.behavior == "wrong":
                values = [min(MAX_VALUE, v + (hi - lo) // 2) for v in values]
        return [(v, ()) for v in values]


def _trained_on(path: str) -> tuple[bytes, int] | None:
    """What ``python -m p2pml.model train`` wrote beside a model file: the Merkle root and
    count of its training rows (None: the task's training split, as a built-in kind)."""
    import json

    side = Path(path + ".card.json")
    if not side.exists():
        return None
    try:
        doc = json.loads(side.read_text())
        return bytes.fromhex(doc["data_root"]), int(doc["rows"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{side}: not a card written by python -m p2pml.model train ({exc})") from None


class _Training:
    """The fast path's parameters and the card for ``kind``, trained and checked in a child
    process started at once; ``result()`` waits for them: None (with the reason logged) if it
    has none or fails, and the caller trains here instead."""

    def __init__(self, kind: str, source: TaskSource | None = None):
        import json

        self.kind = kind
        # the same p2pml as ours, whatever the working directory
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        args = [sys.executable, "-m", "p2pml.model", kind]
        if source is not None:
            args += ["--task", json.dumps(source.describe())]
        try:
            self._child: subprocess.Popen | None = subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
            self._failed = ""
        except OSError as exc:
            self._child, self._failed = None, str(exc)

    def __del__(self):  # dropped unfinished (the node failed to start): no orphan left training
        child = getattr(self, "_child", None)
        if child is not None and child.returncode is None:
            child.kill()
            child.communicate()

    def result(self):
        kind, child = self.kind, self._child
        if child is None:
            log.warning("%s: training in a child process failed (%s); training here", kind, self._failed)
            return None
        try:
            stdout, stderr = child.communicate(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            log.warning("%s: training in a child process took over %d s; training here", kind, CHILD_TIMEOUT_S)
            return None
        self._child = None
        if child.returncode == 3:  # no fast path for this kind and task: scikit-learn's own, here
            return None
        if child.returncode != 0:
            log.warning("%s: training in a child process failed (exit %d: %s); training here", kind,
                        child.returncode, stderr.decode(errors="replace").strip()[-500:])
            return None
        try:
            found, card = _unpack(stdout)
            _PROBA[found[0]](found[1], None)  # every parameter it needs is there
            return found, card
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with them, train here instead
            log.warning("%s: the child's parameters are unusable (%s); training here", kind, exc)
            return None


def main(argv: list[str] | None = None) -> int:
    """``python -m p2pml.model KIND [--task JSON]``: train KIND and write its fast path's
    parameters and its card (.npz) to stdout; exit 3 if it has none equal to scikit-learn's.
    ``python -m p2pml.model train ...``: write a model file (see ``p2pml.train``)."""
    import json

    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["train"]:
        from p2pml.train import main as train_main

        return train_main(args[1:])
    source = None
    if len(args) == 3 and args[1] == "--task":
        try:
            source = TaskSource(**json.loads(args[2]))
        except (TypeError, ValueError) as exc:
            print(f"error: bad --task: {exc}", file=sys.stderr)
            return 2
        args = args[:1]
    if len(args) != 1:
        print("usage: python -m p2pml.model KIND [--task JSON] | train ...", file=sys.stderr)
        return 2
    try:
        estimator, slow, found = train_fast(args[0], source)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if found is None:
        print(f"{args[0]}: no fast path equal to scikit-learn's", file=sys.stderr)
        return 3
    from p2pml import modelfile

    data = cached(source)
    card = card_for("builtin", args[0], modelfile.params_hash(estimator), data, score_bps(slow, data))
    sys.stdout.buffer.write(_pack(*found, card))
    return 0


def one_hot(label: int, n: int = 3) -> tuple[int, ...]:
    return tuple(PROBA_ONE if c == label else 0 for c in range(n))


if __name__ == "__main__":
    sys.exit(main())
