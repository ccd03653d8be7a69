"""Misbehaving peers, run for real as node processes: every honest node must end with the same
ledger, the attacker paid exactly as the rules say, and no honest peer slashed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sklearn.datasets import load_iris

from p2pml.cluster import get_json
from p2pml.ledger import BPS, DEPOSIT, EQUIVOCATION_SLASH_BPS
from tests.test_network import ask

HONEST = ("ada", "bo", "cy")


def by_name(ledger: dict) -> dict:
    return {p["name"]: p for p in ledger["peers"].values()}


async def test_equivocator_is_slashed_once_on_every_node_with_the_same_evidence(make_cluster):
    cluster = make_cluster(5, behaviors={"ed": "equivocate"})
    iris = load_iris()
    answers = await ask(cluster, iris.data[::15], targets=list(HONEST))
    assert all(status == 200 for status, _, _ in answers)
    ledgers = cluster.wait_converged(timeout=15)
    assert len({lg["root"] for lg in ledgers.values()}) == 1, {n: lg["root"][:8] for n, lg in ledgers.items()}
    evidence = set()
    for name, lg in ledgers.items():
        peers = by_name(lg)
        ed = peers["ed"]
        assert ed["status"] == "ejected" and ed["reason"] == "equivocation", (name, ed)
        assert ed["stake"] == DEPOSIT - DEPOSIT * EQUIVOCATION_SLASH_BPS // BPS  # once, not per round
        evidence.add(tuple(ed["equivocation"]))
        honest = [peers[h] for h in ("ada", "bo", "cy", "di")]
        for h in honest:
            assert h["slashed"] == 0 and h["stake"] == DEPOSIT + h["rewarded"] and h["status"] == "active"
        # what ed lost went to the peers that agreed, to the token (or waits in the pool)
        assert sum(h["rewarded"] for h in honest) + lg["pool"] == DEPOSIT * EQUIVOCATION_SLASH_BPS // BPS
    assert len(evidence) == 1  # the same canonical evidence everywhere
    rid, first, second = evidence.pop()
    assert rid in {body["round"] for _, body, _ in answers}
    messages = [cluster.url("ada") + f"/message/{mid}" for mid in (first, second)]
    bodies = [get_json(url) for url in messages]
    assert {b["author"] for b in bodies} == {next(pid for pid, p in ledgers["ada"]["peers"].items()
                                                 if p["name"] == "ed")}
    assert first < second


async def test_colluding_minority_voting_the_same_wrong_class(make_cluster):
    cluster = make_cluster(5, behaviors={"di": "wrong", "ed": "wrong"})
    iris = load_iris()
    rows = list(range(0, 150, 3))  # 50 rows, every class
    answers = await ask(cluster, iris.data[rows])
    right = sum(body["prediction"] == iris.target_names[iris.target[i]]
                for i, (_, body, _) in zip(rows, answers))
    assert right / len(rows) >= 0.9
    same_wrong = sum(
        len({v["prediction"] for v in body["votes"] if v["name"] in ("di", "ed")}) == 1
        for _, body, _ in answers)
    assert same_wrong >= 0.8 * len(rows)  # they really do collude on one class
    ledgers = cluster.wait_converged(timeout=15)
    assert len({lg["root"] for lg in ledgers.values()}) == 1
    for lg in ledgers.values():
        peers = by_name(lg)
        for bad in ("di", "ed"):
            assert peers[bad]["stake"] < DEPOSIT
            assert peers[bad]["weight"] < min(peers[h]["weight"] for h in HONEST)
        for h in HONEST:
            assert peers[h]["slashed"] == 0 and peers[h]["stake"] == DEPOSIT + peers[h]["rewarded"], \
                {n: (p["stake"], p["history"]) for n, p in peers.items()}


async def test_copycat_is_never_counted_nor_rewarded(make_cluster):
    """A peer without a model that commits only after it has seen a reveal, to whatever the
    reveals say: its commit is listed by no revealer, so its votes are late: never counted in a
    consensus, never judged, its weight stays where it started. And after a few rounds nobody
    waits for its commits, so it cannot slow the network down either."""
    from p2pml.ledger import INITIAL_WEIGHT
    cluster = make_cluster(5, behaviors={"ed": "copycat"})
    iris = load_iris()
    rows = list(range(0, 150, 5))  # 30 rows, every class
    answers = await ask(cluster, iris.data[rows], concurrency=2, targets=list(HONEST) + ["di"])
    assert all(status == 200 for status, _, _ in answers)
    right = sum(body["prediction"] == iris.target_names[iris.target[i]]
                for i, (_, body, _) in zip(rows, answers))
    assert right / len(rows) >= 0.9
    assert not any(v["name"] == "ed" for _, body, _ in answers for v in body["votes"])
    later = sorted(seconds for _, _, seconds in answers[10:])
    # not waiting for its commit every round: that would make each answer last the query timeout
    assert later[len(later) // 2] < cluster.net.query_timeout_ms / 1000
    ledgers = cluster.wait_converged(timeout=15)
    assert len({lg["root"] for lg in ledgers.values()}) == 1
    for lg in ledgers.values():
        peers = by_name(lg)
        ed = peers["ed"]
        # it did copy (its reveals are held, just late), and that earned nothing
        assert ed["late"] >= len(rows) // 2, ed
        assert ed["votes"] == 0 and ed["agreed"] == 0 and ed["weight"] == INITIAL_WEIGHT, ed
        assert ed["stake"] == DEPOSIT  # absence is not punished: copying gains nothing
        for h in ("ada", "bo", "cy", "di"):
            assert peers[h]["stake"] == DEPOSIT and peers[h]["late"] == 0, peers[h]
            assert peers[h]["votes"] >= len(rows)


async def test_a_commit_never_revealed_costs_the_peer_its_weight(make_cluster):
    """A peer that commits in time and never reveals (so it could reveal only when it turns
    out right) loses weight on each such commit as on a wrong vote: it ends with no say. Its
    stake is not burned: a missing reveal may still be on its way (docs/ledger.md)."""
    cluster = make_cluster(5, behaviors={"ed": "withhold"})
    iris = load_iris()
    rows = list(range(0, 150, 3))  # 50 rows
    answers = await ask(cluster, iris.data[rows], concurrency=2, targets=list(HONEST) + ["di"])
    assert all(status == 200 for status, _, _ in answers)
    assert any("ed" in body["unrevealed"] for _, body, _ in answers)
    right = sum(body["prediction"] == iris.target_names[iris.target[i]]
                for i, (_, body, _) in zip(rows, answers))
    assert right / len(rows) >= 0.9
    ledgers = cluster.wait_converged(timeout=15)
    assert len({lg["root"] for lg in ledgers.values()}) == 1
    for lg in ledgers.values():
        peers = by_name(lg)
        ed = peers["ed"]
        assert ed["unrevealed"] >= 40 and ed["agreed"] == 0, ed
        assert ed["weight"] < 10_000 and ed["stake"] == DEPOSIT, ed
        for h in ("ada", "bo", "cy", "di"):
            assert peers[h]["stake"] == DEPOSIT and peers[h]["unrevealed"] == 0, peers[h]
            # an honest model disagrees on a boundary row now and then (each costs a tenth)
            assert peers[h]["agreed"] * 10 >= peers[h]["votes"] * 9, peers[h]
            assert peers[h]["weight"] > 500_000, peers[h]


async def test_a_source_of_invalid_messages_is_ignored_for_a_while_and_nobody_else_is(make_cluster):
    """Forged messages cost their sender: after ``invalid_message_limit`` of them (decaying)
    its gossip, syncs and fetches are refused unread (429) for ``ignore_ms``; other sources,
    the peers and the clients, are untouched; a header naming a peer without that peer's
    proof is scored on the address that sent it, so nobody can get an honest peer ignored."""
    import time

    import aiohttp
    import msgpack

    from p2pml.ledger import Query
    from p2pml.wire import Identity, encode_body, pack, pack_batch

    cluster = make_cluster(3, invalid_message_limit=20, ignore_ms=3000)
    url = cluster.url("ada")
    held = get_json(url + "/ledger")
    some = next(m for m in get_json_messages(url, 3))
    key, _, _ = msgpack.unpackb(bytes.fromhex(some["envelope"]))
    body = encode_body(Query(7, ((5.0, 3.0, 1.5, 0.2),)))
    forged = pack([key, body, bytes(64)])  # a new query in a member's name, not its signature
    duplicate = bytes.fromhex(some["envelope"])

    def session(host: str) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(host, 0)),
                                     timeout=aiohttp.ClientTimeout(total=10))

    async def post(s, batch, headers=None):
        async with s.post(url + "/gossip", data=pack_batch(batch),
                          headers={"Content-Type": "application/msgpack", **(headers or {})}) as r:
            return r.status, await r.json()

    async with session("127.0.0.2") as bad, session("127.0.0.3") as spoof, session("127.0.0.1") as good:
        statuses = []
        for _ in range(30):
            statuses.append((await post(bad, [forged]))[0])
        assert statuses[:19] == [400] * 19 and statuses[-1] == 429, statuses
        status, answer = await post(bad, [duplicate])  # even a valid one is refused unread
        assert status == 429 and "ignored" in answer["error"] and "127.0.0.2" in answer["error"]
        async with bad.post(url + "/sync", data=pack([]), headers={"Content-Type": "application/msgpack"}) as r:
            assert r.status == 429
        # Someone writing bo's name without bo's proof is scored as itself.
        for _ in range(25):
            await post(spoof, [forged], {"X-P2PML-Peer": "bo"})
        health = get_json(url + "/health")
        assert set(health["scores"]["ignored"]) == {"address 127.0.0.2", "address 127.0.0.3"}
        # Others are untouched: a client's gossip and queries, and the peers themselves.
        assert (await post(good, [duplicate]))[0] == 200
        answers = await ask(cluster, load_iris().data[:6], targets=["ada"])
        assert all(status == 200 and len(body["votes"]) == 3 for status, body, _ in answers)
        ledgers = cluster.wait_converged(timeout=10)
        assert len({lg["root"] for lg in ledgers.values()}) == 1
        assert ledgers["ada"]["messages"] > held["messages"]
        # A push stream is for proven peers only; one that sends garbage is cut, and refused
        # when it comes back (here a process holding cy's key, proving cy's name).
        async with session("127.0.0.4") as ws_src:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await ws_src.ws_connect(url + "/gossip/ws", headers={"X-P2PML-Peer": "cy"})
            assert refused.value.status == 403
            cy = Identity.from_seed((cluster.data_root / "cy" / "node.key").read_bytes())
            proof = {"X-P2PML-Peer": "cy",
                     "X-P2PML-Proof": cy.link_proof(bytes.fromhex(held["genesis"]), "cy", "ada", int(time.time()))}
            async with ws_src.ws_connect(url + "/gossip/ws", headers=proof) as ws:
                for _ in range(25):
                    await ws.send_bytes(pack_batch([forged]))
                msg = await ws.receive(timeout=5)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
                assert ws.close_code == 1008
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await ws_src.ws_connect(url + "/gossip/ws", headers=proof)
            assert refused.value.status == 429
            assert "peer cy" in get_json(url + "/health")["scores"]["ignored"]
        # And the ignoring ends.
        await asyncio.sleep(3.2)
        assert (await post(bad, [duplicate]))[0] == 200


def get_json_messages(url: str, n: int):
    """Envelopes of ``n`` messages the node holds (from the rounds it answered)."""
    import aiohttp  # noqa: F401 - keeps the imports of this helper local, like its callers'
    health = get_json(url + "/health")
    assert health["status"] == "ok"
    answer = get_json(url + "/predict?sepal_length=5.1&sepal_width=3.5&petal_length=1.4&petal_width=0.2")
    return [get_json(url + "/message/" + v["message"]) for v in answer["votes"][:n]]


async def test_idle_and_slow_connections_and_query_floods_are_bounded(make_cluster):
    """Hundreds of idle connections, a client trickling its headers, one trickling its body,
    and a flood of queries from one address: each is cut or refused fast, the node's memory
    stays put, and an honest client's queries are answered all along."""
    import time

    import aiohttp

    from p2pml.api import BODY_TIMEOUT_S, MAX_CONNECTIONS_PER_ADDRESS, MAX_PREDICTS_PER_ADDRESS

    cluster = make_cluster(3, idle_timeout_ms=3000)
    url = cluster.url("ada")
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
    pid = cluster.procs["ada"].pid

    def rss_mb() -> float:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS:")).split()[1]) / 1024

    async def honest(n: int = 4) -> list[int]:
        answers = await ask(cluster, load_iris().data[:n], concurrency=1, targets=["ada"])
        return [status for status, _, _ in answers]

    await honest()
    rss0 = rss_mb()
    # Idle connections from one address: beyond the per-address cap they are closed at once.
    idle = []
    for _ in range(MAX_CONNECTIONS_PER_ADDRESS + 100):
        idle.append(await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0)))
    deadline = time.monotonic() + 10  # the node refuses them as it accepts them
    while get_json(url + "/health")["connections"]["refused"] < 100 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    view = get_json(url + "/health")["connections"]
    assert view["refused"] >= 100 and view["open"] <= MAX_CONNECTIONS_PER_ADDRESS + 10, view
    assert await honest() == [200] * 4  # served while they sit there
    # Trickled headers: one byte every 0.2 s never makes a request; cut when idle too long.
    reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.3", 0))
    t0 = time.monotonic()
    cut = None
    for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            cut = time.monotonic() - t0
            break
        if reader.at_eof():
            cut = time.monotonic() - t0
            break
        await asyncio.sleep(0.2)
    writer.close()
    assert cut is not None and cut < 6, cut
    # ...and the idle ones have been closed too.
    closed = 0
    for r, w in idle:
        try:
            closed += await asyncio.wait_for(r.read(1), 0.5) == b""
        except (TimeoutError, ConnectionError):
            pass
        w.close()
    assert closed == len(idle), closed
    # A body that never finishes: 408 after BODY_TIMEOUT_S.
    reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.4", 0))
    writer.write(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"features\"")
    await writer.drain()
    t0 = time.monotonic()
    head = await asyncio.wait_for(reader.read(200), BODY_TIMEOUT_S + 3)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408"), head
    assert BODY_TIMEOUT_S - 0.5 < time.monotonic() - t0 < BODY_TIMEOUT_S + 2
    # A flood of queries from one address: beyond its share, 429 at once; others unaffected.
    # (It keeps under the per-address connection cap, beyond which connections are reset.)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.5", 0), limit=200),
                                     timeout=aiohttp.ClientTimeout(total=30)) as flood:
        async def one():
            t = time.monotonic()
            async with flood.get(url + "/predict", params={"sepal_length": "5.1", "sepal_width": "3.5",
                                                         "petal_length": "1.4", "petal_width": "0.2"}) as r:
                return r.status, time.monotonic() - t
        flooding = asyncio.gather(*(one() for _ in range(3 * MAX_PREDICTS_PER_ADDRESS)))
        honest_during = await honest(6)
        results = await flooding
    assert honest_during == [200] * 6
    refused = [t for status, t in results if status == 429]
    assert len(refused) >= 100, [s for s, _ in results]
    assert max(refused) < 5  # refused fast, not after waiting
    assert {status for status, _ in results} <= {200, 429, 503}
    assert rss_mb() - rss0 < 60, (rss0, rss_mb())


