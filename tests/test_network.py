"""End to end: five real node processes on loopback, two of them misbehaving, one killed."""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
from sklearn.datasets import load_iris

from p2pml.ledger import DEPOSIT

HONEST = ("ada", "bo", "cy")


async def ask(cluster, rows, concurrency: int = 4, targets=None) -> list[tuple[int, dict, float]]:
    """Send each row to a peer in turn, ``concurrency`` at a time; (status, body, seconds)."""
    targets = targets or cluster.names
    sem = asyncio.Semaphore(concurrency)

    async def one(session, i, row):
        url = cluster.url(targets[i % len(targets)]) + "/predict"
        async with sem:
            t0 = time.perf_counter()
            async with session.post(url, json={"features": [float(x) for x in row]}) as r:
                return r.status, await r.json(), time.perf_counter() - t0

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        return await asyncio.gather(*(one(session, i, row) for i, row in enumerate(rows)))


async def test_two_misbehaving_peers_lose_stake_and_the_network_stays_right(make_cluster):
    cluster = make_cluster(5, behaviors={"di": "random", "ed": "constant"})
    iris = load_iris()
    order = list(range(len(iris.target)))
    random.Random(7).shuffle(order)
    picked = order[:90]
    answers = await ask(cluster, iris.data[picked])

    assert all(status == 200 for status, _, _ in answers)
    assert min(len(body["votes"]) for _, body, _ in answers) >= 4
    right = sum(body["prediction"] == iris.target_names[iris.target[i]]
                for i, (_, body, _) in zip(picked, answers))
    assert right / len(picked) >= 0.9, f"consensus accuracy {right}/{len(picked)}"

    ledgers = cluster.wait_converged(timeout=10)
    assert len(ledgers) == 5
    assert len({lg["root"] for lg in ledgers.values()}) == 1
    for name, lg in ledgers.items():
        peers = {p["name"]: p for p in lg["peers"].values()}
        assert lg["rounds"] >= 90
        for h in HONEST:
            assert peers[h]["slashed"] == 0 and peers[h]["stake"] == DEPOSIT + peers[h]["rewarded"], (name, peers[h])
        for bad in ("di", "ed"):
            assert peers[bad]["stake"] < DEPOSIT, (name, bad, peers[bad])
            assert peers[bad]["stake"] < min(peers[h]["stake"] for h in HONEST)
            assert peers[bad]["weight"] < min(peers[h]["weight"] for h in HONEST)
        assert sum(p["stake"] for p in peers.values()) + lg["pool"] == 5 * DEPOSIT
        # the misbehaving peers' losses were paid to the peers that agreed, to the token
        assert sum(p["slashed"] for p in peers.values()) == sum(p["rewarded"] for p in peers.values()) + lg["pool"]
        assert all(peers[h]["rewarded"] > 0 for h in HONEST)

    # A killed peer does not block queries, and is not slashed for its absence.
    cluster.kill("cy")
    alive = ["ada", "bo", "di", "ed"]
    later = await ask(cluster, iris.data[order[90:100]], concurrency=1, targets=alive)
    assert all(status == 200 for status, _, _ in later)
    assert all(len(body["votes"]) >= 4 for _, body, _ in later)
    # Waiting for cy on every query would make each answer last the query timeout; the first
    # one after the kill may (and one attempt to reach it, at most a request timeout).
    query_s, request_s = cluster.net.query_timeout_ms / 1000, cluster.net.request_timeout_ms / 1000
    assert max(seconds for _, _, seconds in later) < query_s + request_s
    assert sorted(seconds for _, _, seconds in later)[len(later) // 2] < query_s  # median: no waiting
    ledgers = cluster.wait_converged(timeout=10, names=alive)
    assert len({lg["root"] for lg in ledgers.values()}) == 1
    for lg in ledgers.values():
        cy = next(p for p in lg["peers"].values() if p["name"] == "cy")
        assert cy["slashed"] == 0 and cy["status"] == "active"

    # Restarted, it rebuilds from its log, catches up, and agrees with everyone.
    cluster.start("cy")
    cluster.wait_ready(names=["cy"])
    ledgers = cluster.wait_converged(timeout=20)
    assert len(ledgers) == 5 and len({lg["root"] for lg in ledgers.values()}) == 1
    assert all(lg["rounds"] >= 100 for lg in ledgers.values())


async def test_old_rounds_leave_memory_and_a_message_reaching_back_is_still_counted(make_cluster):
    """With ``rounds_in_memory`` small, every node drops the tables of older rounds and keeps
    their envelopes in its log only (served from there to a peer catching up, and to clients);
    a valid message on one of them (here a reveal by bo that contradicts its commit, which
    costs bo half its stake) makes each node rebuild its ledger, and all agree with a fold of
    the whole log that never dropped anything."""
    from p2pml.cluster import get_json
    from p2pml.ledger import CHECKPOINT_EVERY, Ledger, Reveal, Votes
    from p2pml.store import DataDir
    from p2pml.wire import Identity, Verifier, pack_batch

    keep = 16
    cluster = make_cluster(3, rounds_in_memory=keep)
    iris = load_iris()
    cluster.kill("cy")  # back later: it catches up from the others' logs
    answers = await ask(cluster, iris.data[::2][:60], concurrency=2, targets=["ada", "bo"])
    assert all(status == 200 for status, _, _ in answers)
    cluster.start("cy")
    cluster.wait_ready(names=["cy"])
    deadline = time.monotonic() + 20  # each node prunes once a second: wait until all have
    while time.monotonic() < deadline and not all(
            lg["rounds_in_memory"] < keep + CHECKPOINT_EVERY for lg in cluster.ledgers().values()):
        await asyncio.sleep(0.1)
    ledgers = cluster.wait_converged(timeout=20)
    assert len({lg["root"] for lg in ledgers.values()}) == 1, {
        n: (lg["root"][:8], lg["stale"], lg["messages"], get_json(cluster.url(n) + "/health")["intake"])
        for n, lg in ledgers.items()}
    assert all(lg["rounds_in_memory"] < keep + CHECKPOINT_EVERY and not lg["stale"]
               for lg in ledgers.values()), ledgers
    assert all(lg["rounds"] >= 60 for lg in ledgers.values())

    oldest = bytes.fromhex(answers[0][1]["round"])
    vote = answers[0][1]["votes"][0]
    # README: a round older than the latest rounds_in_memory is folded for good: its view says
    # null where the tables it came from are gone; an unknown round is 404.
    view = get_json(cluster.url("ada") + "/round/" + oldest.hex())
    assert view["round"] == oldest.hex(), view
    assert all(view[k] is None for k in ("prediction", "probabilities", "query", "complete", "missing",
                                         "settled")), view
    assert view["votes"] == [], view
    async with aiohttp.ClientSession() as s, s.get(cluster.url("ada") + "/round/" + "ab" * 16) as r:
        assert r.status == 404 and "error" in await r.json()
    for name in cluster.names:  # an old envelope, read back from the log
        envelope = get_json(cluster.url(name) + "/message/" + vote["message"])
        assert envelope["signature"] == vote["signature"], name
    bo = Identity.from_seed((cluster.data_root / "bo" / "node.key").read_bytes())
    genesis_id = cluster.net.genesis().id()
    late = bo.sign(genesis_id, Votes(1, (), (Reveal(oldest, 2, (0, 0, 1_000_000), b"\0" * 16,
                                                    frozenset()),)))
    async with aiohttp.ClientSession() as s, s.post(
            cluster.url("ada") + "/gossip", data=pack_batch([late.raw]),
            headers={"Content-Type": "application/msgpack"}) as r:
        assert r.status == 200 and (await r.json())["accepted"] == 1

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ledgers = cluster.ledgers()
        if len({lg["root"] for lg in ledgers.values()}) == 1 and not any(lg["stale"] for lg in ledgers.values()) \
                and all(lg["messages"] == ledgers["ada"]["messages"] for lg in ledgers.values()):
            break
        await asyncio.sleep(0.2)
    assert len({lg["root"] for lg in ledgers.values()}) == 1, ledgers
    for lg in ledgers.values():
        peer = next(p for p in lg["peers"].values() if p["name"] == "bo")
        assert peer["reason"] == "reveal does not match its commit" and peer["stake"] <= DEPOSIT // 2
        assert peer["equivocation"][0] == oldest.hex()
    for name in cluster.names:
        health = get_json(cluster.url(name) + "/health")
        assert health["rebuilds"] >= 1, (name, health)

    root = ledgers["ada"]["root"]
    cluster.stop()
    data = DataDir(cluster.data_root / "ada")
    full = Ledger(cluster.net.genesis())
    verifier = Verifier(genesis_id)
    for raw in data.read_log():
        full.add(verifier.open(raw).msg)
    data.close()
    assert full.root() == root and full.rounds_held >= 60
