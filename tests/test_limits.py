"""Each documented limit, reached over real HTTP on loopback: nodes of this process behind their
real API, so that a limit can be made small (and a model call stuck) for the test. The queue of
/predict calls, the round-opening timeout, the per-address /predict limit and Retry-After on
each refusal; the per-peer outbox; anti-entropy paging through a bucket larger than one
/sync answer. (The connection limit needs its own process: tests/test_api.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from p2pml import api, gossip, readiness, service
from p2pml.cluster import free_ports
from p2pml.config import MODEL_KINDS, NetworkConfig, PeerConfig
from p2pml.ledger import Commit, Votes
from p2pml.store import DataDir

PREDICT = "/predict?features=5.1,3.5,1.4,0.2"


async def eventually(check, timeout: float, what: str):
    """Poll ``check`` until it is true; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def network(tmp_path, n: int, **settings):
    """``n`` nodes of one network, each behind its real API on a free loopback port."""
    names = ("ada", "bo", "cy")[:n]
    peers = tuple(PeerConfig(name, "127.0.0.1", port, MODEL_KINDS[i])
                  for i, (name, port) in enumerate(zip(names, free_ports(n))))
    net = NetworkConfig(peers, **settings)
    nodes, servers = [], []
    try:
        for peer in peers:
            node = service.Node(net, peer, DataDir(tmp_path / peer.name))
            server = TestServer(api.make_app(node), host="127.0.0.1", port=peer.port)
            await server.start_server()
            nodes.append(node)
            servers.append(server)
        await asyncio.gather(*(node.start() for node in nodes))
        await eventually(lambda: all(node.readiness.ready for node in nodes), 10, "every node ready")
        yield nodes, [f"http://127.0.0.1:{s.port}" for s in servers]
    finally:
        for server in servers:
            await server.close()
        for node in nodes:
            await node.close()


async def test_a_stuck_round_meets_the_queue_limit_the_address_limit_and_the_opening_timeout(tmp_path, monkeypatch):
    """While the model call of a round hangs, /predict calls queue up to MAX_QUEUED_QUERIES
    (more: 503), one address has at most MAX_PREDICTS_PER_ADDRESS in progress (more: 429),
    and a queued call whose round is not opened within OPEN_ROUND_TIMEOUT_S gets 503; each
    refusal carries Retry-After. Once the model answers again, so does the node."""
    monkeypatch.setattr(service, "MAX_QUEUED_QUERIES", 3)
    monkeypatch.setattr(service, "OPEN_ROUND_TIMEOUT_S", 1.5)
    monkeypatch.setattr(api, "MAX_PREDICTS_PER_ADDRESS", 4)
    async with network(tmp_path, 1) as ([node], [url]):
        async with aiohttp.ClientSession() as http:
            async with http.get(url + PREDICT) as r:
                assert r.status == 200 and (await r.json())["prediction"] == "setosa"
            release, entered = asyncio.Event(), []
            real = node._own_votes

            async def stuck(lamport, rows):
                entered.append(rows)
                await release.wait()
                return await real(lamport, rows)

            node._own_votes = stuck

            async def predict(session):
                t0 = time.monotonic()
                async with session.get(url + PREDICT) as r:
                    return r.status, r.headers.get("Retry-After"), (await r.json()).get("error"), time.monotonic() - t0

            first = asyncio.create_task(predict(http))  # taken into a batch: its model call hangs
            await eventually(lambda: entered, 5, "the first round's model call")
            queued = [asyncio.create_task(predict(http)) for _ in range(3)]
            await eventually(lambda: len(node._queries) == 3, 5, "three queued calls")
            status, retry, error, _ = await predict(http)  # a fifth from this address
            assert (status, retry) == (429, "1") and "4 queries from 127.0.0.1" in error, error
            other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
            async with aiohttp.ClientSession(connector=other) as http2:
                status, retry, error, _ = await predict(http2)  # another address: the queue is full
            assert (status, retry) == (503, "1") and "3 queries already waiting" in error, error
            for status, retry, error, took in await asyncio.gather(first, *queued):
                assert (status, retry) == (503, "1") and "could not be opened in time" in error, error
                assert took >= service.OPEN_ROUND_TIMEOUT_S
            release.set()
            async with http.get(url + PREDICT) as r:
                assert r.status == 200, await r.text()


