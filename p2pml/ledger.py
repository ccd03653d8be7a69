"""The replicated ledger: a pure function of the genesis and the set of valid messages held.

Read top to bottom, like a consensus spec: constants, message types, state, helpers, then
the round transition. Nothing here reads a clock, draws a random number, touches the disk or
the network, or computes with a float (a query's feature rows are floats, carried but never used
here; the state and its canonical form are integers and strings). Messages reach this module already authenticated (their
signature checked by ``p2pml.wire``); this module checks what they say.

Determinism: rounds are applied in the order of ``(query lamport, round id)``, which depends on
message content alone; votes are iterated in sorted author order; every quantity is an integer.
A message that arrives late dirties the ledger from its round on, and the next read replays from
the nearest checkpoint before it, so the result equals a from-scratch fold over the same set.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------------------------
# Constants (docs/ledger.md explains each one)
# ---------------------------------------------------------------------------------------------

LEDGER_VERSION = 1
CLASSES = ("setosa", "versicolor", "virginica")

DEPOSIT = 1000  # stake, in whole tokens, that every registration brings
STAKE_FLOOR = 500  # a peer whose stake falls below this is ejected

WEIGHT_ONE = 1_000_000  # weights are integers in millionths: WEIGHT_ONE means 1.0
INITIAL_WEIGHT = WEIGHT_ONE // 2
WEIGHT_STEP_QUOTIENT = 10  # each vote moves the weight 1/10 of the way toward 1 (agree) or 0

ACCURACY_WINDOW = 20  # votes a peer's agreement is judged over
MIN_AGREEMENT_BPS = 6_000  # below 60% agreement over a full window: slashed
INACCURACY_SLASH_BPS = 1_000  # 10% of stake per judged window
EQUIVOCATION_SLASH_BPS = 5_000  # 50% of stake, then ejected for good
BPS = 10_000  # basis points in one whole

PROBA_ONE = 1_000_000  # class probabilities travel as integers in millionths

STATUS_ACTIVE = "active"
STATUS_EJECTED = "ejected"

CHECKPOINT_EVERY = 8  # rounds between replay checkpoints (memory against replay time)
OUTCOMES_KEPT = 8192  # outcomes of the latest rounds kept for answering clients

# ---------------------------------------------------------------------------------------------
# Message types (shape is checked by p2pml.wire before these are built)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Register:
    """Binds a key to one genesis slot and brings the deposit."""

    name: str
    model: str
    deposit: int


@dataclass(frozen=True, slots=True)
class Query:
    """Opens one round per item; a batch shares one signature."""

    lamport: int
    items: tuple[tuple[float, ...], ...]


@dataclass(frozen=True, slots=True)
class Vote:
    round: bytes
    label: int
    proba: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Votes:
    """One peer's votes on one or more rounds, under one signature."""

    lamport: int
    votes: tuple[Vote, ...]


@dataclass(frozen=True, slots=True)
class Message:
    """An authenticated message: ``id`` is the hash of the signed bytes, ``author`` the key."""

    id: bytes
    author: bytes
    body: Register | Query | Votes


@dataclass(frozen=True, slots=True)
class Slot:
    """A genesis seat: who may register, with which model, optionally pinned to one key."""

    name: str
    model: str
    key: bytes | None = None


@dataclass(frozen=True, slots=True)
class Genesis:
    slots: tuple[Slot, ...]

    def id(self) -> bytes:
        """Network identity: signatures bind to it, so messages cannot cross networks."""
        canon = [[s.name, s.model, s.key.hex() if s.key else None] for s in self.slots]
        return hashlib.sha256(_canonical_json(["p2pml-genesis", LEDGER_VERSION, canon])).digest()


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class PeerState:
    name: str
    model: str
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

    def copy(self) -> PeerState:
        return PeerState(
            self.name, self.model, self.key, self.stake, self.weight, self.status, self.reason,
            self.history, self.votes, self.agreed, self.slashed, self.equivocation,
        )

    def canonical(self) -> dict:
        return {
            "name": self.name,
            "model": self.model,
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
        }


@dataclass(slots=True)
class State:
    peers: dict[str, PeerState] = field(default_factory=dict)  # by peer id
    rounds: int = 0  # rounds settled (rounds with at least one counted vote)
    burned: int = 0

    def copy(self) -> State:
        return State({k: p.copy() for k, p in self.peers.items()}, self.rounds, self.burned)

    def canonical(self) -> dict:
        return {
            "version": LEDGER_VERSION,
            "rounds": self.rounds,
            "burned": self.burned,
            "peers": {pid: self.peers[pid].canonical() for pid in sorted(self.peers)},
        }


