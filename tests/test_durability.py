"""Nothing accepted is lost: restarts, kill -9, and damaged data dirs, on real node processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.error

import pytest

from p2pml.cluster import free_ports, get_json, write_network
from p2pml.store import LOG_FILE, LOG_MAGIC
from tests.conftest import card
from tests.test_network import ask

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.1, 2.8, 4.7, 1.2], [7.7, 3.0, 6.1, 2.3], [5.9, 3.0, 5.1, 1.8]]


def converged_root(cluster) -> str:
    ledgers = cluster.wait_converged(timeout=15)
    roots = {lg["root"] for lg in ledgers.values()}
    assert len(ledgers) == len(cluster.names) and len(roots) == 1, roots
    return roots.pop()


async def test_whole_cluster_restart_keeps_exact_roots(make_cluster):
    cluster = make_cluster(5)
    answers = await ask(cluster, ROWS * 10)
    assert all(status == 200 for status, _, _ in answers)
    before = cluster.wait_converged(timeout=15)
    root = converged_root(cluster)

    cluster.stop()  # clean shutdown of every peer
    cluster.start()
    cluster.wait_ready()
    after = cluster.ledgers()
    assert {lg["root"] for lg in after.values()} == {root}  # straight from each log, no gossip
    assert {n: lg["messages"] for n, lg in after.items()} == {n: lg["messages"] for n, lg in before.items()}


async def test_kill_9_of_every_peer_loses_no_acknowledged_round(make_cluster):
    cluster = make_cluster(5)
    answers = await ask(cluster, ROWS * 10, concurrency=8)
    assert all(status == 200 for status, _, _ in answers)
    queries = {body["query"] for _, body, _ in answers}
    for name in cluster.names:
        cluster.kill(name)  # no chance to flush anything
    cluster.start()
    cluster.wait_ready()
    converged_root(cluster)
    for name in cluster.names:
        # votes lost with the crash came back from peers as the node's own, not as a stranger's
        assert get_json(cluster.url(name) + "/health")["status"] == "ok"
        view = get_json(cluster.url(name) + "/ledger")
        assert not any(p["equivocation"] or p["slashed"] for p in view["peers"].values())
        assert view["rounds"] == len(answers)
        for qid in queries:  # every acknowledged query is held, and its rounds settled
            assert get_json(f"{cluster.url(name)}/message/{qid}")["type"] == "query"


def test_damaged_data_dir_fails_clearly(tmp_path):
    peers = write_network(tmp_path / "peers.toml", free_ports(1))
    port = peers.read_text().split("port = ")[1].split()[0]
    data = tmp_path / "data"
    data.mkdir()
    (data / LOG_FILE).write_bytes(b"P2PMLOG9\n" + b"\0" * 20)  # a future, incompatible version
    r = subprocess.run([sys.executable, "-m", "p2pml.node", "--port", port, "--peers", str(peers),
                        "--data-dir", str(data)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2
    assert "not a p2pml v1 message log" in r.stderr and "Traceback" not in r.stderr
    (data / LOG_FILE).write_bytes(LOG_MAGIC)
    (data / "node.key").write_bytes(b"short")
    (data / "node.key").chmod(0o600)
    r = subprocess.run([sys.executable, "-m", "p2pml.node", "--port", port, "--peers", str(peers),
                        "--data-dir", str(data)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "node.key is damaged" in r.stderr and "Traceback" not in r.stderr


async def test_torn_log_tail_is_dropped_and_recovered_from_peers(make_cluster):
    """The log is torn inside the node's own last vote, which its peers already hold: the node
    drops the tail, takes its own vote back from them (it cannot tell it from an impostor's
    then, and holding it is what keeps it from voting twice), and converges."""
    from p2pml.ledger import Votes
    from p2pml.store import RECORD_HEADER
    from p2pml.wire import Verifier

    cluster = make_cluster(3)
    await ask(cluster, ROWS * 5)
    root = converged_root(cluster)
    cluster.stop("cy")
    log = cluster.data_root / "cy" / LOG_FILE
    data = log.read_bytes()
    verifier, key = Verifier(cluster.net.genesis().id()), cluster.net.peers[2].key
    pos, own_vote_at = len(LOG_MAGIC), None
    while pos < len(data):
        length, _ = RECORD_HEADER.unpack_from(data, pos)
        msg = verifier.open(data[pos + 8 : pos + 8 + length]).msg
        if msg.author == key and isinstance(msg.body, Votes):
            own_vote_at = pos
        pos += 8 + length
    assert own_vote_at is not None
    log.write_bytes(data[: own_vote_at + 20])  # a crash in the middle of writing it
    cluster.start("cy")
    cluster.wait_ready(names=["cy"])
    assert converged_root(cluster) == root  # everything lost came back from the others
    text = (cluster.data_root / "cy.log").read_text()
    assert "damaged bytes at offset" in text and "taken as this node's own" in text


async def test_kill_9_at_random_moments_under_load_never_leaves_a_torn_file(make_cluster):
    import json
    import random

    from p2pml.store import LEDGER_FILE

    cluster = make_cluster(3)
    rng = random.Random(3)
    load = asyncio.ensure_future(ask(cluster, ROWS * 40, concurrency=6, targets=["ada", "bo"]))
    for _ in range(5):
        await asyncio.sleep(rng.uniform(0.05, 0.6))
        cluster.kill("cy")  # whatever it was writing, log record or ledger.json
        ledger_file = cluster.data_root / "cy" / LEDGER_FILE
        if ledger_file.exists():
            json.loads(ledger_file.read_text())  # the complete old or new view, never torn
        cluster.start("cy")
        await asyncio.to_thread(cluster.wait_ready, 60, ["cy"])
    answers = await load
    assert all(status == 200 for status, _, _ in answers)
    converged_root(cluster)


async def test_a_second_process_with_the_same_key_refuses_to_run(make_cluster, tmp_path):
    """A copy of a peer's key started elsewhere (another address, an empty data dir) hears the
    original's votes from the network at start-up, and refuses to sign anything."""
    cluster = make_cluster(3)
    await ask(cluster, ROWS * 3)
    cluster.wait_converged(timeout=10)
    clone_dir = tmp_path / "clone"
    clone_dir.mkdir(mode=0o700)
    key = (cluster.data_root / "ada" / "node.key").read_bytes()
    (clone_dir / "node.key").write_bytes(key)
    (clone_dir / "node.key").chmod(0o600)
    # The same network (same seats and keys), with ada's seat at another loopback address.
    text = cluster.peers_file.read_text().replace('host = "127.0.0.1"\nport = ', 'host = "127.0.0.1"\nport = ', 1)
    ada_port = cluster.net.peers[0].port
    text = text.replace(f'host = "127.0.0.1"\nport = {ada_port}', f'host = "127.0.0.2"\nport = {ada_port}')
    (tmp_path / "clone.toml").write_text(text)
    r = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "p2pml.node", "--port", str(ada_port), "--peers",
                         str(tmp_path / "clone.toml"), "--data-dir", str(clone_dir)],
        capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "refusing to run: another process is signing with this node's key" in r.stderr
    # The original runs on, undisturbed, and the network agrees.
    answers = await ask(cluster, ROWS)
    assert all(status == 200 and len(body["votes"]) == 3 for status, body, _ in answers)
    assert get_json(cluster.url("ada") + "/health")["status"] == "ok"


