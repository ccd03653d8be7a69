"""Accounts and transfers in the ledger (docs/ledger.md, "Accounts and transfers"): balances from
the genesis, signed transfers with a sequence number, replays and overdrafts void, unfunded
senders held back; and, under any order of deliveries with duplicates, the same state, supply
conserved, no balance or stake below zero."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pml import ledger as L
from p2pml.config import ConfigError, MODEL_KINDS, parse
from p2pml.wire import Identity, WireError, decode_body, encode_body
from tests.conftest import NAMES, Net, card, check_reach
from tests.test_determinism import deliver

EXAMPLES = int(os.environ.get("P2PML_PROPERTY_EXAMPLES", "120"))
ALICE = Identity.from_seed(bytes([91]) * 32)  # a genesis account, no seat
BOB = Identity.from_seed(bytes([92]) * 32)  # funded only by transfers
REACH = {"examples": 0, "applied": 0, "void": 0, "held_back": 0, "relayed": 0, "slashed": 0, "rewarded": 0}


def funded_net() -> Net:
    net = Net()
    net.genesis = L.Genesis(tuple(L.Slot(NAMES[i]) for i in range(5)), accounts=((ALICE.key, 500),))
    net.gid = net.genesis.id()
    return net


NET = funded_net()


def send(ident: Identity, lamport: int, seq: int, to: bytes, amount: int) -> L.Message:
    return ident.sign(NET.gid, L.Transfer(lamport, seq, to, amount)).msg


def ledger_with(*msgs) -> L.Ledger:
    lg = L.Ledger(NET.genesis)
    for m in NET.registrations():
        assert lg.add(m) is None
    for m in msgs:
        lg.add(m)
    return lg


def test_the_genesis_funds_each_seat_and_each_account():
    lg = ledger_with()
    state = lg.state
    for ident in NET.ids:
        assert state.accounts[ident.key] == (9000, 0)  # GENESIS_BALANCE, no transfer yet
    assert state.accounts[ALICE.key] == (500, 0)
    assert NET.genesis.supply == 5 * (1000 + 9000) + 500 == state.total()
    # Before its seats are registered, their deposits and balances are unclaimed.
    empty = L.Ledger(NET.genesis).state
    assert empty.unclaimed == 5 * 10_000 and empty.total() == NET.genesis.supply


def test_a_transfer_moves_the_amount_and_a_replay_or_overdraft_is_void():
    ada, bo = NET.ids[0], NET.ids[1]
    first = send(ada, 1, 1, bo.key, 1500)
    lg = ledger_with(first)
    assert lg.state.accounts[ada.key] == (7500, 1) and lg.state.accounts[bo.key] == (10_500, 0)
    assert lg.transfer_result(first.id) == (True, None)
    again = send(ada, 2, 1, bo.key, 1500)  # the same sequence number, signed anew
    too_much = send(ada, 3, 2, bo.key, 7501)
    wrong_seq = send(ada, 4, 5, bo.key, 1)
    for m in (again, too_much, wrong_seq):
        assert lg.add(m) is None  # held: valid messages, void in the fold
    assert lg.transfer_result(again.id) == (False, "sequence number 1 is not the next one (2)")
    assert lg.transfer_result(too_much.id) == (False, "amount 7501 is more than the balance 7500")
    assert lg.transfer_result(wrong_seq.id)[1] == "sequence number 5 is not the next one (2)"
    assert lg.state.accounts[ada.key] == (7500, 1) and lg.state.void == 3 and lg.state.transfers == 1
    assert lg.add(first) is None and lg.state.transfers == 1  # the same message again: a duplicate
    assert lg.state.total() == NET.genesis.supply


def test_transfers_apply_in_lamport_order_whatever_the_arrival():
    """ada pays bo, then bo pays cy more than bo had before: in (lamport, id) order it is
    covered; delivered the other way round, the state is the same."""
    ada, bo, cy = NET.ids[:3]
    pay_bo = send(ada, 5, 1, bo.key, 5000)
    bo_pays = send(bo, 6, 1, cy.key, 12_000)
    one, two = ledger_with(pay_bo, bo_pays), ledger_with(bo_pays, pay_bo)
    assert one.root() == two.root()
    assert one.state.accounts[bo.key] == (2000, 1) and one.state.accounts[cy.key] == (21_000, 0)
    # with a lower lamport than the payment that covers it, it comes first and is void
    early = send(bo, 4, 1, cy.key, 12_000)
    lg = ledger_with(early, pay_bo)
    assert lg.transfer_result(early.id) == (False, "amount 12000 is more than the balance 9000")


def test_a_key_nothing_funds_is_held_back_until_something_does():
    carol = Identity.from_seed(bytes([93]) * 32)
    lg = ledger_with()
    onward = send(BOB, 9, 1, carol.key, 10)
    assert lg.add(onward) == L.NOT_AN_ACCOUNT  # not held: re-offered by anti-entropy
    assert lg.add(send(carol, 1, 1, BOB.key, 1)) == L.NOT_AN_ACCOUNT
    assert lg.add(send(ALICE, 8, 1, BOB.key, 100)) is None  # alice's genesis account funds bob
    assert lg.add(onward) is None
    assert lg.state.accounts[BOB.key] == (90, 1) and lg.state.accounts[carol.key] == (10, 0)
    assert lg.add(send(ALICE, 10, 2, ALICE.key, 1)) == "a transfer to oneself"


def test_transfer_wire_format_is_canonical_and_checked():
    body = L.Transfer(7, 1, bytes([3]) * 32, 250)
    data = encode_body(body)
    assert decode_body(data) == body
    for bad, needle in ((L.Transfer(7, 1, bytes([3]) * 31, 250), "recipient key must be 32 bytes"),
                        (L.Transfer(7, 1, bytes([3]) * 32, 0), "amount must be an integer in [1, "),
                        (L.Transfer(7, 0, bytes([3]) * 32, 5), "seq must be an integer in [1, "),
                        (L.Transfer(0, 1, bytes([3]) * 32, 5), "lamport must be an integer in [1, ")):
        with pytest.raises(WireError) as err:
            decode_body(encode_body(bad))
        assert needle in str(err.value), (needle, err.value)


def test_genesis_accounts_in_the_peers_file():
    peers = '[[peer]]\nname = "ada"\nport = 8001\nmodel = "knn"\n'
    key = "ab" * 32
    net = parse(peers + f'\n[[account]]\nkey = "{key}"\nbalance = 250\n')
    assert net.accounts == ((bytes.fromhex(key), 250),) and net.genesis().supply == 10_000 + 250
    assert net.genesis().id() != parse(peers).genesis().id()  # the accounts are in the genesis id
    for text, needle in (('[[account]]\nkey = "zz"\nbalance = 1\n', "key must be 64 hex digits"),
                         (f'[[account]]\nkey = "{key}"\nbalance = 0\n', "balance must be an integer"),
                         (f'[[account]]\nkey = "{key}"\n', "needs exactly key"),
                         (f'[[account]]\nkey = "{key}"\nbalance = 1\n[[account]]\nkey = "{key}"\nbalance = 2\n',
                          "listed twice")):
        with pytest.raises(ConfigError) as err:
            parse(peers + "\n" + text)
        assert needle in str(err.value), (needle, err.value)
    with pytest.raises(ConfigError, match="must be"):
        parse("account = 3\n" + peers)


# --- the property test --------------------------------------------------------------------------


@pytest.fixture
def small_constants(monkeypatch):
    monkeypatch.setattr(L, "ACCURACY_WINDOW", 4)  # the hostile voter is slashed within the history
    monkeypatch.setattr(L, "CHECKPOINT_EVERY", 3)  # and transfers cross checkpoints

KEYS = [*NET.ids, ALICE, BOB]


@st.composite
def histories(draw):
    """Registrations, a few queries and votes (some hostile: slashes move stake), and transfers
    between the members, alice (a genesis account) and bob (funded by transfers only): random
    amounts (overdrafts), sequence numbers (replays, gaps) and lamports."""
    msgs = list(NET.registrations())
    for issuer, lamport in draw(st.lists(st.tuples(st.integers(0, 4), st.integers(1, 30)), max_size=4)):
        q, rids = NET.query(issuer, lamport, 2)
        msgs.append(q)
        for voter in range(5):
            msgs.append(NET.votes(voter, lamport, [(rid, 1 if voter == 4 else 0) for rid in rids]))
    sent: dict[int, int] = {}
    lamport = 0
    if draw(st.booleans()):  # bob is paid, then pays on (held back wherever it arrives first)
        msgs.append(send(NET.ids[0], 1, 1, BOB.key, 600))
        msgs.append(send(BOB, 2, 1, NET.ids[2].key, 50))
        sent = {0: 1, 6: 1}
        lamport = 2
    for sender, to, step, replay, amount in draw(st.lists(st.tuples(
            st.integers(0, 6), st.integers(0, 6), st.integers(-3, 4), st.integers(0, 4),
            st.sampled_from([1, 50, 400, 600, 4000, 9000, 12_000])), min_size=1, max_size=14)):
        if sender == to:
            to = 6  # to bob, who then has something to send on
        lamport = max(1, lamport + step)  # mostly rising; sometimes back (out of order)
        seq = sent.get(sender, 0) + 1
        if replay == 0:  # a replay, or a gap
            seq = max(1, seq + draw(st.sampled_from([-1, 1])))
        else:
            sent[sender] = seq
        msgs.append(send(KEYS[sender], lamport, seq, KEYS[to].key, amount))
    return msgs


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(msgs=histories(), data=st.data())
def test_balances_do_not_depend_on_the_order_and_supply_is_conserved(small_constants, msgs, data):
    ref = L.Ledger(NET.genesis)
    deliver(ref, sorted(msgs, key=lambda m: m.id))
    order = data.draw(st.permutations(msgs))
    dups = data.draw(st.lists(st.sampled_from(msgs), max_size=8))
    reads = data.draw(st.sets(st.integers(0, len(msgs) + len(dups)), max_size=6))
    lg = L.Ledger(NET.genesis)
    logged, add = [], lg.add

    def add_and_log(m):  # what a node's log holds: each message once, in the order it was held
        known = m.id in lg.held
        reason = add(m)
        if reason is None and not known:
            logged.append(m)
        return reason

    lg.add = add_and_log
    refused = deliver(lg, order + dups, reads)
    assert lg.root() == ref.root() and lg.state.canonical() == ref.state.canonical()
    state = lg.state
    assert state.total() == NET.genesis.supply  # conservation, after any order
    assert all(b >= 0 for b, _ in state.accounts.values()) and all(p.stake >= 0 for p in state.peers.values())
    # replay from the log (the order of holding) gives the same state as the incremental fold
    replayed = L.replay(NET.genesis, len(logged), logged.__getitem__, keep=4)
    assert replayed.root() == lg.root()
    REACH["examples"] += 1
    REACH["applied"] += state.transfers > 0
    REACH["void"] += state.void > 0
    REACH["held_back"] += any(m.author == BOB.key for m in refused)
    REACH["relayed"] += state.accounts.get(BOB.key, (0, 0))[1] > 0
    REACH["slashed"] += any(p.slashed for p in state.peers.values())
    REACH["rewarded"] += any(p.rewarded for p in state.peers.values())


def test_the_balance_property_test_reaches_void_and_relayed_transfers():
    check_reach(REACH, {"applied": 0.8, "void": 0.5, "held_back": 0.05, "relayed": 0.2, "slashed": 0.2,
                        "rewarded": 0.2},
                "balance")


def test_a_seat_that_changes_hands_takes_its_genesis_balance_with_it():
    """The seat's balance belongs to whoever holds the seat: a lower registration id wins it
    (docs/ledger.md), and the loser's transfers, funded by that balance, become void."""
    ada = NET.ids[0]
    rival = Identity.from_seed(bytes([94]) * 32)
    regs = [rival.sign(NET.gid, L.Register("ada", card(MODEL_KINDS[0]), L.DEPOSIT)).msg,
            ada.sign(NET.gid, L.Register("ada", card(MODEL_KINDS[0]), L.DEPOSIT)).msg]
    winner, loser = sorted(regs, key=lambda m: m.id)
    lg = L.Ledger(NET.genesis)
    for m in [loser] + [r for r in NET.registrations() if r.body.name != "ada"]:
        assert lg.add(m) is None
    spend = (rival if loser.author == rival.key else ada).sign(
        NET.gid, L.Transfer(3, 1, NET.ids[1].key, 100)).msg
    assert lg.add(spend) is None and lg.transfer_result(spend.id) == (True, None)
    assert lg.add(winner) is None  # takes the seat: replayed from genesis
    assert lg.transfer_result(spend.id) == (False, "amount 100 is more than the balance 0")
    assert lg.state.accounts[winner.author] == (9000, 0) and lg.state.total() == NET.genesis.supply


