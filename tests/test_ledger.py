"""The ledger's rules, one by one, on real signed messages (spec-style: pre-state, messages, post)."""

from __future__ import annotations

from p2pml import ledger as L
from p2pml.ledger import Ledger


def with_members(net, n=5) -> Ledger:
    lg = Ledger(net.genesis)
    for m in net.registrations()[:n]:
        assert lg.add(m) is None
    return lg


def play(net, lg: Ledger, labels: list[int | None], lamport: int):
    """One round: peer i votes labels[i] (None: does not vote). Returns the round id."""
    q, (rid,) = net.query(0, lamport)
    assert lg.add(q) is None
    for i, lab in enumerate(labels):
        if lab is not None:
            assert lg.add(net.votes(i, lamport, [(rid, lab)])) is None
    return rid


def pid(net, i):
    return L.peer_id(net.ids[i].key)


def test_genesis_state_from_registrations(net):
    lg = with_members(net)
    st = lg.state
    assert len(st.peers) == 5 and st.rounds == 0 and st.burned == 0
    for i in range(5):
        p = st.peers[pid(net, i)]
        assert (p.stake, p.weight, p.status) == (L.DEPOSIT, L.INITIAL_WEIGHT, L.STATUS_ACTIVE)


def test_invalid_registrations_rejected(net):
    lg = Ledger(net.genesis)
    assert "no genesis slot" in lg.add(net.register(0, name="mallory"))
    assert "is for model" in lg.add(net.register(0, model="svm"))
    assert "deposit must be" in lg.add(net.register(0, deposit=999))
    assert lg.state.peers == {}


def test_pinned_slot_refuses_other_keys(net):
    pinned = L.Genesis((L.Slot("ada", "logistic_regression", net.ids[0].key),))
    lg = Ledger(pinned)
    m_other = net.ids[1].sign(pinned.id(), L.Register("ada", "logistic_regression", L.DEPOSIT)).msg
    assert "pinned" in lg.add(m_other)
    m_own = net.ids[0].sign(pinned.id(), L.Register("ada", "logistic_regression", L.DEPOSIT)).msg
    assert lg.add(m_own) is None
    assert list(lg.state.peers) == [pid(net, 0)]


def test_contested_slot_goes_to_lowest_message_id(net):
    a = net.ids[0].sign(net.gid, L.Register("ada", "logistic_regression", L.DEPOSIT)).msg
    b = net.ids[1].sign(net.gid, L.Register("ada", "logistic_regression", L.DEPOSIT)).msg
    winner = min((a, b), key=lambda m: m.id)
    for order in ((a, b), (b, a)):
        lg = Ledger(net.genesis)
        for m in order:
            lg.add(m)
        assert list(lg.state.peers) == [L.peer_id(winner.author)]


def test_consensus_is_largest_voting_power(net):
    lg = with_members(net)
    # Peers 3 and 4 get their weight down first; then 2 votes with high power beat 3 with low.
    for lam in range(1, 11):
        play(net, lg, [0, 0, 0, 1, 1], lam)
    st = lg.state
    assert st.peers[pid(net, 3)].weight < st.peers[pid(net, 0)].weight
    rid = play(net, lg, [None, None, 2, 1, 1], 11)
    # Power of peer 2 alone (high weight) vs peers 3+4 (low weight): peer 2 wins.
    assert lg.outcome(rid).consensus == 2


def test_tie_goes_to_lowest_class(net):
    lg = with_members(net)
    rid = play(net, lg, [2, 1, None, None, None], 1)
    assert lg.outcome(rid).consensus == 1


def test_weight_moves_toward_one_and_zero_within_bounds(net):
    w = L.INITIAL_WEIGHT
    for _ in range(500):
        w = L.compute_weight(w, True)
        assert 0 <= w <= L.WEIGHT_ONE
    assert w == L.WEIGHT_ONE
    for _ in range(500):
        w = L.compute_weight(w, False)
        assert 0 <= w <= L.WEIGHT_ONE
    assert w == 0
    assert L.compute_weight(L.INITIAL_WEIGHT, True) == 550_000
    assert L.compute_weight(L.INITIAL_WEIGHT, False) == 450_000


def test_counted_votes_carry_pre_round_weight_and_stake(net):
    lg = with_members(net)
    rid1 = play(net, lg, [0, 0, 0, 0, 1], 1)
    rid2 = play(net, lg, [0, 0, 0, 0, 1], 2)
    v1 = {cv.peer: cv for cv in lg.outcome(rid1).votes}
    v2 = {cv.peer: cv for cv in lg.outcome(rid2).votes}
    assert v1[pid(net, 0)].weight == L.INITIAL_WEIGHT
    assert v2[pid(net, 0)].weight == L.compute_weight(L.INITIAL_WEIGHT, True)
    assert v2[pid(net, 4)].weight == L.compute_weight(L.INITIAL_WEIGHT, False)