async def test_after_a_crash_a_vote_by_our_key_is_ours_unless_it_contradicts_our_commit(make_cluster):
    """Votes leave before their fsync, so after a crash a vote by a node's key that it does not
    hold may be one the crash lost: the node holds it and votes on. One that commits, on a round
    the node committed on, to another vote is another signer's: the node stops voting (and the
    network slashes the key: two commitments on one round are equivocation). After a clean
    start every vote of ours is held before it leaves, so an unknown one stops the node."""
    import aiohttp

    from p2pml.ledger import Commit, Votes
    from p2pml.store import RUNNING_FILE
    from p2pml.wire import Identity, pack_batch

    cluster = make_cluster(3)
    answers = await ask(cluster, ROWS)
    assert all(status == 200 and len(body["votes"]) == 3 for status, body, _ in answers)
    rid = bytes.fromhex(answers[0][1]["round"])  # cy committed on it
    genesis = bytes.fromhex(get_json(cluster.url("cy") + "/ledger")["genesis"])
    keys = {n: Identity.from_seed((cluster.data_root / n / "node.key").read_bytes()) for n in ("ada", "cy")}
    cluster.kill("cy")
    assert (cluster.data_root / "cy" / RUNNING_FILE).exists()
    cluster.start("cy")
    await asyncio.to_thread(cluster.wait_ready, 60, ["cy"])

    async def gossip(name, signed) -> dict:
        async with aiohttp.ClientSession() as s, s.post(
                cluster.url(name) + "/gossip", data=pack_batch([signed.raw]),
                headers={"Content-Type": "application/msgpack"}) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    def stopped(name) -> str:
        with pytest.raises(urllib.error.HTTPError) as err:
            get_json(cluster.url(name) + "/health")
        assert err.value.code == 503
        return err.value.read().decode()

    # A commit of cy's on a round nobody asked (yet): nothing to contradict; held as cy's own.
    lost = keys["cy"].sign(genesis, Votes(10_000, (Commit(bytes(16), bytes(32)),), ()))
    assert (await gossip("cy", lost))["accepted"] == 1
    assert get_json(cluster.url("cy") + "/health")["status"] == "ok"
    answers = await ask(cluster, ROWS)
    assert all(status == 200 and len(body["votes"]) == 3 for status, body, _ in answers), \
        [(s, b.get("error"), b.get("missing"), b.get("late"), b.get("unrevealed")) for s, b, _ in answers]

    # Another commitment on a round cy committed on: another signer has cy's key.
    clash = keys["cy"].sign(genesis, Votes(10_001, (Commit(rid, bytes(32)),), ()))
    assert (await gossip("cy", clash))["accepted"] == 1
    assert "commits on round" in stopped("cy")
    ledgers = cluster.wait_converged(timeout=15)
    assert all(p["equivocation"] for lg in ledgers.values() for p in lg["peers"].values() if p["name"] == "cy")

    # ada started cleanly: a vote by its key that it does not hold is not its own.
    stranger = keys["ada"].sign(genesis, Votes(10_002, (Commit(bytes(15) + b"\x01", bytes(32)),), ()))
    assert (await gossip("ada", stranger))["accepted"] == 1
    assert "is not in" in stopped("ada")


