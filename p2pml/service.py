"""One peer: takes queries, votes on rounds, holds messages, and keeps its ledger.

Every state change, this node's own included, enters through ``_hold`` as a signed message:
checked, appended to the log, folded into the ledger. Queries and votes are batched: whatever
queued while the previous batch was being signed, predicted and committed goes into the next
one, so one signature, one model call and one gossip frame serve many queries under load.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import msgpack
import numpy as np

from p2pml.config import NetworkConfig, PeerConfig
from p2pml.events import changes, snapshot
from p2pml.gossip import Gossip, Holdings, Scores
from p2pml.ledger import (
    DEPOSIT,
    HELD_BACK,
    INITIAL_WEIGHT,
    PROBA_ONE,
    PRUNE_EVERY,
    Commit,
    Ledger,
    Message,
    Query,
    Register,
    Reveal,
    Transfer,
    Update,
    VALUE_ONE,
    Votes,
    commitment,
    is_active,
    peer_id,
    query_binding,
    replay,
    round_id,
)
from p2pml.model import Model, one_hot
from p2pml.network import check_data_dir
from p2pml.readiness import Member, Readiness
from p2pml.store import DataDir, StoreError
from p2pml.wire import (
    MAX_ITEMS,
    MAX_LAMPORT,
    Identity,
    Shape,
    Signed,
    Verifier,
    WireError,
    check_link_proof,
    decode_body,
    shared,
)

log = logging.getLogger(__name__)

LEDGER_WRITE_INTERVAL_S = 1.0  # ledger.json is a view: rewritten at most this often
INLINE_ROWS = 64  # model calls on at most this many rows run on the loop (at most about 0.1 ms)
MAX_QUEUED_QUERIES = 16 * MAX_ITEMS  # /predict calls waiting for a batch; more get 503
STARTUP_SYNC_S = 3.0  # at most this long to hear from the peers before voting and getting ready
OPEN_ROUND_TIMEOUT_S = 5.0  # a query not signed by then is answered 503 (the node is stuck)
BACKLOG_RETRY_S = 0.5  # how often the vote task looks again while the log cannot be written
COALESCE_TURNS = 3  # event-loop turns a woken query or vote task lets pass before taking its batch
REVEAL_AFTER = 0.5  # of query_timeout_ms: reveal then even if some expected commits are missing
REBUILD_PAUSE_S = 1.0  # at least this long, and as long as the last one took, between ledger rebuilds
# A rebuild waits until no message has reached behind the pruned rounds for this long (a peer
# catching up sends many over a few seconds: one rebuild for all), or at most REBUILD_WAIT_S.
REBUILD_QUIET_S = 1.0
REBUILD_WAIT_S = 10.0
LATE_STREAK_LIMIT = 3  # a peer whose commit missed this many reveals in a row is not waited for
# A member flooding the network with queries: each node votes on at most this many of one
# issuer's rows per second beyond a burst (honest load is a few hundred per second per node);
# the rest are held but not voted on (unsettled rounds change nothing).
VOTE_RATE_PER_ISSUER = 2000
VOTE_BURST_PER_ISSUER = 2048


class KeyInUse(RuntimeError):
    """Another process signs with this node's key: running on could make it equivocate."""


class Unavailable(RuntimeError):
    """The node cannot open a round now (overloaded, or failing); the client should retry."""


async def _let_arrivals_in() -> None:
    """Let the loop run a few turns (each polls the sockets) before a woken task takes its
    batch: under load, frames that already arrived join this batch instead of the next
    message, so there are fewer messages to sign, send, verify and fold per row. Idle, it
    costs microseconds. (Side by side, 32 clients: 3.2 instead of 2.5 commits a message,
    about 4% more queries a second.)"""
    for _ in range(COALESCE_TURNS):
        await asyncio.sleep(0)