@dataclass(frozen=True, slots=True)
class CountedVote:
    peer: str
    label: int
    proba: tuple[int, ...]
    weight: int  # the voter's weight and stake before this round
    stake: int
    message: bytes


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one round was decided, with the weights that applied at the time."""

    round: bytes
    consensus: int | None
    votes: tuple[CountedVote, ...]


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


def compute_root(state: State) -> str:
    return hashlib.sha256(_canonical_json(state.canonical())).hexdigest()


def is_active(peer: PeerState) -> bool:
    return peer.status == STATUS_ACTIVE


def compute_consensus(voters: list[tuple[PeerState, Vote]]) -> int:
    """Among the classes voted for, the one with the largest voting power (stake x weight);
    if no voter has any power, the one with the most votes; ties go to the lowest class."""
    power = [0] * len(CLASSES)
    count = [0] * len(CLASSES)
    for peer, vote in voters:
        power[vote.label] += peer.stake * peer.weight
        count[vote.label] += 1
    if not any(power):
        power = count
    return max((c for c in range(len(CLASSES)) if count[c]), key=lambda c: (power[c], -c))


def compute_weight(weight: int, agreed: bool) -> int:
    """Move 1/WEIGHT_STEP_QUOTIENT of the way to WEIGHT_ONE or 0, rounding the step up."""
    if agreed:
        return weight + -(-(WEIGHT_ONE - weight) // WEIGHT_STEP_QUOTIENT)
    return weight - -(-weight // WEIGHT_STEP_QUOTIENT)


def decrease_stake(state: State, peer: PeerState, bps: int) -> int:
    """Burn ``bps`` of the peer's stake (rounded down, clamped at zero); return the amount."""
    amount = min(peer.stake, peer.stake * bps // BPS)
    peer.stake -= amount
    peer.slashed += amount
    state.burned += amount
    return amount


def eject(peer: PeerState, reason: str) -> None:
    if peer.status != STATUS_EJECTED:
        peer.status = STATUS_EJECTED
        peer.reason = reason


def slash_equivocation(state: State, peer: PeerState, evidence: tuple[str, str, str]) -> None:
    """Once per peer, whatever the order or number of pieces of evidence."""
    if peer.equivocation is not None:
        return
    peer.equivocation = evidence
    decrease_stake(state, peer, EQUIVOCATION_SLASH_BPS)
    peer.status = STATUS_EJECTED
    peer.reason = "equivocation"


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


# ---------------------------------------------------------------------------------------------
# The ledger
# ---------------------------------------------------------------------------------------------


class Ledger:
    """Holds the valid messages and folds them into a State, incrementally but exactly."""

    def __init__(self, genesis: Genesis):
        self.genesis = genesis
        self._slots = {s.name: s for s in genesis.slots}
        self.messages: dict[bytes, Message] = {}
        self._registrations: dict[str, list[Message]] = {}
        self._queries: dict[bytes, tuple[int, bytes]] = {}  # round -> (lamport, round)
        self._order: list[tuple[int, bytes]] = []
        # round -> author -> {(label, proba): message id}; several entries mean equivocation
        self._votes: dict[bytes, dict[bytes, dict[tuple, bytes]]] = {}
        self.lamport = 0
        self._checkpoints: list[State] = []  # state before round CHECKPOINT_EVERY * i
        self._dirty: int | None = 0  # first position in _order not reflected in _state
        self._state = State()
        self._root: str | None = None
        self._seats: dict[bytes, Message] = {}  # key -> its winning registration
        self._registered: set[bytes] = set()  # keys with a valid registration (seat or not)
        self._round_author: dict[bytes, bytes] = {}  # round -> the key that asked
        self._members: dict[bytes, str] = {}  # key -> peer id, for the members of genesis_state
        self._outcomes: dict[bytes, Outcome] = {}

    # -- intake -------------------------------------------------------------------------------

    def add(self, msg: Message) -> str | None:
        """Hold a message. Returns None if held (or already held), else why it is rejected."""
        if msg.id in self.messages:
            return None
        body = msg.body
        if not isinstance(body, Register) and msg.author not in self._registered:
            # [IGNORE] not held: re-offered by anti-entropy once its registration is here.
            # (Whether the key holds a seat is decided in the fold: seats can change hands.)
            return "author holds no seat (no registration held for this key)"
        if isinstance(body, Register):
            reason = self._check_register(msg.author, body)
            if reason:
                return reason
            self._registrations.setdefault(body.name, []).append(msg)
            self._registered.add(msg.author)
            seats = self._assign_seats()
            if seats.keys() != self._seats.keys():  # membership changed: replay from genesis
                self._checkpoints = []
                self._mark_dirty(0)
            self._seats = seats
        elif isinstance(body, Query):
            for i in range(len(body.items)):
                rid = round_id(msg.id, i)
                key = (body.lamport, rid)
                self._queries[rid] = key
                self._round_author[rid] = msg.author
                pos = bisect.bisect_left(self._order, key)
                self._order.insert(pos, key)
                self._mark_dirty(pos)
        elif isinstance(body, Votes):
            for vote in body.votes:
                if not 0 <= vote.label < len(CLASSES):
                    return f"vote label {vote.label} is not a class index"
            if len({vote.round for vote in body.votes}) != len(body.votes):
                return "a vote message holds at most one vote per round"
            for vote in body.votes:
                by_author = self._votes.setdefault(vote.round, {})
                contents = by_author.setdefault(msg.author, {})
                content = (vote.label, vote.proba)
                # The lowest id, not the first arrival: evidence must not depend on timing.
                if content not in contents or msg.id < contents[content]:
                    contents[content] = msg.id
                key = self._queries.get(vote.round)
                if key is not None:
                    self._mark_dirty(bisect.bisect_left(self._order, key))
        else:  # pragma: no cover - wire builds only the types above
            return f"unknown message type {type(body).__name__}"
        if isinstance(body, Query):  # only queries are ordered by lamport
            self.lamport = max(self.lamport, body.lamport)
        self.messages[msg.id] = msg
        return None

    def _check_register(self, author: bytes, body: Register) -> str | None:
        slot = self._slots.get(body.name)
        if slot is None:
            return f"no genesis slot named {body.name!r}"
        if body.model != slot.model:
            return f"slot {body.name!r} is for model {slot.model!r}, not {body.model!r}"
        if body.deposit != DEPOSIT:
            return f"deposit must be {DEPOSIT}, not {body.deposit}"
        if slot.key is not None and author != slot.key:
            return f"slot {body.name!r} is pinned to another key"
        return None

    def _mark_dirty(self, pos: int) -> None:
        self._dirty = pos if self._dirty is None else min(self._dirty, pos)

    # -- reads --------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        self._settle()
        return self._state

    @property
    def last_state(self) -> State:
        """The state as of the last read, without folding in what arrived since (cheap; for
        decisions that need not be exact, like which votes are worth waiting for)."""
        return self._state

    def root(self) -> str:
        state = self.state
        if self._root is None:
            self._root = compute_root(state)
        return self._root

    def outcome(self, rid: bytes) -> Outcome | None:
        self._settle()
        return self._outcomes.get(rid)

    @property
    def queries(self):
        """The rounds whose query is held (a read-only view)."""
        return self._queries.keys()

    def voters(self, rid: bytes) -> set[bytes]:
        """Keys that hold a vote on this round (counted or not)."""
        return set(self._votes.get(rid, ()))

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

    def is_member(self, key: bytes) -> bool:
        return key in self._seats

    def genesis_state(self) -> State:
        state = State()
        for key, msg in sorted(self._seats.items(), key=lambda kv: kv[1].body.name):
            state.peers[peer_id(key)] = PeerState(msg.body.name, msg.body.model, key)
        self._members = {p.key: pid for pid, p in state.peers.items()}
        return state

    def _settle(self) -> None:
        if self._dirty is None:
            return
        cp = min(self._dirty // CHECKPOINT_EVERY, len(self._checkpoints) - 1)
        if cp < 0:
            self._checkpoints = [self.genesis_state()]
            cp = 0
        del self._checkpoints[cp + 1 :]
        state = self._checkpoints[cp].copy()
        for pos in range(cp * CHECKPOINT_EVERY, len(self._order)):
            if pos and pos % CHECKPOINT_EVERY == 0 and pos // CHECKPOINT_EVERY == len(self._checkpoints):
                self._checkpoints.append(state.copy())
            self._process_round(state, self._order[pos][1])
        self._state = state
        self._root = None
        self._dirty = None
        if len(self._outcomes) > 2 * OUTCOMES_KEPT:
            keep = {rid for _, rid in self._order[-OUTCOMES_KEPT:]}
            self._outcomes = {r: o for r, o in self._outcomes.items() if r in keep}

    def _process_round(self, state: State, rid: bytes) -> None:
        if self._round_author[rid] not in self._members:
            self._outcomes[rid] = Outcome(rid, None, ())  # asked by a key that holds no seat
            return
        voters: list[tuple[PeerState, Vote, bytes]] = []
        for author, contents in sorted(self._votes.get(rid, {}).items()):
            pid = self._members.get(author)
            if pid is None:
                continue  # not a member (yet): its vote waits, counted if it ever registers
            peer = state.peers[pid]
            if len(contents) > 1:
                first, second = sorted(contents.values())[:2]
                slash_equivocation(state, peer, (rid.hex(), first.hex(), second.hex()))
                continue
            if not is_active(peer):
                continue
            (label, proba), mid = next(iter(contents.items()))
            voters.append((peer, Vote(rid, label, proba), mid))
        if not voters:
            self._outcomes[rid] = Outcome(rid, None, ())
            return
        consensus = compute_consensus([(p, v) for p, v, _ in voters])
        counted = tuple(
            CountedVote(self._members[p.key], v.label, v.proba, p.weight, p.stake, mid)
            for p, v, mid in voters
        )
        state.rounds += 1
        for peer, vote, _ in voters:
            agreed = vote.label == consensus
            peer.weight = compute_weight(peer.weight, agreed)
            peer.votes += 1
            peer.agreed += agreed
            process_accuracy(state, peer, agreed)
        self._outcomes[rid] = Outcome(rid, consensus, counted)