@pytest.mark.parametrize("back", ["at start", "later"])
async def test_a_commit_the_crash_lost_comes_back_from_peers_and_is_revealed(make_cluster, back):
    """cy held the queries (and the others' votes) on disk, and had sent its commits, but they
    had not reached its disk when it crashed: its peers give them back (during its start-up
    sync, or later), and it reveals them (its model gives the same commitment again), instead
    of leaving them unrevealed."""
    import time
    import zlib

    import aiohttp
    import numpy as np

    from p2pml.ledger import Commit, Query, Votes, commitment, round_id
    from p2pml.model import Model
    from p2pml.store import RECORD_HEADER, RUNNING_FILE
    from p2pml.wire import Identity, Verifier, pack_batch

    def records(path) -> list[bytes]:
        data, pos, out = (path / LOG_FILE).read_bytes(), len(LOG_MAGIC), []
        while pos < len(data):
            n, _ = RECORD_HEADER.unpack_from(data, pos)
            out.append(data[pos + RECORD_HEADER.size : pos + RECORD_HEADER.size + n])
            pos += RECORD_HEADER.size + n
        return out

    cluster = make_cluster(3)
    await ask(cluster, ROWS)
    cluster.wait_converged(timeout=10)
    cluster.stop("cy")
    answers = await ask(cluster, ROWS, targets=["ada"])
    assert all(status == 200 for status, _, _ in answers)
    rids = [bytes.fromhex(body["round"]) for _, body, _ in answers]
    assert all(len(body["votes"]) == 2 for _, body, _ in answers)  # ada's and bo's
    cluster.wait_converged(timeout=10, names=["ada", "bo"])
    deadline = time.monotonic() + 10  # their votes reach ada's log in the background
    while len(records(cluster.data_root / "ada")) < get_json(cluster.url("ada") + "/ledger")["messages"]:
        assert time.monotonic() < deadline, "ada's log does not hold every message it holds"
        await asyncio.sleep(0.05)
    cy_dir = cluster.data_root / "cy"
    held = set(records(cy_dir))
    extra = [r for r in records(cluster.data_root / "ada") if r not in held]
    log_bytes = (cy_dir / LOG_FILE).read_bytes()  # as if cy had held them, durably:
    (cy_dir / LOG_FILE).write_bytes(log_bytes + b"".join(
        RECORD_HEADER.pack(len(r), zlib.crc32(r)) + r for r in extra))
    genesis = bytes.fromhex(get_json(cluster.url("ada") + "/ledger")["genesis"])
    verifier = Verifier(genesis)
    rows = {}
    for r in extra:
        msg = verifier.open(r).msg
        if isinstance(msg.body, Query):
            rows.update((round_id(msg.id, i), row) for i, row in enumerate(msg.body.items))
    cy = Identity.from_seed((cy_dir / "node.key").read_bytes())
    model = Model(cluster.net.peers[2].model)
    commits = []
    for rid in rids:
        ((label, proba),) = model.vote(np.array([rows[rid]]), [rid])
        commits.append(Commit(rid, commitment(cy.key, rid, label, proba, cy.salt(rid))))
    sent = cy.sign(genesis, Votes(10_000, tuple(commits), ()))  # sent, then lost in the crash

    async def give_back(names):
        async with aiohttp.ClientSession() as s:
            for name in names:
                async with s.post(cluster.url(name) + "/gossip", data=pack_batch([sent.raw]),
                                  headers={"Content-Type": "application/msgpack"}) as r:
                    assert r.status == 200

    if back == "at start":
        await give_back(["ada", "bo"])
    (cy_dir / RUNNING_FILE).write_bytes(b"crashed\n")
    cluster.start("cy")
    await asyncio.to_thread(cluster.wait_ready, 60, ["cy"])
    if back == "later":
        await give_back(["cy"])
    cluster.wait_converged(timeout=15)
    cy_id = next(pid for pid, p in get_json(cluster.url("ada") + "/ledger")["peers"].items()
                 if p["name"] == "cy")
    for rid in rids:
        view = get_json(f"{cluster.url('ada')}/round/{rid.hex()}")
        revealed = {v["peer"] for v in view["votes"] + view["late_votes"]}
        assert cy_id in revealed and "cy" not in view["unrevealed"], view
    assert get_json(cluster.url("cy") + "/health")["status"] == "ok"