class Node:
    def __init__(self, net: NetworkConfig, me: PeerConfig, data: DataDir, behavior: str = "honest"):
        self.net, self.me, self.data = net, me, data
        self.genesis = net.genesis()
        self.genesis_id = self.genesis.id()
        self.task = self.genesis.task
        self.shape = Shape.of(self.task)
        self.verifier = Verifier(self.genesis_id, self.shape)
        check_data_dir(data, self.genesis, self.verifier)  # not a data dir of another network
        seed = data.load_or_create_seed(lambda: Identity.generate().seed())
        self.identity = Identity.from_seed(seed)
        self.id = peer_id(self.identity.key)
        self.ledger = Ledger(self.genesis)
        # the latest 2 x rounds_in_memory envelopes in memory, older ones read back from the log
        self.holdings = Holdings(2 * net.rounds_in_memory, self._read_logged, lambda: data.durable_end)
        self.model = Model(me.model, behavior, self.identity.key, separate=True,
                           source=net.task_source, task=self.task)
        self.scores = Scores(net.invalid_message_limit, net.ignore_ms / 1000)
        self.gossip = Gossip(me.name, [p for p in net.peers if p.name != me.name], self.holdings,
                             self.ingest, net.request_timeout_ms, net.anti_entropy_interval_ms,
                             # connect from our own loopback address (a firewall can then tell
                             # peers apart); elsewhere the system picks the route's address
                             local_host=me.host if me.host.startswith("127.") else None,
                             prove=lambda receiver, t: self.identity.link_proof(
                                 self.genesis_id, me.name, receiver, t),
                             scores=self.scores, greeting=lambda: self._announce)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._lamport = 0
        self._queries: list[tuple[tuple[float, ...], asyncio.Future]] = []
        self._query_wake = asyncio.Event()
        # rounds to vote on, per issuer (taken in turn, so no issuer's flood delays another's):
        # issuer -> [(round, row, issuer)]
        self._to_vote: dict[bytes, collections.deque] = {}
        self._budget: dict[bytes, tuple[float, float]] = {}  # issuer -> (rows allowed, as of)
        self._loading = False
        # own commits not revealed yet: round -> (label, proba, issuer, commits waited for)
        self._own: dict[bytes, tuple[int, tuple[int, ...], bytes, frozenset[bytes]]] = {}
        self._to_reveal: dict[bytes, None] = {}  # rounds whose reveal is due, in order
        # round -> the commits held when another peer's reveal on it first arrived: all that
        # this node's reveal will list (a commit made after a reveal was out may be a copy)
        self._frozen: dict[bytes, frozenset[bytes]] = {}
        self._to_copy: dict[bytes, bytes] = {}  # copycat only: round -> issuer, until a reveal shows
        self._late_streak: dict[bytes, int] = {}  # key -> reveals in a row its commit missed
        self._keys: dict[str, bytes] = {p.name: p.key for p in net.peers if p.key}  # seat -> key
        self._vote_wake = asyncio.Event()
        self._waiters: dict[bytes, tuple[frozenset[bytes], asyncio.Event]] = {}
        self._tasks: list[asyncio.Task] = []
        self._written_root = ""
        self.stats = {"batches": 0, "accepted": 0, "duplicate": 0, "rejected": 0, "not_voted": 0,
                      "refused": 0}  # refused: not taken while the log cannot be written
        self._announce: list[bytes] = []  # our registration: a peer must hold it to vote on our queries
        self.readiness = Readiness(self._other_members, self._connected, self._reconnect)
        self.key_conflict: str | None = None  # set once a vote by our key that we never signed shows up
        self.seat_conflict: str | None = None  # set while another key holds our seat (_check_seat)
        # The last run crashed (or our log lost its tail): votes we had sent may be lost, and
        # may come back from peers (see start). Otherwise any vote of ours that we do not hold
        # was signed elsewhere.
        self._lost = data.last_run_crashed()
        # after a crash: rounds held at start that we did not vote on, in case a commit of ours
        # that the crash lost shows up (then we reveal it): round -> (round, row, issuer)
        self._unvoted: dict[bytes, tuple] = {}
        # While the ledger is rebuilt (``_rebuild``): what was held since, for the new one.
        self._rebuild_tail: list[Message] | None = None
        self._rebuild_after = 0.0  # monotonic time before which no rebuild starts
        self._reached_at = self._stale_since = 0.0  # the last message that reached back; since when stale
        self._rebuilder = ThreadPoolExecutor(1, thread_name_prefix="rebuild")
        self._closing = False
        self.rebuilds = 0
        self._load()  # while the model trains in its child process
        self.model.finish()

    # -- start-up and shutdown ------------------------------------------------------------------

    def _load(self) -> None:
        """Rebuild everything from the log; then make sure this node is registered."""
        self._loading = True
        keep = self.net.rounds_in_memory
        loaded = 0
        for n, (offset, raw) in enumerate(self.data.records()):  # a piece at a time
            loaded = n + 1
            try:
                signed = self.verifier.open(raw)
            except WireError as exc:  # a record that passed its CRC but not verification
                log.warning("log record ignored: %s", exc)
                continue
            self._hold(signed, offset=offset)
            if n % PRUNE_EVERY == PRUNE_EVERY - 1 and self.ledger.prune(keep):
                for issuer, queue in list(self._to_vote.items()):  # nothing to vote on there
                    self._to_vote[issuer] = collections.deque(
                        item for item in queue if not self.ledger.is_pruned(item[0]))
        self.model.finish()  # its card goes into the registration
        if not self.ledger.is_registered(self.identity.key):
            self._hold(self._sign(Register(self.me.name, self.model.card, DEPOSIT)))
            self.data.commit_now()
        else:
            self._update_card()
        if self.ledger.stale:  # the log holds messages that came long after their rounds
            ids = self.holdings.id_view()
            self.ledger = replay(self.genesis, len(ids), lambda i: self._held_message(ids[i]), keep)
        self._loading = False
        # Of the history just read, vote only where it can still count: rounds committed to
        # but not revealed (a restart in between), and rounds nobody has revealed on yet (on
        # the others a vote would be late: never counted nor judged). After a crash, every
        # round we did not reveal on, until start() has heard from the peers (_after_crash).
        me = self.identity.key
        self._lost = self._lost or bool(self.data.damaged_tail)
        for issuer in list(self._to_vote):
            keep = collections.deque(
                item for item in self._to_vote[issuer] if not self.ledger.is_pruned(item[0]) and (
                    self.ledger.commits_of(me, item[0]) or not self.ledger.revealers(item[0])
                    or (self._lost and me not in self.ledger.revealers(item[0]))))
            if keep:
                self._to_vote[issuer] = keep
            else:
                del self._to_vote[issuer]
        log.info("loaded %d messages from %s; ledger root %s", loaded, self.data.path,
                 self.ledger.root()[:16])
        self._logged = snapshot(self.ledger.state)  # what the log has been told (_log_events)
        self._check_seat()

    def _sign(self, body) -> Signed:
        return self.identity.sign(self.genesis_id, body, self.shape)

    def _update_card(self) -> None:
        """Started with another model than the card in force says: sign a new card, naming the
        last one, in force from the next round on (every vote counts under the card in force)."""
        card = self.model.card
        current = self.ledger.state.card(self.id)
        if current is None or current == replace(card, previous=current.previous):
            return
        self._hold(self._sign(Update(self._next_lamport(), replace(card, previous=current.id()))))
        self.data.commit_now()
        log.info("model changed to %s %s (params %s): signed a new card after %s", card.framework,
                 card.model, card.params.hex()[:16], current.id().hex()[:16])

    def _check_seat(self) -> None:
        """An unpinned seat goes to the registration with the lowest id: another process that
        registered for our name may hold it. Then this node is no member: say so, loudly."""
        me = self.identity.key
        holder = self._keys.get(self.me.name)
        if self.ledger.is_member(me) or holder is None or not self.ledger.is_member(holder):
            self.seat_conflict = None
            return
        problem = (f"seat {self.me.name!r} is held by another key ({peer_id(holder)}), not this "
                   f"node's ({self.id}): another node registered for it (its registration has "
                   f"the lower id and wins); this node is no member and answers no queries. "
                   f"Pin the seats' keys in the peers file (python -m p2pml.network) or start "
                   f"with the data dir that holds the seat's key")
        if problem != self.seat_conflict:
            log.error("%s", problem)
        self.seat_conflict = problem

    async def start(self) -> None:
        """Hear from the peers first: if the network holds a vote by our key that our log does
        not, another process has this key (or this data dir is an old copy); refuse to run.
        Unless our last run crashed: then it may be a vote of ours that the crash lost."""
        await self.gossip.start()
        if self._lost:
            log.warning("the last run did not stop cleanly%s: votes by this key that the peers "
                        "hold are taken as this node's own unless they contradict ours (another "
                        "process with this key cannot be told apart now)",
                        " and the log lost its tail" if self.data.damaged_tail else "")
        await self.gossip.reconcile_all(STARTUP_SYNC_S)
        if self.key_conflict:
            await self.gossip.close()
            raise KeyInUse(self.key_conflict)
        if self._lost:
            self._after_crash()
        self.data.begin_run()  # from here on we send what we sign before it is durable
        self._tasks += [
            asyncio.create_task(self._query_loop(), name="queries"),
            asyncio.create_task(self._vote_loop(), name="votes"),
            asyncio.create_task(self._ledger_writer(), name="ledger-writer"),
        ]
        own = [raw for mid, raw in self.holdings.recent() if self.ledger.author_of(mid) == self.identity.key]
        self.gossip.broadcast(own)  # announce ourselves (and anything we signed lately)
        self._tasks.append(asyncio.create_task(self.readiness.run(), name="readiness"))

    def _other_members(self) -> list[Member]:
        """The members worth hearing before answering: the seats of the peers file (a fresh
        node's ledger may not hold their registrations yet) that are not ejected or gone."""
        state = self.ledger.last_state
        by_name = {p.name: p for p in state.peers.values()}
        others = []
        for cfg in self.net.peers:
            if cfg.name == self.me.name:
                continue
            p = by_name.get(cfg.name)
            if p is None:
                others.append(Member(cfg.name, DEPOSIT * INITIAL_WEIGHT))
            elif is_active(p):
                others.append(Member(p.name, p.stake * p.weight))
        return others

    def _connected(self) -> set[str]:
        """Peers reachable whose registration we hold (else their votes would not count)."""
        registered = {p.name for p in self.ledger.last_state.peers.values()}
        return self.gossip.reachable() & registered

    async def _reconnect(self, timeout: float) -> None:
        await self.gossip.reconnect(timeout)

    def _after_crash(self) -> None:
        """Our votes leave before they are durable (``_vote``), so a crash may have lost commits
        that peers hold. Those the peers returned during the start-up sync are held now. A
        lost one that did not come back stays a risk only if the model changed across the
        restart (the same model, seed and round give the same commitment again, which is no
        conflict): so vote only on rounds whose query arrives from now on, and on the held
        ones only to reveal what our log (or a peer) shows we committed to."""
        me = self.identity.key
        for issuer in list(self._to_vote):
            keep = collections.deque()
            for item in self._to_vote[issuer]:
                if self.ledger.commits_of(me, item[0]):
                    keep.append(item)
                elif me not in self.ledger.revealers(item[0]):
                    self._unvoted[item[0]] = item  # back in _to_vote if a commit of ours shows up
                    self.stats["not_voted"] += 1
            if keep:
                self._to_vote[issuer] = keep
            else:
                del self._to_vote[issuer]

    async def close(self) -> None:
        self._closing = True  # a rebuild in its thread stops at its next message
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._rebuilder.shutdown(wait=True, cancel_futures=True)
        await self.gossip.close()
        self._executor.shutdown(wait=True, cancel_futures=True)
        await self.data.commit()
        self.data.commit_now()
        # Everything we signed is durable: the next start is a clean one. Unless this run began
        # after a crash and never caught up with every peer: one may hold a vote of ours that
        # the crash lost, which a clean start would take for another signer's.
        if not self._lost or self.gossip.caught_up >= set(self.gossip.links):
            self.data.end_run()
        else:
            log.warning("not caught up with every peer since the crash: the next start will "
                        "take votes by this key from peers as its own, as this one did")
        self._log_events()  # what changed since the last look, before the last ledger.json
        self._write_ledger()
        self.data.close()

    # -- intake ---------------------------------------------------------------------------------

    def _hold(self, signed: Signed, offset: int | None = None) -> str | None:
        """Accept a verified message: ledger, holdings (what peers are served from) and, unless
        it was read from the log at ``offset``, the log. Returns a rejection reason or None."""
        msg = signed.msg
        reached = self.ledger.reached_back
        reason = self.ledger.add(msg)
        if reason:
            return reason
        if self.ledger.reached_back != reached:
            self._reached_at = time.monotonic()
            self._stale_since = self._stale_since or self._reached_at
        if self._rebuild_tail is not None:
            self._rebuild_tail.append(msg)
        if offset is None:
            offset = self.data.append([signed.raw])[0]
        self.holdings.add(msg.id, signed.raw, offset)
        body = msg.body
        if isinstance(body, Register):
            if self.ledger.is_member(msg.author):
                self._keys[body.name] = msg.author
            if msg.author == self.identity.key:
                self._announce = [signed.raw]  # sent again to each peer as it comes up
            if body.name == self.me.name and not self._loading:
                self._check_seat()
        elif isinstance(body, Update):
            if msg.author == self.identity.key:
                self._announce = self._announce[:1] + [signed.raw]
        elif isinstance(body, Query):
            rounds = [(round_id(msg.id, i), row, msg.author) for i, row in enumerate(body.items)]
            if self.model.behavior == "copycat":
                self._to_copy.update((rid, issuer) for rid, _, issuer in rounds)
            elif (msg.author == self.identity.key and body.commits and not self._loading
                  and all(rid in self._own for rid, _, _ in rounds)):
                pass  # our vote is in the query already (_query_loop); not so one a crash lost
            elif self.ledger.is_member(msg.author) and self._within_budget(msg.author, len(rounds)):
                self._to_vote.setdefault(msg.author, collections.deque()).extend(rounds)
                self._vote_wake.set()
        elif isinstance(body, Votes):
            for c in body.commits:
                self._maybe_reveal(c.round)
            for r in body.reveals:
                if msg.author != self.identity.key:
                    if r.round in self._own and r.round not in self._frozen:
                        held = self.ledger.committers(r.round)
                        if any(c.round == r.round for c in body.commits):
                            held.discard(msg.author)  # committed together with its reveal
                        self._frozen[r.round] = frozenset(held)
                    self._maybe_reveal(r.round)
                    if r.round in self._to_copy:
                        self._to_reveal[r.round] = None
                        self._vote_wake.set()
                waiter = self._waiters.get(r.round)
                if waiter and waiter[0] <= self.ledger.revealers(r.round):
                    waiter[1].set()
        return None

    def _vouched(self, rid: bytes) -> frozenset[bytes]:
        """What this node's reveal on ``rid`` lists once another reveal has been seen: the
        commits it held at that moment, and those that the reveals of their authors list
        (each such author had committed before any reveal reached this node, so it could not
        have copied; what it lists was committed before it revealed). A commit that arrived
        only after a reveal was out, and is vouched for by nobody trusted, is left out: it may
        be a copy of that reveal."""
        frozen = self._frozen[rid]
        listed = set(frozen)
        for author, keys in self.ledger.listings(rid).items():
            if author in frozen:
                listed |= keys
        return frozenset(listed)

    def _within_budget(self, issuer: bytes, rows: int) -> bool:
        """A token bucket per issuer (own queries, and everything at start-up, always pass)."""
        if issuer == self.identity.key or self._loading:
            return True
        now = time.monotonic()
        tokens, then = self._budget.get(issuer, (VOTE_BURST_PER_ISSUER, now))
        tokens = min(VOTE_BURST_PER_ISSUER, tokens + (now - then) * VOTE_RATE_PER_ISSUER)
        if tokens < rows:
            self._budget[issuer] = (tokens, now)
            self.stats["not_voted"] += rows
            return False
        self._budget[issuer] = (tokens - rows, now)
        return True

    def _next_batch(self) -> list:
        """Up to MAX_ITEMS rounds to vote on, taken from the issuers in turn."""
        batch: list = []
        while self._to_vote and len(batch) < MAX_ITEMS:
            for issuer in list(self._to_vote):
                queue = self._to_vote[issuer]
                take = max(1, (MAX_ITEMS - len(batch)) // max(1, len(self._to_vote)))
                for _ in range(min(take, len(queue), MAX_ITEMS - len(batch))):
                    batch.append(queue.popleft())
                if not queue:
                    del self._to_vote[issuer]
                if len(batch) >= MAX_ITEMS:
                    break
        return batch

    def _maybe_reveal(self, rid: bytes, now: bool = False) -> None:
        """Reveal the own vote on ``rid`` once every expected commit is held, or once anyone
        else has revealed (waiting longer would only help a copier) and this node holds the
        commits of every revealer and of every key their reveals list: listing those is what
        lets the ledger judge them (a peer cut off when it voted is then judged against those
        who came later), and an honest commit one revealer has seen is on its way here too.
        ``now``: the wait is over (REVEAL_AFTER)."""
        entry = self._own.get(rid)
        if entry is None or rid in self._to_reveal:
            return
        if not now and rid in self._frozen:
            if not self._vouched(rid) <= self.ledger.committers(rid):
                return  # commits the trusted reveals list are on their way: list them too
        elif not now:
            committed = self.ledger.committers(rid)
            if not entry[3] <= committed:
                revealed = self.ledger.revealers(rid) - {self.identity.key}
                if not revealed or not (revealed | self.ledger.listed(rid)) <= committed:
                    return
        self._to_reveal[rid] = None
        self._vote_wake.set()

    def source_of(self, name: str | None, proof: str | None, address: str | None) -> str:
        """Who sent a request, for scoring: ``peer <name>`` if it proved that name with the
        seat's key, else its address (a header anyone can write does not make one a peer)."""
        if name and proof:
            key = self._keys.get(name)
            if key and check_link_proof(self.genesis_id, key, name, self.me.name, proof, time.time()):
                return f"peer {name}"
        return f"address {address or '?'}"

    async def ingest(self, envs: list, source: str, acknowledge: bool = True) -> dict:
        """Verify and hold a batch of decoded envelopes from a peer. With ``acknowledge`` (the
        sender will be told), durable before returning; otherwise written in the background.
        Provably invalid messages count against ``source`` (see ``gossip.Scores``)."""
        backlog = self.data.backlog()
        if backlog:  # nothing is lost: the sender keeps what it sent, anti-entropy offers it again
            self.stats["refused"] += len(envs)
            return {"accepted": 0, "duplicate": 0, "rejected": 0, "unavailable": f"not taking messages: {backlog}"}
        accepted = duplicate = rejected = invalid = 0
        errors: list[str] = []
        for env in envs:
            try:
                signed = self.verifier.open_fields(env, is_known=self.holdings.__contains__)
            except WireError as exc:
                reason = str(exc)
                invalid += 1
            else:
                if signed is None:
                    duplicate += 1
                    continue
                reason = self._hold(signed)
                if reason is None:
                    accepted += 1
                    body = signed.msg.body
                    # Everything we signed since the last clean start is held (and on disk after
                    # a clean stop); a reveal may be re-made after a restart, so only an unknown
                    # commit of ours betrays another signer (after a crash, see start()).
                    if signed.msg.author == self.identity.key and isinstance(body, Votes) and body.commits:
                        self._foreign_own_vote(signed.msg, source)
                    continue
                invalid += reason not in HELD_BACK
            rejected += 1
            if len(errors) < 8:
                errors.append(reason)
        for key, n in (("batches", 1), ("accepted", accepted), ("duplicate", duplicate),
                       ("rejected", rejected)):
            self.stats[key] += n
        if rejected:
            log.debug("from %s: rejected %d of %d: %s", source, rejected, len(envs), errors)
        self.scores.penalize(source, invalid)
        if not acknowledge:
            self.data.commit_soon()
            return {"accepted": accepted, "duplicate": duplicate, "rejected": rejected}
        await asyncio.sleep(0)  # let the votes this batch woke join the same fsync
        result = {"accepted": accepted, "duplicate": duplicate, "rejected": rejected, "errors": errors}
        try:
            await self.data.commit()
        except OSError as exc:  # held, and written once the disk lets us: but not durable yet
            result["unavailable"] = (f"writing the log failed ({exc.strerror or exc}): what was "
                                     "accepted is not durable yet; send it again later")
        return result

    def _foreign_own_vote(self, msg: Message, source: str) -> None:
        """A vote by our key that we did not hold. After a clean start, another process signed
        it: everything we sign is held before it is sent. After a crash it may be ours, sent
        just before the crash (votes leave before their fsync): holding it is then what we
        need (and revealing it, see ``_unvoted``), and it betrays another signer only if it
        commits, on some round, to another vote than ours there (the same model, seed and
        round give the same commitment)."""
        if self.key_conflict is not None:
            return
        me = self.identity.key
        clash = [c.round for c in msg.body.commits if len(self.ledger.commits_of(me, c.round)) > 1]
        if not self._lost or clash:
            why = (f"commits on round {clash[0].hex()[:16]} to another vote than ours" if clash
                   else f"is not in {self.data.path}")
            self.key_conflict = (f"another process is signing with this node's key (vote "
                                 f"{msg.id.hex()[:16]} from {source} {why}); stopped voting")
            log.critical("%s", self.key_conflict)
            return
        for c in msg.body.commits:
            item = self._unvoted.pop(c.round, None)
            if item is not None:  # a commit of ours the crash lost: reveal it
                self._to_vote.setdefault(item[2], collections.deque()).append(item)
                self._vote_wake.set()

    # -- own messages ---------------------------------------------------------------------------

    def _next_lamport(self) -> int:
        """One more than any query held; pinned at MAX_LAMPORT (ties then go by round id)."""
        self._lamport = min(MAX_LAMPORT, max(self._lamport, self.ledger.lamport) + 1)
        return self._lamport

    async def _publish(self, signed: Signed, wait: bool) -> None:
        """Hold, send, and write to the log: with ``wait``, durable before this returns (a
        query: before any client hears of its rounds); otherwise in the background (votes:
        see ``_vote``)."""
        reason = self._hold(signed)
        if reason:  # pragma: no cover - our own messages are built valid
            raise RuntimeError(f"own message rejected: {reason}")
        self.gossip.broadcast([signed.raw])
        if wait:
            await self.data.commit()
        else:
            self.data.commit_soon()

    async def _query_loop(self) -> None:
        while True:
            await self._query_wake.wait()
            await _let_arrivals_in()
            self._query_wake.clear()
            if self.net.batch_window_ms:
                await asyncio.sleep(self.net.batch_window_ms / 1000)
            while self._queries:
                most = self.shape.max_rows  # a query must fit in one message
                batch = [(row, fut) for row, fut in self._queries[:most] if not fut.done()]
                del self._queries[:most]
                if not batch:  # their clients gave up (503 or gone): no round for them
                    continue
                try:
                    lamport, rows = self._next_lamport(), tuple(row for row, _ in batch)
                    votes = await self._own_votes(lamport, rows)
                    if self.key_conflict:  # found out during the model call: commit to nothing
                        votes = []
                    signed = self._sign(Query(
                        lamport, rows, tuple(digest for _, _, digest in votes)))
                    expected = self.expected_voters()
                    rids = [round_id(signed.msg.id, i) for i in range(len(rows))]
                    for rid, (label, proba, _) in zip(rids, votes):
                        self._own[rid] = (label, proba, self.identity.key, expected)
                    # It travels while it is written: no later message of ours can commit on
                    # these rounds, which exist only through this query.
                    await self._publish(signed, wait=True)
                    if votes:
                        asyncio.get_running_loop().call_later(
                            self.net.query_timeout_ms / 1000 * REVEAL_AFTER, self._reveal_now, rids)
                except Exception as exc:
                    log.exception("could not open %d rounds", len(batch))
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(Unavailable(f"could not open the round: {exc}"))
                    continue
                for i, (_, fut) in enumerate(batch):
                    if not fut.done():
                        fut.set_result((round_id(signed.msg.id, i), signed.msg.id))

    async def _model_vote(self, rows: np.ndarray, rounds: list[bytes]) -> list[tuple[int, tuple[int, ...]]]:
        """The model's votes on ``rows``: on the loop for at most INLINE_ROWS rows (a thread hop
        costs more than a small model call), unless scikit-learn must be loaded first for one
        of them; in a worker thread otherwise."""
        if len(rows) <= INLINE_ROWS:
            results = self.model.vote_inline(rows, rounds)
            if results is not None:
                return results
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self.model.vote, rows, rounds)

    async def _own_votes(self, lamport: int, rows: tuple) -> list[tuple[int, tuple[int, ...], bytes]]:
        """This node's vote on each row of a query it is about to sign, as (label, proba,
        commitment): the query carries them, committed before any peer has seen the rows (one
        message, one signature, one hop fewer per query than a separate commit). Empty for a
        copycat (it has no vote of its own to give) and once our key is in use elsewhere."""
        if self.model.behavior == "copycat" or self.key_conflict or self.seat_conflict:
            return []
        me = self.identity.key
        binds = [query_binding(me, lamport, i) for i in range(len(rows))]
        votes = await self._model_vote(np.array(rows, dtype=np.float64), binds)
        return [(label, proba, commitment(me, b, label, proba, self.identity.salt(b)))
                for b, (label, proba) in zip(binds, votes)]

    async def _vote_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._vote_wake.wait()
            await _let_arrivals_in()
            self._vote_wake.clear()
            while self._to_vote or self._to_reveal:
                while self.data.backlog():  # what we sign must reach the log too: wait for it
                    await asyncio.sleep(BACKLOG_RETRY_S)
                batch = self._next_batch()
                reveal = list(self._to_reveal)[:MAX_ITEMS]
                for rid in reveal:
                    del self._to_reveal[rid]
                try:
                    await self._vote(batch, reveal, loop)
                except Exception:
                    log.exception("could not vote on %d rounds", len(batch) + len(reveal))

    async def _vote(self, batch: list, reveal: list[bytes], loop: asyncio.AbstractEventLoop) -> None:
        """Commit to votes on ``batch`` of (round, row, issuer) and reveal those on ``reveal``,
        in one signed message, sent before it is durable: a restart that lost it commits the
        same again (see ``_after_crash`` for a changed model) and re-makes the reveal (its ``seen``
        may then differ, harmlessly)."""
        if self.key_conflict or self.seat_conflict:
            return  # never risk a conflicting vote under a key someone else is using; no seat, no vote
        me = self.identity.key
        behavior = self.model.behavior
        # a round folded for good (``Ledger.prune``) is thousands of rounds old: a vote on it
        # would be late, never counted, and would only make every ledger rebuild
        batch = [item for item in batch if not self.ledger.is_pruned(item[0])]
        # Nor on a round every other seat holder has revealed on: none can list a commit made
        # now, so the vote would be late too (a node back from a long absence fetches
        # thousands of such rounds; its votes on them made every peer rebuild its ledger).
        others = self.ledger.members() - {me}
        fresh, redo = [], []
        for item in batch:
            rid = item[0]
            revealers = self.ledger.revealers(rid)
            if self.ledger.commits_of(me, rid):
                # After a restart: committed to, reveal not held. The model gives the same vote
                # again; the commitment tells whether it did.
                if me not in revealers and rid not in self._own:
                    redo.append(item)
            elif me in self.ledger.listed(rid):
                # A reveal lists a commit of ours we do not hold: a crash lost it. A fresh one
                # could contradict it (a changed model); reveal it when it is back (_unvoted).
                self._unvoted[rid] = item
                self.stats["not_voted"] += 1
            elif others and others <= revealers:
                self.stats["not_voted"] += 1
            else:
                fresh.append(item)
        todo = fresh + redo
        results, rounds = [], []
        if todo:
            # what each commitment binds: the round id, or for our own query's rounds what its
            # commits bound (the model's "round" too: a behaviour's draw must come out the same)
            rounds = [self.ledger.commit_round(me, rid) for rid, _, _ in todo]
            rows = np.array([row for _, row, _ in todo], dtype=np.float64)
            results = await self._model_vote(rows, rounds)
        commits, expected = [], self.expected_voters()
        for (rid, _, issuer), bound, (label, proba) in zip(todo, rounds, results):
            if self.ledger.is_pruned(rid):  # pruned (or rebuilt) during the model call
                continue
            digest = commitment(me, bound, label, proba, self.identity.salt(bound))
            held = self.ledger.commits_of(me, rid)
            if held and digest not in held:
                log.warning("round %s: the model no longer gives the vote committed to; not revealed",
                            rid.hex()[:16])
                continue
            self._own[rid] = (label, proba, issuer, expected)
            if held:
                reveal.append(rid)  # committed before a restart: reveal now
            else:
                commits.append(Commit(rid, digest))
        for rid in reveal:
            if rid in self._to_copy and len(commits) < MAX_ITEMS:
                commits += self._copy(rid)
        # One message holds at most MAX_ITEMS reveals: the rest wait for the next one.
        for rid in reveal[MAX_ITEMS:]:
            self._to_reveal[rid] = None
            self._vote_wake.set()
        reveal = reveal[:MAX_ITEMS]
        reveals = self._reveals(reveal)
        if not commits and not reveals:
            return
        lamport = self._next_lamport()
        signed = self._sign(Votes(lamport, tuple(commits), tuple(reveals)))
        for r in reveals:  # signed: they are made (if publishing fails now, a restart redoes them)
            self._own.pop(r.round, None)
        if behavior == "equivocate" and commits:
            self._equivocate(lamport, commits)
        # Everything goes to everyone at once: commits (each peer reveals once it holds them
        # all) and reveals too (a reveal that reached the issuer before the others would give
        # an issuer that copies time to get its commit listed by them). Written in the
        # background: a commit is a pure function of (model, seed, round), so a restart that
        # lost it makes the same one again, no conflict; for a changed model, see _after_crash.
        # (Waiting for the fsync first cost about 1 ms of the sequential answer's 8.)
        await self._publish(signed, wait=False)
        if commits:
            loop.call_later(self.net.query_timeout_ms / 1000 * REVEAL_AFTER, self._reveal_now,
                            [c.round for c in commits])

    def _reveal_now(self, rounds: list[bytes]) -> None:
        for rid in rounds:
            self._maybe_reveal(rid, now=True)

    def _reveals(self, rounds: list[bytes]) -> list[Reveal]:
        """Reveal own votes on ``rounds``, listing whose commits this node holds now."""
        if self.model.behavior == "withhold":
            for rid in rounds:
                self._own.pop(rid, None)
                self._frozen.pop(rid, None)
            return []
        reveals = []
        members = [p.key for p in self.ledger.last_state.peers.values() if is_active(p)]
        for rid in rounds:
            entry = self._own.get(rid)
            if entry is None:
                continue
            if self.ledger.is_pruned(rid):  # thousands of rounds old: the reveal would be late,
                del self._own[rid]  # list no commits (none held), and make everyone rebuild
                self._frozen.pop(rid, None)
                continue
            label, proba, _, _ = entry
            held = frozenset(self.ledger.committers(rid))
            seen = self._vouched(rid) & held if rid in self._frozen else held
            self._frozen.pop(rid, None)
            for key in members:  # who keeps us waiting: not waited for after a few times
                self._late_streak[key] = 0 if key in seen else self._late_streak.get(key, 0) + 1
            salt = self.identity.salt(self.ledger.commit_round(self.identity.key, rid))
            reveals.append(Reveal(rid, label, proba, salt, shared(seen)))  # as peers' are
        return reveals

    def _copy(self, rid: bytes) -> list[Commit]:
        """Misbehaviour, for tests and demos: commit to what most of the revealed votes say,
        after seeing them, and reveal at once (what commit-reveal exists to make worthless)."""
        issuer = self._to_copy.pop(rid)
        labels = self.ledger.revealed_labels(rid)
        if not labels or self.ledger.commits_of(self.identity.key, rid):
            return []
        if self.task.regression:
            label, proba = sorted(labels)[(len(labels) - 1) // 2], ()
        else:
            label = max(range(len(self.task.classes)), key=lambda c: (labels.count(c), -c))
            proba = one_hot(label, len(self.task.classes))
        self._own[rid] = (label, proba, issuer, frozenset())
        return [Commit(rid, commitment(self.identity.key, rid, label, proba, self.identity.salt(rid)))]

    def _equivocate(self, lamport: int, commits: list[Commit]) -> None:
        """Misbehaviour, for tests and demos: a conflicting commit on every round, signed and
        sent only to the second half of the peers (the first half gets only the honest one)."""
        names = sorted(self.gossip.links)
        me = self.identity.key
        evil = []
        for c in commits:
            label = self._own[c.round][0]
            if self.task.regression:
                other, proba = label + 1, ()
            else:
                other = (label + 1) % len(self.task.classes)
                proba = one_hot(other, len(self.task.classes))
            evil.append(Commit(c.round, commitment(me, c.round, other, proba, self.identity.salt(c.round))))
        signed = self._sign(Votes(lamport, tuple(evil), ()))
        self.gossip.send_to(set(names[len(names) // 2:]), [signed.raw])

    # -- queries --------------------------------------------------------------------------------

    def expected_voters(self) -> frozenset[bytes]:
        """Active members this node can reach and that have not kept it waiting several times
        in a row (a peer that withholds its commits must not slow every round down): the
        commits and reveals worth waiting for."""
        reachable = self.gossip.reachable() | {self.me.name}
        return frozenset(p.key for p in self.ledger.last_state.peers.values()
                         if is_active(p) and p.name in reachable
                         and self._late_streak.get(p.key, 0) < LATE_STREAK_LIMIT)

    async def predict(self, row: tuple[float, ...]) -> dict:
        """Open a round for ``row``, wait for the votes (or the timeout), answer the consensus."""
        problem = self.key_conflict or self.seat_conflict
        if problem:
            raise Unavailable(problem)
        backlog = self.data.backlog()
        if backlog:
            raise Unavailable(f"cannot open a round: {backlog}")
        if not self.readiness.ready:
            raise Unavailable(f"not ready yet: {self.readiness.reason}")
        if len(self._queries) >= MAX_QUEUED_QUERIES:
            raise Unavailable(f"overloaded: {len(self._queries)} queries already waiting")
        fut = asyncio.get_running_loop().create_future()
        entry = (row, fut)
        self._queries.append(entry)
        self._query_wake.set()
        try:
            rid, query_id = await asyncio.wait_for(fut, OPEN_ROUND_TIMEOUT_S)
        except TimeoutError:
            raise Unavailable("overloaded: the round could not be opened in time") from None
        finally:
            if not fut.done() or fut.cancelled():  # given up (timed out, or its client left):
                with contextlib.suppress(ValueError):  # no longer queued, nor counted as such
                    self._queries.remove(entry)
        expected = self.expected_voters()
        event = asyncio.Event()
        self._waiters[rid] = (expected, event)
        try:
            if not expected <= self.ledger.revealers(rid):
                try:
                    async with asyncio.timeout(self.net.query_timeout_ms / 1000):
                        await event.wait()
                except TimeoutError:
                    pass
        finally:
            del self._waiters[rid]
        return self.answer(rid, query_id)

    def own_answer(self, row: tuple[float, ...]) -> dict:
        """This node's own model's answer on ``row`` (what it would vote if honest): opens no
        round and changes nothing."""
        if self.model.predict_proba is None:  # pragma: no cover - finished in __init__
            raise Unavailable("the model is not loaded yet")
        answer = self.model.own(np.array([row], dtype=np.float64))[0]
        held = self.ledger.last_state.card(self.id)  # the card in force, if it is this model's
        card = held if held and replace(held, previous=b"") == self.model.card else self.model.card
        return {**answer, "peer": self.id, "name": self.me.name, "model": card.model,
                "behavior": self.model.behavior,
                "card": {**card.canonical(), "id": card.id().hex()} if card else None}

    def round_view(self, rid: bytes) -> dict | None:
        """How this node's ledger decided a round (None: no query for it is held)."""
        if rid not in self.ledger.queries and not self.ledger.is_pruned(rid):
            return None
        view = self.answer(rid, self.ledger.query_of(rid))
        # settled: decided by at least one counted vote; None: too old, its outcome not kept
        kept = self.ledger.outcome(rid)
        view["settled"] = None if kept is None else kept.consensus is not None
        if kept is None:
            view["complete"] = view["missing"] = None  # not known any more
        return view

    def answer(self, rid: bytes, query_id: bytes | None) -> dict:
        outcome = self.ledger.outcome(rid)  # settles the rounds up to this one only
        state = self.ledger.last_state  # for names: a seat keeps its name
        classes = self.task.classes
        power_sum, proba_sum = 0, [0] * len(classes)
        for cv in outcome.votes if outcome else ():
            power = cv.stake * cv.weight
            power_sum += power
            for c, p in enumerate(cv.proba):
                proba_sum[c] += power * p
        votes = [self._vote_view(state, cv) for cv in (outcome.votes if outcome else ())]
        counted = {cv.peer for cv in outcome.votes} if outcome else set()
        # complete: every active member's vote counted; else the ones that were not, by name
        # (a seat of the peers file whose registration is not held here yet is a member too)
        named = {p.name for p in state.peers.values()}
        missing = sorted([p.name for pid, p in state.peers.items() if is_active(p) and pid not in counted]
                         + [cfg.name for cfg in self.net.peers if cfg.name not in named])
        consensus = outcome.consensus if outcome else None
        probabilities = ({c: round(proba_sum[i] / power_sum / 1e6, 6) for i, c in enumerate(classes)}
                         if power_sum and classes else None)
        return {
            "prediction": self._prediction(consensus),
            "probabilities": probabilities,
            "round": rid.hex(),
            "query": query_id.hex() if query_id else None,
            "complete": not missing,
            "missing": missing,
            "late": [state.peers[pid].name for pid in outcome.late] if outcome else [],
            "late_votes": [self._vote_view(state, cv) for cv in outcome.late_votes] if outcome else [],
            "unrevealed": [state.peers[pid].name for pid in outcome.unrevealed] if outcome else [],
            "votes": votes,
            "ledger_root": self.ledger.last_root(),
            "answered_by": self.id,
        }

    def _prediction(self, consensus: int | None):
        """A class name, or for regression a number (the vote's VALUE_ONE units undone)."""
        if consensus is None:
            return None
        return consensus / VALUE_ONE if self.task.regression else self.task.classes[consensus]

    def _vote_view(self, state, cv) -> dict:
        peer = state.peers[cv.peer]
        card = state.card_by_id(cv.peer, cv.card)
        view = {
            "peer": cv.peer, "name": peer.name, "model": card.model if card else None,
            "card": cv.card.hex(),
            "prediction": self._prediction(cv.label),
            "weight": cv.weight, "stake": cv.stake,
            "message": cv.message.hex(), "signature": self.signature_of(cv.message).hex(),
            "commit": cv.commit.hex(),
        }
        if not self.task.regression:
            view["probabilities"] = {c: p / PROBA_ONE for c, p in zip(self.task.classes, cv.proba)}
        return view

    def _read_logged(self, offset: int) -> bytes | None:
        try:
            return self.data.read_at(offset)
        except (OSError, StoreError) as exc:  # the log was changed under this node
            log.error("%s", exc)
            return None

    def _held_message(self, mid: bytes) -> Message:
        """A held message decoded again (for ``replay``; safe in another thread)."""
        if self._closing:
            raise StoreError("the node is stopping")
        raw = self.holdings.get(mid)
        msg = None if raw is None else self.verifier.reopen(raw)
        if msg is None or msg.id != mid:
            raise StoreError(f"message {mid.hex()[:16]} is held but cannot be read back")
        return msg

    def signature_of(self, mid: bytes) -> bytes:
        raw = self.holdings.get(mid)
        return b"" if raw is None else msgpack.unpackb(raw)[2]

    def message(self, mid: bytes) -> dict | None:
        raw = self.holdings.get(mid)
        if raw is None:
            return None
        key, body, sig = msgpack.unpackb(raw)
        decoded = decode_body(body, self.shape)
        view = {"id": mid.hex(), "author": peer_id(key), "key": key.hex(), "body": body.hex(),
                "signature": sig.hex(), "type": type(decoded).__name__.lower(), "envelope": raw.hex()}
        if isinstance(decoded, Transfer):  # what the ledger made of it
            result = self.ledger.transfer_result(mid)
            view.update(to=decoded.to.hex(), amount=decoded.amount, seq=decoded.seq, lamport=decoded.lamport,
                        applied=None if result is None else result[0],
                        void=None if result is None else result[1])
        return view

    def account_view(self, key: bytes) -> dict:
        """One account: its balance, the sequence number its next transfer must carry, the
        lamport a new transfer should be above, and its stake if it holds a seat."""
        state = self.ledger.state
        balance, seq = state.accounts.get(key, (0, 0))
        member = state.peers.get(peer_id(key))
        return {"key": key.hex(), "balance": balance, "seq": seq, "next_seq": seq + 1,
                "lamport": self.ledger.lamport, "member": peer_id(key) if member else None,
                "name": member.name if member else None, "stake": member.stake if member else None,
                "status": member.status if member else None}

    # -- the ledger view ------------------------------------------------------------------------

    def ledger_view(self) -> dict:
        state = self.ledger.state
        view = state.canonical()
        view["root"] = self.ledger.root()
        view["genesis"] = self.genesis_id.hex()
        view["supply"] = self.ledger.genesis.supply
        view["task"] = self.task.canonical()
        view["messages"] = len(self.holdings)
        view["lamport"] = self.ledger.lamport
        # whether a message on a round folded for good is not counted yet (being rebuilt)
        view["stale"] = self.ledger.stale
        view["rounds_in_memory"] = self.ledger.rounds_held
        return view

    def _log_events(self) -> None:
        now = snapshot(self.ledger.state)
        for line in changes(self._logged, now):
            log.info("%s", line)
        self._logged = now

    def _write_ledger(self) -> None:
        view = self.ledger_view()
        self.data.write_ledger(view)
        self._written_root = view["root"]

    def _prune(self, ledger: Ledger) -> None:
        """Down to rounds_in_memory, but never the rounds clients are waiting on (a member's
        flood of queries must not push them out before they are answered)."""
        waited = [k for rid in self._waiters if (k := ledger.key(rid)) is not None]
        ledger.prune(self.net.rounds_in_memory, before=min(waited, default=None))

    def _maybe_rebuild(self) -> None:
        """Rebuild the stale ledger once messages stopped reaching back for a moment (or have
        for long), unless a rebuild runs or one ended too recently (a member that keeps sending
        votes on pruned rounds must not keep every node replaying)."""
        now = time.monotonic()
        settled = (now - self._reached_at >= REBUILD_QUIET_S
                   or now - (self._stale_since or now) >= REBUILD_WAIT_S)
        if (self._rebuild_tail is None and not self._closing and settled
                and now >= self._rebuild_after):
            self._stale_since = 0.0
            self._start_rebuild()

    def _start_rebuild(self) -> None:
        self._rebuild_tail = []
        task = asyncio.get_running_loop().create_task(self._rebuild(), name="rebuild")
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _rebuild(self) -> None:
        """A held message touches a round the ledger pruned (a peer back from a long partition,
        or one replaying old rounds): fold every held message again, in a thread, while this
        ledger goes on answering (without that message's effect) meanwhile."""
        started = time.monotonic()
        ids = self.holdings.id_view()
        try:
            fresh = await asyncio.get_running_loop().run_in_executor(
                self._rebuilder, replay, self.genesis, len(ids),
                lambda i: self._held_message(ids[i]), self.net.rounds_in_memory, False)
            for msg in self._rebuild_tail:  # held meanwhile: before the last prune
                fresh.add(msg)
            self._prune(fresh)
        except Exception:
            if not self._closing:
                log.exception("could not rebuild the ledger; it stays stale")
            return
        finally:
            self._rebuild_tail = None
            self._rebuild_after = time.monotonic() + max(REBUILD_PAUSE_S, time.monotonic() - started)
        self.ledger = fresh
        self.rebuilds += 1
        log.warning("a message reached back past the %d rounds kept in memory: ledger rebuilt "
                    "from %d messages in %.1f s; root %s", self.net.rounds_in_memory, len(ids),
                    time.monotonic() - started, fresh.root()[:16])

    async def _ledger_writer(self) -> None:
        while True:
            await asyncio.sleep(LEDGER_WRITE_INTERVAL_S)
            self._prune(self.ledger)
            if self.ledger.stale:  # also after a failed rebuild, or with nothing arriving since
                self._maybe_rebuild()
            view = self.ledger_view()
            self._log_events()
            if view["root"] != self._written_root:
                try:
                    await asyncio.to_thread(self.data.write_ledger, view)
                except OSError as exc:  # the log is the truth; this view can wait
                    log.error("could not write %s: %s", self.data.path, exc)
                    continue
                self._written_root = view["root"]
