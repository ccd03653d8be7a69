"""Load a contributor's model file without running code from it, and check that it fits a task.

Two formats are accepted, recognised by content (never by suffix):

* **skops** (``.skops``): a zip archive with skops' ``schema.json``, for scikit-learn estimators.
  It is loaded with ``skops.io.loads(..., trusted=TRUSTED_SKOPS_TYPES)`` after
  ``skops.io.get_untrusted_types`` has shown that every type the file needs is on the allow-list.
* **ONNX**: a protobuf ``ModelProto`` run by onnxruntime on the CPU.

Pickle and joblib files are refused, never loaded: unpickling runs whatever code the file names.

Safety beyond the type check.  skops only checks *types*; a crafted file can still hold index
arrays that scikit-learn's compiled code follows without bounds checks (skops itself refuses
``Tree`` and ``TreePredictor`` by default for this reason).  Before the estimator is used,
``load`` therefore checks every such structure against the estimator that owns it: decision
trees (children after their parent and inside the tree, features inside ``n_features_in_``),
histogram-gradient-boosting predictors (same, no categorical splits), KD/Ball trees (index
permutation, node ranges, binary-heap children, distance metric), libsvm models (support-vector
counts and coefficient shapes), and ensembles that call their trees without input checks.
Limits: a file can hold at most ``MAX_MODEL_BYTES``; estimator types are those skops trusts by
default (all scikit-learn estimators) plus ``TRUSTED_SKOPS_TYPES``; for fully untrusted
sources, run ``load`` and ``predict`` in a separate, resource-limited process as well.

Parameter hash (``params_hash``, ``LoadedModel.params_sha256``)
----------------------------------------------------------------
SHA-256 (lower-case hex) of ``enc(x)``, where ``enc`` writes one item as a one-byte ASCII tag,
the payload length as an 8-byte big-endian unsigned integer, then the payload:

====  ====================================  =====================================================
tag   value                                 payload
====  ====================================  =====================================================
N     None                                  empty
B     bool, numpy.bool\\_                    one byte, 0 or 1
I     int, numpy integer                    ASCII decimal, e.g. ``-12``
F     float, numpy floating                 IEEE-754 binary64, big-endian; every NaN as
                                            ``7ff8000000000000``
C     complex                               real then imaginary part, each as for F
S     str                                   UTF-8
Y     bytes                                 the bytes
L     list                                  the elements' encodings, concatenated
T     tuple                                 the same
Q     set, frozenset                        the elements' encodings, sorted bytewise, concatenated
D     dict (and subclasses)                 per entry ``enc(key) + enc(value)``, entries sorted
                                            by ``enc(key)`` bytewise, concatenated
A     numpy.ndarray                         ``enc(dtype) + enc(shape as tuple of int) + body``;
                                            dtype is ``dtype.str`` after converting big-endian
                                            arrays to little-endian; body is ``enc(bytes)`` of the
                                            C-order data for plain dtypes, ``enc(list)`` of the
                                            elements in C order for object arrays, and for
                                            structured dtypes dtype is ``"|V"`` and body is
                                            ``enc(dict field name -> field array)`` (so padding
                                            bytes never count)
E     scikit-learn estimator                ``enc(type name) + enc(get_params(deep=False)) +
                                            enc(state)``; state is ``est.__getstate__()`` without
                                            ``_sklearn_version`` and without the constructor
                                            parameters' keys, i.e. every fitted attribute
                                            (``coef_``, ...) *and* private ones such as
                                            ``_tree``, ``_fit_X``, ``_predictors``, without which
                                            k-NN and HistGradientBoosting models would hash the
                                            same whatever they learned
G     numpy RandomState, Generator,         ``enc(type name)`` only: their internal state changes
      BitGenerator, SeedSequence            as they are used and is not a parameter
X     class, function, ufunc, method,       UTF-8 type name of the thing itself (for a numpy
      functools.partial, numpy.dtype        dtype ``"numpy.dtype:" + dtype.str``)
O     any other object                      ``enc(type name) + enc(state)``; state is
                                            ``__getstate__()``; for ``sklearn.tree._tree.Tree``
                                            it is that dict plus ``n_features``, ``n_classes``,
                                            ``n_outputs``; for KDTree/BallTree it is the
                                            ``__getstate__()`` tuple without items 7..10 (the
                                            counters n_trims, n_leaves, n_splits, n_calls, which
                                            every query increments); for objects without a
                                            visible state (``None``), ``__reduce_ex__(4)[1:3]``
====  ====================================  =====================================================

A type name is ``type.__module__ + "." + type.__qualname__``.  The hash is therefore the same
for two fits with the same data and seed, and before and after a skops round trip.  Nothing
else is skipped: apart from the KD/Ball-tree query counters, no state was found (with
scikit-learn 1.9) that varies between two identical fits or with use.

For ONNX, the hash covers the graph, not the file bytes: ``enc(("onnx-graph", initializers,
nodes))`` with *initializers* the list, sorted by name, of ``(name, array)`` (the array from
``onnx.numpy_helper.to_array``, encoded as tag A, so dtype, shape and raw bytes) and *nodes* the
list, in graph order, of ``(domain, op_type, inputs, outputs, attributes)``, inputs/outputs as
lists of str and attributes a dict name -> value: FLOAT as F, INT as I, STRING as Y, TENSOR as
A, GRAPH as ``("onnx-graph", ...)`` recursively, the plural kinds as lists of those, anything
else as Y of its deterministic protobuf serialisation.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import pickletools
import stat
import struct
import types
import zipfile
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = [
    "MAX_MODEL_BYTES",
    "TRUSTED_SKOPS_TYPES",
    "LoadedModel",
    "ModelFileError",
    "load",
    "params_hash",
    "save",
]

MAX_MODEL_BYTES = 1 << 30
"""Largest model file (and largest total unpacked size of a skops archive) that is read."""

TRUSTED_SKOPS_TYPES: tuple[str, ...] = (
    # decision trees, random forests, extra trees, gradient boosting, AdaBoost/Bagging of trees
    # (structure checked after loading)
    "sklearn.tree._tree.Tree",
    # HistGradientBoosting* (structure checked after loading)
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    # k-nearest neighbours with algorithm "kd_tree"/"ball_tree"/"auto" (structure checked)
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.metrics._dist_metrics.ManhattanDistance64",
    "sklearn.metrics._dist_metrics.ChebyshevDistance64",
    "sklearn.metrics._dist_metrics.MinkowskiDistance64",
    # MLPClassifier/MLPRegressor with solver "adam" or "sgd" (optimizer state after fit)
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    # CalibratedClassifierCV internals (sigmoid, isotonic, temperature)
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.calibration._TemperatureScaling",
    # TweedieRegressor's loss (the other linear models' losses are trusted by skops already)
    "sklearn._loss.loss.HalfTweedieLoss",
    "sklearn._loss.loss.HalfTweedieLossIdentity",
    # VotingClassifier/StackingClassifier named_estimators_ (a dict subclass)
    "sklearn.utils._bunch.Bunch",
)
"""Types trusted beyond skops' defaults (which already cover every scikit-learn estimator
class, numpy arrays, dtypes and scalars, and the loss/link objects of the other models).
Written from ``skops.io.get_untrusted_types`` of linear models, trees, forests, (hist) gradient
boosting, k-NN, SVM, naive Bayes, MLP, pipelines with StandardScaler/MinMaxScaler, and
CalibratedClassifierCV fitted with scikit-learn 1.9 and skops 0.16; numpy types were never
reported.  Deliberately absent: functions and ``functools.partial`` (e.g. HistGradientBoosting
with ``categorical_features``, FunctionTransformer), other distance metrics, anything outside
scikit-learn."""

_PICKLE_ADVICE = (
    "pickle files are never loaded, because loading one can run arbitrary code; "
    "save the model with skops (p2pml.modelfile.save(model, path) or skops.io.dump) "
    "or export it to ONNX"
)
_COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x5d\x00\x00": "lzma",
    b"ZF": "joblib zlib",
    b"\x04\x22\x4d\x18": "lz4",
}
_ONNX_FLOAT_TENSORS = {"tensor(float)", "tensor(double)", "tensor(float16)"}
_ONNX_INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64}
_PROBA_NAMES = ("output_probability", "probabilities", "probability")


class ModelFileError(ValueError):
    """A model file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class LoadedModel:
    """A checked model: ``predict`` maps rows (n, n_features) to probabilities (n, n_classes),
    rows summing to 1, for classification, or to values (n,) for regression, all float64.
    ``predict`` raises ValueError for rows of the wrong shape and ModelFileError if the model
    returns output of the wrong shape, non-finite values or rows that are not probabilities."""

    framework: str
    kind: str
    params_sha256: str
    n_features: int
    predict: Callable[[np.ndarray], np.ndarray] = field(repr=False, compare=False)