async def test_a_node_never_votes_nor_reveals_on_rounds_it_pruned(tmp_path, monkeypatch):
    """A real node object over a real log, no network: it starts from a log long enough to be
    pruned while loading that lacks its own registration (which changes the seats: the ledger
    is folded again, not left stale); it commits on no round pruned while its model ran, and
    does not reveal on a round pruned after its commit (the reveal would list no commits)."""
    import os

    from p2pml import service
    from p2pml.config import MODEL_KINDS, NetworkConfig, PeerConfig
    from p2pml.ledger import DEPOSIT, Query, Register
    from p2pml.store import DataDir
    from p2pml.wire import Identity

    monkeypatch.setattr(service, "PRUNE_EVERY", 8)
    monkeypatch.setattr(service, "INLINE_ROWS", 0)  # the model runs in the executor: an await
    peers = tuple(PeerConfig(n, "127.0.0.1", p, MODEL_KINDS[i])
                  for i, (n, p) in enumerate(zip(("ada", "bo", "cy"), free_ports(3))))
    net = NetworkConfig(peers, rounds_in_memory=16)
    gid = net.genesis().id()
    ids = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(3)]
    (tmp_path / "cy").mkdir(mode=0o700)
    fd = os.open(tmp_path / "cy" / "node.key", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, bytes([3]) * 32)
    os.close(fd)
    raws = [ids[i].sign(gid, Register(n, card(MODEL_KINDS[i]), DEPOSIT)).raw for i, n in enumerate(("ada", "bo"))]
    raws += [ids[0].sign(gid, Query(n + 1, ((5.1 + n / 100, 3.5, 1.4, 0.2),))).raw for n in range(60)]
    data = DataDir(tmp_path / "cy")
    data.read_log()
    data.append(raws)
    data.commit_now()
    data.close()

    data = DataDir(tmp_path / "cy")
    node = service.Node(net, peers[2], data)
    try:
        assert node.ledger.is_member(ids[2].key) and not node.ledger.stale
        assert node.ledger.rounds_held < 60  # pruned while loading
        published = []
        real = node._publish

        async def spy(signed, wait):
            published.append(signed.msg)
            await real(signed, wait)

        node._publish = spy
        loop = asyncio.get_running_loop()
        batch = node._next_batch()
        assert batch and not any(node.ledger.is_pruned(rid) for rid, _, _ in batch)
        loop.call_soon(node.ledger.prune, 4)  # while the model runs
        await node._vote(batch, [], loop)
        commits = published[-1].body.commits
        assert commits and not any(node.ledger.is_pruned(c.round) for c in commits)
        assert len(commits) < len(batch)
        mine = commits[0].round
        for n in range(40):  # more rounds; the next prune drops the one we committed on
            node._hold(ids[0].sign(gid, Query(100 + n, ((5.1, 3.5, 1.4, 0.2),))))
        node.ledger.prune(4)
        assert node.ledger.is_pruned(mine) and not node.ledger.stale
        assert node._reveals([mine]) == [] and mine not in node._own
    finally:
        await node.close()


