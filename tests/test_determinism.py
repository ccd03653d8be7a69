"""The principle: same set of valid messages, same ledger, whatever the order, duplication or
timing of arrival. Checked against a from-scratch replay with hypothesis-generated histories."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pml import ledger as L
from p2pml.config import MODEL_KINDS
from tests.conftest import Net

NET = Net()


@st.composite
def histories(draw):
    """Registrations, queries (with lamport ties and batches), commits and reveals grouped into
    vote messages at random, each reveal listing a random set of committers; some votes missing,
    late, never revealed, re-revealed with another list, equivocating or not matching."""
    msgs = list(NET.registrations())
    if draw(st.booleans()):  # one key also claims a second seat (it may win it, or move)
        msgs.append(NET.register(0, name="bo", model=MODEL_KINDS[1]))
    rounds = []
    own = {}  # round -> (issuer, label) where the query carries the issuer's committed vote
    specs = draw(st.lists(st.tuples(st.integers(0, 4), st.integers(1, 12), st.integers(1, 3),
                                    st.none() | st.integers(0, 2)), min_size=1, max_size=16))
    for issuer, lamport, n_items, embedded in specs:  # small lamport range: many ties broken by round id
        labels = None if embedded is None else [(embedded + k) % 3 for k in range(n_items)]
        q, rids = NET.query(issuer, lamport, n_items, labels)
        msgs.append(q)
        rounds += rids
        if labels is not None:
            own.update((rid, (issuer, label)) for rid, label in zip(rids, labels))
    rounds = list(dict.fromkeys(rounds))  # an identical query drawn twice is one message
    kinds = st.sampled_from([None, 0, 0, 0, 1, 2, "equivocate", "withhold", "mismatch", "rereveal"])
    seen = st.frozensets(st.integers(0, 4))
    for voter in range(5):
        commits, reveals = [], []
        for rid, kind in zip(rounds, draw(st.lists(kinds, min_size=len(rounds), max_size=len(rounds)))):
            if kind is None:
                continue
            label = kind if isinstance(kind, int) else 2
            if own.get(rid, (None,))[0] == voter:  # committed in its query already
                label = own[rid][1]
            else:
                commits.append((rid, label))
            if kind == "equivocate":  # a conflicting commit in a message of its own
                msgs.append(NET.commit(voter, 1, [(rid, 1)]))
            if kind == "mismatch":
                msgs.append(NET.reveal(voter, 1, [(rid, 0)], seen=draw(seen)))
            if kind == "rereveal":
                msgs.append(NET.reveal(voter, 2, [(rid, label)], seen=draw(seen)))
            if kind != "withhold":
                reveals.append((rid, label, draw(seen)))
        for items, make in ((commits, NET.commit), (reveals, None)):
            sizes = draw(st.lists(st.integers(1, 4), min_size=len(items), max_size=len(items)))
            k = 0
            for size in sizes:
                if k >= len(items):
                    break
                group = items[k : k + size]
                if make is not None:
                    msgs.append(make(voter, 1 + k % 12, group))
                else:  # one message, each reveal with its own seen list
                    body = L.Votes(1 + k % 12, (), tuple(
                        r for rid, label, s in group for r in NET.reveals(voter, [(rid, label)], s)))
                    msgs.append(NET.sign(voter, body))
                k += size
    return msgs


def deliver(lg: L.Ledger, msgs, reads=frozenset()) -> list:
    """Offer messages in order; offer what was refused again until nothing more is taken, as
    anti-entropy does (a vote that came before its author's registration is taken later)."""
    pending = []
    for k, m in enumerate(msgs):
        if k in reads:  # a read settles all of the state, or up to one round (an answer does):
            rounds = list(lg.queries)  # what arrives later must repair it
            if k % 2 and rounds:
                lg.outcome(rounds[k % len(rounds)])
            else:
                lg.root()
        if lg.add(m) is not None:
            pending.append(m)
    while pending:
        before = len(pending)
        pending = [m for m in pending if lg.add(m) is not None]
        if len(pending) == before:
            break
    return pending  # refused for good (so far): their authors' registrations are missing


def reference(msgs) -> L.Ledger:
    lg = L.Ledger(NET.genesis)
    assert deliver(lg, sorted(msgs, key=lambda m: (not isinstance(m.body, L.Register), m.id))) == []
    return lg


def reference_root(msgs) -> str:
    return reference(msgs).root()


@pytest.fixture(autouse=True)
def small_checkpoints(monkeypatch):
    monkeypatch.setattr(L, "CHECKPOINT_EVERY", 3)  # many checkpoints: replay paths get exercised


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=histories(), data=st.data())
def test_any_order_duplicates_and_reads_give_the_same_root(msgs, data):
    expected = reference_root(msgs)
    order = data.draw(st.permutations(msgs))
    dups = data.draw(st.lists(st.sampled_from(msgs), max_size=10))
    reads = data.draw(st.sets(st.integers(0, len(msgs) + len(dups)), max_size=8))
    lg = L.Ledger(NET.genesis)
    assert deliver(lg, order + dups, reads) == []
    assert len(lg.held) == len({m.id for m in msgs})
    assert lg.root() == expected
    assert sum(p.stake for p in lg.state.peers.values()) + lg.state.pool == 5 * L.DEPOSIT


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=histories(), data=st.data())
def test_late_arrivals_match_a_node_that_had_them_in_time(msgs, data):
    """A node that read its ledger after every message, missed a random subset, and got that
    subset only at the end (as after a partition heals) agrees with one that never missed any."""
    late = set(data.draw(st.lists(st.integers(0, len(msgs) - 1), max_size=len(msgs) // 2)))
    on_time = L.Ledger(NET.genesis)
    partitioned = L.Ledger(NET.genesis)
    deliver(on_time, msgs, reads=frozenset(range(len(msgs))))
    left = deliver(partitioned, [m for k, m in enumerate(msgs) if k not in late],
                   reads=frozenset(range(len(msgs))))
    assert deliver(partitioned, [msgs[k] for k in sorted(late, reverse=True)] + left) == []
    assert partitioned.root() == on_time.root() == reference_root(msgs)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=histories())
def test_outcomes_match_replay(msgs):
    """The outcome a node answers clients with is the one the from-scratch ledger records."""
    ref = reference(msgs)
    inc = L.Ledger(NET.genesis)
    deliver(inc, msgs, reads=frozenset(range(len(msgs))))
    for m in msgs:
        if isinstance(m.body, L.Query):
            for i in range(len(m.body.items)):
                rid = L.round_id(m.id, i)
                assert inc.outcome(rid) == ref.outcome(rid)


def round_order(msgs) -> list:
    """Messages in the order of the earliest round each touches (registrations first): the
    order in which a node that never falls behind gets them, roughly."""
    keys = {L.round_id(m.id, i): (m.body.lamport, L.round_id(m.id, i))
            for m in msgs if isinstance(m.body, L.Query) for i in range(len(m.body.items))}
    last = (1 << 64, b"")

    def first(m):
        body = m.body
        if isinstance(body, L.Register):
            return (-1, b"")
        if isinstance(body, L.Query):
            return min(keys[L.round_id(m.id, i)] for i in range(len(body.items)))
        return min((keys.get(x.round, last) for x in body.commits + body.reveals), default=last)
    return sorted(msgs, key=lambda m: (first(m), m.id))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=histories(), data=st.data())
def test_pruning_keeps_the_root_or_says_it_is_stale(msgs, data):
    """Dropping old rounds' tables (``prune``) never changes the root; a message that arrives
    later on a dropped round sets ``stale`` rather than leaving a wrong root unnoticed, and
    ``replay`` of the same messages, in any order, gives the root of the full fold."""
    expected = reference_root(msgs)
    order = round_order(msgs)
    for _ in range(data.draw(st.integers(0, 6))):  # some messages come late
        k = data.draw(st.integers(0, len(order) - 1))
        order.insert(data.draw(st.integers(k, len(order) - 1)), order.pop(k))
    prunes = data.draw(st.dictionaries(st.integers(0, len(msgs)), st.integers(1, 6), max_size=12))
    lg = L.Ledger(NET.genesis)
    pending = []
    for k, m in enumerate(order):
        if k in prunes:
            before = lg.root()
            lg.prune(prunes[k])
            assert lg.rounds_held < max(prunes[k], 1) + L.CHECKPOINT_EVERY
            if not lg.stale:
                assert lg.root() == before
        if lg.add(m) is not None:
            pending.append(m)
    assert deliver(lg, pending) == []
    assert len(lg.held) == len({m.id for m in msgs})
    if not lg.stale:
        assert lg.root() == expected
    keep = data.draw(st.integers(1, 6))
    again = L.replay(NET.genesis, len(order), data.draw(st.permutations(order)).__getitem__, keep)
    assert not again.stale
    assert again.root() == expected
    assert again.rounds_held < keep + L.CHECKPOINT_EVERY


def test_a_message_on_a_pruned_round_makes_the_ledger_stale():
    """Each way a late message can reach behind a prune: a reveal, a commit, a query that
    sorts among the pruned rounds, a registration that changes the seats."""
    def pruned():
        lg = L.Ledger(NET.genesis)
        for m in NET.registrations()[:4]:  # the fifth seat is taken late
            lg.add(m)
        rounds = []
        for n in range(8):
            q, rids = NET.query(n % 4, 10 + n, 1)
            lg.add(q)
            rounds += rids
            lg.add(NET.commit(1, 1, [(rids[0], 0)]))
        assert lg.prune(2) == 6 and not lg.stale
        assert all(lg.is_pruned(r) for r in rounds[:6]) and not lg.is_pruned(rounds[6])
        return lg, rounds
    lg, rounds = pruned()
    lg.add(NET.reveal(1, 1, [(rounds[7], 0)]))
    assert not lg.stale  # a round still held
    for late in (NET.reveal(1, 1, [(rounds[0], 0)]), NET.commit(2, 1, [(rounds[5], 1)]),
                 NET.query(3, 1, 1)[0], NET.register(4)):
        lg, _ = pruned()
        assert lg.add(late) is None and late.id in lg.held
        assert lg.stale
    lg, _ = pruned()
    late = NET.query(3, 1, 1)[0]  # sorts among the pruned rounds: is one (no vote goes there)
    lg.add(late)
    assert lg.stale and lg.is_pruned(L.round_id(late.id, 0)) and lg.key(L.round_id(late.id, 0)) is None
    lg, _ = pruned()
    lg.add(NET.query(3, 17, 1)[0])  # after the last pruned round (lamport 15): held as usual
    assert not lg.stale

    # A key registered without winning a seat: its votes count nowhere, so on a pruned round
    # they need no new fold (anyone able to register must not make every node replay).
    from p2pml.wire import Identity
    first = NET.register(0)
    outsider = next(ident for ident in (Identity.from_seed(bytes([40 + k]) * 32) for k in range(64))
                    if ident.sign(NET.gid, first.body).msg.id > first.id)
    lg, rounds = pruned()
    before = lg.root()
    assert lg.add(outsider.sign(NET.gid, first.body).msg) is None and not lg.stale  # ada stays key 0's
    late = outsider.sign(NET.gid, L.Votes(1, (L.Commit(rounds[0], b"\1" * 32),), ())).msg
    assert lg.add(late) is None and not lg.stale and lg.root() == before


def test_replay_prunes_as_it_goes_and_matches_the_full_fold(monkeypatch):
    """A long history: ``replay`` never holds much more than ``keep`` rounds' tables, yet gives
    the state of a fold that kept them all."""
    monkeypatch.setattr(L, "PRUNE_EVERY", 5)
    msgs = list(NET.registrations())
    for n in range(60):
        q, rids = NET.query(n % 5, n + 1, 2)
        msgs.append(q)
        for voter in range(5):
            msgs.append(NET.commit(voter, n + 1, [(rid, (voter + n) % 3 // 2) for rid in rids]))
            msgs.append(NET.reveal(voter, n + 1, [(rid, (voter + n) % 3 // 2) for rid in rids],
                                   seen=frozenset(range(5))))
    held = []
    real_prune = L.Ledger.prune

    def prune(self, keep, before=None):
        held.append(self.rounds_held)
        return real_prune(self, keep, before)

    monkeypatch.setattr(L.Ledger, "prune", prune)
    again = L.replay(NET.genesis, len(msgs), msgs[::-1].__getitem__, 8)
    assert again.root() == reference_root(msgs)
    assert again.state.rounds == 120
    assert max(held) <= 8 + 3 + 5 * 2  # keep, a checkpoint's worth, a prune interval's queries
    assert again.rounds_held < 8 + 3
