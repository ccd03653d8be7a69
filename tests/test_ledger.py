"""The ledger's rules, one by one, on real signed messages (spec-style: pre-state, messages, post)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pml import ledger as L
from p2pml.ledger import Ledger
from tests.conftest import card


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
    assert len(st.peers) == 5 and st.rounds == 0 and st.pool == 0
    for i in range(5):
        p = st.peers[pid(net, i)]
        assert (p.stake, p.weight, p.status) == (L.DEPOSIT, L.INITIAL_WEIGHT, L.STATUS_ACTIVE)


def test_invalid_registrations_rejected(net):
    lg = Ledger(net.genesis)
    assert "no genesis slot" in lg.add(net.register(0, name="mallory"))
    bad_card = L.Card("pickle", "svm", bytes(32), bytes(32), 1, 1)
    assert "framework" in lg.add(net.sign(0, L.Register("ada", bad_card, L.DEPOSIT)))
    chained = L.Card("builtin", "svm", bytes(32), bytes(32), 1, 1, bytes(32))
    assert "names none" in lg.add(net.sign(0, L.Register("ada", chained, L.DEPOSIT)))
    assert "deposit must be" in lg.add(net.register(0, deposit=999))
    assert lg.state.peers == {}


def test_pinned_slot_refuses_other_keys(net):
    pinned = L.Genesis((L.Slot("ada", net.ids[0].key),))
    lg = Ledger(pinned)
    m_other = net.ids[1].sign(pinned.id(), L.Register("ada", card("logistic_regression"), L.DEPOSIT)).msg
    assert "pinned" in lg.add(m_other)
    m_own = net.ids[0].sign(pinned.id(), L.Register("ada", card("logistic_regression"), L.DEPOSIT)).msg
    assert lg.add(m_own) is None
    assert list(lg.state.peers) == [pid(net, 0)]


def test_contested_slot_goes_to_lowest_message_id(net):
    a = net.ids[0].sign(net.gid, L.Register("ada", card("logistic_regression"), L.DEPOSIT)).msg
    b = net.ids[1].sign(net.gid, L.Register("ada", card("logistic_regression"), L.DEPOSIT)).msg
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
    assert st.peers[bad].slashed == slash and st.pool == 0
    # paid to the four that agreed, by power (equal here): 25 each, added to their stake
    honest = [p for k, p in st.peers.items() if k != bad]
    assert [(p.rewarded, p.stake) for p in honest] == [(25, L.DEPOSIT + 25)] * 4
    assert st.peers[bad].history == ""
    for lam in range(L.ACCURACY_WINDOW + 1, 2 * L.ACCURACY_WINDOW):
        play(net, lg, [0, 0, 0, 0, 1], lam)
    assert lg.state.peers[bad].stake == L.DEPOSIT - slash  # next judgement after a full window
    for i in range(4):
        assert lg.state.peers[pid(net, i)].stake == L.DEPOSIT + 25


def test_each_vote_is_judged_with_itself_so_a_colluding_pair_cannot_tie_the_honest(net):
    """Judged without its own vote, each of three honest members would face two honest votes
    and two colluding ones: a tie, which goes to the lower class, the colluders' here. Judged
    with it (docs/ledger.md, "judged against its vouchers and itself"), the honest are never
    slashed, and the pair's losses are paid to them."""
    lg = with_members(net)
    for lam in range(1, 2 * L.ACCURACY_WINDOW + 1):
        play(net, lg, [1, 1, 1, 0, 0], lam)
    st = lg.state
    for i in range(3):
        p = st.peers[pid(net, i)]
        # 2 x 100 in the 20th round, a third each (2 left in the pool); then 2 x 90 + 2
        assert (p.slashed, p.rewarded, p.agreed, p.votes) == (0, 66 + 60, 40, 40) and p.weight > 990_000
        assert p.stake == L.DEPOSIT + 126
    for i in (3, 4):
        p = st.peers[pid(net, i)]
        assert (p.agreed, p.stake) == (0, L.DEPOSIT - 100 - 90)  # two failed windows: 10%, then 10%
    assert st.pool == 2 and sum(p.stake for p in st.peers.values()) + st.pool == 5 * L.DEPOSIT