def test_inaccurate_peer_slashed_once_per_window(net):
    lg = with_members(net)
    bad = pid(net, 4)
    for lam in range(1, L.ACCURACY_WINDOW):
        play(net, lg, [0, 0, 0, 0, 1], lam)
    assert lg.state.peers[bad].stake == L.DEPOSIT  # window not yet full
    play(net, lg, [0, 0, 0, 0, 1], L.ACCURACY_WINDOW)
    slash = L.DEPOSIT * L.INACCURACY_SLASH_BPS // L.BPS
    st = lg.state
    assert st.peers[bad].stake == L.DEPOSIT - slash
    assert st.peers[bad].slashed == slash and st.burned == slash
    assert st.peers[bad].history == ""
    for lam in range(L.ACCURACY_WINDOW + 1, 2 * L.ACCURACY_WINDOW):
        play(net, lg, [0, 0, 0, 0, 1], lam)
    assert lg.state.peers[bad].stake == L.DEPOSIT - slash  # next judgement after a full window
    for i in range(4):
        assert lg.state.peers[pid(net, i)].stake == L.DEPOSIT


def test_agreement_at_threshold_is_not_slashed(net):
    lg = with_members(net)
    need = L.MIN_AGREEMENT_BPS * L.ACCURACY_WINDOW // L.BPS  # 12 of 20
    labels = [0] * need + [1] * (L.ACCURACY_WINDOW - need)
    for lam, lab in enumerate(labels, 1):
        play(net, lg, [0, 0, 0, 0, lab], lam)
    assert lg.state.peers[pid(net, 4)].stake == L.DEPOSIT


def test_below_floor_is_ejected_and_stops_counting(net):
    lg = with_members(net)
    bad = pid(net, 4)
    lam = 0
    while lg.state.peers[bad].status == L.STATUS_ACTIVE:
        lam += 1
        play(net, lg, [0, 0, 0, 0, 1], lam)
        assert lam < 2000
    p = lg.state.peers[bad]
    assert p.stake < L.STAKE_FLOOR and p.reason == "stake below floor"
    votes_before = p.votes
    rid = play(net, lg, [0, 0, 0, 0, 1], lam + 1)
    assert lg.state.peers[bad].votes == votes_before
    assert bad not in {cv.peer for cv in lg.outcome(rid).votes}


def test_absent_peer_is_not_slashed_and_keeps_weight(net):
    lg = with_members(net)
    for lam in range(1, 3 * L.ACCURACY_WINDOW):
        play(net, lg, [0, 0, 0, 0, None], lam)
    p = lg.state.peers[pid(net, 4)]
    assert (p.stake, p.weight, p.votes) == (L.DEPOSIT, L.INITIAL_WEIGHT, 0)


def test_equivocation_slashed_once_with_canonical_evidence(net):
    lg = with_members(net)
    q, (rid,) = net.query(0, 1)
    lg.add(q)
    for i in range(4):
        lg.add(net.votes(i, 1, [(rid, 0)]))
    a = net.votes(4, 1, [(rid, 0)])
    b = net.votes(4, 2, [(rid, 1)])
    c = net.votes(4, 3, [(rid, 2)])
    lg.add(a)
    lg.add(b)
    lg.add(c)
    p = lg.state.peers[pid(net, 4)]
    first, second = sorted([a.id, b.id, c.id])[:2]
    assert p.equivocation == (rid.hex(), first.hex(), second.hex())
    assert p.status == L.STATUS_EJECTED and p.reason == "equivocation"
    assert p.stake == L.DEPOSIT - L.DEPOSIT * L.EQUIVOCATION_SLASH_BPS // L.BPS
    assert pid(net, 4) not in {cv.peer for cv in lg.outcome(rid).votes}
    # A second equivocation in a later round does not slash again.
    q2, (rid2,) = net.query(0, 5)
    lg.add(q2)
    lg.add(net.votes(4, 6, [(rid2, 0)]))
    lg.add(net.votes(4, 7, [(rid2, 1)]))
    assert lg.state.peers[pid(net, 4)].stake == p.stake
    assert lg.state.burned == L.DEPOSIT * L.EQUIVOCATION_SLASH_BPS // L.BPS


