"""Any task, any model: built-in datasets, regression, a CSV task, model files, and cards, on
real node processes (and the task rules on their own)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from p2pml import task as T
from p2pml.cluster import LocalCluster, free_ports, get_json, write_network
from p2pml.config import ConfigError, parse
from p2pml.ledger import REGRESSION

ROOT = Path(__file__).resolve().parent.parent


def small_csv(path: Path) -> tuple[Path, str]:
    """A CSV task of house prices with categorical columns and a missing cell (made here)."""
    rng = np.random.default_rng(0)
    lines = ["Price (USD),Lot Size (sqft),Bedrooms,Air Co,Area"]
    for i in range(160):
        lot, beds, air, area = rng.integers(2000, 9000), rng.integers(1, 5), rng.choice(["yes", "no"]), \
            rng.choice(["north", "south", "east"])
        price = 20 * lot + 9000 * beds + (15000 if air == "yes" else 0) + {"north": 0, "south": 5000, "east": 9000}[area]
        price += int(rng.normal(0, 4000))
        lines.append(f"{price},{lot},{beds if i != 7 else 'NA'},{air},{area}")
    path.write_text("\n".join(lines) + "\n")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def start(tmp_path: Path, task: dict | None, n: int = 5, models: list[str] | None = None) -> LocalCluster:
    peers = write_network(tmp_path / "peers.toml", free_ports(n), task=task, models=models,
                          query_timeout_ms=400, anti_entropy_interval_ms=200)
    cluster = LocalCluster(peers, tmp_path / "data")
    cluster.start()
    cluster.wait_ready()
    cluster.wait_registered()
    return cluster


# -- the task rules --------------------------------------------------------------------------


def test_feature_names_follow_the_documented_rule():
    assert T.feature_name("sepal length (cm)") == "sepal_length"
    assert T.feature_name("od280/od315_of_diluted_wines") == "od280_od315_of_diluted_wines"
    assert T.feature_name("Lot Size (sqft)") == "lot_size"


def test_a_csv_task_encodes_categories_by_the_documented_rule(tmp_path):
    path, digest = small_csv(tmp_path / "houses.csv")
    data = T.load(T.TaskSource(csv=str(path), target="Price (USD)", sha256=digest, kind=REGRESSION))
    spec = data.spec
    assert spec.features == ("lot_size", "bedrooms", "air_co", "area")
    assert spec.rows == 159  # the row with NA is left out
    assert spec.categories == ((), (), ("no", "yes"), ("east", "north", "south"))
    text = path.read_text().splitlines()[1].split(",")
    assert list(data.x[0]) == [float(text[1]), float(text[2]), float(["no", "yes"].index(text[3])),
                               float(["east", "north", "south"].index(text[4]))]
    # the rows root is RFC 6962's over the documented leaves: recomputed by hand for two rows
    leaves = [hashlib.sha256(b"\x00" + np.asarray(data.x[i], dtype=">f8").tobytes()
                             + np.asarray(data.y[i], dtype=">f8").tobytes()).digest() for i in range(2)]
    assert T.merkle_root([np.asarray(data.x[i], dtype=">f8").tobytes() + np.asarray(data.y[i], dtype=">f8").tobytes()
                          for i in range(2)]) == hashlib.sha256(b"\x01" + leaves[0] + leaves[1]).digest()


def test_the_task_is_in_the_genesis_and_iris_is_the_default():
    peers = '[[peer]]\nname = "ada"\nport = 8001\nmodel = "knn"\n'
    iris = parse(peers).genesis()
    assert iris == parse('[task]\ndataset = "iris"\n' + peers).genesis()
    wine = parse('[task]\ndataset = "wine"\n' + peers).genesis()
    assert wine.task.classes == ("class_0", "class_1", "class_2") and len(wine.task.features) == 13
    assert len({iris.id(), wine.id(), parse('[task]\ndataset = "breast_cancer"\n' + peers).genesis().id()}) == 3


BAD_TASKS = {
    "unknown dataset": ('dataset = "mnist"', "is not built in"),
    "dataset and csv": ('dataset = "iris"\ncsv = "x.csv"', "not both"),
    "csv without target": ('csv = "x.csv"\nsha256 = "' + "0" * 64 + '"\nkind = "regression"', "needs target"),
    "bad kind": ('dataset = "iris"\nkind = "ranking"', "classification"),
    "kind against the dataset": ('dataset = "diabetes"\nkind = "classification"', "is a regression task"),
    "band on a classification": ('dataset = "wine"\nband_bps = 10', "for regression tasks"),
    "unknown field": ('dataset = "iris"\nlabels = 3', "unknown [task] field"),
    "short sha256": ('csv = "x.csv"\ntarget = "y"\nsha256 = "abc"\nkind = "regression"', "64 hex digits"),
}


@pytest.mark.parametrize("case", sorted(BAD_TASKS))
def test_a_bad_task_is_refused_with_its_reason(case):
    table, reason = BAD_TASKS[case]
    with pytest.raises(ConfigError, match=None) as info:
        parse(f"[task]\n{table}\n\n" + '[[peer]]\nname = "ada"\nport = 8001\nmodel = "knn"\n')
    assert reason in str(info.value), str(info.value)


def test_a_bad_csv_task_is_refused_with_its_reason(tmp_path):
    path, digest = small_csv(tmp_path / "houses.csv")
    peer = '\n[[peer]]\nname = "ada"\nport = 8001\nmodel = "knn"\n'

    def refused(table: str) -> str:
        with pytest.raises(ConfigError) as info:
            parse(f"[task]\n{table}\n{peer}", folder=tmp_path)
        return str(info.value)
    assert "not the" in refused(f'csv = "houses.csv"\ntarget = "Price (USD)"\nsha256 = "{"1" * 64}"\nkind = "regression"')
    assert "no column 'price'" in refused(f'csv = "houses.csv"\ntarget = "price"\nsha256 = "{digest}"\nkind = "regression"')
    assert "must be a number" in refused(f'csv = "houses.csv"\ntarget = "Area"\nsha256 = "{digest}"\nkind = "regression"')
    assert "cannot read" in refused(f'csv = "nope.csv"\ntarget = "y"\nsha256 = "{digest}"\nkind = "regression"')
    # a classification kind of model for a regression task
    with pytest.raises(ConfigError, match="linear_regression"):
        parse(f'[task]\ncsv = "houses.csv"\ntarget = "Price (USD)"\nsha256 = "{digest}"\nkind = "regression"\n'
              + peer.replace("knn", "logistic_regression"), folder=tmp_path)


# -- real clusters ---------------------------------------------------------------------------


def ask(cluster: LocalCluster, data: T.TaskData, n: int) -> list[dict]:
    x, _ = data.held_out()
    out = []
    for i in range(n):
        name = cluster.names[i % len(cluster.names)]
        features = ",".join(repr(float(v)) for v in x[i])
        out.append(get_json(f"{cluster.url(name)}/predict?features={features}"))
    return out


def check_answers_and_ledgers(cluster: LocalCluster, data: T.TaskData, answers: list[dict]) -> dict:
    """Every answer counts at least 4 votes, regression answers are numbers better than the
    mean's guess, every ledger agrees and shows the task and each member's card trained on the
    task's training rows. Returns the ledgers."""
    assert all(len(a["votes"]) >= 4 for a in answers), [len(a["votes"]) for a in answers]
    if data.spec.regression:
        assert all(isinstance(a["prediction"], float) and a["probabilities"] is None for a in answers)
        x, y = data.held_out()
        error = np.mean([abs(a["prediction"] - y[i]) for i, a in enumerate(answers)])
        assert error < np.std(y)  # better than guessing the mean
    else:
        assert all(a["prediction"] in data.spec.classes for a in answers)
    ledgers = cluster.wait_converged()
    assert len({lg["root"] for lg in ledgers.values()}) == 1
    view = next(iter(ledgers.values()))
    assert view["task"]["name"] == data.spec.name and view["rounds"] >= len(answers)
    x_train, _, y_train, _ = data.split()
    root = T.rows_root(x_train, y_train, data.spec.regression).hex()
    assert all(c[0]["data_root"] == root and c[0]["rows"] == len(x_train) for c in view["cards"].values())
    return ledgers