async def test_a_node_does_not_vote_where_every_other_member_has_revealed(tmp_path):
    """A real node object, no network: of a query's three rounds, the one every other member has
    revealed on already gets no vote from it (no reveal can list its commit any more: the vote
    would be late); the one they have not gets one; one whose reveals list a commit of ours that
    it does not hold (a crash lost it) gets no fresh commit, which might contradict the lost
    one: it waits for that one to come back (``_unvoted``). A node back from a long absence fetches
    thousands of such rounds; its votes on them made every peer rebuild its ledger."""
    from p2pml import service
    from p2pml.config import MODEL_KINDS, NetworkConfig, PeerConfig
    from p2pml.ledger import DEPOSIT, Query, Register, Votes, round_id
    from p2pml.store import DataDir
    from tests.conftest import Net

    peers = tuple(PeerConfig(n, "127.0.0.1", p, MODEL_KINDS[i])
                  for i, (n, p) in enumerate(zip(("ada", "bo", "cy"), free_ports(3))))
    net3 = Net(3)
    assert net3.gid == NetworkConfig(peers).genesis().id()
    (tmp_path / "cy").mkdir(mode=0o700)
    (tmp_path / "cy" / "node.key").write_bytes(bytes([3]) * 32)  # net3's seed for cy
    (tmp_path / "cy" / "node.key").chmod(0o600)
    node = service.Node(NetworkConfig(peers), peers[2], DataDir(tmp_path / "cy"))
    try:
        sign = net3.ids[0].sign, net3.ids[1].sign
        query = sign[0](net3.gid, Query(1, ((5.1, 3.5, 1.4, 0.2), (6.1, 2.8, 4.7, 1.2), (7.7, 3.0, 6.1, 2.3))))
        done, open_, lost = (round_id(query.msg.id, k) for k in range(3))
        held = [sign[0](net3.gid, Register("ada", card(MODEL_KINDS[0]), DEPOSIT)),
                sign[1](net3.gid, Register("bo", card(MODEL_KINDS[1]), DEPOSIT)), query]
        held += [sign[i](net3.gid, Votes(2, net3.commits(i, [(done, 0)]), net3.reveals(i, [(done, 0)], seen=[0, 1])))
                 for i in range(2)]  # both others revealed on one round (listing no commit of ours)
        held += [sign[i](net3.gid, Votes(4, net3.commits(i, [(lost, 0)]), net3.reveals(i, [(lost, 0)])))
                 for i in range(2)]  # and on one listing a commit of ours (which a crash lost)
        held.append(sign[1](net3.gid, Votes(3, net3.commits(1, [(open_, 0)]), ())))  # not on this
        for signed in held:
            assert node._hold(signed) is None, signed.msg
        published = []

        async def spy(signed, wait):
            published.append(signed.msg)

        node._publish = spy
        before = node.stats["not_voted"]
        await node._vote(node._next_batch(), [], asyncio.get_running_loop())
        assert [c.round for c in published[-1].body.commits] == [open_]
        assert lost in node._unvoted
        assert node.stats["not_voted"] == before + 2
    finally:
        await node.close()