# --- real processes -----------------------------------------------------------------------------


def client(*args, timeout: float = 60):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "p2pml.client", *args], capture_output=True, text=True,
                          timeout=timeout)


async def test_a_transfer_by_the_client_reaches_every_node_and_replays_are_void(make_cluster, tmp_path):
    """``python -m p2pml.client transfer`` pays a fresh key from a member's node.key; every node
    shows the same balances, the newcomer can pay on, a replayed envelope is a duplicate, a
    second transfer signed with a used sequence number is void, an overdraft is refused, and
    supply is conserved on every node."""
    import time
    import urllib.error

    import aiohttp

    from p2pml.cluster import get_json
    from p2pml.wire import pack_batch

    cluster = make_cluster(3)
    urls = [cluster.url(n) for n in cluster.names]
    ada_key = cluster.data_root / "ada" / "node.key"
    ada = Identity.from_seed(ada_key.read_bytes())
    newcomer = Identity.from_seed(bytes([95]) * 32)
    new_key = tmp_path / "new.key"
    new_key.write_bytes(bytes([95]) * 32)
    new_key.chmod(0o600)

    r = client("transfer", "--key-file", str(ada_key), "--to", newcomer.key.hex(), "--amount", "1000",
               "--peer", urls[0])
    assert r.returncode == 0, r.stderr
    assert f"transferred 1000 to {newcomer.key.hex()}" in r.stdout and "balance now 8000" in r.stdout

    def accounts_everywhere(key: bytes, want: tuple[int, int]) -> None:
        deadline = time.monotonic() + 15
        while True:
            got = [(a["balance"], a["seq"]) for a in (get_json(f"{u}/account/{key.hex()}") for u in urls)]
            if all(g == want for g in got):
                return
            assert time.monotonic() < deadline, (key.hex()[:8], got, want)
            time.sleep(0.1)

    accounts_everywhere(newcomer.key, (1000, 0))
    accounts_everywhere(ada.key, (8000, 1))
    bo = next(bytes.fromhex(p["key"]) for p in get_json(urls[0] + "/ledger")["peers"].values() if p["name"] == "bo")
    r = client("transfer", "--key-file", str(new_key), "--to", bo.hex(), "--amount", "300", "--peer", urls[2])
    assert r.returncode == 0, r.stderr
    accounts_everywhere(newcomer.key, (700, 1))
    accounts_everywhere(bo, (9300, 0))

    # An overdraft is refused by the client before anything is signed...
    r = client("transfer", "--key-file", str(new_key), "--to", bo.hex(), "--amount", "701", "--peer", urls[0])
    assert r.returncode == 2 and "is 700, less than 701" in r.stderr, r.stderr
    # ...and, signed by hand and sent anyway, or with a used sequence number, it is void.
    gid = bytes.fromhex(get_json(urls[0] + "/ledger")["genesis"])
    lamport = get_json(urls[0] + "/ledger")["lamport"] + 1
    overdraft = newcomer.sign(gid, L.Transfer(lamport, 2, bo, 701))
    replay = newcomer.sign(gid, L.Transfer(lamport + 1, 1, bo, 5))
    async with aiohttp.ClientSession() as http:
        async with http.post(urls[1] + "/gossip", data=pack_batch([overdraft.raw, replay.raw]),
                             headers={"Content-Type": "application/msgpack"}) as resp:
            assert (await resp.json())["accepted"] == 2
    def held(url: str) -> dict:
        try:
            return get_json(url)
        except urllib.error.HTTPError as exc:  # not here yet: gossip is on its way
            assert exc.code == 404, exc
            return {}

    deadline = time.monotonic() + 15
    while True:
        views = [held(f"{u}/message/{m.msg.id.hex()}") for u in urls for m in (overdraft, replay)]
        if all(v.get("applied") is False for v in views):
            break
        assert time.monotonic() < deadline, views
        time.sleep(0.1)
    assert views[0]["void"] == "amount 701 is more than the balance 700"
    assert views[1]["void"] == "sequence number 1 is not the next one (2)"
    accounts_everywhere(newcomer.key, (700, 1))
    ledgers = cluster.wait_converged(timeout=15)
    assert len({lg["root"] for lg in ledgers.values()}) == 1
    for lg in ledgers.values():
        total = sum(a["balance"] for a in lg["accounts"].values()) + sum(p["stake"] for p in lg["peers"].values())
        assert total + lg["pool"] + lg["unclaimed"] == lg["supply"] == 3 * 10_000
        assert (lg["transfers"], lg["void"]) == (2, 2)


def test_client_errors_are_clear(tmp_path):
    loose = tmp_path / "loose.key"
    loose.write_bytes(bytes(32))
    loose.chmod(0o644)
    short = tmp_path / "short.key"
    short.write_bytes(bytes(31))
    short.chmod(0o600)
    for args, needle in (
            (["transfer", "--key-file", str(loose), "--to", "ab" * 32, "--amount", "1", "--peer", "http://127.0.0.1:9"],
             "can be read by others"),
            (["transfer", "--key-file", str(short), "--to", "ab" * 32, "--amount", "1", "--peer", "http://127.0.0.1:9"],
             "not a key file: 31 bytes"),
            (["transfer", "--key-file", str(tmp_path / "none"), "--to", "ab", "--amount", "1", "--peer", "x"],
             "cannot read the key file"),
            (["account", "--key", "xyz", "--peer", "http://127.0.0.1:9"], "is not a key: 64 hex digits"),
            (["account", "--key", "ab" * 32, "--peer", "http://127.0.0.1:9"], "cannot reach 127.0.0.1:9")):
        r = client(*args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