def test_same_vote_in_two_messages_is_not_equivocation(net):
    lg = with_members(net)
    q, rids = net.query(0, 1, n_items=2)
    lg.add(q)
    lg.add(net.votes(4, 2, [(rids[0], 1)]))
    lg.add(net.votes(4, 3, [(rids[0], 1), (rids[1], 0)]))  # re-batched, same content
    p = lg.state.peers[pid(net, 4)]
    assert p.equivocation is None and p.status == L.STATUS_ACTIVE and p.votes == 2


def test_vote_before_its_query_counts_when_the_query_arrives(net):
    lg = with_members(net)
    q, (rid,) = net.query(0, 1)
    lg.add(net.votes(1, 1, [(rid, 2)]))
    assert lg.state.rounds == 0
    lg.add(q)
    assert lg.state.rounds == 1 and lg.outcome(rid).consensus == 2


def test_invalid_messages_of_a_key_without_a_seat_are_not_held(net):
    lg = with_members(net, n=4)
    q, (rid,) = net.query(0, 1)
    lg.add(q)
    early = net.votes(4, 1, [(rid, 1)])
    assert "holds no seat" in lg.add(early)
    assert "holds no seat" in lg.add(net.query(4, 2**53)[0])
    assert early.id not in lg.messages and lg.lamport == 1  # a stranger cannot move the clock
    lg.add(net.register(4))
    assert lg.add(early) is None  # offered again (anti-entropy does this), now held
    assert lg.outcome(rid).consensus == 1


def test_votes_do_not_move_the_clock(net):
    lg = with_members(net)
    q, (rid,) = net.query(0, 3)
    lg.add(q)
    lg.add(net.votes(1, 2**50, [(rid, 0)]))
    assert lg.lamport == 3


def test_registration_for_a_won_seat_changes_nothing(net):
    lg = with_members(net)
    play(net, lg, [0, 0, 0, 0, 0], 1)
    root = lg.root()
    from p2pml.wire import Identity

    held = net.register(0)
    claims = (Identity.from_seed(bytes([s]) * 32).sign(net.gid, held.body).msg for s in range(9, 99))
    late = next(m for m in claims if m.id > held.id)  # a later claim to ada's seat, losing
    assert lg.add(late) is None
    assert lg.root() == root and lg.is_member(net.ids[0].key) and not lg.is_member(late.author)


def test_consensus_among_powerless_voters_is_by_count(net):
    peers = [L.PeerState("a", "m", b"a", weight=0), L.PeerState("b", "m", b"b", weight=0),
             L.PeerState("c", "m", b"c", weight=0)]
    votes = [L.Vote(b"r", 2, (0, 0, 1)), L.Vote(b"r", 2, (0, 0, 1)), L.Vote(b"r", 1, (0, 1, 0))]
    assert L.compute_consensus(list(zip(peers, votes))) == 2
    assert L.compute_consensus([(peers[0], L.Vote(b"r", 2, (0, 0, 1)))]) == 2  # never an unvoted class


def test_duplicate_message_changes_nothing(net):
    lg = with_members(net)
    rid = play(net, lg, [0, 0, 0, 0, 0], 1)
    root = lg.root()
    q = next(m for m in lg.messages.values() if isinstance(m.body, L.Query))
    assert lg.add(q) is None
    assert lg.root() == root and lg.state.rounds == 1 and lg.outcome(rid).consensus == 0


def test_every_unit_is_accounted_for(net):
    lg = with_members(net)
    for lam in range(1, 200):
        play(net, lg, [0, 0, lam % 3, 1, (lam * 7) % 3], lam)
    st = lg.state
    assert sum(p.stake for p in st.peers.values()) + st.burned == 5 * L.DEPOSIT
    assert sum(p.slashed for p in st.peers.values()) == st.burned


def test_root_is_hash_of_canonical_form(net):
    lg = with_members(net)
    play(net, lg, [0, 1, 0, None, 2], 1)
    import hashlib
    import json
    canon = json.dumps(lg.state.canonical(), sort_keys=True, separators=(",", ":")).encode()
    assert lg.root() == hashlib.sha256(canon).hexdigest()
    assert all(not isinstance(v, float) for v in _leaves(lg.state.canonical()))


def _leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


def test_invalid_two_votes_on_one_round_in_one_message(net):
    lg = with_members(net)
    q, (rid,) = net.query(0, 1)
    lg.add(q)
    from tests.conftest import one_hot

    body = L.Votes(1, (L.Vote(rid, 0, one_hot(0)), L.Vote(rid, 1, one_hot(1))))
    reason = lg.add(L.Message(b"\x07" * 32, net.ids[4].key, body))  # no node would sign it
    assert reason and "one vote per round" in reason
    assert lg.state.peers[pid(net, 4)].equivocation is None