async def test_a_vote_that_needs_scikit_learn_does_not_stall_the_event_loop(tmp_path, monkeypatch):
    """A real knn node object: a query whose rows tie at the k-th neighbour needs scikit-learn,
    which a node loads only then (about 0.8 s in a node; this test process has imported it
    already, so the load is made 0.5 s slower); the loop keeps turning meanwhile (the model
    call goes to a worker thread), and the vote is scikit-learn's."""
    import time

    import numpy as np

    from p2pml import model, service
    from p2pml.config import MODEL_KINDS, NetworkConfig, PeerConfig
    from p2pml.ledger import DEPOSIT, Query, Register
    from p2pml.model import Model, _split
    from p2pml.store import DataDir
    from tests.conftest import Net

    names = ("ada", "bo", "cy", "di")
    peers = tuple(PeerConfig(n, "127.0.0.1", p, MODEL_KINDS[i]) for i, (n, p) in enumerate(zip(names, free_ports(4))))
    net4 = Net(4)
    (tmp_path / "di").mkdir(mode=0o700)
    (tmp_path / "di" / "node.key").write_bytes(bytes([4]) * 32)
    (tmp_path / "di" / "node.key").chmod(0o600)
    node = service.Node(NetworkConfig(peers), peers[3], DataDir(tmp_path / "di"))
    try:
        assert node.model.kind == "knn" and node.model.predict_proba.slow._proba is None
        x_train = _split()[0]
        i, j = np.triu_indices(len(x_train), 1)
        mid = (x_train[i] + x_train[j]) / 2
        ties = [r for r in mid if node.model.vote_inline(r[None, :].copy(), [b""]) is None][:8]
        assert ties, "no knn tie among the midpoints"
        real_fit = model._fit

        def slow_fit(kind, data):
            time.sleep(1.0)
            return real_fit(kind, data)

        monkeypatch.setattr(model, "_fit", slow_fit)
        ada = net4.ids[0]
        node._hold(ada.sign(net4.gid, Register("ada", card(MODEL_KINDS[0]), DEPOSIT)))
        node._hold(ada.sign(net4.gid, Query(1, tuple(tuple(map(float, r)) for r in ties))))
        published, gaps = [], []

        async def spy(signed, wait):
            published.append(signed.msg)

        async def ticker():
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

        node._publish = spy
        tick = asyncio.create_task(ticker())
        started = time.monotonic()
        await node._vote(node._next_batch(), [], asyncio.get_running_loop())
        took = time.monotonic() - started
        tick.cancel()
        assert node.model.predict_proba.slow._proba is not None  # loaded, for these rows
        assert len(published[-1].body.commits) == len(ties)
        labels = [label for label, _, _, _ in (node._own[c.round] for c in published[-1].body.commits)]
        assert labels == [int(p.argmax()) for p in Model("knn").estimator.predict_proba(np.array(ties))]
        # the fit took 1 s, and the loop kept turning meanwhile: no gap as long as half of it
        # (a fit on the loop would make one gap of the whole second), and many ticks
        assert len(gaps) >= 20 and max(gaps, default=took) < 0.5, (gaps, took)
    finally:
        await node.close()


