"""Live and ready are two things: a node serves ``/health`` as soon as it listens, but answers
queries only once it has heard its peers, so that its first answers count their votes.

Ready: the start-up sync is done, and either every other member is reachable, or members with
more than half of the others' voting power have been reachable for ``READY_GRACE_S``, or
``READY_WAIT_S`` has passed since the start-up sync ended (a lone survivor of a partition
must still answer, with ``complete: false`` and the members it could not count named).
Once ready, a node stays ready: later partitions show in each answer's ``missing``."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

READY_GRACE_S = 1.0  # a majority reachable this long: ready without waiting for the rest
READY_WAIT_S = 5.0  # ready at the latest this long after the start-up sync, whoever is reachable
READY_POLL_S = 0.1  # how often readiness is looked at (and unreachable peers tried again)
RECONNECT_TIMEOUT_S = 1.0  # one attempt to reach the unreachable peers takes at most this


@dataclass(frozen=True)
class Member:
    name: str
    power: int  # stake x weight, as in the consensus


def decide(others: list[Member], reachable: set[str], elapsed: float,
           majority_since: float | None) -> tuple[str | None, float | None]:
    """(why the node is ready, or None; since when a majority has been reachable).
    Pure: ``elapsed`` is seconds since the start-up sync ended."""
    total = sum(m.power for m in others)
    up = sum(m.power for m in others if m.name in reachable)
    down = sorted(m.name for m in others if m.name not in reachable)
    if not down:
        return ("every other member is reachable" if others else "no other member"), majority_since
    majority = 2 * up > total
    since = (majority_since if majority_since is not None else elapsed) if majority else None
    if majority and elapsed - since >= READY_GRACE_S:
        return (f"members with {up} of the others' {total} voting power are reachable; "
                f"not {', '.join(down)}"), since
    if elapsed >= READY_WAIT_S:
        return (f"waited {READY_WAIT_S:.0f}s; members with {total - up} of the others' {total} "
                f"voting power are unreachable: {', '.join(down)}"), since
    return None, since


class Readiness:
    """Watches the node's links until it is ready, trying unreachable peers again meanwhile
    (their back-off would otherwise keep a peer that started a moment later away for seconds)."""

    def __init__(self, members, reachable, reconnect):
        self._members = members  # () -> list[Member], the other members
        self._reachable = reachable  # () -> set of reachable peer names
        self._reconnect = reconnect  # async (timeout) -> None
        self.ready = False
        self.reason = "starting: the start-up sync is not done"
        self._event = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        t0, since = loop.time(), None
        self.reason = f"hearing from the peers (at most {READY_WAIT_S:.0f}s)"
        while True:
            why, since = decide(self._members(), self._reachable(), loop.time() - t0, since)
            if why is not None:
                break
            await self._reconnect(RECONNECT_TIMEOUT_S)
            await asyncio.sleep(READY_POLL_S)
        self.ready, self.reason = True, why
        self._event.set()
        log.info("ready after %.1fs: %s", loop.time() - t0, why)

    async def wait(self) -> None:
        await self._event.wait()