async def test_a_slow_peer_link_drops_its_oldest_messages_and_anti_entropy_brings_them(tmp_path, monkeypatch):
    """A peer whose link is stuck gets at most MAX_OUTBOX envelopes queued; the oldest are
    dropped and counted (``/health`` ``outbox_dropped``), and what was dropped reaches
    it by anti-entropy once the link moves: nothing is lost."""
    monkeypatch.setattr(gossip, "MAX_OUTBOX", 16)
    async with network(tmp_path, 2, anti_entropy_interval_ms=100) as ((ada, bo), (url, _)):
        release = asyncio.Event()
        real_push = ada.gossip._push

        async def stuck_push(link, data):
            await release.wait()
            await real_push(link, data)

        ada.gossip._push = stuck_push
        sent = []
        for n in range(80):  # one at a time, as rounds are published
            signed = ada.identity.sign(ada.net.genesis().id(), Votes(
                50_000 + n, (Commit(bytes([n, 7]) * 8, bytes([n]) * 32),), ()))
            assert ada._hold(signed) is None
            ada.gossip.broadcast([signed.raw])
            sent.append(signed.msg.id)
        link = ada.gossip.links["bo"]
        assert len(link.outbox) <= gossip.MAX_OUTBOX
        async with aiohttp.ClientSession() as http, http.get(url + "/health") as r:
            dropped = (await r.json())["outbox_dropped"]["bo"]
        assert dropped >= 80 - gossip.MAX_OUTBOX - gossip.MAX_BATCH_MESSAGES, dropped
        release.set()
        await eventually(lambda: all(mid in bo.holdings for mid in sent), 20,
                         "bo holds every message ada dropped for it")


async def test_a_bucket_larger_than_a_sync_answer_is_paged_through_over_http(tmp_path, monkeypatch):
    """A node that lacks more ids of one bucket than a /sync answer lists (MAX_SYNC_IDS, made
    8 here) pages through it from the last id it was given, over real HTTP, and ends holding
    every one (the holder pushes nothing here: what the asker gets, it got by asking)."""
    monkeypatch.setattr(gossip, "MAX_SYNC_IDS", 8)
    monkeypatch.setattr(readiness, "READY_WAIT_S", 0.5)
    peers = tuple(PeerConfig(name, "127.0.0.1", port, MODEL_KINDS[i])
                  for i, (name, port) in enumerate(zip(("ada", "bo"), free_ports(2))))
    net = NetworkConfig(peers, anti_entropy_interval_ms=100)
    ada = service.Node(net, peers[0], DataDir(tmp_path / "ada"))
    server = TestServer(api.make_app(ada), host="127.0.0.1", port=peers[0].port)
    await server.start_server()
    bo = bo_server = None
    try:
        await ada.start()
        # 30 messages, all in bucket 0 (an id's first byte): ground out of a few thousand
        bucket0, n = [], 0
        while len(bucket0) < 30:
            signed = ada.identity.sign(ada.net.genesis().id(), Votes(
                60_000 + n, (Commit(n.to_bytes(4, "big") * 4, b"\x02" * 32),), ()))
            n += 1
            if signed.msg.id[0] == 0:
                assert ada._hold(signed) is None
                bucket0.append(signed.msg.id)
        pages = []
        answer = ada.gossip.answer_sync

        def spy(asked):
            if type(asked) is list and len(asked) == 2 and type(asked[0]) is list:
                pages.extend(b for b, _ in asked[1])
            return answer(asked)

        ada.gossip.answer_sync = spy

        async def nothing(*_):
            pass

        ada.gossip._push = ada.gossip._reconcile = nothing  # bo gets them only by asking
        bo = service.Node(net, peers[1], DataDir(tmp_path / "bo"))
        bo_server = TestServer(api.make_app(bo), host="127.0.0.1", port=peers[1].port)
        await bo_server.start_server()
        await bo.start()
        await eventually(lambda: all(mid in bo.holdings for mid in bucket0), 20,
                         "bo holds all 30 ids of bucket 0")
        assert pages.count(0) >= 3, pages  # 30 ids, 8 an answer: at least three pages on
    finally:
        for s in (bo_server, server):
            if s is not None:
                await s.close()
        for node in (bo, ada):
            if node is not None:
                await node.close()


@pytest.fixture(autouse=True)
def _quick_readiness(monkeypatch):
    monkeypatch.setattr(readiness, "READY_GRACE_S", 0.2)
