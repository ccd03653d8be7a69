"""Generated input against a real node's public endpoints: never a 5xx, always a JSON error that
names the problem, and nothing accepted that should not be."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pml.cluster import LocalCluster, free_ports, get_json, write_network
from p2pml.model import FEATURES

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    # Every fuzzed batch is invalid: score none of them out (tests/test_attacks.py covers that),
    # so that each one reaches the checks it is meant to exercise.
    cluster = LocalCluster(write_network(tmp / "peers.toml", free_ports(1), query_timeout_ms=50,
                                         invalid_message_limit=1_000_000),
                           tmp / "data", log_level="WARNING")
    cluster.start()
    try:
        cluster.wait_ready()
        cluster.wait_registered()
        yield cluster.url(cluster.names[0])
    finally:
        cluster.stop()


def call(url: str, data: bytes | None = None, ctype: str = "application/json") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def check(status: int, body: dict) -> None:
    assert status < 500, body
    if status >= 400:
        assert isinstance(body.get("error"), str) and body["error"], body


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30),
                    st.text(max_size=12))
names = st.one_of(st.sampled_from([*FEATURES, "features"]), st.text(max_size=8))


@FUZZ
@given(params=st.lists(st.tuples(names, numbers.map(str)), max_size=6))
def test_predict_query_strings(url, params):
    status, body = call(f"{url}/predict?{urllib.parse.urlencode(params)}")
    check(status, body)
    if status == 200:  # only what a careful parser would accept
        keys = {k for k, _ in params}
        assert keys == {"features"} or keys == set(FEATURES)
        assert body["prediction"] in ("setosa", "versicolor", "virginica")


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.integers(), st.text(max_size=8)),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20)


@FUZZ
@given(doc=st.one_of(json_values, st.fixed_dictionaries({"features": st.lists(numbers, max_size=6)})))
def test_predict_json_bodies(url, doc):
    status, body = call(f"{url}/predict", json.dumps(doc).encode())
    check(status, body)
    if status == 200:
        feats = doc.get("features") if isinstance(doc, dict) else None
        assert isinstance(doc, dict) and (set(doc) == {"features"} or set(doc) == set(FEATURES))
        assert feats is None or (len(feats) == 4 and all(type(x) in (int, float) for x in feats))


packable = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.binary(max_size=70),
              st.text(max_size=10)),
    lambda inner: st.lists(inner, max_size=4), max_leaves=12)


@FUZZ
@given(payload=st.one_of(st.binary(max_size=300), packable.map(lambda o: msgpack.packb(o, use_bin_type=True))))
def test_gossip_payloads_change_nothing(url, payload):
    before = get_json(f"{url}/ledger")
    status, body = call(f"{url}/gossip", payload, "application/msgpack")
    check(status, body)
    assert status in (200, 400), (status, body)  # judged, not refused unread
    assert status != 200 or body["accepted"] == 0  # nothing generated here is validly signed
    after = get_json(f"{url}/ledger")
    assert (after["root"], after["messages"]) == (before["root"], before["messages"])
