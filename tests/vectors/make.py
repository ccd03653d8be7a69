"""Writes the known-answer vectors in this folder: ``python tests/vectors/make.py``.

Run it only to change a vector on purpose (a rule or format change), review the diff, and commit
it with the change: ``tests/test_vectors.py`` checks the code against these files, and the
byte formats against docs/ledger.md and docs/protocol.md recomputed with hashlib.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from p2pml.config import MODEL_KINDS  # noqa: E402
from p2pml.ledger import (  # noqa: E402
    IRIS,
    Card,
    DEPOSIT,
    Commit,
    Genesis,
    Ledger,
    Query,
    Register,
    Slot,
    Votes,
    commitment,
    query_binding,
    round_id,
)
from p2pml.wire import Identity, Verifier  # noqa: E402


def card(model: str) -> Card:
    """A card as a built-in kind's registration carries one (the hashes are made up)."""
    return Card("builtin", model, hashlib.sha256(model.encode()).digest(), bytes([1]) * 32, 105, 9_500)

NAMES = ("ada", "bo", "cy", "di", "ed")
SEEDS = [bytes([i + 1]) * 32 for i in range(5)]
ROW = (5.1, 3.5, 1.4, 0.2)


def one_hot(label: int) -> tuple[int, ...]:
    return tuple(1_000_000 if c == label else 0 for c in range(3))


class Scenario:
    def __init__(self, genesis: Genesis):
        self.genesis, self.gid = genesis, genesis.id()
        self.ids = [Identity.from_seed(s) for s in SEEDS]
        self.raws: list[bytes] = []

    def sign(self, i: int, body) -> bytes:
        raw = self.ids[i].sign(self.gid, body).raw
        self.raws.append(raw)
        return raw

    def register_all(self) -> None:
        for i in range(len(self.genesis.slots)):
            self.sign(i, Register(NAMES[i], card(MODEL_KINDS[i]), DEPOSIT))

    def rounds(self, issuer: int, lamport: int, labels: list[list[int]]) -> list[bytes]:
        """One query of ``len(labels)`` rows by ``issuer`` (its own vote committed inside);
        then each other peer commits to all in one message, and each peer reveals all in one
        (listing every key as seen). ``labels[row][peer]``."""
        n = len(labels)
        rows = tuple((ROW[0] + k / 100, *ROW[1:]) for k in range(n))
        key = self.ids[issuer].key
        binds = [query_binding(key, lamport, k) for k in range(n)]
        own = tuple(commitment(key, b, labels[k][issuer], one_hot(labels[k][issuer]), self.ids[issuer].salt(b))
                    for k, b in enumerate(binds))
        raw = self.sign(issuer, Query(lamport, rows, own))
        qid = Verifier(self.gid).open(raw).msg.id
        rids = [round_id(qid, k) for k in range(n)]
        peers = range(len(self.genesis.slots))
        for i in peers:
            if i == issuer:
                continue
            k_i = self.ids[i].key
            self.sign(i, Votes(lamport + 1, tuple(
                Commit(r, commitment(k_i, r, labels[k][i], one_hot(labels[k][i]), self.ids[i].salt(r)))
                for k, r in enumerate(rids)), ()))
        from p2pml.ledger import Reveal
        keys = frozenset(self.ids[i].key for i in peers)
        for i in peers:
            bound = binds if i == issuer else rids
            self.sign(i, Votes(lamport + 2, (), tuple(
                Reveal(r, labels[k][i], one_hot(labels[k][i]), self.ids[i].salt(bound[k]), keys)
                for k, r in enumerate(rids))))
        return rids


