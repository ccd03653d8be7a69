"""Tests for p2pml.modelfile: real model files in tmp_path, loaded, checked and refused."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import zipfile

import numpy as np
import pytest

skops_io = pytest.importorskip("skops.io")
pytest.importorskip("onnxruntime")
skl2onnx = pytest.importorskip("skl2onnx")

from sklearn.datasets import load_diabetes, load_iris  # noqa: E402
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier  # noqa: E402
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge  # noqa: E402
from sklearn.neighbors import KNeighborsRegressor  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import FunctionTransformer, StandardScaler  # noqa: E402
from sklearn.svm import LinearSVC  # noqa: E402
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor  # noqa: E402

from p2pml import modelfile  # noqa: E402
from p2pml.modelfile import ModelFileError, load, params_hash, save  # noqa: E402

IRIS_X, IRIS_Y = load_iris(return_X_y=True)
DIAB_X, DIAB_Y = load_diabetes(return_X_y=True)


class TweakedLogisticRegression(LogisticRegression):
    """A contributor's own class: skops cannot know that it is harmless, so it must be refused."""


def _double(x):
    return 2 * x


def _forest(seed: int = 0) -> RandomForestClassifier:
    return RandomForestClassifier(n_estimators=5, max_depth=4, random_state=seed).fit(IRIS_X, IRIS_Y)


def _logreg(**kw) -> LogisticRegression:
    return LogisticRegression(max_iter=1000, **kw).fit(IRIS_X, IRIS_Y)


def _saved(tmp_path, estimator, name: str = "model.skops"):
    path = tmp_path / name
    save(estimator, path)
    return path


def _onnx_file(tmp_path, estimator, x, name: str = "model.onnx", **kw):
    path = tmp_path / name
    path.write_bytes(skl2onnx.to_onnx(estimator, x[:1], **kw).SerializeToString())
    return path


def _refused(path, match: str, **task) -> str:
    task = task or {"n_features": 4, "kind": "classification", "n_classes": 3}
    with pytest.raises(ModelFileError, match=match) as info:
        load(path, **task)
    assert str(path) in str(info.value)
    return str(info.value)


# ------------------------------------------------------------------------------------------- skops


def test_skops_random_forest_loads_and_predicts_like_the_original(tmp_path):
    forest = _forest()
    model = load(_saved(tmp_path, forest), n_features=4, kind="classification", n_classes=3)
    assert (model.framework, model.kind, model.n_features) == ("sklearn", "RandomForestClassifier", 4)
    assert model.params_sha256 == params_hash(forest)
    proba = model.predict(IRIS_X)
    assert proba.dtype == np.float64 and proba.shape == (150, 3)
    np.testing.assert_allclose(proba, forest.predict_proba(IRIS_X), rtol=0, atol=1e-12)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_skops_pipeline_regressor_loads_and_predicts_like_the_original(tmp_path):
    pipe = make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=5)).fit(DIAB_X, DIAB_Y)
    model = load(_saved(tmp_path, pipe), n_features=10, kind="regression")
    assert model.kind == "Pipeline(StandardScaler,KNeighborsRegressor)"
    values = model.predict(DIAB_X)
    assert values.dtype == np.float64 and values.shape == (len(DIAB_X),)
    np.testing.assert_array_equal(values, pipe.predict(DIAB_X))
    assert model.params_sha256 == params_hash(pipe)  # the query counters of the KD-tree do not count


def test_predict_rejects_rows_of_the_wrong_shape(tmp_path):
    model = load(_saved(tmp_path, _forest()), n_features=4, kind="classification", n_classes=3)
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        model.predict(np.zeros((2, 5)))