def test_three_members_with_one_hostile_judge_the_honest_right(net):
    lg = with_members(net, 3)
    for lam in range(1, L.ACCURACY_WINDOW + 1):
        play(net, lg, [1, 1, 0], lam)
    st = lg.state
    assert [st.peers[pid(net, i)].stake for i in range(3)] == [L.DEPOSIT + 50, L.DEPOSIT + 50, L.DEPOSIT - 100]


def test_agreement_at_threshold_is_not_slashed(net):
    lg = with_members(net)
    need = L.MIN_AGREEMENT_BPS * L.ACCURACY_WINDOW // L.BPS  # 12 of 20
    labels = [0] * need + [1] * (L.ACCURACY_WINDOW - need)
    for lam, lab in enumerate(labels, 1):
        play(net, lg, [0, 0, 0, 0, lab], lam)
    assert lg.state.peers[pid(net, 4)].stake == L.DEPOSIT


def eject_the_last_by_inaccuracy(net, lg) -> int:
    """Play rounds in which peer 4 is always wrong until it is ejected; the rounds played."""
    lam = 0
    while lg.state.peers[pid(net, 4)].status == L.STATUS_ACTIVE:
        lam += 1
        play(net, lg, [0, 0, 0, 0, 1], lam)
        assert lam <= 140
    return lam


def test_below_floor_is_ejected_and_stops_counting(net):
    lg = with_members(net)
    bad = pid(net, 4)
    lam = eject_the_last_by_inaccuracy(net, lg)
    p = lg.state.peers[bad]
    # docs/ledger.md: 7 failed windows, ejected at its 140th vote, at stake 480
    assert (lam, p.votes, p.stake, p.slashed) == (140, 140, 480, 520)
    assert p.reason == "stake below floor"
    votes_before = p.votes
    rid = play(net, lg, [0, 0, 0, 0, 1], lam + 1)
    assert lg.state.peers[bad].votes == votes_before
    assert bad not in {cv.peer for cv in lg.outcome(rid).votes}


