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
from p2pml.wire import Identity, Shape
from tests.conftest import card, check_reach, NAMES, Net
from tests.test_determinism import deliver

EXAMPLES = int(os.environ.get("P2PML_PROPERTY_EXAMPLES", "120"))
REACH = {"examples": 0, "slashed": 0, "ejected": 0, "equivocation": 0, "strangers": 0, "refused": 0,
         "full_windows": 0}


def pinned_net() -> Net:
    """Five seats, ``ed`` pinned to its key."""
    net = Net()
    net.genesis = L.Genesis(tuple(L.Slot(NAMES[i], net.ids[i].key if i == 4 else None)
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
        msgs.append(STRANGER.sign(NET.gid, L.Register("ed", card(MODEL_KINDS[4]), L.DEPOSIT)).msg)
    if strangers >= 2:  # ...a seat that does not exist, and a wrong deposit: refused
        msgs.append(STRANGER.sign(NET.gid, L.Register("zed", card(MODEL_KINDS[0]), L.DEPOSIT)).msg)
        msgs.append(STRANGER.sign(NET.gid, L.Register("cy", card(MODEL_KINDS[2]), L.DEPOSIT + 1)).msg)
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
    assert sum(p.stake for p in state.peers.values()) + state.pool == 5 * L.DEPOSIT  # conservation
    # every slashed unit was paid to a peer that agreed, or waits in the pool
    assert sum(p.slashed for p in state.peers.values()) == sum(p.rewarded for p in state.peers.values()) + state.pool
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
    check_reach(REACH, {"slashed": 0.3, "ejected": 0.1, "equivocation": 0.05, "strangers": 0.5,
                        "refused": 0.5, "full_windows": 0.6}, "stake")


# --- Regression, and model cards that change --------------------------------------------------

HOUSES = L.Task("houses", L.REGRESSION, ("a", "b", "c", "d"), (), 100, bytes([9]) * 32, (), (0, 100),
                band_bps=1_000, tolerance=1_000_000)
TRUTH = 50 * L.VALUE_ONE


class RegressionNet(Net):
    """``Net`` on a regression task: a vote is a value in VALUE_ONE units, no probabilities."""

    def __init__(self):
        super().__init__()
        self.genesis = L.Genesis(tuple(L.Slot(NAMES[i]) for i in range(5)), HOUSES)
        self.gid = self.genesis.id()
        self.shape = Shape.of(HOUSES)

    def sign(self, i, body):
        return self.ids[i].sign(self.gid, body, self.shape).msg

    def commits(self, i, choices):
        key = self.ids[i].key
        return tuple(L.Commit(r, L.commitment(key, r, v, (), self.ids[i].salt(r))) for r, v in choices)

    def reveals(self, i, choices, seen=None):
        keys = frozenset(self.ids[k].key for k in (range(5) if seen is None else seen))
        return tuple(L.Reveal(r, v, (), self.ids[i].salt(r), keys) for r, v in choices)


RNET = RegressionNet()


def registered_card(i: int) -> L.Card:
    return card(MODEL_KINDS[i])


def new_card(i: int, previous: bytes, model: str) -> L.Card:
    return L.Card("builtin", model, bytes([i + 40]) * 32, bytes([1]) * 32, 105, 9_000, previous)


@st.composite
def regression_histories(draw):
    msgs = list(RNET.registrations())
    for i in draw(st.sets(st.integers(0, 4), max_size=3)):  # model updates: chains and forks
        first = new_card(i, registered_card(i).id(), "ridge")
        msgs.append(RNET.sign(i, L.Update(draw(st.integers(1, 30)), first)))
        if draw(st.booleans()):  # and a second update on top of it
            msgs.append(RNET.sign(i, L.Update(draw(st.integers(1, 40)), new_card(i, first.id(), "svr"))))
        if draw(st.booleans()):  # or a rival naming the same card: the lower (lamport, id) wins
            msgs.append(RNET.sign(i, L.Update(draw(st.integers(1, 30)),
                                              new_card(i, registered_card(i).id(), "knn"))))
    hostile = draw(st.sets(st.integers(0, 4), max_size=2))
    queries = draw(st.lists(st.tuples(st.integers(0, 4), st.integers(1, 40), st.integers(1, 6)),
                            min_size=2, max_size=8))
    lam = 0
    for issuer, lamport, n in queries:
        q, rids = RNET.query(issuer, lamport, n)
        msgs.append(q)
        for voter in range(5):
            if draw(st.integers(0, 9)) == 0:
                continue
            if voter in hostile:  # a constant far off, or a random value anywhere
                def value(k):
                    return 0 if draw(st.booleans()) else draw(st.integers(-L.MAX_VALUE, L.MAX_VALUE))
            else:  # near the truth (within the band), now and then an outlier
                def value(k):
                    return TRUTH + draw(st.integers(-2, 2)) * L.VALUE_ONE if draw(st.integers(0, 5)) else 3 * TRUTH
            choices = [(rid, value(k)) for k, rid in enumerate(rids)]
            lam += 1
            split = draw(st.integers(0, len(choices)))
            if split:
                msgs.append(RNET.votes(voter, lam, choices[:split]))
            if choices[split:]:
                msgs.append(RNET.commit(voter, lam, choices[split:]))
                msgs.append(RNET.reveal(voter, lam + 1, choices[split:],
                                        seen=draw(st.frozensets(st.integers(0, 4), min_size=3))))
    return msgs


REGRESSION_REACH = {"examples": 0, "slashed": 0, "updated": 0, "forked": 0}


@settings(max_examples=max(30, EXAMPLES // 2), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=regression_histories(), data=st.data())
def test_regression_stakes_and_card_chains_do_not_depend_on_the_order(msgs, data):
    """The weighted median, the band, slashing and each member's card chain (with rival
    updates) come out the same under any order with duplicates; supply is conserved; every
    counted vote names the card in force at its round."""
    ref = L.Ledger(RNET.genesis)
    deliver(ref, sorted(msgs, key=lambda m: (not isinstance(m.body, L.Register), m.id)))
    order = data.draw(st.permutations(msgs))
    dups = data.draw(st.lists(st.sampled_from(msgs), max_size=10))
    reads = data.draw(st.sets(st.integers(0, len(msgs) + len(dups)), max_size=6))
    lg = L.Ledger(RNET.genesis)
    assert deliver(lg, order + dups, reads) == []
    assert lg.root() == ref.root()
    assert lg.state.canonical() == ref.state.canonical()
    state = lg.state
    assert sum(p.stake for p in state.peers.values()) + state.pool == 5 * L.DEPOSIT
    updates = [m for m in msgs if isinstance(m.body, L.Update)]
    for pid, chain in state.cards.items():
        cards = [c for _, c, _ in chain]
        assert cards[0] == registered_card(NAMES.index(state.peers[pid].name))
        assert all(b.previous == a.id() for a, b in zip(cards, cards[1:]))  # a chain, never a fork
        assert all(x[0] < y[0] for x, y in zip(chain[1:], chain[2:]))
    by_id = {m.id: m for m in msgs}
    for rid in list(lg.queries):
        lamport = by_id[lg.query_of(rid)].body.lamport
        for cv in lg.outcome(rid).votes:  # the last card whose update came before the round
            chain = state.cards[cv.peer]
            assert cv.card == [cid for since, _, cid in chain if since < lamport or cid == chain[0][2]][-1]
    REGRESSION_REACH["examples"] += 1
    REGRESSION_REACH["slashed"] += any(p.slashed for p in state.peers.values())
    REGRESSION_REACH["updated"] += any(len(c) > 1 for c in state.cards.values())
    REGRESSION_REACH["forked"] += len(updates) > sum(len(c) - 1 for c in state.cards.values())


def test_the_regression_property_test_reaches_slashes_and_card_chains():
    n = REGRESSION_REACH["examples"]
    if n == 0:
        pytest.skip("run together with test_regression_stakes_and_card_chains_do_not_depend_on_the_order")
    print(f"\nregression property test reach over {n} histories: {REGRESSION_REACH}")
    for key, share in (("slashed", 0.3), ("updated", 0.4), ("forked", 0.2)):
        assert REGRESSION_REACH[key] >= share * n, (key, REGRESSION_REACH)
