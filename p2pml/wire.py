"""Wire format: canonical msgpack bodies in Ed25519-signed envelopes, decoded within limits.

An envelope is the msgpack array ``[key, body, signature]``. ``body`` is the canonical msgpack
of a positional array (``["vote", ...]``); the signature covers ``DOMAIN + genesis id + key +
body`` and the message id is the SHA-256 of those same bytes, so one content has one id and a
signature made for another network or another purpose never verifies here. A body that does not
re-encode to the very same bytes is rejected: two encodings of one vote must not become two
votes (that would frame an honest peer for equivocation).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math
import os
from dataclasses import dataclass

import msgpack
import nacl.bindings
import nacl.exceptions

from p2pml.ledger import (
    IRIS,
    MAX_AMOUNT,
    MAX_VALUE,
    PROBA_ONE,
    Card,
    Commit,
    Message,
    Query,
    Register,
    Reveal,
    Task,
    Transfer,
    Update,
    Votes,
)

DOMAIN = b"p2pml/v1/message\x00"
LINK_DOMAIN = b"p2pml/v1/link\x00"  # a proof of who opens a connection, never a message
LINK_PROOF_MAX_AGE_S = 300  # a link proof older (or newer) than this is not believed

KEY_BYTES = 32
SIG_BYTES = 64
ROUND_BYTES = 16
DIGEST_BYTES = 32  # a commitment: SHA-256
SALT_BYTES = 16  # 128 bits: a commitment to one of three labels cannot be searched

# Limits, each with its reason (docs/protocol.md lists them too).
MAX_BODY_BYTES = 64 * 1024  # a full query batch of MAX_ITEMS rows is about 10 KiB
MAX_ITEMS = 256  # rows per query, commits or reveals per vote message, keys a reveal lists
MAX_BATCH_MESSAGES = 1024  # envelopes per gossip batch (POST or frame): bounds verification work
MAX_BATCH_BYTES = MAX_BATCH_MESSAGES * 2 * 1024  # a gossip batch; larger is refused unread
MAX_NAME_CHARS = 64
MAX_LAMPORT = 2**53  # keeps lamport clocks exact in any JSON reader
FEATURE_RANGE = (0.0, 100.0)  # Iris's, in centimetres (another task's: its Task.feature_range)


@dataclass(frozen=True, slots=True)
class Shape:
    """What a network's messages look like, from its task: the features of a row, and a vote
    as a class index with one probability per class, or (``n_classes`` 0) a value."""

    n_features: int
    n_classes: int
    feature_range: tuple[float, float]

    @classmethod
    def of(cls, task: Task) -> Shape:
        lo, hi = task.feature_range
        return cls(len(task.features), 0 if task.regression else len(task.classes), (float(lo), float(hi)))

    @property
    def max_rows(self) -> int:
        """Rows per query that fit in MAX_BODY_BYTES (9 bytes a feature, 33 a commit)."""
        return max(1, min(MAX_ITEMS, (MAX_BODY_BYTES - 64) // (9 * self.n_features + 3 + 35)))


IRIS_SHAPE = Shape.of(IRIS)


# What msgpack raises for bad input: ValueError (and its subclasses) or UnpackException.
MSGPACK_ERRORS = (ValueError, msgpack.UnpackException)


class WireError(ValueError):
    """A message or batch that is malformed, non-canonical, or badly signed."""


@dataclass(frozen=True, slots=True)
class Signed:
    """A verified message together with the exact envelope bytes it arrived in."""

    msg: Message
    raw: bytes


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _signing_bytes(genesis_id: bytes, key: bytes, body: bytes) -> bytes:
    return DOMAIN + genesis_id + key + body


def _link_bytes(genesis_id: bytes, sender: str, receiver: str, unix_time: int) -> bytes:
    return LINK_DOMAIN + genesis_id + pack([sender, receiver, unix_time])


def check_link_proof(genesis_id: bytes, key: bytes, sender: str, receiver: str, proof: str,
                     now: float) -> bool:
    """Whether ``proof`` (from ``Identity.link_proof``) is ``key``'s, for this sender and
    receiver, and made within LINK_PROOF_MAX_AGE_S of ``now``."""
    stamp, _, sig = proof.partition(".")
    try:
        unix_time, signature = int(stamp), bytes.fromhex(sig)
    except ValueError:
        return False
    if abs(unix_time - now) > LINK_PROOF_MAX_AGE_S or len(signature) != SIG_BYTES or len(key) != KEY_BYTES:
        return False
    try:
        nacl.bindings.crypto_sign_open(signature + _link_bytes(genesis_id, sender, receiver, unix_time), key)
    except (nacl.exceptions.BadSignatureError, ValueError):
        return False
    return True


def message_id(genesis_id: bytes, key: bytes, body: bytes) -> bytes:
    return hashlib.sha256(_signing_bytes(genesis_id, key, body)).digest()


# -- bodies ----------------------------------------------------------------------------------


def _card_fields(card: Card) -> list:
    return [card.framework, card.model, card.params, card.data_root, card.rows, card.score_bps,
            card.previous]


def _card(fields) -> Card:
    framework, model, params, data_root, rows, score, previous = _list(fields, "model card", 7, 7)
    if type(previous) is not bytes or len(previous) not in (0, DIGEST_BYTES):
        raise WireError("a card's previous is empty or a card id (32 bytes)")
    return Card(_str(framework, "framework"), _str(model, "model", 2 * MAX_NAME_CHARS),
                _bytes(params, "a card's params hash", DIGEST_BYTES),
                _bytes(data_root, "a card's data root", DIGEST_BYTES),
                _int(rows, "training rows", 0, MAX_VALUE), _int(score, "score_bps", -MAX_VALUE, 10_000),
                previous)


def encode_body(body: Register | Query | Votes | Update | Transfer) -> bytes:
    if isinstance(body, Transfer):
        return pack(["transfer", body.lamport, body.seq, body.to, body.amount])
    if isinstance(body, Register):
        return pack(["register", body.name, _card_fields(body.card), body.deposit])
    if isinstance(body, Update):
        return pack(["update", body.lamport, _card_fields(body.card)])
    if isinstance(body, Query):
        fields = ["query", body.lamport, [list(item) for item in body.items]]
        if body.commits:  # absent rather than empty: one encoding per content
            fields.append(list(body.commits))
        return pack(fields)
    if isinstance(body, Votes):
        # A reveal's ``seen`` keys are indices into one sorted key table per message: five
        # 32-byte keys per reveal would otherwise be most of the message.
        keys = sorted(set().union(*(r.seen for r in body.reveals)))
        index = {k: i for i, k in enumerate(keys)}
        commits = [[c.round, c.digest] for c in body.commits]
        reveals = [[r.round, r.label, list(r.proba), r.salt, sorted(index[k] for k in r.seen)]
                   for r in body.reveals]
        return pack(["votes", body.lamport, commits, reveals, keys])
    raise TypeError(f"cannot encode {type(body).__name__}")


def _int(value, name: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise WireError(f"{name} must be an integer in [{lo}, {hi}], got {value!r:.40}")
    return value


def _list(value, name: str, lo: int, hi: int) -> list:
    if type(value) is not list or not lo <= len(value) <= hi:
        raise WireError(f"{name} must be a list of {lo} to {hi} items")
    return value


def _bytes(value, name: str, size: int) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise WireError(f"{name} must be {size} bytes")
    return value


def _str(value, name: str, most: int = MAX_NAME_CHARS) -> str:
    if type(value) is not str or not 0 < len(value) <= most:
        raise WireError(f"{name} must be a string of 1 to {most} characters")
    return value


def check_features(row, shape: Shape = IRIS_SHAPE) -> tuple[float, ...]:
    """A feature row: exactly the task's number of finite floats, within its feature range."""
    if type(row) not in (list, tuple) or len(row) != shape.n_features:
        raise WireError(f"a feature row must have {shape.n_features} numbers")
    lo, hi = shape.feature_range
    for x in row:
        if type(x) is not float or not math.isfinite(x) or not lo <= x <= hi:
            raise WireError(f"features must be finite floats in [{lo:g}, {hi:g}], got {x!r:.40}")
    return tuple(row)


