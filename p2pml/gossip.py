"""Moving messages between peers: coalesced push, and anti-entropy that repairs what push missed.

Push: each peer has an outbox and one sender task, which keeps a WebSocket open to the peer and
sends each batch as one binary frame (an HTTP request and answer per batch cost several times
more CPU); whatever queues while a frame is being sent goes in the next one, so batching grows
with load by itself and a slow peer never holds up the others. A peer that does not answer is marked down and skipped (its outbox dropped) until a
reconciliation with it succeeds again; nothing it missed is lost, because anti-entropy brings it.

Anti-entropy: every interval a node sends one peer a digest of what it holds (256 buckets by the
first byte of the message id, each a count and the XOR of the ids, kept up to date in O(1) per
message). The peer answers with its ids in the buckets that differ; the node fetches the ids it
lacks and pushes the ones the peer lacks. Converges with no clock and no coordinator.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator

import aiohttp
import msgpack

from p2pml.config import PeerConfig
from p2pml.ids import IdTable, IdView
from p2pml.wire import (
    MAX_BATCH_BYTES,
    MAX_BATCH_MESSAGES,
    MAX_BODY_BYTES,
    MSGPACK_ERRORS,
    WireError,
    pack,
    pack_batch,
    unpack_batch,
)

log = logging.getLogger(__name__)

MSGPACK = "application/msgpack"
BUCKETS = 256
MAX_SYNC_BUCKETS = 64  # buckets answered per /sync: bounds one answer to ~64 x ids-per-bucket
MAX_SYNC_IDS = 32 * 1024  # ids per /sync answer (1 MiB of ids)
MAX_RESPONSE_BYTES = 2 * MAX_BATCH_BYTES  # the most this node reads of any peer's answer
MAX_PUSH_BYTES = 512 * 1024  # one push POST; aiohttp streams larger bodies less well
MAX_OUTBOX = 8 * MAX_BATCH_MESSAGES  # envelopes queued for one peer; older ones are dropped
FETCHES_PER_SYNC = 8  # fetch requests one reconciliation may make (catch-up speed vs fairness)
PAGING_RETRY_S = 60.0  # after a paged /sync failed (a peer that does not page?), ask without pages
BACKOFF_BASE_S = 0.1
BACKOFF_MAX_S = 2.0
PEER_HEADER = "X-P2PML-Peer"  # the sender's name: traffic from a peer shows it is up again
PROOF_HEADER = "X-P2PML-Proof"  # Identity.link_proof of that name: who the traffic is scored on
PROOF_REFRESH_S = 60  # a node re-signs its link proofs this often


class Holdings:
    """The envelopes a node holds, by message id, with the bucket digest anti-entropy compares.

    With a ``read`` (the log's ``read_at``), only the latest ``in_memory`` envelopes stay in
    memory; older ones, once durable at their offset in the log (below ``durable()``), are
    read back from it when asked for: a long-running node's memory does not grow with them."""

    def __init__(self, in_memory: int = 0, read: Callable[[int], bytes | None] | None = None,
                 durable: Callable[[], int] = lambda: 0):
        self._recent: dict[bytes, tuple[bytes, int | None]] = {}  # id -> (envelope, log offset)
        # ids in _recent, oldest first (a dict's first key is found in time linear in how many
        # were deleted before it)
        self._arrival: collections.deque[bytes] = collections.deque()
        self._stored = IdTable(32)  # id -> log offset, envelope not in memory (compact)
        self._in_memory, self._read, self._durable = in_memory, read, durable
        self._count = [0] * BUCKETS
        self._xor = [0] * BUCKETS
        # the ids in _recent by bucket (first byte), for anti-entropy (those in _stored: sorted)
        self._recent_ids: list[dict[bytes, None]] = [{} for _ in range(BUCKETS)]

    def __contains__(self, mid: bytes) -> bool:
        return mid in self._recent or mid in self._stored

    def __len__(self) -> int:
        return len(self._recent) + len(self._stored)

    def get(self, mid: bytes) -> bytes | None:
        """The envelope, from memory or the log; None if not held (or the log lost it). Safe
        from another thread: an entry moves to ``_stored`` before it leaves ``_recent``."""
        found = self._recent.get(mid)
        if found is not None:
            return found[0]
        offset = self._stored.get(mid)
        return None if offset is None else self._read(offset)

    def get_many(self, mids: list[bytes]) -> list[bytes]:
        """The envelopes of those of ``mids`` that can be had (see ``get``)."""
        return [raw for mid in mids if (raw := self.get(mid)) is not None]

    def id_view(self) -> IdView:
        """Every id held now, by index (see ``IdView``): for a rebuild, in another thread."""
        return self._stored.view().extended(list(self._recent))

    def recent(self) -> Iterator[tuple[bytes, bytes]]:
        """(id, envelope) of those in memory."""
        return ((mid, raw) for mid, (raw, _) in self._recent.items())

    def add(self, mid: bytes, raw: bytes, offset: int | None = None) -> None:
        """Hold ``raw``; ``offset``: where the log has (or will have) it."""
        if mid in self:
            return
        self._recent[mid] = (raw, offset)
        b = mid[0]
        self._count[b] += 1
        self._xor[b] ^= int.from_bytes(mid, "big")
        self._recent_ids[b][mid] = None
        if self._read is not None:
            self._arrival.append(mid)
            self._spill()

    def _spill(self) -> None:
        """Leave the oldest envelopes to the log, once they are durable there."""
        if len(self._arrival) <= self._in_memory:
            return
        durable = self._durable()
        while len(self._arrival) > self._in_memory:
            mid = self._arrival[0]
            offset = self._recent[mid][1]
            if offset is None or offset >= durable:  # (durable_end is a record boundary)
                return  # not in the log (yet): kept; the next add tries again
            self._stored.add(mid, offset)
            del self._recent[mid]
            del self._recent_ids[mid[0]][mid]
            self._arrival.popleft()

    def count(self, b: int) -> int:
        """How many ids bucket ``b`` holds."""
        return self._count[b]

    def summary(self) -> list:
        return [[c, x.to_bytes(32, "big")] for c, x in zip(self._count, self._xor)]

    def differing(self, theirs) -> list[int]:
        """Buckets whose digest differs from ``theirs``; raises ValueError if it is malformed."""
        if type(theirs) is not list or len(theirs) != BUCKETS:
            raise ValueError(f"a digest is a list of {BUCKETS} [count, xor] pairs")
        out = []
        for b, entry in enumerate(theirs):
            if type(entry) is not list or len(entry) != 2 or type(entry[0]) is not int \
                    or type(entry[1]) is not bytes or len(entry[1]) != 32:
                raise ValueError(f"digest bucket {b} is not [count, 32-byte xor]")
            if entry[0] != self._count[b] or int.from_bytes(entry[1], "big") != self._xor[b]:
                out.append(b)
        return out

    def newest(self) -> dict[int, list[bytes]]:
        """What ``bucket_ids`` takes to list many buckets in a row without a pass each."""
        return self._stored.newest_by_first_byte()

    def bucket_ids(self, b: int, after: bytes | None = None, limit: int | None = None,
                   newest: dict[int, list[bytes]] | None = None) -> list[bytes]:
        """The ids held in bucket ``b``, sorted; only those greater than ``after`` if given;
        the first ``limit`` of them if given."""
        ids = self._stored.in_bucket(b, after, limit, newest)
        extra = [i for i in self._recent_ids[b] if after is None or i > after]
        if extra:
            ids = sorted(ids + extra)  # a sorted run and a short one: about linear
            if limit is not None:
                del ids[limit:]
        return ids

    def lacking(self, mids: list[bytes]) -> list[bytes]:
        """Those of ``mids`` not held (the old ones looked up in one vectorized search)."""
        rest = [mid for mid in mids if mid not in self._recent]
        return [mid for mid, held in zip(rest, self._stored.have(rest)) if not held]


# -- peer scoring ---------------------------------------------------------------------------------

INVALID_HALF_LIFE_S = 10.0  # a source's count of invalid messages halves every 10 s
MAX_SOURCES = 4096  # sources scored at once; the least suspect are forgotten first


class Scores:
    """What each source has sent that was provably invalid (bad signature, malformed or
    non-canonical body, a message the ledger rejects), in the manner of gossipsub v1.1's
    invalid-message penalty: a count that decays with a half-life; at ``limit`` the source is
    ignored for ``ignore_s`` (its pushes, posts, syncs and fetches refused unread), then starts
    afresh. Messages held back only because their author's registration is not here yet are
    not invalid. A source is a peer that proved its name (see ``link_proof``) or an address."""

    def __init__(self, limit: int, ignore_s: float, clock=time.monotonic):
        self.limit, self.ignore_s, self._clock = limit, ignore_s, clock
        self._penalty: dict[str, tuple[float, float]] = {}  # source -> (count, as of)
        self._ignored: dict[str, float] = {}  # source -> until
        self.ignored_total = 0

    def _decayed(self, source: str, now: float) -> float:
        count, then = self._penalty.get(source, (0.0, now))
        return count * 0.5 ** ((now - then) / INVALID_HALF_LIFE_S)

    def penalize(self, source: str, n: int = 1) -> None:
        if n <= 0:
            return
        now = self._clock()
        count = self._decayed(source, now) + n
        if count >= self.limit:
            self._penalty.pop(source, None)
            self._ignored[source] = now + self.ignore_s
            self.ignored_total += 1
            log.warning("ignoring %s for %.0f s: %d invalid messages", source, self.ignore_s, self.limit)
            return
        self._penalty[source] = (count, now)
        if len(self._penalty) > MAX_SOURCES:
            least = min(self._penalty, key=lambda s: self._decayed(s, now))
            del self._penalty[least]

    def ignored(self, source: str) -> float:
        """Seconds this source is still ignored for (0: it is not)."""
        until = self._ignored.get(source)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left <= 0:
            del self._ignored[source]
            return 0.0
        return left

    def view(self) -> dict:
        now = self._clock()
        for source in [s for s, until in self._ignored.items() if until <= now]:
            del self._ignored[source]
        return {"ignored": {s: round(until - now, 1) for s, until in sorted(self._ignored.items())},
                "suspect": {s: round(self._decayed(s, now), 1) for s in sorted(self._penalty)
                            if self._decayed(s, now) >= 1}}


class Link:
    """What this node knows of one peer's reachability, and what it still has to send it."""

    def __init__(self, cfg: PeerConfig):
        self.cfg = cfg
        self.outbox: list[bytes] = []
        self.wake = asyncio.Event()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.up = False  # until a request to it succeeds, or it reaches us
        self.failures = 0
        self.retry_at = 0.0
        self.dropped = 0


Ingest = Callable[[list, str], Awaitable[object]]


class Gossip:
    def __init__(self, me: str, peers: list[PeerConfig], holdings: Holdings, ingest: Ingest,
                 request_timeout_ms: int, interval_ms: int, local_host: str | None = None,
                 prove: Callable[[str, int], str] | None = None, scores: Scores | None = None,
                 greeting: Callable[[], list[bytes]] | None = None):
        self.me = me
        self._greeting = greeting  # () -> what each peer gets first whenever its link comes up
        self._prove = prove  # (receiver, unix time) -> link proof
        self._proofs: dict[str, tuple[int, str]] = {}
        self.scores = scores or Scores(64, 30.0)
        self._local_host = local_host
        self.links = {p.name: Link(p) for p in peers}
        self.caught_up: set[str] = set()  # peers all of whose buckets we settled (reconcile)
        self._covered: dict[str, set[int]] = {}  # peer -> buckets settled since start
        # peer -> bucket -> (last id it listed there, whether this pass of pages left none lacking)
        self._pages: dict[str, dict[int, tuple[bytes, bool]]] = {}
        self._no_paging_until: dict[str, float] = {}  # peers whose paged /sync failed: not till then
        self._reconciling: set[str] = set()  # peers a reconciliation with is under way
        self.holdings = holdings
        self._ingest = ingest
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_ms / 1000,
                                              sock_connect=min(1.0, request_timeout_ms / 1000))
        self._interval = interval_ms / 1000
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []
        self._aside: set[asyncio.Task] = set()  # short-lived tasks, kept so they are not lost
        self.pushes = 0

    async def start(self) -> None:
        # Connect from our own address, so that a peer (and a firewall) sees who is talking.
        local = (self._local_host, 0) if self._local_host else None
        self._session = aiohttp.ClientSession(
            timeout=self._timeout, connector=aiohttp.TCPConnector(limit_per_host=4, local_addr=local))
        for link in self.links.values():
            self._tasks.append(asyncio.create_task(self._sender(link), name=f"push-{link.cfg.name}"))
        self._tasks.append(asyncio.create_task(self._anti_entropy(), name="anti-entropy"))

    def _background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._aside.add(task)
        task.add_done_callback(self._aside.discard)

    async def close(self) -> None:
        for t in [*self._tasks, *self._aside]:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._aside, return_exceptions=True)
        self._tasks.clear()
        for link in self.links.values():
            if link.ws is not None:
                await link.ws.close()
        if self._session is not None:
            await self._session.close()

    def heard_from(self, name: str | None) -> None:
        """A peer reached us: it is up, whatever our last attempt to reach it said."""
        link = self.links.get(name or "")
        if link is not None and not link.up:
            self._mark(link, True)

    def reachable(self) -> set[str]:
        return {name for name, link in self.links.items() if link.up}

    def broadcast(self, raws: list[bytes]) -> None:
        """Push to every reachable peer, sharing a frame with whatever else queues meanwhile."""
        for link in self.links.values():
            if link.up:
                self._enqueue(link, raws)

    def send_to(self, names: set[str], raws: list[bytes]) -> None:
        """Push to some peers only (the equivocate behaviour's way of splitting the network)."""
        for name in names:
            if name in self.links and self.links[name].up:
                self._enqueue(self.links[name], raws)

    def _enqueue(self, link: Link, raws: list[bytes]) -> None:
        link.outbox.extend(raws)
        excess = len(link.outbox) - MAX_OUTBOX
        if excess > 0:
            del link.outbox[:excess]
            link.dropped += excess
        link.wake.set()

    # -- transport ------------------------------------------------------------------------------

    def _mark(self, link: Link, ok: bool) -> None:
        if ok:
            was_up, link.up, link.failures = link.up, True, 0
            if not was_up:
                log.info("peer %s is reachable again", link.cfg.name)
                if self._greeting is not None:  # it may have missed what we said while it was away
                    self._enqueue(link, self._greeting())
            return
        if link.up:
            log.info("peer %s is unreachable; skipping it until it answers", link.cfg.name)
        link.up = False
        link.outbox.clear()
        if link.ws is not None:
            self._background(link.ws.close())
            link.ws = None
        delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** min(link.failures, 10))
        link.failures += 1
        link.retry_at = asyncio.get_running_loop().time() + delay

    def headers(self, receiver: str) -> dict[str, str]:
        """Who this node is, with a fresh enough proof of it."""
        headers = {PEER_HEADER: self.me}
        if self._prove is not None:
            now = int(time.time())
            made, proof = self._proofs.get(receiver, (0, ""))
            if now - made >= PROOF_REFRESH_S:
                proof = self._prove(receiver, now)
                self._proofs[receiver] = (now, proof)
            headers[PROOF_HEADER] = proof
        return headers

    async def _post(self, link: Link, path: str, data: bytes) -> bytes | None:
        """POST and read a bounded answer; None (and the peer marked down) if it fails."""
        try:
            headers = {"Content-Type": MSGPACK, **self.headers(link.cfg.name)}
            async with self._session.post(link.cfg.url + path, data=data, headers=headers) as resp:
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise ValueError(f"answer over {MAX_RESPONSE_BYTES} bytes")
                if resp.status != 200:
                    log.debug("peer %s answered %s to %s: %.200s", link.cfg.name, resp.status,
                              path, bytes(body))
                    self._mark(link, True)
                    return None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            log.debug("peer %s failed %s: %r", link.cfg.name, path, exc)
            self._mark(link, False)
            return None
        self._mark(link, True)
        return bytes(body)

    async def _sender(self, link: Link) -> None:
        while True:
            await link.wake.wait()
            link.wake.clear()
            while link.outbox and link.up:
                n = size = 0
                while n < min(len(link.outbox), MAX_BATCH_MESSAGES) and size < MAX_PUSH_BYTES:
                    size += len(link.outbox[n])
                    n += 1
                batch = link.outbox[:n]
                del link.outbox[:n]
                self.pushes += 1
                await self._push(link, pack_batch(batch))

    async def _push(self, link: Link, data: bytes) -> None:
        """One batch as one WebSocket frame; (re)connects as needed; a failure marks the peer down
        (what it missed comes back through anti-entropy)."""
        try:
            if link.ws is None or link.ws.closed:
                link.ws = await self._session.ws_connect(
                    link.cfg.url + "/gossip/ws", headers=self.headers(link.cfg.name),
                    max_msg_size=MAX_BATCH_BYTES, autoping=True,
                    heartbeat=self._timeout.total)  # a peer that stops answering pings is cut
                self._background(self._drain(link.ws))
            async with asyncio.timeout(self._timeout.total):  # no task per frame, as wait_for makes
                await link.ws.send_bytes(data)
        except (aiohttp.ClientError, TimeoutError, OSError, RuntimeError) as exc:
            log.debug("push to %s failed: %r", link.cfg.name, exc)
            self._mark(link, False)
            return
        self._mark(link, True)

    @staticmethod
    async def _drain(ws: aiohttp.ClientWebSocketResponse) -> None:
        """Read (and drop) what the peer sends, so that pings and the closing handshake are seen."""
        try:
            async for _ in ws:
                pass
        except (aiohttp.ClientError, OSError):
            pass

    # -- anti-entropy ---------------------------------------------------------------------------

    async def _anti_entropy(self) -> None:
        """Each tick: reconcile with the next peer in turn, and re-probe down peers that are due."""
        names = sorted(self.links)
        turn = 0
        while True:
            await asyncio.sleep(self._interval)
            now = asyncio.get_running_loop().time()
            due = {n for n in names if not self.links[n].up and now >= self.links[n].retry_at}
            if names:
                due.add(names[turn % len(names)])
                turn += 1
            await asyncio.gather(*(self._reconcile_safely(self.links[n]) for n in sorted(due)))

    async def reconcile_all(self, timeout: float) -> None:
        """One reconciliation with every peer at once, for at most ``timeout`` seconds."""
        try:
            await asyncio.wait_for(
                asyncio.gather(*(self._reconcile_safely(link) for link in self.links.values())), timeout)
        except TimeoutError:
            log.info("start-up reconciliation incomplete after %.1fs", timeout)

    async def reconnect(self, timeout: float) -> None:
        """Try every unreachable peer now, whatever its back-off says (while getting ready)."""
        down = [link for link in self.links.values() if not link.up]
        if down:
            try:
                await asyncio.wait_for(asyncio.gather(*(self._reconcile_safely(l) for l in down)), timeout)
            except TimeoutError:
                pass

    async def _reconcile_safely(self, link: Link) -> None:
        try:
            await self.reconcile(link)
        except Exception:
            log.exception("reconciliation with %s failed", link.cfg.name)

    async def reconcile(self, link: Link) -> None:
        """One reconciliation with the peer; none if one with it is under way already (the
        start-up one and the periodic ones overlap, and two at once would each page on from
        state the other changed while it waited)."""
        if link.cfg.name in self._reconciling:
            return
        self._reconciling.add(link.cfg.name)
        try:
            await self._reconcile(link)
        finally:
            self._reconciling.discard(link.cfg.name)

    async def _reconcile(self, link: Link) -> None:
        name = link.cfg.name
        if self.scores.ignored(f"peer {name}"):
            return  # it sent too much that was invalid: nothing more is taken from it for now
        pages = self._pages.setdefault(name, {})
        if time.monotonic() < self._no_paging_until.get(name, 0):
            pages.clear()
        sent = {b: last for b, (last, _) in sorted(pages.items())[:MAX_SYNC_BUCKETS]}
        digest = self.holdings.summary()
        answer = await self._post(link, "/sync", pack([digest, [[b, i] for b, i in sent.items()]])
                                  if sent else pack(digest))
        if answer is None:
            if sent:  # maybe a peer that does not page (an older version): ask it without pages
                pages.clear()
                self._no_paging_until[name] = time.monotonic() + PAGING_RETRY_S
            return
        try:
            fields = msgpack.unpackb(answer, max_bin_len=64, max_map_len=0,
                                     max_array_len=max(MAX_SYNC_IDS, BUCKETS), max_str_len=0)
            if type(fields) is not list or len(fields) not in (2, 3):
                raise ValueError("expected [buckets, ids, settled]")
            buckets, theirs, settled = (fields + [None])[:3]  # [buckets, ids]: an older peer
            if type(buckets) is not list or type(theirs) is not list or type(settled) not in (list, type(None)):
                raise ValueError("expected [buckets, ids, settled]")
        except (*MSGPACK_ERRORS, TypeError, ValueError) as exc:
            log.debug("peer %s sent a bad /sync answer: %r", name, exc)
            return
        buckets = sorted({b for b in buckets if type(b) is int and 0 <= b < BUCKETS})[:MAX_SYNC_BUCKETS]
        their_ids = {i for i in theirs if type(i) is bytes and len(i) == 32}
        missing = self.holdings.lacking(list(their_ids))
        fetched: set[bytes] = set()  # asked for, and answered whole (held now, or refused)
        for k in range(0, min(len(missing), FETCHES_PER_SYNC * MAX_BATCH_MESSAGES),
                       MAX_BATCH_MESSAGES):
            asked = missing[k : k + MAX_BATCH_MESSAGES]
            batch = await self._post(link, "/fetch", pack(asked))
            if batch is None:
                break
            got = await self._ingest_batch(batch, f"peer {name}")
            if got is None:
                break  # not taken (our log cannot be written now): fetch no more
            if got == len(asked) or len(batch) + MAX_BODY_BYTES + 1024 <= MAX_BATCH_BYTES:
                fetched.update(asked)  # all of it, or all the peer can give: not cut for size
        lacking_now = set(self.holdings.lacking(missing))
        # Caught up: every bucket has been settled since we started, by one sync or another
        # (it matched, or it was listed whole and we hold what it listed). What the peer held
        # before any of those syncs we hold now. Not "a sync found nothing missing": under
        # constant load something always is, and a node back from a crash kept its crash
        # marker for good (see Node.close); nor "one answer listed every differing id": with a
        # long history a few busy buckets hold more than one answer lists.
        settled_now = set() if settled is None else {b for b in settled if type(b) is int and 0 <= b < BUCKETS}
        short = {i[0] for i in lacking_now}
        covered = self._covered.setdefault(name, set())
        covered.update(b for b in settled_now - short if b not in sent or pages[b][1])
        # Paging through a bucket too large for one answer (only with a peer that says what it
        # settled): on from the last id listed, once every id listed there was fetched (held
        # now, or refused: a message waiting for its author's registration must not keep the
        # pages from reaching that registration). A bucket is covered only by a pass of pages
        # that left nothing lacking (``clean``); one settled, or no longer differing, needs no
        # page (if the pass was not clean, the next one starts from the beginning).
        last: dict[int, bytes] = {}
        for i in their_ids:
            if i[0] not in last or i > last[i[0]]:
                last[i[0]] = i
        stuck = {i[0] for i in lacking_now - fetched}  # listed ids this sync did not get to
        for b in list(pages):
            if b in settled_now and b not in stuck:  # (if stuck, its last page is asked again)
                del pages[b]
        if settled is not None:
            for b in buckets:
                if b in last and b not in settled_now and b not in stuck:
                    pages[b] = (last[b], (b not in sent or pages[b][1]) and b not in short)
        if len(covered) == BUCKETS:
            self.caught_up.add(name)
        # What the peer lacks: our ids in the range each answered bucket was listed over (after
        # our page in it, and up to its last id listed if it was cut short), at most MAX_OUTBOX
        push: list[bytes] = []
        newest = self.holdings.newest()
        for b in buckets:
            room = MAX_OUTBOX - len(push)
            if room <= 0:
                break
            if b not in settled_now and b not in last:
                continue  # cut short before its first id: no range to compare
            listed = sum(1 for i in their_ids if i[0] == b)
            for i in self.holdings.bucket_ids(b, sent.get(b), room + listed, newest):
                if b not in settled_now and i >= last[b]:
                    break
                if i not in their_ids:
                    push.append(i)
        if push:  # old envelopes are read back from the log: not on the event loop
            extra = await asyncio.to_thread(self.holdings.get_many, push[:MAX_OUTBOX])
            self._enqueue(link, extra)

    async def _ingest_batch(self, data: bytes, source: str) -> int | None:
        """How many envelopes the batch held, once taken (even if some were rejected); None
        if not taken."""
        try:
            envs = unpack_batch(data)
        except WireError as exc:
            log.debug("%s sent a bad /fetch answer: %s", source, exc)
            self.scores.penalize(source)
            return 0
        result = await self._ingest(envs, source)
        if "unavailable" in result:
            log.warning("fetched from %s, not durable: %s", source, result["unavailable"])
            return None
        return len(envs)

    # -- the serving side of anti-entropy -------------------------------------------------------

    def answer_sync(self, asked) -> bytes:
        """The ids this node holds in the buckets where the asker's digest differs, sorted
        within each bucket (bounded: a random choice of the buckets when too many differ.
        Always the first ones in order would starve the last: a peer that lacks a registration
        refuses its author's messages for now, so their buckets keep differing, and the one
        bucket holding the registration was never answered). ``asked`` is the digest, or
        ``[digest, pages]``: ``pages`` lists ``[bucket, id]`` for buckets too large for one
        answer, which the asker is paging through; their ids after ``id`` are listed, and
        those buckets are always among those answered. Buckets are listed smallest first; the
        last one listed may be cut short. Raises ValueError if it is malformed."""
        theirs, after = asked, {}
        if type(asked) is list and len(asked) == 2 and type(asked[0]) is list:
            theirs, pages = asked
            if type(pages) is not list or len(pages) > MAX_SYNC_BUCKETS:
                raise ValueError(f"/sync pages are a list of at most {MAX_SYNC_BUCKETS} [bucket, id]")
            for page in pages:
                if (type(page) is not list or len(page) != 2 or type(page[0]) is not int
                        or type(page[1]) is not bytes or len(page[1]) != 32 or page[1][0] != page[0]):
                    raise ValueError("a /sync page is [bucket, the id it lists after, in that bucket]")
                after[page[0]] = page[1]
        differ = self.holdings.differing(theirs)
        paged = [b for b in differ if b in after]
        rest = [b for b in differ if b not in after]
        room = MAX_SYNC_BUCKETS - len(paged)
        buckets = paged + (random.sample(rest, room) if len(rest) > room else rest)
        # smallest first: a huge bucket (one that keeps differing) does not take every answer
        buckets.sort(key=lambda b: (self.holdings.count(b), b))
        newest = self.holdings.newest()
        ids: list[bytes] = []
        answered, full = [], []
        for b in buckets:
            budget = MAX_SYNC_IDS - len(ids)
            if budget <= 0:
                break
            more = self.holdings.bucket_ids(b, after.get(b), budget + 1, newest)
            ids.extend(more[:budget])
            answered.append(b)
            if len(more) > budget:
                break  # cut short: the asker pages on through it from the last id listed
            full.append(b)
        # settled: the buckets where the asker holds all we hold once it holds what we listed
        # (those that match, and those listed whole, or to their end after the asker's page;
        # only the last bucket listed can be cut short: the asker pages on from its last id)
        settled = sorted(set(range(BUCKETS)).difference(differ).union(full))
        return pack([answered, ids, settled])

    def answer_fetch(self, ids) -> bytes:
        """The envelopes asked for that this node holds, as much as fits in one batch (the rest
        is asked for again at the next reconciliation)."""
        if type(ids) is not list or len(ids) > MAX_BATCH_MESSAGES:
            raise ValueError(f"/fetch takes a list of at most {MAX_BATCH_MESSAGES} message ids")
        raws, size = [], 8
        for i in ids:
            raw = self.holdings.get(i) if type(i) is bytes else None
            if raw is not None:
                if size + len(raw) > MAX_BATCH_BYTES:
                    break
                raws.append(raw)
                size += len(raw)
        return pack_batch(raws)

