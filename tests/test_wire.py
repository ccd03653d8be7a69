"""Wire format: signed envelopes, canonical bodies, shape checks and decoding limits."""

from __future__ import annotations

import hashlib
import math
import time

import msgpack
import nacl.bindings
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from p2pml.ledger import CLASSES, PROBA_ONE, Commit, Query, Register, Reveal, Votes
from p2pml.wire import (
    DOMAIN,
    MAX_BATCH_BYTES,
    MAX_BATCH_MESSAGES,
    MAX_BODY_BYTES,
    MAX_ITEMS,
    MAX_LAMPORT,
    MAX_NAME_CHARS,
    ROUND_BYTES,
    Identity,
    Verifier,
    WireError,
    decode_body,
    encode_body,
    message_id,
    pack,
    pack_batch,
    unpack_batch,
)
from tests.conftest import card

GID = hashlib.sha256(b"test network").digest()
OTHER_GID = hashlib.sha256(b"another network").digest()
ALICE = Identity.from_seed(b"\x01" * 32)
BOB = Identity.from_seed(b"\x02" * 32)
ROW = (5.1, 3.5, 1.4, 0.2)
RID = bytes(range(ROUND_BYTES))
DIGEST = bytes(range(32))
SALT = bytes(range(16, 32))
FAST = 0.5  # seconds: every limit must reject well under a second


def one_hot(label: int) -> tuple[int, ...]:
    return tuple(PROBA_ONE if c == label else 0 for c in range(len(CLASSES)))


BODIES = {
    "register": Register("ada", card("knn"), 1000),
    "query": Query(7, (ROW, (6.3, 2.9, 5.6, 1.8), (-0.0, 1e-300, 100.0, 0.5))),
    "query with the issuer's commits": Query(8, (ROW, (6.3, 2.9, 5.6, 1.8)), (DIGEST, bytes(32))),
    "votes": Votes(9, (Commit(bytes(16), DIGEST),),
                   (Reveal(RID, 1, (100_000, 800_000, 100_000), SALT, frozenset({ALICE.key, BOB.key})),
                    Reveal(b"r" * 16, 2, one_hot(2), SALT, frozenset()))),
}


def envelope(identity: Identity, body: bytes, gid: bytes = GID) -> bytes:
    """An envelope over arbitrary body bytes, validly signed: only the body can be at fault."""
    sig = nacl.bindings.crypto_sign(DOMAIN + gid + identity.key + body, identity._secret)[:64]
    return pack([identity.key, body, sig])


def fields(raw: bytes) -> list[bytes]:
    return msgpack.unpackb(raw)


def assert_fast_wire_error(fn, data) -> WireError:
    start = time.perf_counter()
    with pytest.raises(WireError) as info:
        fn(data)
    assert time.perf_counter() - start < FAST
    return info.value


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_sign_open_round_trip(kind):
    body = BODIES[kind]
    signed = ALICE.sign(GID, body)
    opened = Verifier(GID).open(signed.raw)
    assert opened.msg == signed.msg
    assert opened.msg.body == body
    assert opened.msg.author == ALICE.key
    assert opened.raw == signed.raw
    key, data, _sig = fields(signed.raw)
    assert key == ALICE.key
    assert data == encode_body(body)
    assert decode_body(data) == body
    assert opened.msg.id == message_id(GID, ALICE.key, data)
    assert opened.msg.id == hashlib.sha256(DOMAIN + GID + ALICE.key + data).digest()


def test_same_content_same_id_different_author_different_id():
    body = BODIES["votes"]
    assert ALICE.sign(GID, body).msg.id == ALICE.sign(GID, body).msg.id
    assert ALICE.sign(GID, body).msg.id != BOB.sign(GID, body).msg.id
    assert ALICE.sign(GID, body).msg.id != ALICE.sign(OTHER_GID, body).msg.id