def decode_body(data: bytes, shape: Shape = IRIS_SHAPE) -> Register | Query | Votes | Update | Transfer:
    try:
        obj = msgpack.unpackb(
            data, use_list=True, raw=False, strict_map_key=True,
            max_array_len=MAX_ITEMS, max_map_len=0, max_ext_len=0,
            max_str_len=MAX_NAME_CHARS * 4, max_bin_len=DIGEST_BYTES,
        )
    except MSGPACK_ERRORS as exc:
        raise WireError(f"body is not valid msgpack within limits: {exc}") from None
    fields = _list(obj, "body", 1, 5)
    kind = fields[0]
    if kind == "register" and len(fields) == 4:
        body = Register(_str(fields[1], "name"), _card(fields[2]), _int(fields[3], "deposit", 0, 2**63))
    elif kind == "transfer" and len(fields) == 5:
        body = Transfer(_int(fields[1], "lamport", 1, MAX_LAMPORT), _int(fields[2], "seq", 1, MAX_LAMPORT),
                        _bytes(fields[3], "a transfer's recipient key", KEY_BYTES),
                        _int(fields[4], "amount", 1, MAX_AMOUNT))
    elif kind == "update" and len(fields) == 3:
        body = Update(_int(fields[1], "lamport", 1, MAX_LAMPORT), _card(fields[2]))
    elif kind == "query" and len(fields) in (3, 4):
        items = _list(fields[2], "query items", 1, MAX_ITEMS)
        commits = ()
        if len(fields) == 4:
            commits = tuple(_bytes(c, "a query's commit", DIGEST_BYTES)
                            for c in _list(fields[3], "query commits", len(items), len(items)))
        body = Query(_int(fields[1], "lamport", 1, MAX_LAMPORT),
                     tuple(check_features(row, shape) for row in items), commits)
    elif kind == "votes" and len(fields) == 5:
        body = _votes_fast(*fields[1:], shape.n_classes) or _decode_votes(*fields[1:], shape.n_classes)
    else:
        raise WireError(f"unknown body kind {str(kind)[:20]!r} with {len(fields)} fields")
    # Canonical: the decoded fields re-packed give the very same bytes. (With the checks above,
    # which leave no field free, this equals ``encode_body(body) == data`` at a fifth of the cost.)
    if pack(obj) != data:
        raise WireError("body is not in canonical encoding")
    return body