@pytest.mark.parametrize("which", ["wine", "csv"])
def test_a_cluster_runs_any_task(tmp_path, which):
    """Five real peers on wine (classification) or a CSV of house prices (regression, with
    categorical columns); diabetes is the next test's cluster."""
    if which == "csv":
        path, digest = small_csv(tmp_path / "houses.csv")
        task = {"csv": str(path), "target": "Price (USD)", "sha256": digest, "kind": "regression"}
    else:
        task = {"dataset": which}
    cluster = start(tmp_path, task)
    try:
        data = cluster.net.task_data()
        check_answers_and_ledgers(cluster, data, ask(cluster, data, 10))
    finally:
        cluster.stop()


def test_a_diabetes_cluster_and_own_model_predict_opening_no_round(tmp_path):
    """Diabetes (regression) on five real peers; then GET /model/predict: this node's model
    alone; the ledger's rounds and messages stay as they were on every node, and five peers
    give five different models' answers."""
    cluster = start(tmp_path, {"dataset": "diabetes"})
    try:
        data = cluster.net.task_data()
        before = check_answers_and_ledgers(cluster, data, ask(cluster, data, 10))
        x, _ = data.held_out()
        query = "&".join(f"{n}={float(v)!r}" for n, v in zip(data.spec.features, x[0]))
        own = {n: get_json(f"{cluster.url(n)}/model/predict?{query}") for n in cluster.names}
        after = cluster.wait_converged()
        for n in cluster.names:
            assert (after[n]["rounds"], after[n]["messages"]) == (before[n]["rounds"], before[n]["messages"])
            assert own[n]["name"] == n and own[n]["card"]["framework"] == "builtin"
        assert len({a["prediction"] for a in own.values()}) == 5
        from p2pml.model import Model

        here = Model("knn", source=cluster.net.task_source)  # di's kind, trained here the same way
        assert own["di"]["prediction"] == pytest.approx(here.own(x[:1])[0]["prediction"], rel=1e-9)
        assert own["di"]["card"]["params"] == here.card.params.hex()
    finally:
        cluster.stop()