async def test_a_log_that_cannot_be_written_stops_intake_and_loses_nothing(tmp_path, monkeypatch):
    """A real node and its HTTP API (in this process, so that fsync can fail: "no space left").
    Gossip it accepted but could not make durable is answered 503, not 500; once the unwritten
    backlog passes its bound, intake is refused (503, naming the problem) and so are new
    rounds and the health check, so memory stays bounded; when the disk works again,
    everything accepted is written by itself (the intake is all acknowledged, commits on rounds
    whose queries are not held: nothing else writes), intake resumes, and the log holds every
    message."""
    import os

    import aiohttp
    import msgpack
    from aiohttp.test_utils import TestServer

    from p2pml import store
    from p2pml.api import make_app
    from p2pml.config import MODEL_KINDS, NetworkConfig, PeerConfig
    from p2pml.ledger import DEPOSIT, Commit, Register, Votes
    from p2pml.service import Node
    from p2pml.wire import Identity, pack_batch

    monkeypatch.setattr(store, "MAX_UNWRITTEN_BYTES", 4096)
    peers = tuple(PeerConfig(n, "127.0.0.1", p, MODEL_KINDS[i])
                  for i, (n, p) in enumerate(zip(("ada", "bo", "cy"), free_ports(3))))
    net = NetworkConfig(peers)
    gid = net.genesis().id()
    ada = Identity.from_seed(bytes([1]) * 32)
    node = Node(net, peers[2], store.DataDir(tmp_path / "cy"))
    node._hold(ada.sign(gid, Register("ada", card(MODEL_KINDS[0]), DEPOSIT)))
    node.data.commit_now()
    queries = [ada.sign(gid, Votes(n + 1, (Commit(bytes([n % 256, n // 256]) * 8, b"\x01" * 32),), ()))
               for n in range(300)]
    batches = [pack_batch([q.raw for q in queries[k : k + 10]]) for k in range(0, len(queries), 10)]
    real_fsync, failing = os.fsync, {"on": False}

    def fsync(fd):
        if failing["on"]:
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    server = TestServer(make_app(node), host="127.0.0.1", port=free_ports(1)[0])
    await server.start_server()
    await node.start()  # as api.serve does: listening first
    url = f"http://127.0.0.1:{server.port}"
    answers = []
    try:
        async with aiohttp.ClientSession(headers={"Content-Type": "application/msgpack"}) as http:
            failing["on"] = True
            for batch in batches:
                async with http.post(url + "/gossip", data=batch) as r:
                    answers.append((r.status, (await r.json())["error"]))
                if "not taking messages" in answers[-1][1]:
                    break
            assert answers[0][0] == 503 and "No space left on device" in answers[0][1], answers[0]
            assert answers[-1][0] == 503 and "MiB already accepted are waiting" in answers[-1][1], answers
            taken = sum(1 for q in queries if q.msg.id in node.holdings)
            assert 0 < taken < len(queries)
            assert node.data.unwritten <= 4096 + len(batches[0])  # and the batch that passed it
            async with http.get(url + "/health") as r:
                assert r.status == 503 and (await r.json())["status"] == "cannot write its log"
            async with http.get(url + "/predict?features=5.1,3.5,1.4,0.2") as r:
                assert r.status == 503 and "cannot open a round" in (await r.json())["error"]
            failing["on"] = False  # the disk is back: what was accepted is written, by itself
            for _ in range(100):
                if not node.data.unwritten:
                    break
                await asyncio.sleep(0.1)
            assert node.data.unwritten == 0
            async with http.get(url + "/health") as r:
                assert r.status == 200, await r.text()
            for batch in batches:  # the sender tries again: the rest is taken
                async with http.post(url + "/gossip", data=batch) as r:
                    assert r.status == 200, await r.text()
    finally:
        await server.close()
        await node.close()
    logged = store.DataDir(tmp_path / "cy")
    held = {msgpack.unpackb(raw)[1] for raw in logged.read_log()}
    logged.close()
    assert all(msgpack.unpackb(q.raw)[1] in held for q in queries)