_INTERNED: dict = {}
MAX_INTERNED = 8192  # keys and seen-sets repeat in every vote message: keep one copy of each


def shared(value):
    """One shared object per distinct key or seen-set: a node holds every message it has ever
    accepted, and five reveals a round each listing the same five keys were 3.6 KB a round."""
    found = _INTERNED.get(value)
    if found is None:
        if len(_INTERNED) >= MAX_INTERNED:
            _INTERNED.clear()
        _INTERNED[value] = found = value
    return found


def _votes_fast(lamport, commits, reveals, keys, n_classes: int) -> Votes | None:
    """``_decode_votes`` for a well-formed message, in one tight pass (decoding was the largest
    cost per message after the signature); None at the first doubt, and then
    ``_decode_votes`` finds and names the problem."""
    if not (type(lamport) is int and 1 <= lamport <= MAX_LAMPORT and type(keys) is list
            and type(commits) is list and type(reveals) is list and (commits or reveals)
            and len(keys) <= MAX_ITEMS and len(commits) <= MAX_ITEMS and len(reveals) <= MAX_ITEMS):
        return None
    table, prev = [], b""
    for k in keys:
        if type(k) is not bytes or len(k) != KEY_BYTES or k <= prev:
            return None
        table.append(shared(k))
        prev = k
    out_commits, rounds = [], set()
    for c in commits:
        if type(c) is not list or len(c) != 2:
            return None
        rid, digest = c
        if type(rid) is not bytes or len(rid) != ROUND_BYTES or type(digest) is not bytes or len(digest) != DIGEST_BYTES:
            return None
        rounds.add(rid)
        out_commits.append(Commit(rid, digest))
    if len(rounds) != len(out_commits):
        return None
    out_reveals, rounds, used, n = [], set(), set(), len(table)
    for r in reveals:
        if type(r) is not list or len(r) != 5:
            return None
        rid, label, proba, salt, seen = r
        if (type(rid) is not bytes or len(rid) != ROUND_BYTES or type(label) is not int
                or not (0 <= label < n_classes if n_classes else -MAX_VALUE <= label <= MAX_VALUE)
                or type(proba) is not list or len(proba) != n_classes
                or type(salt) is not bytes or len(salt) != SALT_BYTES or type(seen) is not list):
            return None
        for p in proba:
            if type(p) is not int or not 0 <= p <= PROBA_ONE:
                return None
        last = -1
        for i in seen:
            if type(i) is not int or i <= last or i >= n:
                return None
            last = i
        used.update(seen)
        rounds.add(rid)
        out_reveals.append(Reveal(rid, label, tuple(proba), salt, shared(frozenset([table[i] for i in seen]))))
    if len(rounds) != len(out_reveals) or len(used) != n:
        return None
    return Votes(lamport, tuple(out_commits), tuple(out_reveals))


