"""Order independence where the stakes move: histories long enough, with constants small enough
(monkeypatched), that accuracy windows fill, slashes and ejections happen, equivocators are
slashed, and strangers, a pinned seat and invalid messages are in the mix, under any delivery
order with duplicates. Supply is conserved in every one.

``P2PML_PROPERTY_EXAMPLES=2000 python -m pytest tests/test_stakes_property.py`` runs more
examples than CI's default; ``-s`` prints how many of them slashed, ejected and held strangers."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pml import ledger as L
from p2pml.config import MODEL_KINDS
from p2pml.wire import Identity
from tests.conftest import NAMES, Net
from tests.test_determinism import deliver

EXAMPLES = int(os.environ.get("P2PML_PROPERTY_EXAMPLES", "120"))
REACH = {"examples": 0, "slashed": 0, "ejected": 0, "equivocation": 0, "strangers": 0, "refused": 0,
         "full_windows": 0}


def pinned_net() -> Net:
    """Five seats, ``ed`` pinned to its key."""
    net = Net()
    net.genesis = L.Genesis(tuple(L.Slot(NAMES[i], MODEL_KINDS[i], net.ids[i].key if i == 4 else None)
                                  for i in range(5)))
    net.gid = net.genesis.id()
    return net


NET = pinned_net()
STRANGER = Identity.from_seed(bytes([77]) * 32)


@pytest.fixture(autouse=True)
def small_constants(monkeypatch):
    monkeypatch.setattr(L, "ACCURACY_WINDOW", 4)  # windows fill within a few rounds
    monkeypatch.setattr(L, "STAKE_FLOOR", 800)  # three failed windows (1000, 900, 810, 729) eject
    monkeypatch.setattr(L, "CHECKPOINT_EVERY", 3)


@st.composite
def histories(draw):
    msgs = list(NET.registrations())
    strangers = draw(st.integers(0, 3))
    if strangers >= 1:  # a stranger takes the pinned seat: refused
        msgs.append(STRANGER.sign(NET.gid, L.Register("ed", MODEL_KINDS[4], L.DEPOSIT)).msg)
    if strangers >= 2:  # ...a seat that does not exist, and a wrong deposit: refused
        msgs.append(STRANGER.sign(NET.gid, L.Register("zed", MODEL_KINDS[0], L.DEPOSIT)).msg)
        msgs.append(STRANGER.sign(NET.gid, L.Register("cy", MODEL_KINDS[2], L.DEPOSIT + 1)).msg)
    if strangers >= 3:  # a query and a vote by the key without a seat: never held
        msgs.append(STRANGER.sign(NET.gid, L.Query(3, ((5.0, 3.0, 1.5, 0.2),))).msg)
    hostile = draw(st.sets(st.integers(0, 4), max_size=2))
    queries = draw(st.lists(st.tuples(st.integers(0, 4), st.integers(1, 40), st.integers(1, 6)),
                            min_size=2, max_size=8))
    lam = 0
    for issuer, lamport, n in queries:
        q, rids = NET.query(issuer, lamport, n)
        msgs.append(q)
        for voter in range(5):
            if draw(st.integers(0, 9)) == 0:
                continue  # this voter sits the query out
            label_of = (lambda k: 1) if voter in hostile else (lambda k: 0 if draw(st.integers(0, 5)) else 2)
            choices = [(rid, label_of(k)) for k, rid in enumerate(rids)]
            lam += 1
            split = draw(st.integers(0, len(choices)))
            if split:  # commit and reveal together
                msgs.append(NET.votes(voter, lam, choices[:split]))
            if choices[split:]:  # or commit first, reveal later, listing a random set as seen
                msgs.append(NET.commit(voter, lam, choices[split:]))
                msgs.append(NET.reveal(voter, lam + 1, choices[split:],
                                       seen=draw(st.frozensets(st.integers(0, 4), min_size=3))))
            if voter in hostile and draw(st.integers(0, 7)) == 0:  # and sometimes equivocates
                msgs.append(NET.commit(voter, lam + 2, [(rids[0], 2)]))
    return msgs


def reference(msgs) -> L.Ledger:
    lg = L.Ledger(NET.genesis)
    deliver(lg, sorted(msgs, key=lambda m: (not isinstance(m.body, L.Register), m.id)))
    return lg


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=histories(), data=st.data())
def test_stakes_slashes_and_ejections_do_not_depend_on_the_order(msgs, data):
    ref = reference(msgs)
    order = data.draw(st.permutations(msgs))
    dups = data.draw(st.lists(st.sampled_from(msgs), max_size=10))
    reads = data.draw(st.sets(st.integers(0, len(msgs) + len(dups)), max_size=6))
    lg = L.Ledger(NET.genesis)
    refused = deliver(lg, order + dups, reads)
    assert lg.root() == ref.root()
    assert lg.state.canonical() == ref.state.canonical()
    assert {m.id for m in refused} == {m.id for m in deliver(L.Ledger(NET.genesis), msgs)}
    state = lg.state
    assert sum(p.stake for p in state.peers.values()) + state.burned == 5 * L.DEPOSIT  # conservation
    assert all(p.key != STRANGER.key for p in state.peers.values())
    assert next(p for p in state.peers.values() if p.name == "ed").key == NET.ids[4].key  # pinned
    REACH["examples"] += 1
    REACH["slashed"] += any(p.slashed for p in state.peers.values())
    REACH["ejected"] += any(p.status == L.STATUS_EJECTED for p in state.peers.values())
    REACH["equivocation"] += any(p.equivocation for p in state.peers.values())
    REACH["strangers"] += any(m.author == STRANGER.key for m in msgs)
    REACH["refused"] += bool(refused)
    REACH["full_windows"] += any(p.votes >= L.ACCURACY_WINDOW for p in state.peers.values())


def test_the_property_test_reaches_the_stakes():
    """Run after the property test (file order): a good share of its histories slashed,
    ejected, held strangers and refused messages, or it proves little."""
    n = REACH["examples"]
    if n == 0:
        pytest.skip("run together with test_stakes_slashes_and_ejections_do_not_depend_on_the_order")
    print(f"\nstake property test reach over {n} histories: " +
          ", ".join(f"{k} {v} ({100 * v // n}%)" for k, v in REACH.items() if k != "examples"))
    for key, share in (("slashed", 0.3), ("ejected", 0.1), ("equivocation", 0.05), ("strangers", 0.5),
                       ("refused", 0.5), ("full_windows", 0.6)):
        assert REACH[key] >= share * n, (key, REACH)