# -------------------------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("zipmap", [True, False])
def test_onnx_classifier_agrees_with_scikit_learn(tmp_path, zipmap):
    clf = _logreg()
    options = None if zipmap else {"zipmap": False}
    path = _onnx_file(tmp_path, clf, IRIS_X.astype(np.float32), options=options)
    model = load(path, n_features=4, kind="classification", n_classes=3)
    assert (model.framework, model.kind, model.n_features) == ("onnx", "onnx:skl2onnx", 4)
    proba = model.predict(IRIS_X)
    assert proba.dtype == np.float64 and proba.shape == (150, 3)
    np.testing.assert_allclose(proba, clf.predict_proba(IRIS_X), rtol=0, atol=1e-4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_onnx_regressor_agrees_with_scikit_learn(tmp_path, dtype):
    reg = DecisionTreeRegressor(max_depth=5, random_state=0).fit(DIAB_X, DIAB_Y)
    if dtype is np.float64:
        reg = LinearRegression().fit(DIAB_X, DIAB_Y)
    model = load(_onnx_file(tmp_path, reg, DIAB_X.astype(dtype)), n_features=10, kind="regression")
    values = model.predict(DIAB_X)
    assert values.dtype == np.float64 and values.shape == (len(DIAB_X),)
    np.testing.assert_allclose(values, reg.predict(DIAB_X), rtol=0, atol=1e-4)


def test_onnx_params_hash_covers_the_graph_not_the_file(tmp_path):
    task = {"n_features": 4, "kind": "classification", "n_classes": 3}
    x = IRIS_X.astype(np.float32)
    path = _onnx_file(tmp_path, _logreg(), x, "a.onnx")
    proto = skl2onnx.to_onnx(_logreg(), x[:1])
    proto.doc_string = "the same graph, other file bytes"
    proto.producer_version = "0"
    (tmp_path / "b.onnx").write_bytes(proto.SerializeToString())
    assert path.read_bytes() != (tmp_path / "b.onnx").read_bytes()
    one, same = load(path, **task), load(tmp_path / "b.onnx", **task)
    other = load(_onnx_file(tmp_path, _logreg(C=0.5), x, "c.onnx"), **task)
    assert one.params_sha256 == same.params_sha256 != other.params_sha256
    assert len(one.params_sha256) == 64


def test_onnx_model_with_wrong_features_or_task_is_refused(tmp_path):
    path = _onnx_file(tmp_path, _logreg(), IRIS_X.astype(np.float32), options={"zipmap": False})
    _refused(path, "model takes 4 features; the task has 5", n_features=5, kind="classification", n_classes=3)
    _refused(path, "3 classes; the task has 4", n_features=4, kind="classification", n_classes=4)
    _refused(path, "regressor has 2 outputs", n_features=4, kind="regression")
    reg = _onnx_file(tmp_path, LinearRegression().fit(IRIS_X, IRIS_Y), IRIS_X.astype(np.float32), "r.onnx")
    _refused(reg, r"no \[N, 3\] class-probability output \(outputs: variable")


def test_onnx_classifier_with_other_labels_is_refused(tmp_path):
    clf = LogisticRegression(max_iter=1000).fit(IRIS_X, IRIS_Y + 1)
    for zipmap in (True, False):
        options = None if zipmap else {"zipmap": False}
        path = _onnx_file(tmp_path, clf, IRIS_X.astype(np.float32), f"l{zipmap}.onnx", options=options)
        _refused(path, r"classes are \[1, 2, 3\]; the task's classes are 0\.\.2")


# --------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL])
def test_pickle_file_is_refused_without_being_loaded(tmp_path, protocol):
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(_forest(), protocol=protocol))  # written, never loaded
    message = _refused(path, "pickle files are never loaded")
    assert "skops" in message and "p2pml.modelfile.save" in message and "ONNX" in message


def test_skops_file_with_a_custom_class_is_refused(tmp_path):
    tweaked = TweakedLogisticRegression(max_iter=1000).fit(IRIS_X, IRIS_Y)
    message = _refused(_saved(tmp_path, tweaked), "not trusted")
    assert "TweakedLogisticRegression" in message


def test_skops_file_with_a_function_is_refused(tmp_path):
    pipe = make_pipeline(FunctionTransformer(_double), LogisticRegression(max_iter=1000)).fit(IRIS_X, IRIS_Y)
    assert "_double" in _refused(_saved(tmp_path, pipe), "not trusted")


def test_model_with_three_features_for_a_task_of_four_is_refused(tmp_path):
    clf = DecisionTreeClassifier(random_state=0).fit(IRIS_X[:, :3], IRIS_Y)
    _refused(_saved(tmp_path, clf), "model takes 3 features; the task has 4")