def _decode_votes(lamport, commits, reveals, keys, n_classes: int) -> Votes:
    keys = [shared(_bytes(k, "a seen key", KEY_BYTES)) for k in _list(keys, "seen keys", 0, MAX_ITEMS)]
    if any(a >= b for a, b in itertools.pairwise(keys)):
        raise WireError("seen keys must be sorted and distinct")
    out_commits = []
    for c in _list(commits, "commits", 0, MAX_ITEMS):
        rid, digest = _list(c, "commit", 2, 2)
        out_commits.append(Commit(_bytes(rid, "a commit's round", ROUND_BYTES),
                                  _bytes(digest, "a commit's digest", DIGEST_BYTES)))
    out_reveals = []
    for r in _list(reveals, "reveals", 0, MAX_ITEMS):
        rid, label, proba, salt, seen = _list(r, "reveal", 5, 5)
        proba = _list(proba, "probabilities", n_classes, n_classes)
        seen = [_int(i, "a seen index", 0, len(keys) - 1) for i in _list(seen, "seen", 0, len(keys))]
        if any(a >= b for a, b in itertools.pairwise(seen)):
            raise WireError("seen indices must be increasing")
        out_reveals.append(Reveal(
            _bytes(rid, "a reveal's round", ROUND_BYTES),
            _int(label, "label", 0, n_classes - 1) if n_classes else _int(label, "value", -MAX_VALUE, MAX_VALUE),
            tuple(_int(p, "probability", 0, PROBA_ONE) for p in proba),
            _bytes(salt, "a salt", SALT_BYTES), shared(frozenset(keys[i] for i in seen))))
    if not out_commits and not out_reveals:
        raise WireError("a vote message holds at least one commit or reveal")
    if set(keys) != set().union(*(r.seen for r in out_reveals)):
        raise WireError("the seen key table lists a key no reveal lists")
    for name, items in (("commit", out_commits), ("reveal", out_reveals)):
        if len({item.round for item in items}) != len(items):
            raise WireError(f"a vote message holds at most one {name} per round")
    return Votes(_int(lamport, "lamport", 1, MAX_LAMPORT), tuple(out_commits), tuple(out_reveals))


# -- envelopes -------------------------------------------------------------------------------


class Identity:
    """This node's signing key; the only holder of private key material. Ed25519 through
    libsodium (PyNaCl): it signs in about half the time of ``cryptography`` (28 against 54 us
    here), the signatures are the very same bytes (Ed25519 is deterministic; tested), and a node
    does not load ``cryptography`` at all (6 MB of resident memory per process)."""

    def __init__(self, seed: bytes):
        if len(seed) != 32:
            raise ValueError(f"an Ed25519 seed is 32 bytes, not {len(seed)}")
        self._seed = seed
        self.key, self._secret = nacl.bindings.crypto_sign_seed_keypair(seed)

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        return cls(seed)

    @classmethod
    def generate(cls) -> Identity:
        return cls(os.urandom(32))

    def seed(self) -> bytes:
        return self._seed

    def salt(self, rid: bytes) -> bytes:
        """The salt of this node's commitment on a round: secret (keyed by the private key),
        yet the same after a restart, so a lost reveal can be made again."""
        return hmac.digest(self._seed, b"p2pml/salt\x00" + rid, "sha256")[:SALT_BYTES]

    def _sign(self, data: bytes) -> bytes:
        return nacl.bindings.crypto_sign(data, self._secret)[:SIG_BYTES]

    def link_proof(self, genesis_id: bytes, sender: str, receiver: str, unix_time: int) -> str:
        """``"<unix time>.<signature hex>"``: proves to ``receiver`` that this connection is
        ``sender``'s, so what arrives on it is scored against ``sender`` and not against an
        impostor that merely writes ``sender``'s name in a header."""
        sig = self._sign(_link_bytes(genesis_id, sender, receiver, unix_time))
        return f"{unix_time}.{sig.hex()}"

    def sign(self, genesis_id: bytes, body: Register | Query | Votes | Update | Transfer,
             shape: Shape = IRIS_SHAPE) -> Signed:
        """Sign ``body``; raises WireError for anything peers would reject, so a node never
        holds a message of its own that nobody else would accept."""
        data = encode_body(body)
        decode_body(data, shape)
        sig = self._sign(_signing_bytes(genesis_id, self.key, data))
        msg = Message(message_id(genesis_id, self.key, data), self.key, body)
        return Signed(msg, pack([self.key, data, sig]))


