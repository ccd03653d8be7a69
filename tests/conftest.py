"""Shared fixtures: a signed-message factory for ledger tests, and real clusters for integration."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pml.cluster import LocalCluster, free_ports, write_network
from p2pml.config import MODEL_KINDS
from p2pml.ledger import (
    DEPOSIT,
    Card,
    Commit,
    Genesis,
    Query,
    Register,
    Reveal,
    Slot,
    Votes,
    commitment,
    query_binding,
    round_id,
)
from p2pml.wire import Identity

NAMES = ("ada", "bo", "cy", "di", "ed")
ROW = (5.1, 3.5, 1.4, 0.2)


def check_reach(reach: dict, shares: dict, what: str) -> None:
    """A property test's reach (how many generated histories did each thing), printed (-s) and
    held to a share of its examples: a property test that never reaches a rule proves little."""
    n = reach["examples"]
    if n == 0:
        pytest.skip(f"run together with the {what} property test")
    print(f"\n{what} property test reach over {n} histories: " +
          ", ".join(f"{k} {v} ({100 * v // n}%)" for k, v in reach.items() if k != "examples"))
    for key, share in shares.items():
        assert reach[key] >= share * n, (key, reach)


def one_hot(label: int) -> tuple[int, ...]:
    return tuple(1_000_000 if c == label else 0 for c in range(3))


def card(model: str = "knn", framework: str = "builtin") -> Card:
    """A model card as a registration carries it (hashes made up: the ledger only checks form)."""
    return Card(framework, model, bytes(32), bytes([1]) * 32, 105, 9_500)


class Net:
    """Five seeded identities in one genesis, and helpers that sign real messages for them."""

    def __init__(self, n: int = 5):
        self.ids = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(n)]
        self.genesis = Genesis(tuple(Slot(NAMES[i]) for i in range(n)))
        self.gid = self.genesis.id()
        self.bound: dict[tuple[int, bytes], bytes] = {}  # (issuer, round) -> its commit's binding

    def sign(self, i: int, body):
        return self.ids[i].sign(self.gid, body).msg

    def register(self, i: int, deposit: int = DEPOSIT, name: str | None = None, model: str | None = None):
        return self.sign(i, Register(name or NAMES[i], card(model or MODEL_KINDS[i]), deposit))

    def registrations(self):
        return [self.register(i) for i in range(len(self.ids))]

    def query(self, i: int, lamport: int, n_items: int = 1, labels: list[int] | None = None):
        """A query by peer ``i``; with ``labels``, carrying its own committed vote on each item."""
        rows = tuple((ROW[0] + k / 100, *ROW[1:]) for k in range(n_items))
        commits = ()
        if labels is not None:
            key, binds = self.ids[i].key, [query_binding(self.ids[i].key, lamport, k) for k in range(n_items)]
            commits = tuple(commitment(key, b, lab, one_hot(lab), self.ids[i].salt(b)) for b, lab in zip(binds, labels))
        msg = self.sign(i, Query(lamport, rows, commits))
        rids = [round_id(msg.id, k) for k in range(n_items)]
        if labels is not None:
            self.bound.update(((i, r), b) for r, b in zip(rids, binds))
        return msg, rids

    def commits(self, i: int, choices: list[tuple[bytes, int]]) -> tuple[Commit, ...]:
        key = self.ids[i].key
        return tuple(Commit(r, commitment(key, r, lab, one_hot(lab), self.ids[i].salt(r)))
                     for r, lab in choices)

    def reveals(self, i: int, choices: list[tuple[bytes, int]], seen=None) -> tuple[Reveal, ...]:
        """Reveals listing ``seen`` (peer indices; default: every peer) as committed before."""
        keys = frozenset(self.ids[k].key for k in (range(len(self.ids)) if seen is None else seen))
        return tuple(Reveal(r, lab, one_hot(lab), self.ids[i].salt(self.bound.get((i, r), r)), keys)
                     for r, lab in choices)

    def commit(self, i: int, lamport: int, choices: list[tuple[bytes, int]]):
        return self.sign(i, Votes(lamport, self.commits(i, choices), ()))

    def reveal(self, i: int, lamport: int, choices: list[tuple[bytes, int]], seen=None):
        return self.sign(i, Votes(lamport, (), self.reveals(i, choices, seen)))

    def votes(self, i: int, lamport: int, choices: list[tuple[bytes, int]], seen=None):
        """Commit and reveal in one message (every peer listed as seen): a plain, timely vote."""
        return self.sign(i, Votes(lamport, self.commits(i, choices), self.reveals(i, choices, seen)))


@pytest.fixture
def net() -> Net:
    return Net()


@pytest.fixture
def make_cluster(tmp_path: Path):
    """Start real node processes on free loopback ports; every one is stopped at teardown."""
    started: list[LocalCluster] = []

    def make(n: int = 5, behaviors: dict[str, str] | None = None, **network) -> LocalCluster:
        network.setdefault("query_timeout_ms", 400)
        network.setdefault("anti_entropy_interval_ms", 200)
        peers = write_network(tmp_path / "peers.toml", free_ports(n), **network)
        cluster = LocalCluster(peers, tmp_path / "data", behaviors)
        started.append(cluster)
        cluster.start()
        cluster.wait_ready()
        cluster.wait_registered()
        return cluster

    yield make
    for cluster in started:
        cluster.stop()