def test_identity_seed_round_trip():
    again = Identity.from_seed(ALICE.seed())
    assert again.key == ALICE.key
    fresh = Identity.generate()
    assert Verifier(GID).open(fresh.sign(GID, BODIES["register"]).raw).msg.author == fresh.key


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_boundary_values_accepted(kind):
    edge = {
        "register": Register("x" * MAX_NAME_CHARS, card("\U0001f600" * MAX_NAME_CHARS), 2**63),
        "query": Query(MAX_LAMPORT, tuple((i / 3.0, 1.5, 0.0, 2.0) for i in range(MAX_ITEMS))),
        "query with the issuer's commits": Query(MAX_LAMPORT, tuple((i / 3.0, 1.5, 0.0, 2.0) for i in range(MAX_ITEMS)),
                                                 tuple(bytes([i]) * 32 for i in range(MAX_ITEMS))),
        "votes": Votes(1, tuple(Commit(bytes([i]) * 16, bytes([i]) * 32) for i in range(MAX_ITEMS)),
                       tuple(Reveal(bytes([i]) * 16, len(CLASSES) - 1, (0, 0, PROBA_ONE), SALT,
                                    frozenset(bytes([k]) * 32 for k in range(MAX_ITEMS)))
                             for i in range(2))),
    }[kind]
    assert Verifier(GID).open(ALICE.sign(GID, edge).raw).msg.body == edge


# -- rejected envelopes ------------------------------------------------------------------------


def test_tampered_body_rejected():
    key, body, sig = fields(ALICE.sign(GID, BODIES["register"]).raw)
    tampered = body.replace(b"ada", b"adb")
    assert tampered != body and decode_body(tampered).name == "adb"  # still a well-formed body
    with pytest.raises(WireError, match="signature"):
        Verifier(GID).open(pack([key, tampered, sig]))


@pytest.mark.parametrize("pos", [0, 31, 32, 63])
def test_tampered_signature_rejected(pos):
    key, body, sig = fields(ALICE.sign(GID, BODIES["query"]).raw)
    bad = bytearray(sig)
    bad[pos] ^= 0x01
    with pytest.raises(WireError, match="signature"):
        Verifier(GID).open(pack([key, body, bytes(bad)]))


def test_swapped_author_key_rejected():
    body = BODIES["votes"]
    _, data, bob_sig = fields(BOB.sign(GID, body).raw)
    # Bob's valid signature over the same body, presented as Alice's message.
    with pytest.raises(WireError, match="signature"):
        Verifier(GID).open(pack([ALICE.key, data, bob_sig]))
    # And Alice's key with Bob's signature, the other way round.
    _, _, alice_sig = fields(ALICE.sign(GID, body).raw)
    with pytest.raises(WireError, match="signature"):
        Verifier(GID).open(pack([BOB.key, data, alice_sig]))


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_other_network_rejected(kind):
    raw = ALICE.sign(OTHER_GID, BODIES[kind]).raw
    assert Verifier(OTHER_GID).open(raw).msg.body == BODIES[kind]
    with pytest.raises(WireError, match="signature"):
        Verifier(GID).open(raw)


@pytest.mark.parametrize(
    "env",
    [
        [],
        [ALICE.key, b"\x90"],
        [ALICE.key, b"\x90", b"s" * 64, b""],
        [ALICE.key[:31], b"\x90", b"s" * 64],
        [ALICE.key + b"\0", b"\x90", b"s" * 64],
        [ALICE.key, b"\x90", b"s" * 63],
        [ALICE.key, b"\x90", b"s" * 65],
        [ALICE.key, 5, b"s" * 64],
        [ALICE.key, "", b"s" * 64],
        [None, b"\x90", b"s" * 64],
        b"not a list",
        7,
    ],
)
def test_malformed_envelopes_rejected(env):
    with pytest.raises(WireError):
        Verifier(GID).open(pack(env))
    with pytest.raises(WireError):
        Verifier(GID).open_fields(env)