def write(name: str, sc: Scenario, about: str) -> None:
    ledger = Ledger(sc.genesis)
    verifier = Verifier(sc.gid)
    refused = {}
    for raw in sc.raws:
        msg = verifier.open(raw).msg
        reason = ledger.add(msg)
        if reason:
            refused[msg.id.hex()] = reason
    state = ledger.state.canonical()
    doc = {
        "about": about,
        "genesis": [[s.name, s.key.hex() if s.key else None] for s in sc.genesis.slots],
        "genesis_id": sc.gid.hex(),
        "messages": [raw.hex() for raw in sc.raws],
        "refused": refused,
        "root": ledger.root(),
        "rounds": state["rounds"],
        "pool": state["pool"],
        "peers": {p["name"]: {k: p[k] for k in ("stake", "weight", "status", "reason", "votes", "agreed",
                                                 "slashed", "rewarded", "late", "unrevealed")}
                  for p in state["peers"].values()},
    }
    (HERE / f"{name}.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def ledgers() -> None:
    five = Genesis(tuple(Slot(NAMES[i]) for i in range(5)))
    # ed always votes the class after the others': 7 failed windows (140 votes) eject it
    sc = Scenario(five)
    sc.register_all()
    sc.rounds(0, 1, [[0, 0, 0, 0, 1]] * 150)
    write("accuracy_slash_and_ejection", sc,
          "five seats; ed votes against the other four on 150 rounds: slashed 10% per failed "
          "20-vote window (900, 810, 729, 657, 592, 533, 480) and ejected below 500 at its 140th vote; "
          "each slash paid to the four that agreed, by power")
    # di signs two different commits on one round: 50% slashed and ejected
    sc = Scenario(five)
    sc.register_all()
    rids = sc.rounds(1, 1, [[2, 2, 2, 2, 2]] * 3)
    k = sc.ids[3].key
    sc.sign(3, Votes(10, (Commit(rids[0], commitment(k, rids[0], 0, one_hot(0), sc.ids[3].salt(rids[0]))),), ()))
    write("equivocation", sc, "five seats, three rounds; di signs a second, different commit on the first: "
          "half its stake slashed (paid to the peers that agree on a later round), ejected")
    # a pinned seat: a stranger's registration for it is refused, and its query is not held
    pinned = Genesis(tuple(Slot(NAMES[i], sc.ids[i].key if i == 0 else None) for i in range(3)))
    sc = Scenario(pinned)
    sc.register_all()
    stranger = Identity.from_seed(bytes([9]) * 32)
    sc.raws.append(stranger.sign(sc.gid, Register("ada", card(MODEL_KINDS[0]), DEPOSIT)).raw)
    sc.raws.append(stranger.sign(sc.gid, Query(5, (ROW,))).raw)
    sc.rounds(2, 1, [[1, 1, 1]] * 2)
    write("pinned_seat_and_stranger", sc, "three seats, ada pinned; a stranger registers for ada "
          "(refused) and asks a query (not held); two ordinary rounds")


def formats() -> None:
    """Fixed inputs and the bytes each format gives (docs/ledger.md, docs/protocol.md)."""
    seed, key = SEEDS[0], Identity.from_seed(SEEDS[0]).key
    genesis = Genesis(tuple(Slot(NAMES[i]) for i in range(5)))
    gid = genesis.id()
    ident = Identity.from_seed(seed)
    ada = card(MODEL_KINDS[0])
    signed = ident.sign(gid, Register("ada", ada, DEPOSIT))
    qid = hashlib.sha256(b"query").digest()
    rid = round_id(qid, 3)
    binding = query_binding(key, 42, 3)
    salt = ident.salt(rid)
    doc = {
        "seed": seed.hex(), "key": key.hex(),
        "genesis": [[s.name, None] for s in genesis.slots], "genesis_id": gid.hex(),
        "task": IRIS.canonical(),
        "register": {"name": "ada", "card": ada.canonical(), "card_id": ada.id().hex(), "deposit": DEPOSIT,
                     "body": signed.raw.hex(), "id": signed.msg.id.hex()},
        "round": {"query_id": qid.hex(), "index": 3, "round_id": rid.hex()},
        "query_binding": {"lamport": 42, "index": 3, "binding": binding.hex()},
        "salt": {"round_id": rid.hex(), "salt": salt.hex(),
                 "check": hmac.digest(seed, b"p2pml/salt\x00" + rid, "sha256")[:16].hex()},
        "commit": {"round_id": rid.hex(), "label": 2, "proba": [1000, 2000, 997000], "salt": salt.hex(),
                   "digest": commitment(key, rid, 2, (1000, 2000, 997000), salt).hex()},
        "commit_value": {"round_id": rid.hex(), "value": -152_250_000, "salt": salt.hex(),
                         "digest": commitment(key, rid, -152_250_000, (), salt).hex()},
        "link_proof": {"sender": "ada", "receiver": "bo", "unix_time": 1_700_000_000,
                       "proof": ident.link_proof(gid, "ada", "bo", 1_700_000_000)},
    }
    (HERE / "formats.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    ledgers()
    formats()
    print("wrote", ", ".join(sorted(p.name for p in HERE.glob("*.json"))))