def save(estimator: Any, path: str | PathLike[str]) -> None:
    """Write ``estimator`` as a skops file, the format ``load`` reads for scikit-learn."""
    import skops.io

    skops.io.dump(estimator, path)


def load(path: str | PathLike[str], *, n_features: int, kind: str, n_classes: int = 0) -> LoadedModel:
    """Load the skops or ONNX model at ``path`` and check that it fits the task.

    ``kind`` is ``"classification"`` (classes are the integers 0..n_classes-1) or
    ``"regression"`` (``n_classes`` 0).  Every problem with the file raises ModelFileError
    naming the file; bad arguments raise ValueError."""
    if kind not in ("classification", "regression"):
        raise ValueError(f"kind must be 'classification' or 'regression', not {kind!r}")
    if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
        raise ValueError(f"n_features must be a positive int, not {n_features!r}")
    if kind == "classification" and (not isinstance(n_classes, int) or n_classes < 2):
        raise ValueError(f"a classification task needs n_classes >= 2, not {n_classes!r}")
    if kind == "regression" and n_classes != 0:
        raise ValueError(f"a regression task has n_classes 0, not {n_classes!r}")
    path = Path(path)
    data = _read(path)
    if data[:1] == b"\x80":
        raise ModelFileError(f"{path}: this is a pickle file (pickle/joblib); {_PICKLE_ADVICE}")
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _load_skops(path, data, n_features, kind, n_classes)
    for magic, name in _COMPRESSED_MAGIC.items():
        if data.startswith(magic):
            raise ModelFileError(
                f"{path}: this is a {name}-compressed file, probably a compressed joblib pickle; "
                f"{_PICKLE_ADVICE}"
            )
    model = _parse_onnx(data)
    if model is not None:
        return _load_onnx(path, data, model, n_features, kind, n_classes)
    if _is_pickle(data):
        raise ModelFileError(f"{path}: this is a pickle file (protocol 0/1); {_PICKLE_ADVICE}")
    raise ModelFileError(
        f"{path}: not a model file: expected a skops file (zip archive) or an ONNX model, "
        f"but the file {_describe(data)}"
    )


