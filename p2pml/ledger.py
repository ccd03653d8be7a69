"""The replicated ledger: a pure function of the genesis and the set of valid messages held.

Read top to bottom, like a consensus spec: constants, message types, state, helpers, then
the round transition. Nothing here reads a clock, draws a random number, touches the disk or
the network, or computes with a float (a query's feature rows are floats, carried but never used
here; the state and its canonical form are integers and strings). Messages reach this module already authenticated (their
signature checked by ``p2pml.wire``); this module checks what they say.

Votes are committed before they are seen: a peer first signs the hash of its vote (``Commit``),
and reveals the vote (``Reveal``) once it holds the others' commits, listing whose commits it
held. A vote counts only if most of the other revealers' power saw its commit before revealing,
so a vote made after looking at the others' (a copycat's) is never judged nor counted.

Determinism: rounds are applied in the order of ``(query lamport, round id)``, which depends on
message content alone; votes are iterated in sorted author order; every quantity is an integer.
A message that arrives late dirties the ledger from its round on, and the next read replays from
the nearest checkpoint before it, so the result equals a from-scratch fold over the same set.
Old rounds can be dropped from memory (``Ledger.prune``); a message reaching behind that is
held and flagged (``stale``) until everything is folded again (``replay``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from p2pml.ids import IdTable

# ---------------------------------------------------------------------------------------------
# Constants (docs/ledger.md explains each one)
# ---------------------------------------------------------------------------------------------

LEDGER_VERSION = 4
CLASSES = ("setosa", "versicolor", "virginica")  # the default task's (Iris)
IRIS_FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
CLASSIFICATION, REGRESSION = "classification", "regression"
VALUE_ONE = 1_000_000  # regression votes are integers in millionths of the target's unit
MAX_VALUE = 2**53  # |vote| at most this (exact in any JSON reader)

DEPOSIT = 1000  # stake, in whole tokens, that every registration brings
STAKE_FLOOR = 500  # a peer whose stake falls below this is ejected
GENESIS_BALANCE = 9000  # the balance each genesis seat's account gets, besides its staked deposit
MAX_AMOUNT = 2**53  # a transfer's amount, a genesis account's balance: at most this

WEIGHT_ONE = 1_000_000  # weights are integers in millionths: WEIGHT_ONE means 1.0
INITIAL_WEIGHT = WEIGHT_ONE // 2
WEIGHT_STEP_QUOTIENT = 10  # each vote moves the weight 1/10 of the way toward 1 (agree) or 0

ACCURACY_WINDOW = 20  # votes a peer's agreement is judged over
MIN_AGREEMENT_BPS = 6_000  # below 60% agreement over a full window: slashed
INACCURACY_SLASH_BPS = 1_000  # 10% of stake per judged window
EQUIVOCATION_SLASH_BPS = 5_000  # 50% of stake, then ejected for good
BPS = 10_000  # basis points in one whole

PROBA_ONE = 1_000_000  # class probabilities travel as integers in millionths
COMMIT_DOMAIN = b"p2pml/commit\x00"  # a commitment hash means nothing elsewhere
QUERY_VOTE_DOMAIN = b"p2pml/query-vote\x00"  # what an issuer's commit in its query binds
CARD_DOMAIN = "p2pml-card"  # a card's id is the hash of its canonical JSON under this tag
CARD_FRAMEWORKS = ("builtin", "sklearn", "onnx")  # a built-in kind, a skops file, an ONNX file

STATUS_ACTIVE = "active"
STATUS_EJECTED = "ejected"

CHECKPOINT_EVERY = 8  # rounds between replay checkpoints (memory against replay time)
OUTCOMES_KEPT = 8192  # outcomes of the latest rounds kept for answering clients
PRUNE_EVERY = 4096  # messages between prunes while ``replay`` folds

# Why ``Ledger.add`` holds a message back without judging it invalid: it may be valid later.
NOT_A_MEMBER = "author holds no seat (no registration held for this key)"
NOT_AN_ACCOUNT = "author has no account (no genesis balance, registration or transfer to it held)"
HELD_BACK = (NOT_A_MEMBER, NOT_AN_ACCOUNT)

# ---------------------------------------------------------------------------------------------
# Message types (shape is checked by p2pml.wire before these are built)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Card:
    """What a member's model is, signed by the member: anyone can re-check it (docs/ledger.md).

    ``params``: SHA-256 of a canonical encoding of the model's parameters (not of a file);
    ``data_root``: the RFC 6962 Merkle root of the ``rows`` training rows it was fitted on;
    ``score_bps``: the held-out score its owner claims (accuracy, or R^2, in basis points);
    ``previous``: the id of the card this one replaces (empty in a registration)."""

    framework: str
    model: str
    params: bytes
    data_root: bytes
    rows: int
    score_bps: int
    previous: bytes = b""

    def canonical(self) -> dict:
        return {"framework": self.framework, "model": self.model, "params": self.params.hex(),
                "data_root": self.data_root.hex(), "rows": self.rows, "score_bps": self.score_bps,
                "previous": self.previous.hex()}

    def id(self) -> bytes:
        return hashlib.sha256(_canonical_json([CARD_DOMAIN, self.canonical()])).digest()


@dataclass(frozen=True, slots=True)
class Register:
    """Binds a key to one genesis slot, brings the deposit, and states the model (its card)."""

    name: str
    card: Card
    deposit: int


@dataclass(frozen=True, slots=True)
class Update:
    """A member's new model card (a node restarted with another model): in force for the
    rounds whose query lamport is above ``lamport``; ``card.previous`` names the card it
    replaces."""

    lamport: int
    card: Card


@dataclass(frozen=True, slots=True)
class Query:
    """Opens one round per item; a batch shares one signature. ``commits`` (empty, or one per
    item): the issuer's own vote on each of its rounds, committed before anyone saw the rows;
    the commitment binds ``query_binding(author, lamport, index)``, since the round id (the hash
    of this very message) cannot be inside it."""

    lamport: int
    items: tuple[tuple[float, ...], ...]
    commits: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Commit:
    """A vote, hidden: ``digest = commitment(author, round, label, proba, salt)``."""

    round: bytes
    digest: bytes


@dataclass(frozen=True, slots=True)
class Reveal:
    """The vote behind a commit, and whose commits on this round the author held when it
    revealed (``seen``, keys): the evidence of who could not have copied this vote."""

    round: bytes
    label: int
    proba: tuple[int, ...]
    salt: bytes
    seen: frozenset[bytes]


@dataclass(frozen=True, slots=True)
class Votes:
    """One peer's commits on new rounds and reveals on earlier ones, under one signature."""

    lamport: int
    commits: tuple[Commit, ...]
    reveals: tuple[Reveal, ...]


