"""Known answers: the rules and byte formats pinned by files checked in under tests/vectors/
(made by ``python tests/vectors/make.py``), and by the docs' own words.

- each ledger vector (a genesis, signed messages, the post-state) is folded in file order, in
  reverse, shuffled and with duplicates: the same root and fields every time;
- each byte format is recomputed here with hashlib/hmac/PyNaCl from docs/ledger.md and
  docs/protocol.md, never with p2pml's functions, and compared with the file and the code;
- the constants table of docs/ledger.md is compared with the code.

A deliberate rule change changes a vector (``make.py``) in the same commit, visibly."""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
import random
import re
import struct
from pathlib import Path

import msgpack
import nacl.signing
import pytest

from p2pml import ledger as L
from p2pml.ledger import Genesis, Ledger, Slot, commitment, query_binding, round_id
from p2pml.wire import Identity, Verifier

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"
LEDGER_VECTORS = sorted(p.stem for p in VECTORS.glob("*.json") if p.stem != "formats")


def load(name: str) -> dict:
    return json.loads((VECTORS / f"{name}.json").read_text())


def fold(doc: dict, raws: list[bytes]) -> tuple[Ledger, dict]:
    genesis = Genesis(tuple(Slot(n, bytes.fromhex(k) if k else None) for n, k in doc["genesis"]))
    assert genesis.id().hex() == doc["genesis_id"]
    verifier, ledger = Verifier(genesis.id()), Ledger(genesis)
    pending = [verifier.open(raw).msg for raw in raws]
    while True:  # what waits for its author's seat is offered again, as anti-entropy does
        refused, waiting = {}, []
        for msg in pending:
            reason = ledger.add(msg)
            if reason:
                refused[msg.id.hex()] = reason
                waiting.append(msg)
        if len(waiting) == len(pending):  # no progress: these are refused for good
            return ledger, refused
        pending = waiting


def test_there_are_ledger_vectors():
    assert {"accuracy_slash_and_ejection", "equivocation", "pinned_seat_and_stranger"} <= set(LEDGER_VECTORS)


@pytest.mark.parametrize("name", LEDGER_VECTORS)
@pytest.mark.parametrize("order", ["as written", "reversed", "shuffled", "duplicated"])
def test_ledger_vector(name, order):
    doc = load(name)
    raws = [bytes.fromhex(h) for h in doc["messages"]]
    if order == "reversed":
        raws.reverse()
    elif order == "shuffled":
        random.Random(name).shuffle(raws)
    elif order == "duplicated":
        raws = raws + raws[::2]
    ledger, refused = fold(doc, raws)
    state = ledger.state.canonical()
    assert ledger.root() == doc["root"]
    assert (state["rounds"], state["pool"]) == (doc["rounds"], doc["pool"])
    peers = {p["name"]: {k: p[k] for k in doc["peers"][p["name"]]} for p in state["peers"].values()}
    assert peers == doc["peers"]
    assert refused == doc["refused"]


def test_the_ejection_vector_is_the_documented_arithmetic():
    """docs/ledger.md: 10% of stake per failed 20-vote window, rounded down; ejected below 500."""
    ed = load("accuracy_slash_and_ejection")["peers"]["ed"]
    stake = 1000
    for _ in range(7):
        stake -= stake * 1000 // 10000
    assert (ed["stake"], ed["slashed"], ed["votes"], ed["status"]) == (stake, 1000 - stake, 140, "ejected")
    assert stake == 480


# -- byte formats, from the docs ----------------------------------------------------------------


def canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def test_formats_recomputed_from_the_docs():
    f = json.loads((VECTORS / "formats.json").read_text())
    seed, key = bytes.fromhex(f["seed"]), bytes.fromhex(f["key"])
    signer = nacl.signing.SigningKey(seed)
    assert bytes(signer.verify_key) == key
    # the task: Iris's rows root is RFC 6962's Merkle tree hash over its rows, each leaf the
    # features as big-endian float64s and the class index as a big-endian int64
    from sklearn.datasets import load_iris

    iris = load_iris()
    leaves = [hashlib.sha256(b"\x00" + struct.pack(">4d", *row) + struct.pack(">q", int(t))).digest()
              for row, t in zip(iris.data, iris.target)]

    def mth(nodes):
        if len(nodes) == 1:
            return nodes[0]
        k = 1 << ((len(nodes) - 1).bit_length() - 1)
        return hashlib.sha256(b"\x01" + mth(nodes[:k]) + mth(nodes[k:])).digest()
    assert mth(leaves).hex() == f["task"]["rows_root"] == L.IRIS.rows_root.hex()
    assert f["task"] == L.IRIS.canonical()
    # genesis id: SHA-256 of the canonical JSON of ["p2pml-genesis", 4, task, slots, accounts]
    gid = hashlib.sha256(canonical_json(["p2pml-genesis", 4, f["task"], f["genesis"], []])).digest()
    assert gid.hex() == f["genesis_id"]
    assert Genesis(tuple(Slot(n) for n, _ in f["genesis"])).id() == gid
    # a card's id: SHA-256 of the canonical JSON of ["p2pml-card", card]
    r = f["register"]
    assert hashlib.sha256(canonical_json(["p2pml-card", r["card"]])).hexdigest() == r["card_id"]
    c = r["card"]
    card = [c["framework"], c["model"], bytes.fromhex(c["params"]), bytes.fromhex(c["data_root"]), c["rows"],
            c["score_bps"], bytes.fromhex(c["previous"])]
    # a message: envelope [key, body, signature]; id = SHA-256(DOMAIN || genesis || key || body)
    body = msgpack.packb(["register", r["name"], card, r["deposit"]], use_bin_type=True)
    data = b"p2pml/v1/message\x00" + gid + key + body
    envelope = msgpack.packb([key, body, signer.sign(data).signature], use_bin_type=True)
    assert envelope.hex() == r["body"] and hashlib.sha256(data).hexdigest() == r["id"]
    assert Verifier(gid).open(envelope).msg.id.hex() == r["id"]
    # round id: SHA-256(query id || index, 4 bytes big-endian)[:16]
    q = f["round"]
    rid = hashlib.sha256(bytes.fromhex(q["query_id"]) + q["index"].to_bytes(4, "big")).digest()[:16]
    assert rid.hex() == q["round_id"] == round_id(bytes.fromhex(q["query_id"]), q["index"]).hex()
    # query_binding: SHA-256(QUERY_VOTE_DOMAIN || key || lamport (8) || index (4))[:16]
    b = f["query_binding"]
    binding = hashlib.sha256(b"p2pml/query-vote\x00" + key + b["lamport"].to_bytes(8, "big")
                             + b["index"].to_bytes(4, "big")).digest()[:16]
    assert binding.hex() == b["binding"] == query_binding(key, b["lamport"], b["index"]).hex()
    # salt: HMAC-SHA256(seed, "p2pml/salt\0" || round)[:16]
    s = f["salt"]
    salt = hmac.digest(seed, b"p2pml/salt\x00" + rid, "sha256")[:16]
    assert salt.hex() == s["salt"] == Identity.from_seed(seed).salt(rid).hex()
    # commit digest: SHA-256(COMMIT_DOMAIN || key || round || label (1) || p0 p1 p2 (4 each) || salt)
    c = f["commit"]
    digest = hashlib.sha256(b"p2pml/commit\x00" + key + rid + bytes([c["label"]])
                            + b"".join(p.to_bytes(4, "big") for p in c["proba"]) + salt).digest()
    assert digest.hex() == c["digest"] == commitment(key, rid, c["label"], tuple(c["proba"]), salt).hex()
    # a regression vote: the value as 8 bytes, big-endian, signed, and no probabilities
    v = f["commit_value"]
    digest = hashlib.sha256(b"p2pml/commit\x00" + key + rid + v["value"].to_bytes(8, "big", signed=True)
                            + salt).digest()
    assert digest.hex() == v["digest"] == commitment(key, rid, v["value"], (), salt).hex()
    # link proof: "<unix time>.<hex Ed25519 signature of LINK_DOMAIN || genesis || msgpack([s, r, t])>"
    lp = f["link_proof"]
    signed = b"p2pml/v1/link\x00" + gid + msgpack.packb([lp["sender"], lp["receiver"], lp["unix_time"]])
    assert lp["proof"] == f"{lp['unix_time']}.{signer.sign(signed).signature.hex()}"
    assert Identity.from_seed(seed).link_proof(gid, lp["sender"], lp["receiver"], lp["unix_time"]) == lp["proof"]


def test_the_docs_give_every_format_used_here():
    text = (ROOT / "docs" / "protocol.md").read_text() + (ROOT / "docs" / "ledger.md").read_text()
    for needle in ['b"p2pml/v1/message\\x00"', "p2pml/v1/link\\0", '"p2pml-genesis"', "LEDGER_VERSION = 4",
                   '`b"p2pml/commit\\x00"`', '`b"p2pml/query-vote\\x00"`', '"p2pml/salt\\0"',
                   "lamport (8 bytes, big-endian)", "4 bytes big-endian"]:
        assert needle in text, needle


# -- the constants table ------------------------------------------------------------------------


def documented_constants() -> dict[str, str]:
    text = (ROOT / "docs" / "ledger.md").read_text()
    section = text.split("## Units and constants", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z_]+)` \| (.+?) \|", section, re.MULTILINE)
    return dict(rows)


def parse_value(text: str):
    text = text.strip()
    if text.startswith("`") and text.endswith("`"):
        return ast.literal_eval(text[1:-1])
    if re.fullmatch(r"[\d ]+", text):
        return int(text.replace(" ", ""))
    return tuple(part.strip() for part in text.split(","))


def test_the_constants_table_is_the_code():
    table = documented_constants()
    assert len(table) >= 14, table
    for name, value in table.items():
        assert parse_value(value) == getattr(L, name), name
    for name in ("DEPOSIT", "STAKE_FLOOR", "ACCURACY_WINDOW", "MIN_AGREEMENT_BPS", "INACCURACY_SLASH_BPS",
                 "EQUIVOCATION_SLASH_BPS", "COMMIT_DOMAIN", "QUERY_VOTE_DOMAIN", "WEIGHT_ONE", "INITIAL_WEIGHT",
                 "WEIGHT_STEP_QUOTIENT", "BPS", "PROBA_ONE", "CLASSES"):
        assert name in table, name


def test_the_constants_have_their_documented_values():
    """Pinned here as well, so that a constant and its docs row cannot change together unseen."""
    assert (L.DEPOSIT, L.STAKE_FLOOR, L.WEIGHT_ONE, L.INITIAL_WEIGHT, L.WEIGHT_STEP_QUOTIENT) == \
        (1000, 500, 1_000_000, 500_000, 10)
    assert (L.ACCURACY_WINDOW, L.MIN_AGREEMENT_BPS, L.INACCURACY_SLASH_BPS, L.EQUIVOCATION_SLASH_BPS, L.BPS) == \
        (20, 6000, 1000, 5000, 10_000)
    assert (L.COMMIT_DOMAIN, L.QUERY_VOTE_DOMAIN, L.LEDGER_VERSION) == \
        (b"p2pml/commit\x00", b"p2pml/query-vote\x00", 4)
    assert (L.GENESIS_BALANCE, L.MAX_AMOUNT) == (9000, 2**53)