def test_envelope_body_over_limit_rejected():
    env = [ALICE.key, b"\x90" * (MAX_BODY_BYTES + 1), b"s" * 64]
    with pytest.raises(WireError, match="body"):
        Verifier(GID).open_fields(env)
    assert_fast_wire_error(Verifier(GID).open, pack(env))


def test_envelope_with_trailing_bytes_rejected():
    raw = ALICE.sign(GID, BODIES["register"]).raw
    with pytest.raises(WireError):
        Verifier(GID).open(raw + b"\x00")


# -- canonical encoding ------------------------------------------------------------------------


def _noncanonical_bodies():
    q = ["query", 1, [list(ROW)]]
    knn = pack(["builtin", "knn", bytes(32), bytes([1]) * 32, 105, 9_500, b""])  # a card
    commits = [[RID, DIGEST]]
    yield "float32 features", msgpack.packb(["query", 1, [[1.5, 2.5, 3.5, 4.5]]], use_single_float=True)
    yield "uint16 lamport", b"\x93" + pack("query") + b"\xcd\x00\x01" + pack(q[2])
    yield "int8 lamport", b"\x93" + pack("query") + b"\xd0\x01" + pack(q[2])
    yield "uint64 deposit", b"\x94" + pack("register") + pack("ada") + knn + b"\xcf" + (5).to_bytes(8, "big")
    yield "uint32 label", (b"\x95" + pack("votes") + b"\x01" + pack([]) + b"\x91\x95" + pack(RID) + b"\xce"
                          + (0).to_bytes(4, "big") + pack([PROBA_ONE, 0, 0]) + pack(SALT) + pack([]) + pack([]))
    yield "str8 kind", b"\x94\xd9\x08register" + pack("ada") + knn + b"\x05"
    yield "bin16 round", (b"\x95" + pack("votes") + b"\x01\x91\x92\xc5\x00\x10" + RID + pack(DIGEST)
                          + pack([]) + pack([]))
    yield "array16 body", b"\xdc\x00\x05" + pack("votes") + b"\x01" + pack(commits) + pack([]) + pack([])
    yield "str8 name", b"\x94" + pack("register") + b"\xd9\x03ada" + knn + b"\x05"


@pytest.mark.parametrize(("what", "data"), list(_noncanonical_bodies()), ids=lambda v: v if isinstance(v, str) else "")
def test_non_canonical_body_rejected(what, data):
    decoded = msgpack.unpackb(data, raw=False)
    # The same content, canonically encoded, is a well-formed body...
    canonical = pack(decoded)
    assert canonical != data
    assert encode_body(decode_body(canonical)) == canonical
    # ...but this other encoding of it is not accepted, even when validly signed.
    with pytest.raises(WireError, match="canonical"):
        decode_body(data)
    with pytest.raises(WireError, match="canonical"):
        Verifier(GID).open(envelope(ALICE, data))
    assert Verifier(GID).open(envelope(ALICE, canonical)).msg.body == decode_body(canonical)


# -- body shapes -------------------------------------------------------------------------------

NAN, INF = math.nan, math.inf
GOOD_COMMIT = [RID, DIGEST]
GOOD_REVEAL = [RID, 0, [PROBA_ONE, 0, 0], SALT, [0]]
KEYS = [ALICE.key]


def votes(commits=(), reveals=(), keys=KEYS, lamport=1) -> list:
    return ["votes", lamport, list(commits), list(reveals), list(keys)]


def reveal(rid=RID, label=0, proba=(PROBA_ONE, 0, 0), salt=SALT, seen=(0,)) -> list:
    return [rid, label, list(proba), salt, list(seen)]