# ---------------------------------------------------------------------------- reading and sniffing


def _read(path: Path) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelFileError(f"{path}: is a directory, not a model file")
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(f"{path}: is not a regular file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MODEL_BYTES + 1)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    if not data:
        raise ModelFileError(f"{path}: the file is empty")
    if len(data) > MAX_MODEL_BYTES:
        raise ModelFileError(f"{path}: the file is larger than the limit of {MAX_MODEL_BYTES} bytes")
    return data


def _is_pickle(data: bytes) -> bool:
    """True if ``data`` parses as a complete pickle opcode stream (parsed, never executed)."""
    try:
        ops = 0
        for opcode, _arg, _pos in pickletools.genops(io.BytesIO(data)):
            ops += 1
            if opcode.name == "STOP":
                return ops > 1
    except Exception:
        return False
    return False


def _describe(data: bytes) -> str:
    head = data[:40]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"looks like text (starts with {text[:30]!r})"
    return f"starts with the bytes {data[:8].hex(' ')} ({len(data)} bytes in all)"


# -------------------------------------------------------------------------------------------- skops


def _load_skops(path: Path, data: bytes, n_features: int, kind: str, n_classes: int) -> LoadedModel:
    import skops.io

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ModelFileError(f"{path}: a damaged zip archive: {exc}") from None
    names = [m.filename for m in members]
    if "schema.json" not in names:
        hint = ""
        if any(n.endswith((".pkl", ".pickle")) for n in names):
            hint = f" (it holds pickles, e.g. a PyTorch checkpoint; {_PICKLE_ADVICE})"
        raise ModelFileError(f"{path}: a zip archive but not a skops file: no schema.json{hint}")
    if sum(m.file_size for m in members) > MAX_MODEL_BYTES:
        raise ModelFileError(f"{path}: unpacks to more than the limit of {MAX_MODEL_BYTES} bytes")
    try:
        untrusted = skops.io.get_untrusted_types(data=data)
    except MemoryError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{path}: not a readable skops file: {exc}") from None
    refused = sorted(set(untrusted) - set(TRUSTED_SKOPS_TYPES))
    if refused:
        raise ModelFileError(
            f"{path}: the skops file needs types that are not trusted: {', '.join(refused)}; "
            "only scikit-learn estimators and the internals in p2pml.modelfile.TRUSTED_SKOPS_TYPES "
            "are loaded"
        )
    try:
        obj = skops.io.loads(data, trusted=list(TRUSTED_SKOPS_TYPES))
    except MemoryError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{path}: the skops file cannot be loaded: {exc}") from None

    from sklearn.base import BaseEstimator, is_classifier, is_regressor
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    if not isinstance(obj, BaseEstimator):
        raise ModelFileError(
            f"{path}: the skops file holds a {_type_name(type(obj))}, not a scikit-learn estimator"
        )
    try:
        _check_structures(obj, path, n_features)
    except (ModelFileError, MemoryError):
        raise
    except Exception as exc:  # a crafted state that does not even have the expected attributes
        raise ModelFileError(f"{path}: the model file is malformed: {exc!r}") from None
    name = _kind_name(obj)
    try:
        check_is_fitted(obj)
    except NotFittedError:
        raise ModelFileError(f"{path}: the {name} in the file is not fitted") from None
    except Exception as exc:
        raise ModelFileError(f"{path}: cannot tell whether the {name} is fitted: {exc}") from None
    took = getattr(obj, "n_features_in_", None)
    if not isinstance(took, (int, np.integer)):
        raise ModelFileError(f"{path}: the {name} does not record its number of features")
    if took != n_features:
        raise ModelFileError(f"{path}: model takes {took} features; the task has {n_features}")
    if kind == "classification":
        if not is_classifier(obj):
            what = "a regressor" if is_regressor(obj) else "neither a classifier nor a regressor"
            raise ModelFileError(f"{path}: the model ({name}) is {what}; the task is classification")
        _check_classes(path, getattr(obj, "classes_", None), n_classes)
        if not hasattr(obj, "predict_proba"):
            raise ModelFileError(
                f"{path}: the classifier ({name}) has no predict_proba; the task needs probabilities"
            )

        def predict(rows: np.ndarray) -> np.ndarray:
            x = _rows(rows, n_features)
            return _probabilities(obj.predict_proba(x), len(x), n_classes, path)

    else:
        if not is_regressor(obj):
            what = "a classifier" if is_classifier(obj) else "neither a classifier nor a regressor"
            raise ModelFileError(f"{path}: the model ({name}) is {what}; the task is regression")

        def predict(rows: np.ndarray) -> np.ndarray:
            x = _rows(rows, n_features)
            return _values(obj.predict(x), len(x), path)

    _probe(path, predict, n_features)
    return LoadedModel("sklearn", name, params_hash(obj), n_features, predict)


def _kind_name(est: Any) -> str:
    from sklearn.pipeline import Pipeline

    if isinstance(est, Pipeline):
        steps = ",".join(
            "passthrough" if s is None or s == "passthrough" else _kind_name(s) for _, s in est.steps
        )
        return f"Pipeline({steps})"
    return type(est).__name__


def _check_classes(path: Path, classes: Any, n_classes: int) -> None:
    want = f"the task's classes are 0..{n_classes - 1}"
    if not isinstance(classes, np.ndarray) or classes.ndim != 1:
        raise ModelFileError(f"{path}: the classifier has no single list of classes (classes_); {want}")
    if len(classes) != n_classes:
        raise ModelFileError(f"{path}: the classifier has {len(classes)} classes; the task has {n_classes}")
    if classes.dtype.kind not in "iuf" or not np.array_equal(classes, np.arange(n_classes)):
        shown = ", ".join(map(str, classes.tolist()[:10]))
        raise ModelFileError(f"{path}: the classifier's classes are [{shown}]; {want}")


# ------------------------------------------------------------------ structure checks (skops objects)


def _reachable(root: Any) -> list[Any]:
    """Every object reachable from ``root`` through containers and instance ``__dict__``s."""
    seen: set[int] = set()
    found: list[Any] = []
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
            continue
        seen.add(id(obj))
        found.append(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, np.ndarray):
            if obj.dtype.kind == "O":
                stack.extend(obj.ravel().tolist())
        elif isinstance(getattr(obj, "__dict__", None), dict):
            stack.extend(vars(obj).values())
    return found


def _check_structures(obj: Any, path: Path, n_features: int) -> None:
    """Refuse index structures that compiled scikit-learn code would follow out of bounds."""
    from sklearn.ensemble import BaggingClassifier, BaggingRegressor
    from sklearn.ensemble._forest import BaseForest
    from sklearn.ensemble._gb import BaseGradientBoosting
    from sklearn.ensemble._hist_gradient_boosting.gradient_boosting import BaseHistGradientBoosting
    from sklearn.ensemble._hist_gradient_boosting.predictor import TreePredictor
    from sklearn.metrics._dist_metrics import DistanceMetric
    from sklearn.neighbors import BallTree, KDTree
    from sklearn.neighbors._base import NeighborsBase
    from sklearn.svm._base import BaseLibSVM
    from sklearn.tree import BaseDecisionTree
    from sklearn.tree._tree import Tree

    def bad(what: str) -> ModelFileError:
        return ModelFileError(f"{path}: the model file is malformed: {what}")

    objs = _reachable(obj)
    owned: set[int] = set()
    for o in objs:
        nin = getattr(o, "n_features_in_", None)
        if isinstance(o, BaseDecisionTree) and hasattr(o, "tree_"):
            _check_tree(o.tree_, nin, bad)
            owned.add(id(o.tree_))
        elif isinstance(o, BaseHistGradientBoosting) and hasattr(o, "_predictors"):
            for predictor in (p for it in o._predictors for p in it):
                _check_tree_predictor(predictor, nin, bad)
                owned.add(id(predictor))
        elif isinstance(o, NeighborsBase) and getattr(o, "_tree", None) is not None:
            _check_binary_tree(o._tree, nin, bad)
            owned.add(id(o._tree))
        elif isinstance(o, BaseLibSVM) and hasattr(o, "support_vectors_"):
            _check_libsvm(o, bad)
        if isinstance(o, BaseGradientBoosting) and hasattr(o, "estimators_"):
            est = o.estimators_
            if not isinstance(est, np.ndarray) or est.ndim != 2 or est.shape[1] != o.n_trees_per_iteration_:
                raise bad("gradient boosting stages do not match n_trees_per_iteration_")
        if isinstance(o, (BaseForest, BaseGradientBoosting)) and hasattr(o, "estimators_"):
            trees = np.asarray(o.estimators_, dtype=object).ravel().tolist()
            if any(not isinstance(t, BaseDecisionTree) or t.n_features_in_ != nin for t in trees):
                raise bad(f"a tree of the {type(o).__name__} does not take its {nin} features")
        if isinstance(o, (BaggingClassifier, BaggingRegressor)) and hasattr(o, "estimators_"):
            feats = getattr(o, "estimators_features_", [])
            if len(feats) != len(o.estimators_) or any(
                getattr(e, "n_features_in_", None) != len(f) for e, f in zip(o.estimators_, feats)
            ):
                raise bad("a bagged estimator does not take its feature subset")
    for o in objs:
        if isinstance(o, (Tree, TreePredictor, KDTree, BallTree)) and id(o) not in owned:
            raise bad(f"a {type(o).__name__} outside the estimator that uses it")
        if isinstance(o, DistanceMetric):
            _check_metric(o, n_features, bad)


def _check_tree(tree: Any, n_features: Any, bad: Callable[[str], ModelFileError]) -> None:
    from sklearn.tree._tree import Tree

    if not isinstance(tree, Tree):
        raise bad("a decision tree's tree_ is not a Tree")
    n = tree.node_count
    if not 1 <= n <= tree.capacity:  # checked first: __getstate__ reads node_count nodes
        raise bad("a decision tree's node count exceeds its nodes")
    if tree.n_features != n_features:
        raise bad("a decision tree's number of features differs from its estimator's")
    nodes = tree.__getstate__()["nodes"]
    _check_children(nodes["left_child"], nodes["right_child"], nodes["left_child"] == -1, bad)
    internal = nodes["left_child"] != -1
    feature = nodes["feature"][internal]
    if feature.size and (feature.min() < 0 or feature.max() >= n_features):
        raise bad("a decision tree splits on a feature it does not have")


def _check_children(left: np.ndarray, right: np.ndarray, leaf: np.ndarray, bad: Callable) -> None:
    """Internal nodes' children must come after them and inside the node array."""
    n = len(left)
    idx = np.arange(n)[~leaf]
    lft, rgt = left[~leaf].astype(np.int64), right[~leaf].astype(np.int64)
    if np.any((lft <= idx) | (lft >= n) | (rgt <= idx) | (rgt >= n)):
        raise bad("a tree node's child index is out of range")


def _check_tree_predictor(pred: Any, n_features: Any, bad: Callable[[str], ModelFileError]) -> None:
    from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE
    from sklearn.ensemble._hist_gradient_boosting.predictor import TreePredictor

    nodes = getattr(pred, "nodes", None)
    if not isinstance(pred, TreePredictor) or not isinstance(nodes, np.ndarray):
        raise bad("a histogram gradient boosting predictor is not a TreePredictor")
    if nodes.dtype != PREDICTOR_RECORD_DTYPE or nodes.ndim != 1 or len(nodes) == 0:
        raise bad("a histogram gradient boosting tree has a wrong node array")
    leaf = nodes["is_leaf"] != 0
    if len(nodes) > 1 and leaf[0]:
        raise bad("a histogram gradient boosting tree's root is a leaf with children")
    _check_children(nodes["left"], nodes["right"], leaf, bad)
    feature = nodes["feature_idx"][~leaf]
    if feature.size and (feature.min() < 0 or feature.max() >= n_features):
        raise bad("a histogram gradient boosting tree splits on a feature it does not have")
    if np.any(nodes["is_categorical"][~leaf]):
        raise bad("categorical splits in histogram gradient boosting are not supported")


def _check_binary_tree(bt: Any, n_features: Any, bad: Callable[[str], ModelFileError]) -> None:
    from sklearn.neighbors import BallTree, KDTree

    if not isinstance(bt, (KDTree, BallTree)):
        raise bad("a neighbours model's _tree is not a KDTree or BallTree")
    (data, idx, node_data, bounds, _leaf, n_levels, n_nodes, *_, metric, weight) = bt.__getstate__()
    n = data.shape[0] if data.ndim == 2 else 0
    if data.ndim != 2 or n == 0 or data.shape[1] != n_features:
        raise bad("a neighbours tree's data do not have the model's features")
    if idx.shape != (n,) or not np.array_equal(np.sort(idx), np.arange(n)):
        raise bad("a neighbours tree's index array is not a permutation of its points")
    if not 1 <= n_levels <= 62 or n_nodes != 2**n_levels - 1 or node_data.shape != (n_nodes,):
        raise bad("a neighbours tree's node count does not match its levels")
    if bounds.shape != (2 if isinstance(bt, KDTree) else 1, n_nodes, n_features):
        raise bad("a neighbours tree's node bounds have the wrong shape")
    start, end = node_data["idx_start"], node_data["idx_end"]
    if np.any((start < 0) | (start > end) | (end > n)):
        raise bad("a neighbours tree's node ranges are out of range")
    internal = np.flatnonzero(node_data["is_leaf"] == 0)
    if internal.size and 2 * internal.max() + 2 >= n_nodes:
        raise bad("a neighbours tree's inner node has no children")
    if weight is not None and np.shape(weight) != (n,):
        raise bad("a neighbours tree's sample weights do not match its points")
    _check_metric(metric, n_features, bad)


def _check_metric(metric: Any, n_features: int, bad: Callable[[str], ModelFileError]) -> None:
    from sklearn.metrics._dist_metrics import (
        ChebyshevDistance64,
        EuclideanDistance64,
        ManhattanDistance64,
        MinkowskiDistance64,
    )

    if type(metric) in (EuclideanDistance64, ManhattanDistance64, ChebyshevDistance64):
        return
    if type(metric) is not MinkowskiDistance64:
        raise bad(f"distance metric {type(metric).__name__} is not supported")
    p, w, _mat = metric.__getstate__()
    if not (math.isfinite(p) and p > 0) or np.ndim(w) != 1 or len(w) not in (0, n_features):
        raise bad("a Minkowski distance has a wrong p or weight vector")


def _check_libsvm(svm: Any, bad: Callable[[str], ModelFileError]) -> None:
    sv = svm.support_vectors_
    if getattr(svm, "_sparse", True) or not isinstance(sv, np.ndarray):
        raise bad("SVMs fitted on sparse data are not supported")
    if svm.kernel not in ("linear", "poly", "rbf", "sigmoid"):
        raise bad(f"SVM kernel {svm.kernel!r} is not supported")
    n_sv = svm._n_support
    n_class = len(n_sv)
    pairs = n_class * (n_class - 1) // 2
    if sv.ndim != 2 or sv.shape[1] != svm.n_features_in_ or n_class < 2:
        raise bad("an SVM's support vectors do not have the model's features")
    count = sv.shape[0]
    classifier = hasattr(svm, "classes_")
    if classifier and (n_class != len(svm.classes_) or np.any(n_sv < 0) or n_sv.sum() != count):
        raise bad("an SVM's support-vector counts do not add up")
    if not classifier and n_class != 2:
        raise bad("an SVM regressor's support-vector counts have the wrong length")
    if (
        np.shape(svm.support_) != (count,)
        or np.shape(svm._dual_coef_) != (n_class - 1, count)
        or np.shape(svm._intercept_) != (pairs,)
        or np.size(svm._probA) not in (0, pairs)
        or np.size(svm._probB) not in (0, pairs)
    ):
        raise bad("an SVM's coefficient arrays have the wrong shapes")


# --------------------------------------------------------------------------------------------- ONNX


def _parse_onnx(data: bytes) -> Any:
    """The ModelProto if ``data`` is one (has an IR version and a graph with nodes), else None."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception:
        return None
    if model.ir_version <= 0 or not model.HasField("graph") or len(model.graph.node) == 0:
        return None
    return model


def _onnx_graphs(graph: Any):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _onnx_graphs(attr.g)
            for sub in attr.graphs:
                yield from _onnx_graphs(sub)


def _load_onnx(
    path: Path, data: bytes, model: Any, n_features: int, kind: str, n_classes: int
) -> LoadedModel:
    import onnx
    import onnxruntime as ort

    graphs = list(_onnx_graphs(model.graph))
    for function in model.functions:
        graphs.append(function)  # its nodes' attributes may hold tensors too
    for g in graphs:
        tensors = list(getattr(g, "initializer", []))
        for node in g.node:
            for attr in node.attribute:
                tensors.extend([attr.t] if attr.HasField("t") else [])
                tensors.extend(attr.tensors)
        if any(t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) for t in tensors):
            raise ModelFileError(f"{path}: the ONNX model refers to external data files; embed the weights")
        if len(getattr(g, "sparse_initializer", [])):
            raise ModelFileError(f"{path}: ONNX sparse initializers are not supported")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelFileError(f"{path}: not a valid ONNX model: {exc}") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelFileError(f"{path}: onnxruntime cannot run the model: {exc}") from None

    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelFileError(f"{path}: the ONNX model has {len(inputs)} inputs; it needs exactly one")
    inp = inputs[0]
    in_dtype = _ONNX_INPUT_DTYPES.get(inp.type)
    if in_dtype is None:
        raise ModelFileError(f"{path}: the ONNX model's input is {inp.type}; it must be float or double")
    if len(inp.shape) != 2:
        raise ModelFileError(
            f"{path}: the ONNX model's input has shape {inp.shape}; it must be [N, features]"
        )
    if isinstance(inp.shape[1], int) and inp.shape[1] != n_features:
        raise ModelFileError(f"{path}: model takes {inp.shape[1]} features; the task has {n_features}")

    outputs = session.get_outputs()
    if kind == "classification":
        out = _onnx_probability_output(path, outputs, n_classes)
        zipmap = out.type.startswith("seq(map(")
        _check_onnx_labels(path, model.graph, n_classes)

        def predict(rows: np.ndarray) -> np.ndarray:
            x = _rows(rows, n_features).astype(in_dtype)
            (raw,) = session.run([out.name], {inp.name: x})
            if zipmap:
                if any(len(row) != n_classes for row in raw):
                    raise ModelFileError(f"{path}: the model's probabilities do not have {n_classes} classes")
                try:
                    raw = [[row[k] for k in range(n_classes)] for row in raw]
                except KeyError:
                    raise ModelFileError(
                        f"{path}: the model's class labels are not 0..{n_classes - 1}"
                    ) from None
                raw = np.array(raw, dtype=np.float64).reshape(len(x), n_classes)
            return _probabilities(raw, len(x), n_classes, path)

    else:
        if len(outputs) != 1:
            raise ModelFileError(
                f"{path}: the ONNX regressor has {len(outputs)} outputs; it needs exactly one"
            )
        out = outputs[0]
        if (
            out.type not in _ONNX_FLOAT_TENSORS
            or len(out.shape) not in (1, 2)
            or (len(out.shape) == 2 and isinstance(out.shape[1], int) and out.shape[1] != 1)
        ):
            raise ModelFileError(
                f"{path}: the ONNX model's output is {out.type} of shape {out.shape}; "
                "a regressor needs a float output of shape [N] or [N, 1]"
            )

        def predict(rows: np.ndarray) -> np.ndarray:
            x = _rows(rows, n_features).astype(in_dtype)
            (raw,) = session.run([out.name], {inp.name: x})
            return _values(raw, len(x), path)

    _probe(path, predict, n_features)
    digest = _onnx_params_hash(model.graph)
    return LoadedModel("onnx", f"onnx:{model.producer_name}", digest, n_features, predict)


def _onnx_probability_output(path: Path, outputs: list, n_classes: int) -> Any:
    """The output holding class probabilities: a ZipMap sequence of maps or a [N, classes] tensor.

    skl2onnx classifiers give ``output_label`` and ``output_probability``; export them with
    ``options={"zipmap": False}`` (a plain tensor) when you can, it is faster and simpler."""
    named = [o for o in outputs if o.name in _PROBA_NAMES]
    maps = [o for o in outputs if o.type.startswith("seq(map(")]
    tensors = [
        o
        for o in outputs
        if o.type in _ONNX_FLOAT_TENSORS
        and len(o.shape) == 2
        and (o.shape[1] == n_classes or not isinstance(o.shape[1], int))
    ]
    found = named[:1] or maps[:1] or (tensors if len(tensors) == 1 else [])
    if not found:
        listed = ", ".join(f"{o.name}: {o.type} {o.shape}" for o in outputs)
        raise ModelFileError(
            f"{path}: the ONNX model has no [N, {n_classes}] class-probability output (outputs: {listed})"
        )
    out = found[0]
    if out.type.startswith("seq(map("):
        if not out.type.startswith("seq(map(int64,"):
            raise ModelFileError(
                f"{path}: the ONNX model's class labels are not integers ({out.type}); "
                f"the task's classes are 0..{n_classes - 1}"
            )
    elif out.type not in _ONNX_FLOAT_TENSORS or len(out.shape) != 2:
        raise ModelFileError(
            f"{path}: the ONNX model's probability output is {out.type} of shape {out.shape}"
        )
    elif isinstance(out.shape[1], int) and out.shape[1] != n_classes:
        raise ModelFileError(
            f"{path}: the classifier has {out.shape[1]} classes; the task has {n_classes}"
        )
    return out


def _check_onnx_labels(path: Path, graph: Any, n_classes: int) -> None:
    """Class labels declared by ai.onnx.ml classifier nodes must be 0..n_classes-1 (best effort:
    a model without such nodes, e.g. a neural network, is checked only by its column count)."""
    import onnx

    for node in graph.node:
        for attr in node.attribute:
            if attr.name == "classlabels_strings" and len(attr.strings):
                raise ModelFileError(
                    f"{path}: the ONNX model's class labels are strings; the task's classes are "
                    f"0..{n_classes - 1}"
                )
            if attr.name in ("classlabels_ints", "classlabels_int64s") and len(attr.ints):
                labels = list(onnx.helper.get_attribute_value(attr))
                if labels != list(range(n_classes)):
                    shown = ", ".join(map(str, labels[:10]))
                    raise ModelFileError(
                        f"{path}: the classifier's classes are [{shown}]; the task's classes are "
                        f"0..{n_classes - 1}"
                    )


# ------------------------------------------------------------------------------------------ outputs


def _rows(rows: Any, n_features: int) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != n_features:
        raise ValueError(f"expected rows of shape (n, {n_features}), got shape {x.shape}")
    return np.ascontiguousarray(x)


def _probabilities(raw: Any, n_rows: int, n_classes: int, path: Path) -> np.ndarray:
    p = np.asarray(raw, dtype=np.float64)
    if p.shape != (n_rows, n_classes):
        raise ModelFileError(
            f"{path}: the model returned probabilities of shape {p.shape}; expected ({n_rows}, {n_classes})"
        )
    if not np.all(np.isfinite(p)) or np.any(p < -1e-6) or np.any(p > 1 + 1e-6) or (
        n_rows and np.max(np.abs(p.sum(axis=1) - 1.0)) > 1e-3
    ):
        raise ModelFileError(
            f"{path}: the model's output is not probabilities (each row must be in [0, 1] and sum to 1)"
        )
    p = np.clip(p, 0.0, None)
    return p / p.sum(axis=1, keepdims=True)


def _values(raw: Any, n_rows: int, path: Path) -> np.ndarray:
    v = np.asarray(raw, dtype=np.float64)
    if v.ndim == 2 and v.shape[1] == 1:
        v = v[:, 0]
    if v.shape != (n_rows,):
        raise ModelFileError(f"{path}: the model returned values of shape {v.shape}; expected ({n_rows},)")
    if not np.all(np.isfinite(v)):
        raise ModelFileError(f"{path}: the model returned non-finite values")
    return v


def _probe(path: Path, predict: Callable[[np.ndarray], np.ndarray], n_features: int) -> None:
    """Run the model once at load, so that a model that cannot predict is refused there."""
    try:
        predict(np.zeros((1, n_features)))
    except ModelFileError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{path}: the model fails on a probe row of zeros: {exc}") from None


# -------------------------------------------------------------------------------------------- hashes


def params_hash(estimator: Any) -> str:
    """SHA-256 (hex) of the canonical encoding of a fitted estimator (see the module docstring);
    independent of the file it came from, so a model is identified by what it learned."""
    return hashlib.sha256(_enc(estimator, set())).hexdigest()


def _item(tag: bytes, payload: bytes) -> bytes:
    return tag + struct.pack(">Q", len(payload)) + payload


def _type_name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _float_bytes(x: float) -> bytes:
    return b"\x7f\xf8\x00\x00\x00\x00\x00\x00" if math.isnan(x) else struct.pack(">d", x)


_RANDOM_TYPES = (np.random.RandomState, np.random.Generator, np.random.BitGenerator, np.random.SeedSequence)
_NAMED_TYPES = (
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    np.ufunc,
    functools.partial,
)


def _enc_array(a: np.ndarray, active: set[int]) -> bytes:
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    shape = _enc(tuple(int(d) for d in a.shape), active)
    if a.dtype.names is not None:
        fields = {name: np.ascontiguousarray(a[name]) for name in a.dtype.names}
        return _item(b"A", _enc("|V", active) + shape + _enc(fields, active))
    if a.dtype.kind == "O":
        return _item(b"A", _enc(a.dtype.str, active) + shape + _enc(a.ravel().tolist(), active))
    return _item(b"A", _enc(a.dtype.str, active) + shape + _enc(np.ascontiguousarray(a).tobytes(), active))


def _object_state(obj: Any) -> Any:
    from sklearn.neighbors import BallTree, KDTree
    from sklearn.tree._tree import Tree

    if isinstance(obj, Tree):
        shape = {"n_features": obj.n_features, "n_classes": obj.n_classes, "n_outputs": obj.n_outputs}
        return dict(obj.__getstate__(), **shape)
    if isinstance(obj, (KDTree, BallTree)):
        state = obj.__getstate__()
        return state[:7] + state[11:]  # without the query counters n_trims, n_leaves, n_splits, n_calls
    try:
        state = obj.__getstate__()
    except TypeError:
        state = None
    if state is None and not hasattr(obj, "__dict__"):
        try:
            state = tuple(obj.__reduce_ex__(4)[1:3])
        except TypeError:
            raise TypeError(f"params_hash cannot encode a {_type_name(type(obj))}") from None
    return state


def _enc(v: Any, active: set[int]) -> bytes:
    if v is None:
        return _item(b"N", b"")
    if isinstance(v, (bool, np.bool_)):
        return _item(b"B", b"\x01" if v else b"\x00")
    if isinstance(v, (int, np.integer)):
        return _item(b"I", str(int(v)).encode())
    if isinstance(v, (float, np.floating)):
        return _item(b"F", _float_bytes(float(v)))
    if isinstance(v, (complex, np.complexfloating)):
        return _item(b"C", _float_bytes(v.real) + _float_bytes(v.imag))
    if isinstance(v, str):
        return _item(b"S", v.encode("utf-8"))
    if isinstance(v, (bytes, bytearray, memoryview)):
        return _item(b"Y", bytes(v))
    if isinstance(v, np.dtype):
        return _item(b"X", f"numpy.dtype:{v.str}".encode())
    if isinstance(v, _RANDOM_TYPES):
        return _item(b"G", _enc(_type_name(type(v)), active))
    if isinstance(v, _NAMED_TYPES):
        target = v if isinstance(v, type) else getattr(v, "func", v)  # partial -> its function
        module = getattr(target, "__module__", None) or type(target).__module__
        name = getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))
        return _item(b"X", f"{module}.{name}".encode())
    if id(v) in active:
        raise ValueError(f"params_hash cannot encode a cyclic {_type_name(type(v))}")
    active.add(id(v))
    try:
        return _enc_composite(v, active)
    finally:
        active.discard(id(v))


def _enc_composite(v: Any, active: set[int]) -> bytes:
    from sklearn.base import BaseEstimator

    if isinstance(v, np.ndarray):
        return _enc_array(v, active)
    if isinstance(v, list):
        return _item(b"L", b"".join(_enc(x, active) for x in v))
    if isinstance(v, tuple):
        return _item(b"T", b"".join(_enc(x, active) for x in v))
    if isinstance(v, (set, frozenset)):
        return _item(b"Q", b"".join(sorted(_enc(x, active) for x in v)))
    if isinstance(v, dict):
        entries = sorted((_enc(k, active), _enc(x, active)) for k, x in v.items())
        return _item(b"D", b"".join(k + x for k, x in entries))
    if isinstance(v, BaseEstimator):
        params = v.get_params(deep=False)
        state = v.__getstate__()
        if not isinstance(state, dict):
            state = dict(vars(v))
        fitted = {k: x for k, x in state.items() if k != "_sklearn_version" and k not in params}
        return _item(b"E", _enc(_type_name(type(v)), active) + _enc(params, active) + _enc(fitted, active))
    return _item(b"O", _enc(_type_name(type(v)), active) + _enc(_object_state(v), active))


def _onnx_params_hash(graph: Any) -> str:
    return hashlib.sha256(_enc(_onnx_graph_value(graph), set())).hexdigest()


def _onnx_graph_value(graph: Any) -> tuple:
    from onnx import numpy_helper

    inits = [(t.name, numpy_helper.to_array(t)) for t in sorted(graph.initializer, key=lambda t: t.name)]
    nodes = [
        (
            n.domain,
            n.op_type,
            list(n.input),
            list(n.output),
            {a.name: _onnx_attr_value(a) for a in n.attribute},
        )
        for n in graph.node
    ]
    return ("onnx-graph", inits, nodes)


def _onnx_attr_value(attr: Any) -> Any:
    from onnx import AttributeProto, numpy_helper

    kind = attr.type
    if kind == AttributeProto.FLOAT:
        return float(attr.f)
    if kind == AttributeProto.INT:
        return int(attr.i)
    if kind == AttributeProto.STRING:
        return bytes(attr.s)
    if kind == AttributeProto.TENSOR:
        return numpy_helper.to_array(attr.t)
    if kind == AttributeProto.GRAPH:
        return _onnx_graph_value(attr.g)
    if kind == AttributeProto.FLOATS:
        return [float(x) for x in attr.floats]
    if kind == AttributeProto.INTS:
        return [int(x) for x in attr.ints]
    if kind == AttributeProto.STRINGS:
        return [bytes(x) for x in attr.strings]
    if kind == AttributeProto.TENSORS:
        return [numpy_helper.to_array(t) for t in attr.tensors]
    if kind == AttributeProto.GRAPHS:
        return [_onnx_graph_value(g) for g in attr.graphs]
    return attr.SerializeToString(deterministic=True)