def test_classifier_for_a_regression_task_is_refused(tmp_path):
    message = _refused(_saved(tmp_path, _forest()), "is a classifier; the task is regression",
                       n_features=4, kind="regression")
    assert "RandomForestClassifier" in message


def test_regressor_for_a_classification_task_is_refused(tmp_path):
    reg = Ridge().fit(IRIS_X, IRIS_Y)
    assert "(Ridge)" in _refused(_saved(tmp_path, reg), "is a regressor; the task is classification")


def test_classifier_with_other_classes_is_refused(tmp_path):
    shifted = DecisionTreeClassifier(random_state=0).fit(IRIS_X, IRIS_Y + 1)
    _refused(_saved(tmp_path, shifted, "a.skops"), r"classes are \[1, 2, 3\]; the task's classes are 0\.\.2")
    binary = DecisionTreeClassifier(random_state=0).fit(IRIS_X, (IRIS_Y > 0).astype(int))
    _refused(_saved(tmp_path, binary, "b.skops"), "has 2 classes; the task has 3")


def test_classifier_without_probabilities_is_refused(tmp_path):
    svc = LinearSVC().fit(StandardScaler().fit_transform(IRIS_X), IRIS_Y)
    _refused(_saved(tmp_path, svc), "has no predict_proba")


def test_skops_file_without_a_fitted_estimator_is_refused(tmp_path):
    _refused(_saved(tmp_path, {"w": [1.0]}, "a.skops"), "holds a builtins.dict, not a scikit-learn estimator")
    _refused(_saved(tmp_path, LogisticRegression(), "b.skops"), "is not fitted")


def test_zip_archive_that_is_not_a_skops_file_is_refused(tmp_path):
    path = tmp_path / "model.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x04N.")
    _refused(path, "not a skops file: no schema.json.*pickle")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"weights: 1, 2, 3\nthis is not a model\n", "not a model file.*looks like text"),
        (np.random.default_rng(0).bytes(4096), "not a model file.*starts with the bytes"),
        (b"", "the file is empty"),
    ],
    ids=["text", "random-bytes", "empty"],
)
def test_file_that_is_no_model_is_refused(tmp_path, content, match):
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    _refused(path, match)


def test_missing_path_and_directory_are_refused(tmp_path):
    _refused(tmp_path / "nowhere.skops", "no such file")
    _refused(tmp_path, "is a directory")


def test_bad_task_arguments_raise_value_error(tmp_path):
    path = _saved(tmp_path, _forest())
    with pytest.raises(ValueError, match="kind must be"):
        load(path, n_features=4, kind="ranking")
    with pytest.raises(ValueError, match="n_classes >= 2"):
        load(path, n_features=4, kind="classification")


# ------------------------------------------------------------------------ crafted (tampered) files