@dataclass(frozen=True, slots=True)
class Transfer:
    """Moves ``amount`` of the author's balance to the account of key ``to``. Applied in the
    order of ``(lamport, transfer id)`` among the rounds, if ``seq`` is the author's next
    sequence number (one more than its transfers applied) and the balance covers it; otherwise
    void (held, and changing nothing): a replay, or a transfer of more than the balance."""

    lamport: int
    seq: int
    to: bytes
    amount: int


@dataclass(frozen=True, slots=True)
class Message:
    """An authenticated message: ``id`` is the hash of the signed bytes, ``author`` the key."""

    id: bytes
    author: bytes
    body: Register | Query | Votes | Update | Transfer


@dataclass(frozen=True, slots=True)
class Task:
    """What the network predicts. Part of the genesis: messages never cross tasks.

    ``rows_root``: the RFC 6962 Merkle root of the task's rows (see p2pml.task); ``categories``:
    per feature, the names of its categories (a query may give the name for its code), empty
    for a number. Regression: a vote agrees with the consensus when it lies within
    ``max(band_bps x |consensus| / BPS, tolerance)`` of it (``tolerance`` in VALUE_ONE units)."""

    name: str
    kind: str
    features: tuple[str, ...]
    classes: tuple[str, ...] = ()
    rows: int = 0
    rows_root: bytes = b""
    categories: tuple[tuple[str, ...], ...] = ()
    feature_range: tuple[int, int] = (-10**9, 10**9)
    band_bps: int = 0
    tolerance: int = 0

    @property
    def regression(self) -> bool:
        return self.kind == REGRESSION

    def canonical(self) -> dict:
        return {"name": self.name, "kind": self.kind, "features": list(self.features),
                "classes": list(self.classes), "rows": self.rows, "rows_root": self.rows_root.hex(),
                "categories": [list(c) for c in self.categories],
                "feature_range": list(self.feature_range), "band_bps": self.band_bps,
                "tolerance": self.tolerance}


# The task of a network whose peers file has no [task] (p2pml.task builds it from the data and
# a test checks that it equals this).
IRIS = Task("iris", CLASSIFICATION, IRIS_FEATURES, CLASSES, 150,
            bytes.fromhex("926a8712d8d8091936f0ae8cf7bd4706264865f05dda6d780ac35c52dcdc5d6c"), (), (0, 100))


@dataclass(frozen=True, slots=True)
class Slot:
    """A genesis seat: who may register for it, optionally pinned to one key. (Which model a
    member runs is not part of the genesis: it is in the member's signed card.)"""

    name: str
    key: bytes | None = None


@dataclass(frozen=True, slots=True)
class Genesis:
    slots: tuple[Slot, ...]
    task: Task = IRIS
    accounts: tuple[tuple[bytes, int], ...] = ()  # (key, balance): funded keys besides the seats

    def id(self) -> bytes:
        """Network identity: signatures bind to it, so messages cannot cross networks (or tasks)."""
        canon = [[s.name, s.key.hex() if s.key else None] for s in self.slots]
        accounts = [[key.hex(), balance] for key, balance in sorted(self.accounts)]
        return hashlib.sha256(_canonical_json(
            ["p2pml-genesis", LEDGER_VERSION, self.task.canonical(), canon, accounts])).digest()

    @property
    def supply(self) -> int:
        """Every token there is: each seat's deposit and balance, and the genesis accounts'."""
        return len(self.slots) * (DEPOSIT + GENESIS_BALANCE) + sum(b for _, b in self.accounts)


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class PeerState:
    name: str
    key: bytes
    stake: int = DEPOSIT
    weight: int = INITIAL_WEIGHT
    status: str = STATUS_ACTIVE
    reason: str = ""
    history: str = ""  # the current window's agreement, "1" agreed / "0" not, oldest first
    votes: int = 0
    agreed: int = 0
    slashed: int = 0
    equivocation: tuple[str, str, str] | None = None  # (round, message id, message id)
    late: int = 0  # votes committed after most of the others had revealed: neither judged nor counted
    unrevealed: int = 0  # timely commits not revealed: each cost weight as a wrong vote (not stake)
    rewarded: int = 0  # stake received from the pool of slashed stake (see pay_pool)

    def copy(self) -> PeerState:
        return PeerState(
            self.name, self.key, self.stake, self.weight, self.status, self.reason,
            self.history, self.votes, self.agreed, self.slashed, self.equivocation, self.late,
            self.unrevealed, self.rewarded,
        )

    def canonical(self) -> dict:
        return {
            "name": self.name,
            "key": self.key.hex(),
            "stake": self.stake,
            "weight": self.weight,
            "status": self.status,
            "reason": self.reason,
            "history": self.history,
            "votes": self.votes,
            "agreed": self.agreed,
            "slashed": self.slashed,
            "equivocation": list(self.equivocation) if self.equivocation else None,
            "late": self.late,
            "unrevealed": self.unrevealed,
            "rewarded": self.rewarded,
        }


@dataclass(slots=True)
class State:
    peers: dict[str, PeerState] = field(default_factory=dict)  # by peer id
    rounds: int = 0  # rounds settled (rounds with at least one counted vote)
    pool: int = 0  # slashed stake not paid out yet (see pay_pool)
    # peer id -> its chain of model cards, oldest first: (the lamport above which each is in
    # force, card, its id). Set from the held registrations and updates, not folded round by round.
    cards: dict[str, tuple[tuple[int, Card, bytes], ...]] = field(default_factory=dict)
    accounts: dict[bytes, tuple[int, int]] = field(default_factory=dict)  # key -> (balance, seq)
    unclaimed: int = 0  # the deposits and balances of seats nobody has registered for yet
    transfers: int = 0  # applied
    void: int = 0  # transfers held that changed nothing (a used sequence number, too little balance)

    def copy(self) -> State:
        return State({k: p.copy() for k, p in self.peers.items()}, self.rounds, self.pool, self.cards,
                     dict(self.accounts), self.unclaimed, self.transfers, self.void)

    def total(self) -> int:
        """Balances, stakes, the pool and unclaimed: always the genesis supply."""
        return (sum(b for b, _ in self.accounts.values()) + sum(p.stake for p in self.peers.values())
                + self.pool + self.unclaimed)

    def card(self, pid: str) -> Card | None:
        """The card a member's latest votes count under."""
        chain = self.cards.get(pid)
        return chain[-1][1] if chain else None

    def card_by_id(self, pid: str, cid: bytes) -> Card | None:
        return next((card for _, card, i in self.cards.get(pid, ()) if i == cid), None)

    def canonical(self) -> dict:
        return {
            "version": LEDGER_VERSION,
            "rounds": self.rounds,
            "pool": self.pool,
            "peers": {pid: self.peers[pid].canonical() for pid in sorted(self.peers)},
            "cards": {pid: [{**card.canonical(), "id": cid.hex(), "after_lamport": lamport}
                            for lamport, card, cid in self.cards[pid]] for pid in sorted(self.cards)},
            "accounts": {key.hex(): {"balance": b, "seq": seq} for key, (b, seq) in sorted(self.accounts.items())},
            "unclaimed": self.unclaimed,
            "transfers": self.transfers,
            "void": self.void,
        }