class Verifier:
    """Checks envelopes for one network. Signatures are verified with libsodium (PyNaCl):
    about 60 us against about 90 us with ``cryptography`` on this machine, and verification is
    the largest CPU cost per message. libsodium also refuses keys that are not valid curve
    points of full order (``cryptography`` took any 32 bytes)."""

    def __init__(self, genesis_id: bytes, shape: Shape = IRIS_SHAPE):
        self.genesis_id = genesis_id
        self.shape = shape

    def open(self, raw: bytes) -> Signed:
        """Decode one envelope: shape, then signature, then body. Raises WireError."""
        try:
            env = msgpack.unpackb(raw, max_array_len=3, max_map_len=0, max_str_len=0,
                                  max_ext_len=0, max_bin_len=MAX_BODY_BYTES)
        except MSGPACK_ERRORS as exc:
            raise WireError(f"envelope is not valid msgpack within limits: {exc}") from None
        return self.open_fields(env, raw)

    def reopen(self, raw: bytes) -> Message:
        """An envelope that ``open`` accepted before, decoded again without checking the
        signature a second time (a ledger rebuilt from what this node holds)."""
        key, body, _ = msgpack.unpackb(raw)
        return Message(message_id(self.genesis_id, key, body), shared(key), decode_body(body, self.shape))

    def open_fields(self, env, raw: bytes | None = None, is_known=None) -> Signed | None:
        """Check one decoded envelope; None if ``is_known(id)`` (a duplicate costs no verify)."""
        if type(env) is not list or len(env) != 3 or not all(type(x) is bytes for x in env):
            raise WireError("an envelope is [key, body, signature], all byte strings")
        key, body, sig = env
        if len(key) != KEY_BYTES or len(sig) != SIG_BYTES:
            raise WireError(f"key must be {KEY_BYTES} bytes and signature {SIG_BYTES}")
        if len(body) > MAX_BODY_BYTES:
            raise WireError(f"body over {MAX_BODY_BYTES} bytes")
        signed = _signing_bytes(self.genesis_id, key, body)
        mid = hashlib.sha256(signed).digest()
        if is_known is not None and is_known(mid):
            return None
        try:
            nacl.bindings.crypto_sign_open(sig + signed, key)
        except nacl.exceptions.BadSignatureError:
            raise WireError("bad signature") from None
        msg = Message(mid, shared(key), decode_body(body, self.shape))
        return Signed(msg, raw if raw is not None else pack(env))


def pack_batch(raws: list[bytes]) -> bytes:
    """A gossip batch: a msgpack array header, then the envelopes' own bytes unchanged."""
    n = len(raws)
    if n < 16:
        header = bytes([0x90 | n])
    elif n < 65536:
        header = b"\xdc" + n.to_bytes(2, "big")
    else:
        header = b"\xdd" + n.to_bytes(4, "big")
    return header + b"".join(raws)


def unpack_batch(data: bytes) -> list:
    """Split a gossip batch into envelope field lists, within limits; raises WireError."""
    if len(data) > MAX_BATCH_BYTES:
        raise WireError(f"batch over {MAX_BATCH_BYTES} bytes")
    try:
        batch = msgpack.unpackb(data, max_array_len=MAX_BATCH_MESSAGES, max_map_len=0,
                                max_str_len=0, max_ext_len=0, max_bin_len=MAX_BODY_BYTES)
    except MSGPACK_ERRORS as exc:
        raise WireError(f"batch is not valid msgpack within limits: {exc}") from None
    if type(batch) is not list:
        raise WireError("a gossip batch is a msgpack array of envelopes")
    return batch