BAD_BODIES = {
    # field counts
    "register 3 fields": ["register", "ada", "knn"],
    "register 5 fields": ["register", "ada", "knn", 5, 5],
    "query 2 fields": ["query", 1],
    "query 4 fields, not commits": ["query", 1, [list(ROW)], 0],
    "query 5 fields": ["query", 1, [list(ROW)], [DIGEST], 0],
    "query commits empty": ["query", 1, [list(ROW)], []],
    "query commits fewer than items": ["query", 1, [list(ROW), list(ROW)], [DIGEST]],
    "query commits more than items": ["query", 1, [list(ROW)], [DIGEST, DIGEST]],
    "query commit short": ["query", 1, [list(ROW)], [DIGEST[:31]]],
    "query commit not bytes": ["query", 1, [list(ROW)], ["x" * 32]],
    "votes 2 fields": ["votes", 1],
    "votes 4 fields": ["votes", 1, [GOOD_COMMIT], []],
    "votes 6 fields": [*votes([GOOD_COMMIT]), 0],
    "empty body": [],
    "5-field body": ["register", "a", "b", 1, 2],
    "commit with 1 field": votes([[RID]]),
    "commit with 3 fields": votes([[*GOOD_COMMIT, 0]]),
    "reveal with 4 fields": votes((), [GOOD_REVEAL[:4]]),
    "reveal with 6 fields": votes((), [[*GOOD_REVEAL, 0]]),
    # body is not a list
    "body is a string": "register",
    "body is an int": 5,
    "body is a map": {},
    "body is nil": None,
    # unknown kinds
    "unknown kind": ["vote", 1, [GOOD_COMMIT]],
    "empty kind": ["", 1, [GOOD_COMMIT]],
    "int kind": [1, 1, [GOOD_COMMIT]],
    "bin kind": [b"votes", 1, [GOOD_COMMIT], [], []],
    "upper kind": ["QUERY", 1, [list(ROW)]],
    # register types and ranges
    "name bin": ["register", b"ada", "knn", 5],
    "name empty": ["register", "", "knn", 5],
    "name too long": ["register", "x" * (MAX_NAME_CHARS + 1), "knn", 5],
    "model int": ["register", "ada", 3, 5],
    "model empty": ["register", "ada", "", 5],
    "deposit negative": ["register", "ada", "knn", -1],
    "deposit over 2**63": ["register", "ada", "knn", 2**63 + 1],
    "deposit float": ["register", "ada", "knn", 5.0],
    "deposit bool": ["register", "ada", "knn", True],
    "deposit str": ["register", "ada", "knn", "5"],
    # query
    "query lamport 0": ["query", 0, [list(ROW)]],
    "query lamport negative": ["query", -1, [list(ROW)]],
    "query lamport over max": ["query", MAX_LAMPORT + 1, [list(ROW)]],
    "query lamport float": ["query", 1.0, [list(ROW)]],
    "query lamport nil": ["query", None, [list(ROW)]],
    "query no items": ["query", 1, []],
    "query items not list": ["query", 1, list(ROW)],
    "query too many items": ["query", 1, [list(ROW)] * (MAX_ITEMS + 1)],
    "query 3 features": ["query", 1, [list(ROW[:3])]],
    "query 5 features": ["query", 1, [list(ROW) + [1.0]]],
    "query 0 features": ["query", 1, [[]]],
    "query int features": ["query", 1, [[5, 3, 1, 0]]],
    "query bool feature": ["query", 1, [[True, 3.5, 1.4, 0.2]]],
    "query nil feature": ["query", 1, [[None, 3.5, 1.4, 0.2]]],
    "query nan feature": ["query", 1, [[NAN, 3.5, 1.4, 0.2]]],
    "query inf feature": ["query", 1, [[5.1, INF, 1.4, 0.2]]],
    "query -inf feature": ["query", 1, [[5.1, 3.5, -INF, 0.2]]],
    "query feature over range (float32 overflow)": ["query", 1, [[5.1, 3.5, 1e39, 0.2]]],
    "query negative feature": ["query", 1, [[5.1, -0.5, 1.4, 0.2]]],
    "query row is a map": ["query", 1, [{}]],
    "query second row bad": ["query", 1, [list(ROW), [1.0, 2.0, 3.0]]],
    # votes
    "votes lamport 0": votes([GOOD_COMMIT], lamport=0),
    "votes lamport over max": votes([GOOD_COMMIT], lamport=MAX_LAMPORT + 1),
    "votes empty": votes(),
    "commits too many": votes([GOOD_COMMIT] * (MAX_ITEMS + 1)),
    "reveals too many": votes((), [GOOD_REVEAL] * (MAX_ITEMS + 1)),
    "commits not a list": ["votes", 1, GOOD_COMMIT, [], []],
    "commit not a list": votes([RID]),
    "round 15 bytes": votes([[RID[:15], DIGEST]]),
    "round 17 bytes": votes([[RID + b"\0", DIGEST]]),
    "round empty": votes([[b"", DIGEST]]),
    "round str": votes([["r" * 16, DIGEST]]),
    "reveal round 15 bytes": votes((), [reveal(rid=RID[:15])]),
    "digest 31 bytes": votes([[RID, DIGEST[:31]]]),
    "digest 33 bytes": votes([[RID, DIGEST + b"\0"]]),
    "salt 15 bytes": votes((), [reveal(salt=SALT[:15])]),
    "salt missing": votes((), [reveal(salt=None)]),
    "label negative": votes((), [reveal(label=-1)]),
    "label = classes": votes((), [reveal(label=len(CLASSES))]),
    "label float": votes((), [reveal(label=0.0)]),
    "label bool": votes((), [reveal(label=False)]),
    "proba over one": votes((), [reveal(proba=(PROBA_ONE + 1, 0, 0))]),
    "proba negative": votes((), [reveal(proba=(PROBA_ONE, -1, 0))]),
    "proba float": votes((), [reveal(proba=(1.0, 0.0, 0.0))]),
    "proba too few": votes((), [reveal(proba=(PROBA_ONE, 0))]),
    "proba too many": votes((), [reveal(proba=(PROBA_ONE, 0, 0, 0))]),
    "proba not a list": votes((), [[RID, 0, PROBA_ONE, SALT, [0]]]),
    "second reveal bad": votes((), [GOOD_REVEAL, reveal(rid=bytes(16), label=9)]),
    "two commits one round": votes([GOOD_COMMIT, [RID, bytes(32)]]),
    "two reveals one round": votes((), [GOOD_REVEAL, reveal(label=1, proba=(0, PROBA_ONE, 0))]),
    "seen index out of range": votes((), [reveal(seen=(1,))]),
    "seen index negative": votes((), [reveal(seen=(-1,))]),
    "seen indices not increasing": votes((), [reveal(seen=(1, 0))], keys=sorted([ALICE.key, BOB.key])),
    "seen keys not sorted": votes((), [reveal(seen=(0, 1))], keys=sorted([ALICE.key, BOB.key])[::-1]),
    "seen keys repeated": votes((), [reveal(seen=(0, 1))], keys=[ALICE.key, ALICE.key]),
    "seen key 31 bytes": votes((), [reveal()], keys=[ALICE.key[:31]]),
    "seen key nobody lists (two encodings of one vote)": votes((), [reveal()], keys=sorted([ALICE.key, BOB.key])),
    "seen keys too many": votes((), [reveal()], keys=[bytes([i // 256, i % 256]) * 16 for i in range(MAX_ITEMS + 1)]),
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_wrong_shape_rejected(name):
    data = pack(BAD_BODIES[name])
    with pytest.raises(WireError):
        decode_body(data)
    # Validly signed, it is still rejected by the verifier.
    with pytest.raises(WireError):
        Verifier(GID).open(envelope(ALICE, data))


def test_shape_error_messages_name_the_problem():
    def msg(obj):
        with pytest.raises(WireError) as info:
            decode_body(pack(obj))
        return str(info.value)

    assert "label" in msg(BAD_BODIES["label = classes"])
    assert "probabilit" in msg(BAD_BODIES["proba over one"])
    assert "lamport" in msg(BAD_BODIES["query lamport 0"])
    assert "finite" in msg(BAD_BODIES["query nan feature"])
    assert "4 numbers" in msg(BAD_BODIES["query 3 features"])
    assert "round" in msg(BAD_BODIES["round 15 bytes"])
    assert "unknown body kind" in msg(BAD_BODIES["unknown kind"])


def test_encode_body_rejects_other_types():
    with pytest.raises(TypeError):
        encode_body(Commit(RID, DIGEST))


# -- limits ------------------------------------------------------------------------------------

HUGE_ARRAY = b"\xdd\xff\xff\xff\xff"  # array32 header claiming 2**32 - 1 items
DEEP = b"\x91" * 100_000  # 100000 nested one-item arrays


@pytest.mark.parametrize("data", [HUGE_ARRAY, HUGE_ARRAY + b"\x90" * 64, b"\xdc\xff\xff", DEEP,
                                  DEEP + b"\x90", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff",
                                  b"\xc6\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x01"],
                         ids=["array32", "array32+tail", "array16", "deep", "deep+leaf", "map32",
                              "str32", "bin32", "ext32"])
@pytest.mark.parametrize("entry", ["open", "unpack_batch", "decode_body"])
def test_hostile_headers_rejected_fast(entry, data):
    fn = {"open": Verifier(GID).open, "unpack_batch": unpack_batch, "decode_body": decode_body}[entry]
    assert_fast_wire_error(fn, data)


def test_batch_message_count_limit():
    raw = ALICE.sign(GID, BODIES["register"]).raw
    assert len(unpack_batch(pack_batch([raw] * MAX_BATCH_MESSAGES))) == MAX_BATCH_MESSAGES
    err = assert_fast_wire_error(unpack_batch, pack_batch([raw] * (MAX_BATCH_MESSAGES + 1)))
    assert str(MAX_BATCH_MESSAGES) in str(err)
    # Tiny items do not help: the count alone is the limit.
    assert_fast_wire_error(unpack_batch, pack_batch([b"\xc0"] * (MAX_BATCH_MESSAGES + 1)))


def test_batch_byte_limit():
    # Envelope-shaped items, each within every per-item limit, so only the size can refuse it.
    item = pack([ALICE.key, b"\x90" * 2200, b"s" * 64])
    n = MAX_BATCH_BYTES // len(item)
    fits = pack_batch([item] * n)
    assert len(fits) <= MAX_BATCH_BYTES
    assert len(unpack_batch(fits)) == n
    over = pack_batch([item] * (n + 1))
    assert len(over) > MAX_BATCH_BYTES
    assert n + 1 <= MAX_BATCH_MESSAGES
    err = assert_fast_wire_error(unpack_batch, over)
    assert "over" in str(err)
    assert_fast_wire_error(unpack_batch, b"\x00" * (MAX_BATCH_BYTES + 1))
    assert_fast_wire_error(unpack_batch, b"\x91" * (4 * MAX_BATCH_BYTES))


@pytest.mark.parametrize("data", [b"", b"\x93", b"\xc0", b"\x80", b"\xa3abc", b"\x90\x90"])
def test_batch_not_an_array_or_truncated(data):
    with pytest.raises(WireError):
        unpack_batch(data)


@pytest.mark.parametrize("n", [0, 1, 15, 16, 300])
def test_pack_unpack_batch_round_trip(n):
    raws = [ALICE.sign(GID, Query(i + 1, (ROW,))).raw for i in range(n)]
    data = pack_batch(raws)
    if n < 16:
        assert data[0] == 0x90 | n
    else:
        assert data[:3] == b"\xdc" + n.to_bytes(2, "big")
    assert data == pack([fields(r) for r in raws])  # exactly msgpack's own array encoding
    envs = unpack_batch(data)
    assert envs == [fields(r) for r in raws]
    verifier = Verifier(GID)
    for i, (env, raw) in enumerate(zip(envs, raws)):
        signed = verifier.open_fields(env)
        assert signed.raw == raw
        assert signed.msg.body == Query(i + 1, (ROW,))


def test_pack_batch_large_header():
    n = 65536
    data = pack_batch([b"\xc0"] * n)
    assert data[:5] == b"\xdd" + n.to_bytes(4, "big")
    assert msgpack.unpackb(data) == [None] * n


# -- duplicates cost no verification ----------------------------------------------------------


def test_open_fields_known_id_returns_none_without_verifying():
    signed = ALICE.sign(GID, BODIES["votes"])
    key, body, sig = fields(signed.raw)
    forged = [key, body, bytes(64)]  # a signature that would never verify
    asked = []

    def known(mid):
        asked.append(mid)
        return True

    verifier = Verifier(GID)
    assert verifier.open_fields(forged, is_known=known) is None
    assert verifier.open_fields([key, body, sig], is_known=known) is None
    assert asked == [signed.msg.id, signed.msg.id]
    # Not known: verified as usual.
    with pytest.raises(WireError, match="signature"):
        verifier.open_fields(forged, is_known=lambda mid: False)
    opened = verifier.open_fields([key, body, sig], raw=signed.raw, is_known=lambda mid: False)
    assert opened.msg == signed.msg and opened.raw == signed.raw


def test_open_fields_shape_checked_before_is_known():
    def known(mid):
        raise AssertionError("is_known must not be asked about a malformed envelope")

    with pytest.raises(WireError):
        Verifier(GID).open_fields([ALICE.key, b"\x90", b"short"], is_known=known)


def test_keys_that_are_not_curve_points_are_refused():
    """libsodium refuses an author key that is not a valid point of full order, whatever the
    signature: nobody can sign under such a key, and a small-order key verifies too much."""
    verifier = Verifier(GID)
    _, body, sig = fields(BOB.sign(GID, BODIES["register"]).raw)
    for key in (bytes(32), b"\x01" + bytes(31), b"\xff" * 32):
        with pytest.raises(WireError, match="bad signature"):
            verifier.open(pack([key, body, sig]))
    ids = [Identity.from_seed(bytes([i + 10]) * 32) for i in range(10)]
    for ident in ids:
        assert verifier.open(ident.sign(GID, BODIES["register"]).raw).msg.author == ident.key
    with pytest.raises(WireError):
        verifier.open(pack([ids[0].key, body, sig]))


# -- property: hostile input raises only WireError --------------------------------------------

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=80)
    | st.binary(max_size=80)
    | st.sampled_from(["register", "query", "votes", RID, ALICE.key, PROBA_ONE, MAX_LAMPORT])
)
packable = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=30,
)
body_like = st.tuples(
    st.sampled_from(["register", "query", "votes", "vote", ""]),
    st.lists(packable, max_size=4),
).map(lambda t: [t[0], *t[1]])


def only_wire_errors(fn, arg):
    try:
        return fn(arg)
    except WireError:
        return None


@PROPERTY
@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_wire_error(data):
    only_wire_errors(Verifier(GID).open, data)
    only_wire_errors(unpack_batch, data)
    only_wire_errors(decode_body, data)
    for env in only_wire_errors(unpack_batch, data) or []:
        only_wire_errors(Verifier(GID).open_fields, env)


@PROPERTY
@given(st.one_of(packable, body_like))
def test_arbitrary_objects_raise_only_wire_error(obj):
    data = msgpack.packb(obj, use_bin_type=True)
    only_wire_errors(Verifier(GID).open, data)
    only_wire_errors(unpack_batch, data)
    only_wire_errors(decode_body, data)
    only_wire_errors(Verifier(GID).open_fields, obj)
    body = only_wire_errors(decode_body, data)
    if body is not None:
        assert encode_body(body) == data


@PROPERTY
@given(body_like, st.booleans())
def test_signed_arbitrary_bodies_raise_only_wire_error(obj, single_float):
    """Past the signature check: a valid signature over any body still yields only WireError."""
    try:
        data = msgpack.packb(obj, use_bin_type=True, use_single_float=single_float)
    except OverflowError:  # a float beyond float32 range cannot be packed single
        assume(False)
    raw = envelope(ALICE, data)
    signed = only_wire_errors(Verifier(GID).open, raw)
    if signed is not None:
        assert encode_body(signed.msg.body) == data
        assert signed.raw == raw
    for env in only_wire_errors(unpack_batch, pack_batch([raw, raw])) or []:
        only_wire_errors(Verifier(GID).open_fields, env)


@PROPERTY
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=200), st.binary(min_size=64, max_size=64))
def test_random_keys_and_signatures_raise_only_wire_error(key, body, sig):
    with pytest.raises(WireError):
        Verifier(GID).open(pack([key, body, sig]))