def train(tmp_path: Path, peers: Path, kind: str, out: str) -> Path:
    r = subprocess.run([sys.executable, "-m", "p2pml.model", "train", "--peers", str(peers), "--kind", kind,
                        "--out", str(tmp_path / out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return tmp_path / out


def test_a_cluster_with_a_skops_seat_and_an_onnx_seat_and_a_model_update(tmp_path):
    """ada runs a skops file, bo an ONNX file, both written by the train command. Then cy
    restarts with another model: it signs a card naming its last one; every ledger holds the
    same chain, votes before count under the old card and after under the new, and the
    network (its genesis) is the same."""
    peers = write_network(tmp_path / "iris.toml", [1, 2])  # only for the training command
    rf = train(tmp_path, peers, "random_forest", "rf.skops")
    lr = train(tmp_path, peers, "logistic_regression", "lr.onnx")
    cluster = start(tmp_path, None, models=[f"file:{rf}", f"file:{lr}", "gradient_boosting", "knn", "svm"])
    try:
        data = cluster.net.task_data()
        answers = ask(cluster, data, 10)
        assert all(len(a["votes"]) >= 4 for a in answers)
        view = cluster.wait_converged()["ada"]
        cards = {view["peers"][pid]["name"]: chain[-1] for pid, chain in view["cards"].items()}
        assert (cards["ada"]["framework"], cards["ada"]["model"]) == ("sklearn", "RandomForestClassifier")
        assert cards["bo"]["framework"] == "onnx" and cards["cy"]["framework"] == "builtin"
        assert cards["ada"]["score_bps"] >= 9_000 and cards["bo"]["score_bps"] >= 9_000
        votes = {v["name"]: v for v in answers[0]["votes"]}
        assert votes["bo"]["model"] == cards["bo"]["model"]

        old, genesis = votes["cy"]["card"], view["genesis"]
        cluster.stop("cy")
        text = cluster.peers_file.read_text()
        cluster.peers_file.write_text(text.replace('model = "gradient_boosting"', 'model = "knn"'))
        cluster.start("cy")
        cluster.wait_ready(names=["cy"])
        later = ask(cluster, data, 3)
        ledgers = cluster.wait_converged()
        assert len({lg["root"] for lg in ledgers.values()}) == 1
        view = ledgers["ada"]
        assert view["genesis"] == genesis
        chain = next(c for pid, c in view["cards"].items() if view["peers"][pid]["name"] == "cy")
        assert [c["model"] for c in chain] == ["gradient_boosting", "knn"]
        assert chain[0]["id"] == old and chain[1]["previous"] == chain[0]["id"]
        assert chain[0]["params"] != chain[1]["params"]
        now = {v["name"]: v for v in later[-1]["votes"]}["cy"]
        assert now["card"] == chain[1]["id"] and now["model"] == "knn"
    finally:
        cluster.stop()


def refusal(tmp_path: Path, peers_text: str) -> str:
    (tmp_path / "p.toml").write_text(peers_text)
    r = subprocess.run([sys.executable, "-m", "p2pml.node", "--port", "8001", "--peers", str(tmp_path / "p.toml"),
                        "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stderr


def test_bad_model_files_are_refused_at_start(tmp_path):
    import pickle

    from sklearn.linear_model import LogisticRegression

    peers = write_network(tmp_path / "iris.toml", [1, 2])
    rf = train(tmp_path, peers, "random_forest", "rf.skops")
    wine = write_network(tmp_path / "wine.toml", [1, 2], task={"dataset": "wine"})
    wine_rf = train(tmp_path, wine, "random_forest", "wine.skops")
    x, y = np.zeros((6, 4)), np.array([0, 1, 2] * 2)
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(LogisticRegression().fit(x, y)))
    (tmp_path / "notes.txt").write_text("not a model\n")

    def with_model(model: str, task: str = "") -> str:
        return f"{task}[[peer]]\nname = \"ada\"\nport = 8001\nmodel = \"{model}\"\n"
    assert "pickle files are never loaded" in refusal(tmp_path, with_model(f"file:{tmp_path / 'model.pkl'}"))
    assert "13 features" in refusal(tmp_path, with_model(f"file:{wine_rf}"))
    assert "regress" in refusal(tmp_path, with_model(f"file:{rf}", '[task]\ndataset = "diabetes"\n\n'))
    assert "notes.txt" in refusal(tmp_path, with_model(f"file:{tmp_path / 'notes.txt'}"))
    assert "missing.skops" in refusal(tmp_path, with_model(f"file:{tmp_path / 'missing.skops'}"))