def _tamper(path, field: str, change) -> None:
    """Rewrite the first structured .npy member of a skops file that has ``field``."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    for name, raw in members.items():
        if name.endswith(".npy"):
            array = np.load(io.BytesIO(raw), allow_pickle=False)
            if array.dtype.names and field in array.dtype.names:
                change(array)
                buffer = io.BytesIO()
                np.save(buffer, array, allow_pickle=False)
                members[name] = buffer.getvalue()
                break
    else:
        raise AssertionError(f"no array with field {field}")
    with zipfile.ZipFile(path, "w") as archive:
        for name, raw in members.items():
            archive.writestr(name, raw)


@pytest.mark.parametrize(
    ("field", "change", "match"),
    [
        ("left_child", lambda a: a["left_child"].__setitem__(0, 10_000), "child index is out of range"),
        ("left_child", lambda a: a["left_child"].__setitem__(0, 0), "child index is out of range"),
        ("feature", lambda a: a["feature"].__setitem__(0, 99), "splits on a feature it does not have"),
    ],
    ids=["child-beyond-the-end", "child-cycle", "feature"],
)
def test_tree_with_out_of_range_indices_is_refused(tmp_path, field, change, match):
    path = _saved(tmp_path, DecisionTreeClassifier(max_depth=3, random_state=0).fit(IRIS_X, IRIS_Y))
    _tamper(path, field, change)
    _refused(path, "malformed.*" + match)


def test_hist_gradient_boosting_with_out_of_range_child_is_refused(tmp_path):
    hgb = HistGradientBoostingClassifier(max_iter=3, random_state=0).fit(IRIS_X, IRIS_Y)
    path = _saved(tmp_path, hgb)
    assert load(path, n_features=4, kind="classification", n_classes=3).params_sha256 == params_hash(hgb)
    _tamper(path, "feature_idx", lambda a: a["right"].__setitem__(0, 4_000_000))
    _refused(path, "malformed.*child index is out of range")


def test_neighbours_tree_with_out_of_range_node_is_refused(tmp_path):
    path = _saved(tmp_path, KNeighborsRegressor(algorithm="kd_tree").fit(DIAB_X, DIAB_Y))
    _tamper(path, "idx_end", lambda a: a["idx_end"].__setitem__(-1, 10**9))
    _refused(path, "malformed.*node ranges are out of range", n_features=10, kind="regression")


# ------------------------------------------------------------------------------------- params_hash


def test_params_hash_is_stable_across_identical_fits_and_a_save_load_round_trip(tmp_path):
    first, second = _forest(seed=7), _forest(seed=7)
    assert params_hash(first) == params_hash(second)
    loaded = skops_io.load(_saved(tmp_path, first), trusted=list(modelfile.TRUSTED_SKOPS_TYPES))
    assert params_hash(loaded) == params_hash(first)
    assert load(tmp_path / "model.skops", n_features=4, kind="classification",
                n_classes=3).params_sha256 == params_hash(first)


def test_params_hash_changes_with_one_coefficient():
    clf = _logreg()
    before = params_hash(clf)
    clf.coef_[1, 2] = np.nextafter(clf.coef_[1, 2], np.inf)
    assert params_hash(clf) != before


def test_params_hash_changes_with_one_tree_threshold():
    tree = DecisionTreeClassifier(max_depth=3, random_state=0).fit(IRIS_X, IRIS_Y)
    before = params_hash(tree)
    state = tree.tree_.__getstate__()
    state["nodes"] = state["nodes"].copy()
    state["nodes"]["threshold"][0] += 1e-9
    tree.tree_.__setstate__(state)
    assert params_hash(tree) != before


def test_params_hash_differs_between_estimators():
    hashes = {
        params_hash(_forest(seed=0)),
        params_hash(_forest(seed=1)),
        params_hash(_logreg()),
        params_hash(_logreg(C=0.5)),
        params_hash(LogisticRegression(max_iter=1000)),  # unfitted: parameters only
    }
    assert len(hashes) == 5


def _spec(v) -> bytes:
    """The documented encoding, re-implemented independently for the types LinearRegression uses."""

    def item(tag: bytes, payload: bytes) -> bytes:
        return tag + struct.pack(">Q", len(payload)) + payload

    if v is None:
        return item(b"N", b"")
    if isinstance(v, (bool, np.bool_)):
        return item(b"B", bytes([bool(v)]))
    if isinstance(v, (int, np.integer)):
        return item(b"I", str(int(v)).encode())
    if isinstance(v, (float, np.floating)):
        return item(b"F", struct.pack(">d", float(v)))
    if isinstance(v, str):
        return item(b"S", v.encode())
    if isinstance(v, tuple):
        return item(b"T", b"".join(_spec(x) for x in v))
    if isinstance(v, dict):
        return item(b"D", b"".join(k + x for k, x in sorted((_spec(k), _spec(x)) for k, x in v.items())))
    if isinstance(v, np.ndarray):
        body = item(b"Y", np.ascontiguousarray(v).tobytes())
        return item(b"A", _spec(v.dtype.str) + _spec(tuple(v.shape)) + body)
    params = v.get_params(deep=False)
    state = {k: x for k, x in vars(v).items() if k not in params}
    name = f"{type(v).__module__}.{type(v).__qualname__}"
    return item(b"E", _spec(name) + _spec(params) + _spec(state))


def test_params_hash_follows_the_documented_encoding():
    reg = LinearRegression().fit(DIAB_X, DIAB_Y)
    assert params_hash(reg) == hashlib.sha256(_spec(reg)).hexdigest()