def test_an_ejected_peer_is_still_slashed_for_equivocation(net):
    """docs/ledger.md: slash_equivocation "applies whatever the member's status": a peer ejected
    for low stake that then commits twice on one round loses half of what it has left."""
    lg = with_members(net)
    bad = pid(net, 4)
    lam = eject_the_last_by_inaccuracy(net, lg)
    ejected = lg.state.peers[bad]
    assert (ejected.reason, ejected.stake, ejected.equivocation) == ("stake below floor", 480, None)
    q, (rid,) = net.query(0, lam + 1)
    lg.add(q)
    for i in range(4):
        lg.add(net.votes(i, lam + 2, [(rid, 0)]))
    a, b = net.votes(4, lam + 2, [(rid, 0)]), net.votes(4, lam + 3, [(rid, 1)])
    lg.add(a)
    lg.add(b)
    p = lg.state.peers[bad]
    assert p.equivocation == (rid.hex(), *sorted([a.id.hex(), b.id.hex()]))
    assert p.stake == 480 - 480 * 5_000 // 10_000 == 240  # EQUIVOCATION_SLASH_BPS 5 000
    assert p.status == L.STATUS_EJECTED and p.reason == "equivocation"
    assert sum(x.stake for x in lg.state.peers.values()) + lg.state.pool == 5 * L.DEPOSIT


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
    # paid to the four that agreed on the round of the evidence, 125 each
    assert lg.state.pool == 0
    assert [p.rewarded for k, p in lg.state.peers.items() if k != pid(net, 4)] == \
        [L.DEPOSIT * L.EQUIVOCATION_SLASH_BPS // L.BPS // 4] * 4


def test_same_vote_in_two_messages_is_not_equivocation(net):
    lg = with_members(net)
    q, rids = net.query(0, 1, n_items=2)
    lg.add(q)
    lg.add(net.votes(0, 2, [(rids[0], 1), (rids[1], 0)]))
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
    assert early.id not in lg.held and lg.lamport == 1  # a stranger cannot move the clock
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


def oh(label, n=3):
    return tuple(L.PROBA_ONE if c == label else 0 for c in range(n))


def test_consensus_among_powerless_voters_is_by_count(net):
    peers = [L.PeerState("a", b"a", weight=0), L.PeerState("b", b"b", weight=0),
             L.PeerState("c", b"c", weight=0)]
    assert L.compute_consensus(L.IRIS, [(p, lab, oh(lab)) for p, lab in zip(peers, [2, 2, 1])]) == 2
    assert L.compute_consensus(L.IRIS, [(peers[0], 2, oh(2))]) == 2


def test_soft_vote_sums_probabilities_by_power():
    """Two members fairly sure of class 1 outweigh one certain of class 0 (a hard vote by power
    would give 0: it holds the most power), and a tie keeps the lower class."""
    strong = L.PeerState("s", b"s", weight=L.WEIGHT_ONE)
    weak = [L.PeerState(n, n.encode(), weight=L.WEIGHT_ONE * 6 // 10) for n in "ab"]
    votes = [(strong, 0, (1_000_000, 0, 0)), (weak[0], 1, (300_000, 700_000, 0)),
             (weak[1], 1, (300_000, 700_000, 0))]
    # class 0: 1.0 + 0.6 x 0.3 x 2 = 1.36; class 1: 0.6 x 0.7 x 2 = 0.84 -> 0
    assert L.compute_consensus(L.IRIS, votes) == 0
    votes[0] = (strong, 0, (400_000, 350_000, 250_000))  # 0.4 + 0.36 = 0.76 < 0.84
    assert L.compute_consensus(L.IRIS, votes) == 1
    even = [(strong, 0, (500_000, 500_000, 0))]
    assert L.compute_consensus(L.IRIS, even) == 0


REGRESSION = L.Task("r", L.REGRESSION, ("x",), band_bps=1_000, tolerance=5 * L.VALUE_ONE)


def test_regression_consensus_is_the_weighted_median_and_agreement_a_band():
    peers = [L.PeerState(n, n.encode(), weight=w) for n, w in (("a", 100), ("b", 100), ("c", 300))]
    votes = [(peers[0], 10, ()), (peers[1], 20, ()), (peers[2], 1_000, ())]
    assert L.compute_consensus(REGRESSION, votes) == 1_000  # c holds 3/5 of the power
    peers[2].weight = 100
    assert L.compute_consensus(REGRESSION, votes) == 20  # now the middle of three alike
    peers[2].weight = 200  # 2 x (100 + 100) >= 400: the lower median
    assert L.compute_consensus(REGRESSION, votes) == 20
    one = L.VALUE_ONE
    assert L.agrees(REGRESSION, 100 * one + 10 * one, 100 * one)  # within 10% of 100
    assert not L.agrees(REGRESSION, 100 * one + 10 * one + 1, 100 * one)
    assert L.agrees(REGRESSION, 5 * one, 0)  # the tolerance near zero
    assert not L.agrees(REGRESSION, 5 * one + 1, 0)


def test_duplicate_message_changes_nothing(net):
    lg = with_members(net)
    rid = play(net, lg, [0, 0, 0, 0, 0], 1)
    root = lg.root()
    q, _ = net.query(0, 1)  # signing is deterministic: the very same message again
    assert q.id in lg.held and lg.add(q) is None
    assert lg.root() == root and lg.state.rounds == 1 and lg.outcome(rid).consensus == 0


def test_every_unit_is_accounted_for(net):
    lg = with_members(net)
    for lam in range(1, 200):
        play(net, lg, [0, 0, lam % 3, 1, (lam * 7) % 3], lam)
    st = lg.state
    assert sum(p.stake for p in st.peers.values()) + st.pool == 5 * L.DEPOSIT
    assert sum(p.slashed for p in st.peers.values()) == sum(p.rewarded for p in st.peers.values()) + st.pool


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
    body = L.Votes(1, net.commits(4, [(rid, 0)]) + net.commits(4, [(rid, 1)]), ())
    reason = lg.add(L.Message(b"\x07" * 32, net.ids[4].key, body))  # no node would sign it
    assert reason and "one commit and one reveal per round" in reason
    assert lg.state.peers[pid(net, 4)].equivocation is None


# -- commit-reveal ---------------------------------------------------------------------------


def open_round(net, lg, lamport=1):
    q, (rid,) = net.query(0, lamport)
    assert lg.add(q) is None
    return rid


def test_a_reveal_waits_for_its_commit_and_a_commit_for_its_reveal(net):
    lg = with_members(net)
    rid = open_round(net, lg)
    for i in range(4):
        assert lg.add(net.reveal(i, 1, [(rid, 1)])) is None
    assert lg.state.rounds == 0  # reveals without commits: nothing to count yet
    for i in range(4):
        assert lg.add(net.commit(i, 1, [(rid, 1)])) is None
    assert lg.outcome(rid).consensus == 1 and lg.state.rounds == 1


def test_copycat_committing_after_the_reveals_is_late_never_counted_nor_judged(net):
    lg = with_members(net)
    for lam in range(1, 2 * L.ACCURACY_WINDOW):
        rid = open_round(net, lg, lam)
        for i in range(4):  # the honest four commit, then reveal listing the four commits
            lg.add(net.commit(i, lam, [(rid, 0)]))
            lg.add(net.reveal(i, lam, [(rid, 0)], seen=range(4)))
        lg.add(net.votes(4, lam, [(rid, 0)]))  # the copycat: commit and reveal after seeing them
        out = lg.outcome(rid)
        assert out.consensus == 0 and pid(net, 4) not in {cv.peer for cv in out.votes}
        assert out.late == (pid(net, 4),)
    p = lg.state.peers[pid(net, 4)]
    assert (p.weight, p.votes, p.agreed, p.stake) == (L.INITIAL_WEIGHT, 0, 0, L.DEPOSIT)
    assert p.late == 2 * L.ACCURACY_WINDOW - 1


def test_timely_means_seen_by_more_than_half_of_the_other_revealers_power(net):
    # Equal power: seen by 2 of 4 others is not more than half; 3 of 4 is.
    for seen_by, timely in ((2, False), (3, True)):
        lg = with_members(net)
        rid = open_round(net, lg)
        for i in range(4):
            lg.add(net.votes(i, 1, [(rid, 1)], seen=range(4) if i >= seen_by else range(5)))
        lg.add(net.votes(4, 1, [(rid, 1)]))
        counted = pid(net, 4) in {cv.peer for cv in lg.outcome(rid).votes}
        assert counted is timely, seen_by


def test_a_lone_revealer_decides_the_answer_but_is_not_judged(net):
    """Agreeing with oneself proves nothing: a member that asks a query and reveals on it
    before anyone else can see it (so the others vote late) gains no weight by it."""
    lg = with_members(net)
    rid = open_round(net, lg)
    lg.add(net.votes(2, 1, [(rid, 2)], seen=[2]))
    assert lg.outcome(rid).consensus == 2 and lg.state.rounds == 1
    assert lg.state.peers[pid(net, 2)].votes == 0


def test_split_voters_decide_the_answer_together_and_nobody_is_judged(net):
    lg = with_members(net)
    rid = open_round(net, lg)
    for i in (0, 1):  # one side of a partition
        lg.add(net.votes(i, 1, [(rid, 1)], seen=[0, 1]))
    for i in (2, 3, 4):  # the other side
        lg.add(net.votes(i, 1, [(rid, 2)], seen=[2, 3, 4]))
    out = lg.outcome(rid)
    assert out.consensus == 2 and len(out.votes) == 5 and len(out.late) == 5
    assert all(p.votes == 0 and p.weight == L.INITIAL_WEIGHT for p in lg.state.peers.values())


def test_a_late_joiner_vouches_for_an_early_voter_who_is_judged_against_it(net):
    """A member that asks and reveals alone, then lets the others see the query (or was cut
    off while it asked): the others list its commit, so it is judged against their votes."""
    lg = with_members(net)
    rid = open_round(net, lg)
    lg.add(net.votes(0, 1, [(rid, 1)], seen=[0]))
    for i in range(1, 5):
        lg.add(net.votes(i, 1, [(rid, 2)], seen=[0, i]))
    p0 = lg.state.peers[pid(net, 0)]
    assert (p0.votes, p0.agreed) == (1, 0)
    assert lg.outcome(rid).consensus == 1 and [cv.peer for cv in lg.outcome(rid).votes] == [pid(net, 0)]


def test_an_unrevealed_timely_commit_costs_weight_until_revealed_never_stake(net):
    lg = with_members(net)
    rid = open_round(net, lg)
    for i in range(4):
        lg.add(net.votes(i, 1, [(rid, 0)]))
    lg.add(net.commit(4, 1, [(rid, 0)]))
    p = lg.state.peers[pid(net, 4)]
    assert (p.unrevealed, p.votes, p.agreed, p.history) == (1, 1, 0, "")
    assert p.weight == L.compute_weight(L.INITIAL_WEIGHT, False)
    assert lg.outcome(rid).unrevealed == (pid(net, 4),)
    lg.add(net.reveal(4, 2, [(rid, 0)]))  # the reveal arrives late (a partition): recomputed
    p = lg.state.peers[pid(net, 4)]
    assert (p.unrevealed, p.votes, p.agreed) == (0, 1, 1)


def test_a_reveal_that_does_not_match_its_commit_is_slashed_like_equivocation(net):
    lg = with_members(net)
    rid = open_round(net, lg)
    for i in range(4):
        lg.add(net.votes(i, 1, [(rid, 0)]))
    c = net.commit(4, 1, [(rid, 1)])
    r = net.reveal(4, 1, [(rid, 0)])  # committed to 1, reveals 0 once it sees the others
    lg.add(c)
    lg.add(r)
    p = lg.state.peers[pid(net, 4)]
    assert p.status == L.STATUS_EJECTED and p.reason == "reveal does not match its commit"
    assert p.equivocation == (rid.hex(), c.id.hex(), r.id.hex())
    assert p.stake == L.DEPOSIT - L.DEPOSIT * L.EQUIVOCATION_SLASH_BPS // L.BPS
    assert pid(net, 4) not in {cv.peer for cv in lg.outcome(rid).votes}


def test_committing_to_another_peers_hash_does_not_let_one_reveal_its_vote(net):
    """The author is inside the commitment: a copy of peer 0's commit cannot be opened by
    revealing peer 0's vote and salt, even though they are public after peer 0 reveals."""
    lg = with_members(net)
    rid = open_round(net, lg)
    for i in range(4):
        lg.add(net.votes(i, 1, [(rid, 0)]))
    (theirs,) = net.commits(0, [(rid, 0)])
    lg.add(net.sign(4, L.Votes(1, (theirs,), ())))
    (their_reveal,) = net.reveals(0, [(rid, 0)])
    lg.add(net.sign(4, L.Votes(2, (), (their_reveal,))))
    p = lg.state.peers[pid(net, 4)]
    assert p.reason == "reveal does not match its commit" and p.agreed == 0


def test_reveals_re_made_with_other_seen_lists_are_one_vote_seen_by_their_intersection(net):
    lg = with_members(net)
    rid = open_round(net, lg)
    for i in range(4):
        lg.add(net.commit(i, 1, [(rid, 0)]))
    lg.add(net.commit(4, 1, [(rid, 0)]))
    lg.add(net.reveal(0, 1, [(rid, 0)], seen=range(5)))
    lg.add(net.reveal(0, 2, [(rid, 0)], seen=range(4)))  # after a restart: lists fewer
    for i in (1, 2, 3, 4):
        lg.add(net.reveal(i, 1, [(rid, 0)], seen=range(5)))
    p0 = lg.state.peers[pid(net, 0)]
    assert p0.equivocation is None and p0.votes == 1
    # peer 4 is seen by 3 of its 4 others (peer 0's reveals intersect to range(4)): timely
    assert pid(net, 4) in {cv.peer for cv in lg.outcome(rid).votes}


def test_never_revealing_drives_weight_to_zero_but_burns_no_stake(net):
    """A reveal may still be on its way, so a missing one is never slashed for; but a peer that
    commits and keeps its votes to itself loses its say."""
    lg = with_members(net)
    for lam in range(1, 3 * L.ACCURACY_WINDOW):
        rid = open_round(net, lg, lam)
        for i in range(4):
            lg.add(net.votes(i, lam, [(rid, 0)]))
        lg.add(net.commit(4, lam, [(rid, 0)]))
    p = lg.state.peers[pid(net, 4)]
    assert p.weight < L.WEIGHT_ONE // 100 and p.stake == L.DEPOSIT and p.status == L.STATUS_ACTIVE
    assert p.unrevealed == 3 * L.ACCURACY_WINDOW - 1


def test_a_key_moving_to_another_seat_replays_from_genesis(net):
    """One key registering for two unpinned seats holds the first by name order; whichever of
    its registrations arrives first, the ledger ends the same (found by review)."""
    from p2pml.config import MODEL_KINDS

    regs = net.registrations()
    extra = net.register(0, name="bo", model=MODEL_KINDS[1])
    q, (rid,) = net.query(2, 1)
    votes = [net.votes(i, 1, [(rid, 0)]) for i in (2, 3, 4)]
    roots = set()
    for order in ([extra, regs[0], *regs[2:], q, *votes], [*regs[2:], q, *votes, extra, regs[0]],
                  [regs[0], extra, *regs[2:], q, *votes]):
        lg = Ledger(net.genesis)
        for m in order:
            lg.add(m)
            lg.root()  # a read in between, as a node makes
        roots.add(lg.root())
        assert lg.state.peers[pid(net, 0)].name == "ada"
    assert len(roots) == 1


def _assess_by_definition(peer, revealed):
    """docs/ledger.md's definition, written plainly: the reference for ``L.assess``."""
    others = [p for p, _, _, _ in revealed if p is not peer]
    vouchers = [(p, proba) for p, _, proba, seen in revealed if p is not peer and peer.key in seen]
    total, saw = sum(L.power(p) for p in others), sum(L.power(p) for p, _ in vouchers)
    if total == 0:
        total, saw = len(others), len(vouchers)
    if not vouchers or 2 * saw <= total:
        return None
    vouchers += [(p, proba) for p, _, proba, _ in revealed if p is peer]  # and its own vote
    powered = any(L.power(p) for p, _ in vouchers)
    score = {c: sum((L.power(p) if powered else 1) * proba[c] for p, proba in vouchers) for c in range(3)}
    return max(range(3), key=lambda c: (score[c], -c))


@given(st.lists(st.tuples(st.sampled_from([0, 1, 7, 500]), st.sampled_from([0, 1, 3, 500_000]),
                          st.integers(0, 2), st.sets(st.integers(0, 5))), min_size=0, max_size=6),
       st.booleans())
@settings(max_examples=400, deadline=None)
def test_assess_matches_its_definition(voters, outsider_committed):
    """Timeliness and the vouchers' consensus, as computed in the hot loop, equal the plain
    definition (including powerless revealers, ties, and a peer that committed and did not
    reveal)."""
    peers = [L.PeerState(str(i), bytes([i]), stake=s, weight=w) for i, (s, w, _, _) in enumerate(voters)]
    outsider = L.PeerState("x", bytes([5]))
    soft = ((1_000_000, 0, 0), (0, 600_000, 400_000), (300_000, 300_000, 400_000))
    revealed = [(p, label, soft[label], frozenset(bytes([k]) for k in seen if k != i or outsider_committed))
                for i, (p, (_, _, label, seen)) in enumerate(zip(peers, voters))]
    for peer in peers + [outsider]:
        assert L.assess(L.IRIS, peer, revealed) == _assess_by_definition(peer, revealed)
    for k in range(len(revealed) + 1):
        voters_k = [(p, label, proba) for p, label, proba, _ in revealed[:k]]
        if voters_k:
            by_definition = _assess_by_definition(L.PeerState("y", b"y"),
                                                  [(*v, frozenset([b"y"])) for v in voters_k])
            assert by_definition is None or L.compute_consensus(L.IRIS, voters_k) == by_definition


def test_the_issuers_commit_in_its_query_is_its_vote(net):
    """The issuer commits to its own vote inside the query (binding ``query_binding``, since the
    round id is the query's own hash): everyone holding the round holds that commit, its reveal
    opens it, and it is counted and judged like any other vote."""
    lg = with_members(net)
    q, (rid,) = net.query(0, 1, labels=[2])
    assert lg.add(q) is None
    assert lg.committers(rid) == {net.ids[0].key}
    assert lg.commit_round(net.ids[0].key, rid) == L.query_binding(net.ids[0].key, 1, 0)
    assert lg.commit_round(net.ids[1].key, rid) == rid
    for i in range(1, 5):
        lg.add(net.commit(i, 1, [(rid, 2)]))
    for i in range(5):
        assert lg.add(net.reveal(i, 2, [(rid, 2)])) is None
    out = lg.outcome(rid)
    assert out.consensus == 2 and len(out.votes) == 5 and not out.late
    issuer = next(cv for cv in out.votes if cv.peer == pid(net, 0))
    assert issuer.commit == q.id  # the commit it opens is the query itself
    assert lg.state.peers[pid(net, 0)].votes == 1 and lg.state.peers[pid(net, 0)].agreed == 1


def test_the_issuers_commit_in_its_query_binds_its_vote(net):
    """A reveal by the issuer that does not open the commit in its query is slashed like
    equivocation; a second commit on its own round beside the one in the query is equivocation."""
    lg = with_members(net)
    q, (rid,) = net.query(0, 1, labels=[2])
    lg.add(q)
    for i in range(1, 5):
        lg.add(net.votes(i, 1, [(rid, 0)]))
    lg.add(net.reveal(0, 2, [(rid, 0)]))  # claims the majority's class, committed to 2
    assert lg.state.peers[pid(net, 0)].reason == "reveal does not match its commit"
    lg2 = with_members(net)
    q2, (rid2,) = net.query(0, 1, labels=[1])
    lg2.add(q2)
    lg2.add(net.commit(0, 2, [(rid2, 1)]))  # the same class, committed again on the round id
    p = lg2.state.peers[pid(net, 0)]
    assert p.reason == "equivocation" and p.equivocation[0] == rid2.hex()


def test_a_query_with_a_commit_count_unlike_its_items_is_refused(net):
    lg = with_members(net)
    body = L.Query(1, ((5.0, 3.0, 1.0, 0.1), (5.1, 3.0, 1.0, 0.1)), (bytes(32),))
    # (the wire refuses to build or decode it; the ledger does not rely on that)
    assert lg.add(L.Message(bytes(32), net.ids[0].key, body)) == "a query carries one commit per item, or none"