_KEYS = [bytes([k]) * 32 for k in (1, 2, 3)]
_ODD = [None, True, 1.0, -1, 0, 1, 3, 2**64 - 1, b"", bytes(15), bytes(17), bytes(32), "x", [], [0]]


@st.composite
def _vote_fields(draw):
    """A valid vote message's fields, then (usually) one field swapped for something odd."""
    keys = sorted(draw(st.sets(st.sampled_from(_KEYS))))
    rids = [bytes([i]) * ROUND_BYTES for i in range(3)]
    commits = [[rid, DIGEST] for rid in draw(st.lists(st.sampled_from(rids), unique=True, max_size=2))]
    reveals = [[rid, draw(st.integers(0, len(CLASSES) - 1)), draw(st.lists(st.integers(0, PROBA_ONE), min_size=3, max_size=3)),
                SALT, sorted(draw(st.sets(st.integers(0, len(keys) - 1)))) if keys else []]
               for rid in draw(st.lists(st.sampled_from(rids), unique=True, max_size=2))]
    fields = [draw(st.sampled_from([1, 7, MAX_LAMPORT])), commits, reveals, keys]
    slots = [(fields, 0), (fields, 1), (fields, 2), (fields, 3)]
    for lst in (commits, reveals, keys, *commits, *reveals, *(r[2] for r in reveals), *(r[4] for r in reveals)):
        slots += [(lst, i) for i in range(len(lst))]
        slots.append((lst, None))  # append an extra item
    if draw(st.integers(0, 4)):
        where, i = draw(st.sampled_from(slots))
        odd = draw(st.sampled_from(_ODD + [fields[1][:1] and fields[1][0], fields[2][:1] and fields[2][0], _KEYS[0]]))
        if i is None:
            where.append(odd)
        else:
            where[i] = odd
    return fields


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_vote_fields())
@example([1, [], [[RID, 0, [PROBA_ONE, 0, 0], SALT, [0, 0]]], [_KEYS[0]]])  # a repeated index
@example([1, [], [[RID, 0, [PROBA_ONE, 0, 0], SALT, [1, 0]]], _KEYS[:2]])  # out of order
@example([1, [[RID, DIGEST], [RID, DIGEST]], [], []])  # two commits on one round
def test_fast_vote_decoding_equals_the_checked_one(fields):
    """The one-pass decoder accepts exactly what the field-by-field one accepts, with the same
    result (the latter then names the problem)."""
    from p2pml.wire import _decode_votes, _votes_fast

    try:
        checked = _decode_votes(*fields, 3)
    except WireError:
        checked = None
    assert _votes_fast(*fields, 3) == checked


def test_signatures_are_standard_ed25519():
    """Signed with libsodium: the very bytes ``cryptography``'s Ed25519 gives (and verifies)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    signed = ALICE.sign(GID, Query(3, (ROW,)))
    key, body, sig = msgpack.unpackb(signed.raw)
    reference = Ed25519PrivateKey.from_private_bytes(ALICE.seed())
    assert sig == reference.sign(DOMAIN + GID + key + body)
    reference.public_key().verify(sig, DOMAIN + GID + key + body)