@dataclass(frozen=True, slots=True)
class CountedVote:
    peer: str
    label: int
    proba: tuple[int, ...]
    weight: int  # the voter's weight and stake before this round
    stake: int
    message: bytes  # the reveal (the lowest id among the reveals of this vote)
    commit: bytes  # the commit it opens
    card: bytes = b""  # the id of the voter's model card in force for this round


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one round was decided, with the weights that applied at the time. ``consensus``:
    a class index, or for regression a value in VALUE_ONE units."""

    round: bytes
    consensus: int | None
    votes: tuple[CountedVote, ...]
    late: tuple[str, ...] = ()  # peer ids whose vote came too late to count
    late_votes: tuple[CountedVote, ...] = ()  # the revealed ones among them (shown, not counted)
    unrevealed: tuple[str, ...] = ()  # peer ids judged for a commit they never revealed


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def peer_id(key: bytes) -> str:
    """A peer's id: the first 16 bytes of the SHA-256 of its Ed25519 public key, in hex."""
    return hashlib.sha256(key).digest()[:16].hex()


def round_id(query_id: bytes, index: int) -> bytes:
    """Round ids derive from the query message, so nobody can choose another peer's round."""
    return hashlib.sha256(query_id + index.to_bytes(4, "big")).digest()[:16]


def query_binding(author: bytes, lamport: int, index: int) -> bytes:
    """What the issuer's commit carried in its query binds instead of the round id (16 bytes,
    like a round id): the author, the query's lamport and the item's index."""
    return hashlib.sha256(QUERY_VOTE_DOMAIN + author + lamport.to_bytes(8, "big")
                          + index.to_bytes(4, "big")).digest()[:16]


def commitment(author: bytes, rid: bytes, label: int, proba: tuple[int, ...], salt: bytes) -> bytes:
    """What a Commit carries. The author is inside, so nobody can commit to another's hash
    and reveal that peer's vote as its own; the salt makes three possible labels unguessable."""
    # a class index as one byte; a regression value (no probabilities) as 8, signed
    parts = [COMMIT_DOMAIN, author, rid, bytes([label]) if proba else label.to_bytes(8, "big", signed=True)]
    parts += [p.to_bytes(4, "big") for p in proba]
    parts.append(salt)
    return hashlib.sha256(b"".join(parts)).digest()


def _pairs(flat: tuple):
    """The (key, value) pairs of a flat tuple ``(key, value, key, value, ...)``."""
    return zip(flat[::2], flat[1::2])


def _get(flat: tuple, key, default=None):
    """The value for ``key`` in ``flat`` (see ``_pairs``), or ``default``."""
    for i in range(0, len(flat), 2):
        if flat[i] == key:
            return flat[i + 1]
    return default


def _with(flat: tuple, key, value) -> tuple:
    """``flat`` with ``key`` set to ``value``. Flat tuples rather than dicts for what the ledger
    keeps per round and author: nearly always one entry, and a node keeps every round it saw (a
    one-entry dict costs 224 bytes, this tuple 56)."""
    for i in range(0, len(flat), 2):
        if flat[i] == key:
            return (*flat[:i + 1], value, *flat[i + 2:])
    return (*flat, key, value)


def compute_root(state: State) -> str:
    return hashlib.sha256(_canonical_json(state.canonical())).hexdigest()


def is_active(peer: PeerState) -> bool:
    return peer.status == STATUS_ACTIVE


def power(peer: PeerState) -> int:
    return peer.stake * peer.weight


def compute_consensus(task: Task, votes: list[tuple[PeerState, int, tuple[int, ...]]]) -> int:
    """The consensus of ``votes`` ``(peer, label, proba)``, each weighted by its voting power
    (stake x weight), or all alike if no voter has any power.

    Classification, a soft vote: the class with the largest weighted sum of the revealed
    probabilities, a tie to the lowest class. Regression: the weighted median of the values
    (the lowest value at which the weight at or below it reaches half of the total)."""
    powers = [power(peer) for peer, _, _ in votes]
    if not any(powers):
        powers = [1] * len(votes)
    if task.kind == REGRESSION:
        return weighted_median(sorted(zip([label for _, label, _ in votes], powers)))
    totals = [0] * len(votes[0][2])
    for (_, _, proba), weight in zip(votes, powers):
        totals = [t + weight * p for t, p in zip(totals, proba)]
    return totals.index(max(totals))  # the first of the largest: a tie keeps the lower class


def weighted_median(ordered: list[tuple[int, int]]) -> int:
    """The lower weighted median of ``(value, weight)`` pairs sorted by value."""
    total = sum(weight for _, weight in ordered)
    below = 0
    for value, weight in ordered:
        below += weight
        if 2 * below >= total:
            return value
    raise ValueError("no votes")


