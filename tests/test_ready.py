"""Ready before answering: real node processes on fresh and existing data dirs, queried the
moment ``GET /ready`` says 200, as the README tells users to."""

from __future__ import annotations

import time
import urllib.error

import pytest

from p2pml.cluster import LocalCluster, free_ports, get_json, write_network
from p2pml.readiness import READY_WAIT_S
from p2pml.service import STARTUP_SYNC_S

ROWS = [(5.1, 3.5, 1.4, 0.2), (6.7, 3.0, 5.2, 2.3), (5.9, 3.0, 4.2, 1.5), (4.9, 3.1, 1.5, 0.1)]


def first_answers(cluster: LocalCluster, n: int = 20, names: list[str] | None = None) -> list[dict]:
    """``n`` queries at once, one after the other, spread over the peers."""
    names = names or cluster.names
    out = []
    for i in range(n):
        row = ROWS[i % len(ROWS)]
        url = cluster.url(names[i % len(names)]) + "/predict?features=" + ",".join(map(str, row))
        out.append(get_json(url))
    return out


def check_full(answers: list[dict]) -> None:
    for i, a in enumerate(answers):
        assert len(a["votes"]) >= 4, (i, [v["name"] for v in a["votes"]], a["missing"])
        assert a["late"] == [], (i, a["late"])
        assert not set(a["missing"]) & {v["name"] for v in a["votes"]}


def test_first_answers_count_the_peers_votes_fresh_and_after_a_restart(tmp_path):
    peers = write_network(tmp_path / "peers.toml", free_ports(5))
    with LocalCluster(peers, tmp_path / "data") as cluster:
        cluster.start()
        cluster.wait_ready()
        check_full(first_answers(cluster))
        cluster.stop()
        cluster.start()  # the same data dirs
        cluster.wait_ready()
        check_full(first_answers(cluster))
        ledgers = cluster.wait_converged()
        for lg in ledgers.values():  # no honest record suffers from the starts
            for p in lg["peers"].values():
                assert p["late"] == 0 and p["unrevealed"] == 0 and p["slashed"] == 0, p


def test_not_ready_is_503_with_retry_after_and_health_says_so(tmp_path):
    peers = write_network(tmp_path / "peers.toml", free_ports(3))
    with LocalCluster(peers, tmp_path / "data") as cluster:
        cluster.start("ada")  # alone: not ready until READY_WAIT_S has passed
        url = cluster.url("ada")
        deadline = time.monotonic() + 30
        while True:
            try:
                health = get_json(url + "/health", timeout=1)
                break
            except (OSError, urllib.error.URLError):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert health["status"] == "ok" and health["ready"] is False
        for path in ("/ready", "/predict?features=5.1,3.5,1.4,0.2"):
            with pytest.raises(urllib.error.HTTPError) as err:
                get_json(url + path, timeout=2)
            assert err.value.code == 503 and err.value.headers["Retry-After"] == "1"
            assert "not ready" in err.value.read().decode()


def test_a_minority_becomes_ready_within_the_bound_and_names_the_missing(tmp_path):
    peers = write_network(tmp_path / "peers.toml", free_ports(5))
    with LocalCluster(peers, tmp_path / "data") as cluster:
        t0 = time.monotonic()
        cluster.start("ada")
        cluster.start("bo")
        cluster.wait_ready(names=["ada", "bo"])
        took = time.monotonic() - t0
        # the bound: start-up sync, then READY_WAIT_S; the rest is two Python start-ups
        assert took < STARTUP_SYNC_S + READY_WAIT_S + 10, took
        assert get_json(cluster.url("ada") + "/health")["ready"] is True
        for a in first_answers(cluster, 6, ["ada", "bo"]):
            assert a["complete"] is False
            assert sorted(a["missing"]) == ["cy", "di", "ed"], a["missing"]
            assert sorted(v["name"] for v in a["votes"]) == ["ada", "bo"]


def test_the_readiness_rule_exactly():
    from p2pml.readiness import READY_GRACE_S, Member, decide

    others = [Member("bo", 3), Member("cy", 2), Member("di", 2)]  # 7 in all
    assert decide([], set(), 0.0, None)[0] == "no other member"
    assert decide(others, {"bo", "cy", "di"}, 0.0, None)[0] == "every other member is reachable"
    # bo + cy hold 5 of 7: a majority, ready once it has lasted READY_GRACE_S
    why, since = decide(others, {"bo", "cy"}, 0.5, None)
    assert why is None and since == 0.5
    assert decide(others, {"bo", "cy"}, 0.5 + READY_GRACE_S - 0.01, since)[0] is None
    why, _ = decide(others, {"bo", "cy"}, 0.5 + READY_GRACE_S, since)
    assert why.startswith("members with 5 of the others' 7 voting power are reachable; not di")
    # a majority lost restarts the grace
    assert decide(others, {"bo"}, 2.0, since) == (None, None)
    # bo alone holds 3 of 7 (no majority), cy + di 4 of 7 (a majority): power counts, not heads
    assert decide(others, {"cy", "di"}, 0.0, None)[1] == 0.0
    assert decide(others, {"bo"}, READY_WAIT_S - 0.01, None) == (None, None)
    why, _ = decide(others, {"bo"}, READY_WAIT_S, None)
    assert why.startswith("waited 5s; members with 4 of the others' 7 voting power are unreachable: cy, di")