async def test_a_member_flooding_queries_does_not_hold_up_honest_ones(make_cluster):
    """A member (here: a process holding ed's key) publishes 60 queries of 256 rows at once,
    15 360 rounds. Each node votes on at most its burst of them, takes rounds from the issuers
    in turn, and keeps answering honest queries with every peer's vote."""
    import time

    import aiohttp

    from p2pml.ledger import Query
    from p2pml.service import VOTE_BURST_PER_ISSUER
    from p2pml.wire import MAX_ITEMS, Identity, pack_batch

    cluster = make_cluster(3)
    seed = (cluster.data_root / "cy" / "node.key").read_bytes()
    mallory = Identity.from_seed(seed)  # cy's key, in a second process: cy's queries, not cy's node
    genesis = bytes.fromhex(get_json(cluster.url("ada") + "/ledger")["genesis"])
    setosa = load_iris().data[:50]  # rows every model agrees on: this test is about load only
    rows = tuple(tuple(float(x) for x in setosa[i % 50]) for i in range(MAX_ITEMS))
    flood = [mallory.sign(genesis, Query(10_000 + k, rows)).raw for k in range(60)]
    async with aiohttp.ClientSession() as s:
        for name in ("ada", "bo"):
            for k in range(0, len(flood), 10):
                async with s.post(cluster.url(name) + "/gossip", data=pack_batch(flood[k:k + 10]),
                                  headers={"Content-Type": "application/msgpack"}) as r:
                    assert r.status == 200 and (await r.json())["rejected"] == 0
    t0 = time.monotonic()
    answers = await ask(cluster, load_iris().data[::30], concurrency=1, targets=["ada", "bo"])
    took = time.monotonic() - t0
    assert all(status == 200 for status, _, _ in answers), [(st, b, round(t, 2)) for st, b, t in answers]
    iris = load_iris()
    right = sum(body["prediction"] == iris.target_names[iris.target[i]]
                for i, (_, body, _) in zip(range(0, 150, 30), answers))
    assert right >= len(answers) - 1
    # On this 2-core machine the flood (about 2 000 voted rounds per node) makes peers slow to
    # commit, so some answers count fewer votes; they still come: each round opened in time
    # (no 503, above) and each answer within the query timeout once it is.
    from p2pml.service import OPEN_ROUND_TIMEOUT_S
    assert max(t for _, _, t in answers) < OPEN_ROUND_TIMEOUT_S + cluster.net.query_timeout_ms / 1000, took
    for name in ("ada", "bo"):
        intake = get_json(cluster.url(name) + "/health")["intake"]
        assert intake["not_voted"] >= 60 * MAX_ITEMS - VOTE_BURST_PER_ISSUER - 4000, intake
