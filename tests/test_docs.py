"""The docs are true: an outsider who follows docs/ledger.md and docs/protocol.md, with hashlib,
json, msgpack and PyNaCl and nothing of p2pml, recomputes the genesis id and verifies every
counted vote of an answer from ``/message/{id}`` alone."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import msgpack
import nacl.signing

from p2pml.cluster import get_json

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("setosa", "versicolor", "virginica")  # docs/ledger.md, "Units and constants"


IRIS = json.loads((ROOT / "tests" / "vectors" / "formats.json").read_text())["task"]  # Iris: the default task


def genesis_id(peers_toml: Path) -> bytes:
    doc = tomllib.loads(peers_toml.read_text())
    slots = [[p["name"], p.get("key")] for p in doc["peer"]]
    accounts = sorted([a["key"].lower(), a["balance"]] for a in doc.get("account", []))
    canon = json.dumps(["p2pml-genesis", 4, IRIS, slots, accounts], sort_keys=True, separators=(",", ":"),
                       ensure_ascii=True)
    return hashlib.sha256(canon.encode()).digest()


def fetch(url: str, mid: str, gid: bytes) -> tuple[bytes, list]:
    """A message, verified as protocol.md step 2 says: (author key, decoded body)."""
    m = get_json(f"{url}/message/{mid}")
    key, body, sig = bytes.fromhex(m["key"]), bytes.fromhex(m["body"]), bytes.fromhex(m["signature"])
    data = b"p2pml/v1/message\x00" + gid + key + body
    nacl.signing.VerifyKey(key).verify(data, sig)  # raises if the signature is bad
    assert hashlib.sha256(data).hexdigest() == mid
    return key, msgpack.unpackb(body, raw=False)


def test_the_repository_genesis_id_is_the_documented_one():
    doc = (ROOT / "docs" / "ledger.md").read_text()
    assert genesis_id(ROOT / "peers.toml").hex() in doc


def test_an_outsider_verifies_every_counted_vote_as_the_docs_say(make_cluster):
    cluster = make_cluster(3)
    gid = genesis_id(cluster.peers_file)
    for name in cluster.names:
        assert get_json(cluster.url(name) + "/ledger")["genesis"] == gid.hex()
    for name in cluster.names:  # each issuer: its own vote is committed in its query
        url = cluster.url(name)
        answer = get_json(url + "/predict?features=6.1,2.8,4.7,1.2")
        assert len(answer["votes"]) == 3
        issuer, query = fetch(url, answer["query"], gid)
        assert query[0] == "query"
        index = next(i for i in range(len(query[2]))
                     if hashlib.sha256(bytes.fromhex(answer["query"]) + i.to_bytes(4, "big")).digest()[:16].hex()
                     == answer["round"])
        rid = bytes.fromhex(answer["round"])
        power = [0, 0, 0]  # the soft vote: power-weighted sums of the revealed probabilities
        for vote in answer["votes"]:
            key, body = fetch(url, vote["message"], gid)
            assert hashlib.sha256(key).digest()[:16].hex() == vote["peer"]
            assert body[0] == "votes"
            reveal = next(r for r in body[3] if r[0] == rid)
            _, label, proba, salt, _seen = reveal
            assert CLASSES[label] == vote["prediction"]
            assert [round(p / 1_000_000, 6) for p in proba] == [vote["probabilities"][c] for c in CLASSES]
            ckey, commit = fetch(url, vote["commit"], gid)
            assert ckey == key
            if commit[0] == "query":  # the issuer's own vote
                assert key == issuer and vote["commit"] == answer["query"]
                bound = hashlib.sha256(b"p2pml/query-vote\x00" + key + commit[1].to_bytes(8, "big")
                                       + index.to_bytes(4, "big")).digest()[:16]
                digest = commit[3][index]
            else:
                bound = rid
                digest = next(d for r, d in commit[2] if r == rid)
            expect = hashlib.sha256(b"p2pml/commit\x00" + key + bound + bytes([label])
                                    + b"".join(p.to_bytes(4, "big") for p in proba) + salt).digest()
            assert expect == digest, vote["name"]
            for c in range(3):
                power[c] += vote["stake"] * vote["weight"] * proba[c]
        best = max(range(3), key=lambda c: (power[c], -c))
        assert CLASSES[best] == answer["prediction"]