def agrees(task: Task, label: int, consensus: int) -> bool:
    """Whether a vote agrees with the consensus: the same class, or for regression a value
    within the task's band around it."""
    if task.kind != REGRESSION:
        return label == consensus
    return abs(label - consensus) <= max(task.band_bps * abs(consensus) // BPS, task.tolerance)


def assess(task: Task, peer: PeerState,
           revealed: list[tuple[PeerState, int, tuple[int, ...], frozenset[bytes]]],
           whole: int | None = None) -> int | None:
    """Whether ``peer``'s vote is timely, and if so what it is judged against.

    Its **vouchers** are the other revealers ``(peer, label, proba, seen)`` whose ``seen``
    holds its key: they held its commit before revealing, so it provably could not have seen
    their votes when it committed (a reveal cannot list a commit that did not exist yet). The
    vote is timely if its vouchers hold more than half of the power of all the other revealers
    (by count if those have no power); a vote committed after looking at the others' reveals
    fails this, and so does a vote nobody else revealed on. Returns None if not timely, else
    the consensus of its vouchers' votes and its own (``compute_consensus`` over them): each
    member is judged by the votes it could not have copied, weighed as in the round's answer,
    so that two colluders among five cannot tie the two other honest votes of a leave-one-out
    judgement (a soft vote of confident liars would win every such tie). ``whole``, if given,
    is ``compute_consensus`` over every revealed vote: what a member every other revealer
    vouched for is judged against (the common case, computed once a round)."""
    vouchers = []
    own = None
    total = others = saw = 0
    for other, label, proba, seen in revealed:
        if other is peer:
            own = (other, label, proba)
            continue
        weight = power(other)
        total += weight
        others += 1
        if peer.key in seen:
            saw += weight
            vouchers.append((other, label, proba))
    if total == 0:
        total, saw = others, len(vouchers)
    if not vouchers or 2 * saw <= total:
        return None
    if whole is not None and len(vouchers) == others:
        return whole
    if own is not None:
        vouchers.append(own)
    return compute_consensus(task, vouchers)


def compute_weight(weight: int, agreed: bool) -> int:
    """Move 1/WEIGHT_STEP_QUOTIENT of the way to WEIGHT_ONE or 0, rounding the step up."""
    if agreed:
        return weight + -(-(WEIGHT_ONE - weight) // WEIGHT_STEP_QUOTIENT)
    return weight - -(-weight // WEIGHT_STEP_QUOTIENT)


def decrease_stake(state: State, peer: PeerState, bps: int) -> int:
    """Slash ``bps`` of the peer's stake (rounded down, clamped at zero) into the pool; return
    the amount."""
    amount = min(peer.stake, peer.stake * bps // BPS)
    peer.stake -= amount
    peer.slashed += amount
    state.pool += amount
    return amount


def pay_pool(state: State, recipients: list[tuple[PeerState, int]]) -> None:
    """The whole pool to ``recipients`` (peer, power before the round), each
    ``pool * power // total power``; the integer remainder stays in the pool."""
    total = sum(p for _, p in recipients)
    if not state.pool or not total:
        return
    pot = state.pool
    for peer, p in recipients:
        share = pot * p // total
        peer.stake += share
        peer.rewarded += share
        state.pool -= share


def eject(peer: PeerState, reason: str) -> None:
    if peer.status != STATUS_EJECTED:
        peer.status = STATUS_EJECTED
        peer.reason = reason


def slash_equivocation(state: State, peer: PeerState, evidence: tuple[str, str, str],
                       reason: str = "equivocation") -> None:
    """Once per peer, whatever the order or number of pieces of evidence. Two different commits
    on one round, or a reveal that does not match the commit, are both signed contradictions."""
    if peer.equivocation is not None:
        return
    peer.equivocation = evidence
    decrease_stake(state, peer, EQUIVOCATION_SLASH_BPS)
    peer.status = STATUS_EJECTED
    peer.reason = reason


def judge(state: State, peer: PeerState, agreed: bool) -> None:
    """One judged vote: the weight moves, the counts grow, the accuracy window is checked."""
    peer.weight = compute_weight(peer.weight, agreed)
    peer.votes += 1
    peer.agreed += agreed
    process_accuracy(state, peer, agreed)


def process_accuracy(state: State, peer: PeerState, agreed: bool) -> None:
    """Judge a full window of votes; a window below the threshold is slashed once, then reset."""
    peer.history += "1" if agreed else "0"
    if len(peer.history) < ACCURACY_WINDOW:
        return
    if peer.history.count("1") * BPS < MIN_AGREEMENT_BPS * ACCURACY_WINDOW:
        decrease_stake(state, peer, INACCURACY_SLASH_BPS)
        peer.history = ""
        if peer.stake < STAKE_FLOOR:
            eject(peer, "stake below floor")
    else:
        peer.history = peer.history[1:]


def apply_transfer(state: State, author: bytes, body: Transfer) -> str | None:
    """Move the amount if the sequence number is the author's next and the balance covers it.
    Returns None if applied, else why it is void."""
    balance, seq = state.accounts.get(author, (0, 0))
    if body.seq != seq + 1:
        state.void += 1
        return f"sequence number {body.seq} is not the next one ({seq + 1})"
    if body.amount > balance:
        state.void += 1
        return f"amount {body.amount} is more than the balance {balance}"
    state.accounts[author] = (balance - body.amount, seq + 1)
    to_balance, to_seq = state.accounts.get(body.to, (0, 0))
    state.accounts[body.to] = (to_balance + body.amount, to_seq)
    state.transfers += 1
    return None


# ---------------------------------------------------------------------------------------------
# The ledger
# ---------------------------------------------------------------------------------------------


class Ledger:
    """Holds the valid messages and folds them into a State, incrementally but exactly."""

    def __init__(self, genesis: Genesis):
        self.genesis = genesis
        self.task = genesis.task
        self._slots = {s.name: s for s in genesis.slots}
        # id of every message held -> its author's place in _authors: the contents live on in
        # the per-round tables below (nothing is stored twice), until ``prune`` drops those of
        # old rounds; the ids stay, compactly (``IdTable``: a long-running node keeps them all)
        self.held = IdTable(32)
        self._authors: list[bytes] = []
        self._author_index: dict[bytes, int] = {}
        self._registrations: dict[str, list[Message]] = {}
        self._updates: dict[bytes, list[Message]] = {}  # key -> its valid model card updates
        self._cards: dict[str, tuple[tuple[int, Card, bytes], ...]] = {}  # peer id -> chain (see State)
        self._queries: dict[bytes, tuple[int, bytes]] = {}  # round -> (lamport, round)
        self._order: list[tuple[int, bytes]] = []
        # round -> author -> (digest, lowest message id, ...); two digests mean equivocation
        self._commits: dict[bytes, dict[bytes, tuple]] = {}
        # round -> author -> ((label, proba, salt), (seen, lowest message id, ...), ...)
        self._reveals: dict[bytes, dict[bytes, tuple]] = {}
        self.lamport = 0
        self._checkpoints: list[State] = []  # state before round CHECKPOINT_EVERY * i
        self._dirty: int | None = 0  # first position in _order not reflected in _state
        self._state = State()
        self._root: str | None = None
        self._last_root: str | None = None
        self._seats: dict[bytes, Message] = {}  # key -> its winning registration
        self._registered: set[bytes] = set()  # keys with a valid registration (seat or not)
        self._round_author: dict[bytes, bytes] = {}  # round -> the key that asked
        self._query_of: dict[bytes, bytes] = {}  # round -> the id of the query that asked
        self._bound: dict[bytes, bytes] = {}  # round -> what its issuer's commit in the query binds
        self._members: dict[bytes, str] = {}  # key -> peer id, for the members of genesis_state
        self._outcomes: dict[bytes, Outcome] = {}
        # Rounds whose tables ``prune`` dropped, folded into the first checkpoint for good.
        self._pruned = IdTable(16)
        self._floor: tuple[int, bytes] | None = None  # the key of the last pruned round
        # A held message touches a pruned round (or changes the seats after a prune): the state
        # does not reflect it, and only a fold of every message can (``replay``).
        self.stale = False
        self.reached_back = 0  # messages that made it stale, or found it so: how many so far
        # Transfers sort among the rounds, at (lamport, the first 16 bytes of their id).
        self._transfers: dict[bytes, Message] = {}
        self._transfer_results: dict[bytes, str | None] = {}  # transfer id -> why void (None: applied)
        self._funded = {key for key, _ in genesis.accounts}  # keys a transfer may come from

    # -- intake -------------------------------------------------------------------------------

    def add(self, msg: Message) -> str | None:
        """Hold a message. Returns None if held (or already held), else why it is rejected."""
        if msg.id in self.held:
            return None
        body = msg.body
        if isinstance(body, Transfer):
            return self._add_transfer(msg)
        if not isinstance(body, Register) and msg.author not in self._registered:
            # [IGNORE] not held: re-offered by anti-entropy once its registration is here.
            # (Whether the key holds a seat is decided in the fold: seats can change hands.)
            return NOT_A_MEMBER
        if isinstance(body, Register):
            reason = self._check_register(msg.author, body)
            if reason:
                return reason
            self._registrations.setdefault(body.name, []).append(msg)
            self._registered.add(msg.author)
            self._funded.add(msg.author)
            seats = self._assign_seats()
            # Membership changed (a key won, lost or changed seats): replay from genesis.
            if {k: m.id for k, m in seats.items()} != {k: m.id for k, m in self._seats.items()}:
                if self._pruned:
                    self._reach_back(True)
                else:
                    self._checkpoints = []
                    self._mark_dirty(0)
            self._seats = seats
            self._chain_cards()
        elif isinstance(body, Update):
            reason = self._check_card(body.card, update=True)
            if reason:
                return reason
            self._updates.setdefault(msg.author, []).append(msg)
            before = self._cards
            self._chain_cards()
            if self._cards != before:  # votes from its lamport on count under another card
                self._root = None
                self._state.cards = self._cards
                self._mark_dirty(bisect.bisect_left(self._order, (body.lamport + 1, b"")))
        elif isinstance(body, Query):
            if body.commits and len(body.commits) != len(body.items):
                return "a query carries one commit per item, or none"
            for i in range(len(body.items)):
                rid = round_id(msg.id, i)
                key = (body.lamport, rid)
                if self._floor is not None and key < self._floor:
                    # it sorts among the pruned rounds, and counts as one (a query by a key
                    # without a seat changes nothing there, unless the key wins one: see
                    # Register)
                    self._pruned.add(rid)
                    self._reach_back(msg.author in self._seats)
                    continue
                self._queries[rid] = key
                self._round_author[rid] = msg.author
                self._query_of[rid] = msg.id
                if body.commits:  # the issuer's own vote, committed with the question
                    authors = self._commits.setdefault(rid, {})
                    authors[msg.author] = _with(authors.get(msg.author, ()), body.commits[i], msg.id)
                    self._bound[rid] = query_binding(msg.author, body.lamport, i)
                pos = bisect.bisect_left(self._order, key)
                self._order.insert(pos, key)
                self._mark_dirty(pos)
        elif isinstance(body, Votes):
            reason = self._check_reveals(body.reveals)
            if reason:
                return reason
            for items in (body.commits, body.reveals):
                if len({item.round for item in items}) != len(items):
                    return "a vote message holds at most one commit and one reveal per round"
            # The lowest id, not the first arrival: evidence must not depend on timing.
            # On a pruned round, a vote by a key without a seat changes nothing (the fold skips
            # it; if the key wins a seat later, that registration makes the ledger stale): only
            # a member can make every node fold everything again.
            member = msg.author in self._seats
            for c in body.commits:
                # (a held query's round is not pruned: only the others are looked up there)
                if c.round not in self._queries and c.round in self._pruned:
                    self._reach_back(member)
                    continue
                authors = self._commits.setdefault(c.round, {})
                digests = authors.get(msg.author, ())
                known = _get(digests, c.digest)
                if known is None or msg.id < known:
                    authors[msg.author] = _with(digests, c.digest, msg.id)
                self._touch(c.round)
            for r in body.reveals:
                if r.round not in self._queries and r.round in self._pruned:
                    self._reach_back(member)
                    continue
                authors = self._reveals.setdefault(r.round, {})
                contents = authors.get(msg.author, ())
                content = (r.label, r.proba, r.salt)
                variants = _get(contents, content, ())
                known = _get(variants, r.seen)
                if known is None or msg.id < known:
                    authors[msg.author] = _with(contents, content, _with(variants, r.seen, msg.id))
                self._touch(r.round)
        else:  # pragma: no cover - wire builds only the types above
            return f"unknown message type {type(body).__name__}"
        if isinstance(body, (Query, Update)):  # only these are ordered by lamport
            self.lamport = max(self.lamport, body.lamport)
        self._held(msg)
        return None

    def _held(self, msg: Message) -> None:
        index = self._author_index.get(msg.author)
        if index is None:
            index = self._author_index[msg.author] = len(self._authors)
            self._authors.append(msg.author)
        self.held.add(msg.id, index)

    def _add_transfer(self, msg: Message) -> str | None:
        """[IGNORE] a transfer from a key no held message funds: it may be funded later (held
        back, like a member's messages before its registration). So a flood of transfers from
        fresh keys is not held: each key must be paid first."""
        body = msg.body
        if body.to == msg.author:
            return "a transfer to oneself"
        if msg.author not in self._funded:
            return NOT_AN_ACCOUNT
        self._funded.add(body.to)
        self.lamport = max(self.lamport, body.lamport)
        key = (body.lamport, msg.id[:16])
        self._held(msg)
        if self._floor is not None and key < self._floor:
            self._pruned.add(key[1])
            self._reach_back(True)
            return None
        self._transfers[key[1]] = msg
        pos = bisect.bisect_left(self._order, key)
        self._order.insert(pos, key)
        self._mark_dirty(pos)
        return None

    def transfer_result(self, mid: bytes) -> tuple[bool, str | None] | None:
        """For a held transfer: ``(applied, why it is void or None)``; None if it is not held
        here, or its place in the order was pruned."""
        tid = mid[:16]
        msg = self._transfers.get(tid)
        if msg is None or msg.id != mid:
            return None
        pos = bisect.bisect_left(self._order, (msg.body.lamport, tid))
        self._settle(pos)
        reason = self._transfer_results.get(tid)
        return reason is None, reason

    def author_of(self, mid: bytes) -> bytes | None:
        """The author of a held message (None if not held)."""
        index = self.held.get(mid)
        return None if index is None else self._authors[index]

    def _check_reveals(self, reveals) -> str | None:
        """A classification vote: a class index, one probability per class (in PROBA_ONE
        units, adding up to at most PROBA_ONE plus one per class for rounding), its class
        among the most probable. A regression vote: a value within MAX_VALUE, no probabilities."""
        n = len(self.task.classes)
        for r in reveals:
            if self.task.kind == REGRESSION:
                if r.proba or not -MAX_VALUE <= r.label <= MAX_VALUE:
                    return "a regression vote is a value of at most 2**53 and no probabilities"
                continue
            if not 0 <= r.label < n:
                return f"vote label {r.label} is not a class index (the task has {n} classes)"
            if len(r.proba) != n:
                return f"a vote gives {len(r.proba)} probabilities; the task has {n} classes"
            if sum(r.proba) > PROBA_ONE + n or r.proba[r.label] != max(r.proba):
                return "a vote's probabilities add up to more than 1, or its class is not the most probable"
        return None

    def _check_card(self, card: Card, update: bool = False) -> str | None:
        if card.framework not in CARD_FRAMEWORKS:
            return f"model card framework {card.framework!r} is not one of {', '.join(CARD_FRAMEWORKS)}"
        if len(card.params) != 32 or len(card.data_root) != 32:
            return "a model card's params and data_root are SHA-256 hashes (32 bytes)"
        if not 0 <= card.rows <= MAX_VALUE or not -MAX_VALUE <= card.score_bps <= BPS:
            return "a model card's rows or score_bps is out of range"
        if update != bool(card.previous) or (update and len(card.previous) != 32):
            return ("an update's card names the card it replaces (32 bytes); a registration's "
                    "card names none")
        return None

    def _chain_cards(self) -> None:
        """Each member's card chain: its winning registration's card, then, repeatedly, the
        update that names the last card as ``previous`` with a higher lamport (of several, the
        lowest (lamport, id)). A card is in force for the rounds whose query lamport is above
        the update's (the registration's: from the start)."""
        cards = {}
        for key, reg in self._seats.items():
            chain = [(0, reg.body.card, reg.body.card.id())]
            updates = sorted(self._updates.get(key, ()), key=lambda m: (m.body.lamport, m.id))
            for msg in updates:
                lamport, _, cid = chain[-1]
                if msg.body.card.previous == cid and msg.body.lamport > lamport:
                    chain.append((msg.body.lamport, msg.body.card, msg.body.card.id()))
            cards[peer_id(key)] = tuple(chain)
        self._cards = cards

    def card_at(self, pid: str, lamport: int) -> bytes:
        """The id of member ``pid``'s card in force for a round whose query has ``lamport``."""
        chain = self._cards.get(pid, ())
        if len(chain) == 1:
            return chain[0][2]
        found = b""
        for since, _, cid in chain:
            if since < lamport or not found:
                found = cid
        return found

    def _check_register(self, author: bytes, body: Register) -> str | None:
        slot = self._slots.get(body.name)
        if slot is None:
            return f"no genesis slot named {body.name!r}"
        reason = self._check_card(body.card)
        if reason:
            return reason
        if body.deposit != DEPOSIT:
            return f"deposit must be {DEPOSIT}, not {body.deposit}"
        if slot.key is not None and author != slot.key:
            return f"slot {body.name!r} is pinned to another key"
        return None

    def _reach_back(self, counts: bool) -> None:
        if counts:
            self.stale = True
            self.reached_back += 1

    def _touch(self, rid: bytes) -> None:
        key = self._queries.get(rid)
        if key is not None:  # otherwise it is counted when (if) the query arrives
            self._mark_dirty(bisect.bisect_left(self._order, key))

    def _mark_dirty(self, pos: int) -> None:
        self._dirty = pos if self._dirty is None else min(self._dirty, pos)

    # -- reads --------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        self._settle()
        return self._state

    @property
    def last_state(self) -> State:
        """The state as of the last read (possibly of the rounds up to one only), without
        folding in what arrived since (cheap; for decisions that need not be exact, like which
        votes are worth waiting for, or the names of peers)."""
        return self._state

    def root(self) -> str:
        state = self.state
        if self._root is None:
            self._root = self._last_root = compute_root(state)
        return self._root

    def last_root(self) -> str:
        """The root as of the last time all of the ledger was read (``root()``), without reading
        it again; at first, the current root."""
        return self._last_root or self.root()

    def outcome(self, rid: bytes) -> Outcome | None:
        """How round ``rid`` is decided, given what is held now (None if its query is not, or
        the round was pruned)."""
        key = self._queries.get(rid)
        if key is None:
            return None
        self._settle(bisect.bisect_left(self._order, key))
        found = self._outcomes.get(rid)
        if found is None and rid in self._queries and rid not in self._commits:
            return Outcome(rid, None, ())  # nobody voted: not settled
        return found

    @property
    def queries(self):
        """The rounds whose query is held (a read-only view)."""
        return self._queries.keys()

    def query_of(self, rid: bytes) -> bytes | None:
        """The id of the query message that opened a held round."""
        return self._query_of.get(rid)

    def committers(self, rid: bytes) -> set[bytes]:
        """Keys with a commit on this round (valid or not)."""
        return set(self._commits.get(rid, ()))

    def revealers(self, rid: bytes) -> set[bytes]:
        """Keys with a reveal on this round (matching or not)."""
        return set(self._reveals.get(rid, ()))

    def listed(self, rid: bytes) -> set[bytes]:
        """Keys that any reveal held on this round lists as committed."""
        return {key for contents in self._reveals.get(rid, {}).values()
                for variants in contents[1::2] for seen in variants[::2] for key in seen}

    def listings(self, rid: bytes) -> dict[bytes, set[bytes]]:
        """For each author with a reveal on this round, every key its reveals list."""
        return {author: {key for variants in contents[1::2] for seen in variants[::2] for key in seen}
                for author, contents in self._reveals.get(rid, {}).items()}

    def revealed_labels(self, rid: bytes) -> list[int]:
        """The label of a reveal of every author on this round (in author order)."""
        return [contents[0][0] for _, contents in sorted(self._reveals.get(rid, {}).items())]

    def commit_round(self, key: bytes, rid: bytes) -> bytes:
        """What ``key``'s commitment on round ``rid`` binds: ``query_binding`` for the issuer
        whose query carried its commit, the round id otherwise."""
        if key == self._round_author.get(rid) and rid in self._bound:
            return self._bound[rid]
        return rid

    def commits_of(self, key: bytes, rid: bytes) -> set[bytes]:
        return set(self._commits.get(rid, {}).get(key, ())[::2])

    def key(self, rid: bytes) -> tuple[int, bytes] | None:
        """Where round ``rid`` sorts, ``(query lamport, round id)``; None if its query is not
        held (or the round was pruned)."""
        return self._queries.get(rid)

    def is_pruned(self, rid: bytes) -> bool:
        """Whether ``prune`` dropped this round's tables (it still counts in the state)."""
        return rid not in self._queries and rid in self._pruned

    @property
    def rounds_held(self) -> int:
        """Rounds whose tables are in memory (those of the held queries not pruned)."""
        return len(self._order)

    # -- memory -------------------------------------------------------------------------------

    def prune(self, keep: int, before: tuple[int, bytes] | None = None) -> int:
        """Drop the tables of the oldest rounds, all but the latest ``keep`` (and none from
        the round key ``before`` on), once folded: their effect lives on in the checkpoint
        that the fold starts from, so the state and root do not change and memory no longer
        grows with the history (but for the ids of rounds and messages). A message that
        touches a dropped round later cannot be
        folded in: it is held, and sets ``stale`` (fold everything again with ``replay``).
        Returns the number of rounds dropped (a multiple of CHECKPOINT_EVERY)."""
        cut = len(self._order) - max(1, keep)  # the state after the last round is no checkpoint
        if before is not None:
            cut = min(cut, bisect.bisect_left(self._order, before))
        cut = cut // CHECKPOINT_EVERY * CHECKPOINT_EVERY
        if cut <= 0:
            return 0
        self._settle()  # leaves a checkpoint before every CHECKPOINT_EVERY-th position
        for _, rid in self._order[:cut]:
            self._pruned.add(rid)
            if self._transfers.pop(rid, None) is not None:
                self._transfer_results.pop(rid, None)
                continue
            del self._queries[rid]
            for table in (self._commits, self._reveals, self._round_author, self._query_of, self._bound,
                          self._outcomes):
                table.pop(rid, None)
        self._floor = self._order[cut - 1]
        del self._order[:cut]
        del self._checkpoints[:cut // CHECKPOINT_EVERY]
        return cut

    # -- the transition -----------------------------------------------------------------------

    def _assign_seats(self) -> dict[bytes, Message]:
        """Each seat (in name order) goes to its registration with the lowest message id whose
        author holds no seat yet. Pinned seats admit one key only, so this matters only for
        unpinned ones."""
        seats: dict[bytes, Message] = {}
        for name in sorted(self._registrations):
            for msg in sorted(self._registrations[name], key=lambda m: m.id):
                if msg.author not in seats:
                    seats[msg.author] = msg
                    break
        return seats

    def is_registered(self, key: bytes) -> bool:
        """Whether a valid registration by ``key`` is held (whether or not it won a seat)."""
        return key in self._registered

    def is_member(self, key: bytes) -> bool:
        return key in self._seats

    def members(self) -> set[bytes]:
        """The keys that hold a seat (active or not)."""
        return set(self._seats)

    def genesis_state(self) -> State:
        """Each seat taken brings its deposit (staked) and GENESIS_BALANCE to its key's
        account; the seats nobody holds yet keep theirs unclaimed."""
        state = State()
        for key, balance in self.genesis.accounts:
            state.accounts[key] = (balance, 0)
        for key, msg in sorted(self._seats.items(), key=lambda kv: kv[1].body.name):
            state.peers[peer_id(key)] = PeerState(msg.body.name, key)
            balance, seq = state.accounts.get(key, (0, 0))
            state.accounts[key] = (balance + GENESIS_BALANCE, seq)
        state.unclaimed = (len(self.genesis.slots) - len(self._seats)) * (DEPOSIT + GENESIS_BALANCE)
        self._members = {p.key: pid for pid, p in state.peers.items()}
        return state

    def _settle(self, through: int | None = None) -> None:
        """Fold in what arrived since the last read, up to and including position ``through``
        (all of it by default). A client's answer needs its own round only; the rounds after it
        are mostly still collecting votes, and folding them in at every answer tripled the
        ledger's work under load."""
        end = len(self._order) if through is None else through + 1
        if self._dirty is None or (through is not None and self._dirty >= end):
            return
        cp = min(self._dirty // CHECKPOINT_EVERY, len(self._checkpoints) - 1)
        if cp < 0:
            self._checkpoints = [self.genesis_state()]
            cp = 0
        del self._checkpoints[cp + 1 :]
        state = self._checkpoints[cp].copy()
        changed = False  # since the last checkpoint: if not, the next one is the same state
        for pos in range(cp * CHECKPOINT_EVERY, end):
            if pos and pos % CHECKPOINT_EVERY == 0 and pos // CHECKPOINT_EVERY == len(self._checkpoints):
                self._checkpoints.append(state.copy() if changed else self._checkpoints[-1])
                changed = False
            rid = self._order[pos][1]
            if rid in self._commits:  # a round nobody committed on changes nothing (fast path)
                self._process_round(state, rid)
                changed = True
            elif rid in self._transfers:
                msg = self._transfers[rid]
                self._transfer_results[rid] = apply_transfer(state, msg.author, msg.body)
                changed = True
        state.cards = self._cards
        self._state = state
        self._root = None
        self._dirty = end if end < len(self._order) else None
        if len(self._outcomes) > 2 * OUTCOMES_KEPT:
            keep = {rid for _, rid in self._order[-OUTCOMES_KEPT:]}
            self._outcomes = {r: o for r, o in self._outcomes.items() if r in keep}

    def _process_round(self, state: State, rid: bytes) -> None:
        if self._round_author[rid] not in self._members:
            self._outcomes[rid] = Outcome(rid, None, ())  # asked by a key that holds no seat
            return
        commits = self._commits.get(rid, {})
        reveals = self._reveals.get(rid, {})
        revealed: list[tuple[PeerState, int, tuple[int, ...], frozenset[bytes], tuple[bytes, bytes]]] = []
        unrevealed: list[PeerState] = []
        for author in sorted(commits.keys() | reveals.keys()):
            pid = self._members.get(author)
            digests = commits.get(author)
            if pid is None or not digests:
                continue  # not a member (yet), or a reveal waiting for its commit
            peer = state.peers[pid]
            if len(digests) > 2:
                first, second = sorted(digests[1::2])[:2]
                slash_equivocation(state, peer, (rid.hex(), first.hex(), second.hex()))
                continue
            digest, commit_id = digests
            contents = reveals.get(author, ())
            bound = self.commit_round(author, rid)
            wrong = [mid for content, variants in _pairs(contents)
                     if commitment(author, bound, *content) != digest for mid in variants[1::2]]
            if wrong:
                slash_equivocation(state, peer, (rid.hex(), commit_id.hex(), min(wrong).hex()),
                                   "reveal does not match its commit")
                continue
            if not is_active(peer):
                continue
            if not contents:
                unrevealed.append(peer)
                continue
            # One content (all match one digest); several reveals of it (a restart re-reveals):
            # each lists only commits held before it was signed, so their intersection is what
            # the earliest one saw.
            (label, proba, _), variants = contents[:2]
            seen = frozenset.intersection(*variants[::2])
            revealed.append((peer, label, proba, seen, (min(variants[1::2]), commit_id)))
        task = self.task
        evidence = [(p, label, proba, seen) for p, label, proba, seen, _ in revealed]
        # From the powers before the round: None if not timely, else the consensus of its
        # vouchers and its own vote.
        whole = compute_consensus(task, [v[:3] for v in evidence]) if evidence else None
        against = {p.key: assess(task, p, evidence, whole) for p in [v[0] for v in revealed] + unrevealed}
        judged = [v for v in revealed if against[v[0].key] is not None]
        missing = [p for p in unrevealed if against[p.key] is not None]
        late = sorted((p for p in [v[0] for v in revealed] + unrevealed
                       if against[p.key] is None and any(v[0] is not p for v in revealed)),
                      key=lambda p: p.key)
        # The answer: the timely votes; if none is (the voters were split apart, or one voted
        # alone), every revealed vote, and then nobody is judged.
        counted = judged or revealed
        if not counted:
            self._outcomes[rid] = Outcome(rid, None, ())
            return
        consensus = whole if len(counted) == len(revealed) else compute_consensus(
            task, [(p, label, proba) for p, label, proba, _, _ in counted])
        lamport = self._queries[rid][0]

        def counted_vote(p, label, proba, ids):
            pid = self._members[p.key]
            return CountedVote(pid, label, proba, p.weight, p.stake, *ids, self.card_at(pid, lamport))
        votes = tuple(counted_vote(p, label, proba, ids) for p, label, proba, _, ids in counted)
        late_votes = tuple(counted_vote(p, label, proba, ids)
                           for p, label, proba, _, ids in revealed if any(p is q for q in late))
        # Each judged vote is compared with the consensus of its vouchers and itself, all
        # computed from the powers before the round: the votes it cannot have copied.
        verdicts = [(peer, agrees(task, label, against[peer.key])) for peer, label, _, _, _ in judged]
        agreeing = [(peer, power(peer), peer.slashed) for peer, agreed in verdicts if agreed]
        state.rounds += 1
        for peer, agreed in verdicts:
            judge(state, peer, agreed)
        for peer in missing:
            # Committed in time, not revealed (yet): its weight falls as for a wrong vote, so
            # revealing only the guesses that turned out right earns nothing. Not entered in the
            # accuracy window: a reveal still on its way (a busy or cut-off peer) must not get
            # an honest peer slashed or ejected; when it arrives, the round is judged again.
            peer.unrevealed += 1
            peer.votes += 1
            peer.weight = compute_weight(peer.weight, False)
        for peer in late:
            peer.late += 1
        # Slashed stake goes to the peers whose votes agreed with this round's consensus (not to
        # one slashed in it), by their power before the round.
        pay_pool(state, [(p, pw) for p, pw, slashed in agreeing if p.slashed == slashed and is_active(p)])
        self._outcomes[rid] = Outcome(rid, consensus, votes, late=tuple(self._members[p.key] for p in late),
                                      late_votes=late_votes,
                                      unrevealed=tuple(self._members[p.key] for p in missing))


def replay(genesis: Genesis, count: int, get: Callable[[int], Message], keep: int,
           finish: bool = True) -> Ledger:
    """A ledger holding the messages ``get(0)`` .. ``get(count - 1)``, with the same state as
    adding them in any order, built without holding the tables of more than about ``keep``
    rounds (plus PRUNE_EVERY messages' worth) at any time (and a key and a position for every
    round and message, about 200 bytes each, while it runs): the messages are added in the order
    of the earliest round each touches, and what is behind them is pruned as it goes. For a
    long history (at start-up, or when a message touched a pruned round: ``Ledger.stale``).
    ``get`` decodes on demand (three times per message) so the caller need not hold them all
    decoded at once. Without ``finish``, the last rounds are left unpruned (for messages the
    caller still has to add)."""
    keys: dict[bytes, tuple[int, bytes]] = {}  # round -> its key, for every query
    for i in range(count):
        msg = get(i)
        if isinstance(msg.body, Query):
            for j in range(len(msg.body.items)):
                rid = round_id(msg.id, j)
                keys[rid] = (msg.body.lamport, rid)
    last = (1 << 64, b"")  # after every round: votes on rounds whose query is not held
    firsts: list[tuple[tuple[int, bytes], int]] = []
    for i in range(count):
        msg = get(i)
        body = msg.body
        if isinstance(body, (Register, Update, Transfer)):
            # seats and cards first: a later registration would make it stale; transfers in
            # the order they were held (which funded their authors before them)
            first = (-1, b"")
        elif isinstance(body, Query):
            first = min((keys[round_id(msg.id, j)] for j in range(len(body.items))), default=last)
        else:
            first = min((keys.get(item.round, last) for items in (body.commits, body.reveals)
                         for item in items), default=last)
        firsts.append((first, i))
    del keys
    firsts.sort()
    ledger = Ledger(genesis)
    for n, (first, i) in enumerate(firsts):
        if n % PRUNE_EVERY == 0 and n:
            ledger.prune(keep, before=first)
        ledger.add(get(i))
    if finish:
        ledger.prune(keep)
    return ledger
