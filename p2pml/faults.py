"""Fault injection in the manner of Jepsen: a real cluster under load, faults, heal, check.

The harness re-executes itself inside a network namespace it creates (root and iproute2 needed),
where the five peers listen on 127.0.0.11-15 and connect from their own addresses, so that
nftables rules in that namespace (and only there) can cut, split or thin out the links between
them. Process faults are signals sent, by pid, to the peers this harness started.

The checker, after every fault is healed: every query a client got a 200 for is held, with a
settled round, by every peer (lost = 0); no peer holds more rounds than clients asked for
(nothing appears that no one sent); all roots agree, and how long that took; no honest peer
was slashed.

    python -m p2pml.faults [--rounds N] [--fault-seconds S] [--kinds kill9,pause,...] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from p2pml.cluster import LocalCluster, free_ports, write_network
from p2pml.config import NETWORK_SETTINGS
from p2pml.ledger import DEPOSIT

NAMESPACE_ENV = "P2PML_FAULTS_NETNS"
HOSTS = [f"127.0.0.{11 + i}" for i in range(5)]  # where peers are reached (through a proxy)
BIND_HOSTS = [f"127.0.0.{21 + i}" for i in range(5)]  # where they really listen
FAULT_KINDS = ("kill9", "pause", "isolate", "split", "bridge", "one_way", "loss", "delay",
               "restart_all")
DELAY_S = 0.05  # the delay fault: every chunk on every link 50 ms late,
SPIKE_S = 0.3  # and one chunk in SPIKE_ONE_IN 300 ms more
SPIKE_ONE_IN = 10
CLIENTS = 6  # concurrent clients of the load
CLIENT_TIMEOUT_S = 1.0  # below any fault's length: a client stuck on a dead peer comes back
CONVERGE_LIMIT_S = 30.0


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def can_run() -> str | None:
    """Why the harness cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2, nftables)"
    return None


class Firewall:
    """nftables rules in the harness's own namespace, on the peers' addresses only."""

    def __init__(self) -> None:
        self.nft("add table inet p2pml")
        self.nft("add chain inet p2pml out { type filter hook output priority 0 ; policy accept ; }")

    @staticmethod
    def nft(rule: str) -> None:
        sh("nft", rule)

    def cut(self, a: list[str], b: list[str]) -> None:
        for x in a:
            for y in b:
                self.nft(f"add rule inet p2pml out ip saddr {x} ip daddr {y} drop")
                self.nft(f"add rule inet p2pml out ip saddr {y} ip daddr {x} drop")

    def one_way(self, a: list[str], b: list[str]) -> None:
        """``a`` cannot open connections to ``b``; ``b`` can still reach ``a`` (and be answered).
        (Dropping every packet one way would break TCP both ways: that is ``cut``.)"""
        for x in a:
            for y in b:
                self.nft(f"add rule inet p2pml out ip saddr {x} ip daddr {y} ct state new drop")

    def loss(self, hosts: list[str], percent: int) -> None:
        group = "{ " + ", ".join(hosts) + " }"
        self.nft(f"add rule inet p2pml out ip saddr {group} ip daddr {group} "
                 f"numgen random mod 100 < {percent} drop")

    def heal(self) -> None:
        self.nft("flush chain inet p2pml out")


def unanimous_rows(n: int = 12) -> list[str]:
    """Iris rows on which all five models agree, from every class: on these an honest peer
    never disagrees with the consensus, so any slash would be the faults' doing."""
    from sklearn.datasets import load_iris

    from p2pml.config import MODEL_KINDS
    from p2pml.model import Model

    x = load_iris().data
    labels = [[label for label, _ in Model(k).vote(x, [b""] * len(x))] for k in MODEL_KINDS]
    agreed = [i for i in range(len(x)) if len({votes[i] for votes in labels}) == 1]
    picked = [i for c in range(3) for i in agreed if labels[0][i] == c][:: max(1, len(agreed) // n)]
    return [",".join(f"{v:g}" for v in x[i]) for i in picked]


class DelayProxy:
    """Stands at a peer's address and forwards to where it really listens, holding each chunk
    back by ``delay`` (plus an occasional spike): added latency where tc netem is not to be had.
    Order within a connection is kept."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], rng: random.Random):
        self.listen, self.target, self.rng = listen, target, rng
        self.delay = 0.0
        self.spike = 0.0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, *self.listen)

    async def close(self) -> None:
        self._server.close()
        for t in self._pipes:
            t.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        for r, w in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(r, w))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(64 * 1024):
                wait = self.delay + (self.spike if self.rng.randrange(SPIKE_ONE_IN) == 0 else 0.0)
                if wait:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@dataclass
class Load:
    """Clients sending Iris rows to the peers in turn; bounded in time by ``stop``."""

    urls: list[str]
    rows: list[str]
    acked: list[tuple[str, str, str]] = field(default_factory=list)  # (query, round, fault)
    answered_by: set[int] = field(default_factory=set)  # peers that answered while counting
    counting: bool = False  # True while a fault is in force
    attempts: int = 0
    attempts_to: dict[int, int] = field(default_factory=dict)
    failures: int = 0
    phase: str = ""

    async def run(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        rows = self.rows

        async def client(k: int) -> None:
            i = k
            while not stop.is_set():
                peer = i % len(self.urls)
                url = f"{self.urls[peer]}/predict?features={rows[i % len(rows)]}"
                i += 1
                self.attempts += 1
                self.attempts_to[peer] = self.attempts_to.get(peer, 0) + 1
                try:
                    async with session.get(url) as r:
                        body = await r.json(content_type=None)
                        if r.status == 200:
                            self.acked.append((body["query"], body["round"], self.phase))
                            if self.counting:
                                self.answered_by.add(peer)
                        else:
                            self.failures += 1
                except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
                    self.failures += 1
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(client(k) for k in range(CLIENTS)))


@dataclass
class Outcome:
    kind: str
    acked: int = 0
    converge_s: list[float] = field(default_factory=list)
    slashed: set[str] = field(default_factory=set)
    answering: list[int] = field(default_factory=list)  # peers answering, per occurrence


class Harness:
    def __init__(self, root: Path, fault_seconds: float, seed: int, rounds_in_memory: int | None = None):
        ports = free_ports(5, host=HOSTS[0])
        extra = {} if rounds_in_memory is None else {"rounds_in_memory": rounds_in_memory}
        peers = write_network(root / "peers.toml", ports, hosts=HOSTS, query_timeout_ms=300,
                              anti_entropy_interval_ms=200, request_timeout_ms=1000, **extra)
        self.cluster = LocalCluster(peers, root / "data", log_level="WARNING",
                                    bind_hosts=dict(zip(self._names(peers), BIND_HOSTS)))
        self.fw = Firewall()
        self.rng = random.Random(seed)
        self.hold = fault_seconds
        self.proxies = [DelayProxy((HOSTS[i], port), (BIND_HOSTS[i], port), random.Random(seed * 100 + i))
                        for i, port in enumerate(ports)]  # own generators: fault picks stay seeded
        # Clients talk to the peers directly: the faults are between peers.
        self.load = Load([self.cluster.url(n) for n in self.cluster.names], unanimous_rows())
        self.hosts = {p.name: p.host for p in self.cluster.net.peers}

    def rebuilds(self) -> int:
        """Ledger rebuilds the nodes logged (a message reached behind the rounds they keep)."""
        return sum(path.read_text(errors="replace").count("ledger rebuilt")
                   for path in self.cluster.data_root.glob("*.log"))

    @staticmethod
    def _names(peers_file: Path) -> list[str]:
        from p2pml.config import load

        return [p.name for p in load(peers_file).peers]

    # -- faults ---------------------------------------------------------------------------------

    async def fault(self, kind: str) -> None:
        """Apply one fault under load, hold it (answers counted meanwhile), heal it."""
        names = self.cluster.names
        pick = self.rng.sample(names, len(names))
        hosts = [self.hosts[n] for n in pick]
        if kind == "kill9":
            await asyncio.sleep(self.rng.uniform(0.1, self.hold / 2))  # mid-load, writes in flight
            self.cluster.kill(pick[0])
            await self.held()
            self.cluster.start(pick[0])
            await asyncio.to_thread(self.cluster.wait_ready, 60, [pick[0]])
        elif kind == "pause":
            self.cluster.signal(pick[0], signal.SIGSTOP)
            await self.held()
            self.cluster.signal(pick[0], signal.SIGCONT)
        elif kind == "restart_all":
            await asyncio.to_thread(self.cluster.stop)
            self.cluster.start()
            await asyncio.to_thread(self.cluster.wait_ready, 60)
            await self.held()
        else:
            if kind == "isolate":
                self.fw.cut(hosts[:1], hosts[1:])
            elif kind == "split":
                self.fw.cut(hosts[:2], hosts[2:])
            elif kind == "bridge":  # 0 and 1 reach each other only through 2
                self.fw.cut(hosts[:1], hosts[1:2])
                self.fw.cut(hosts[:2], hosts[3:])
            elif kind == "one_way":
                self.fw.one_way(hosts[:1], hosts[1:])
            elif kind == "loss":
                self.fw.loss(hosts, 20)
            elif kind == "delay":
                for proxy in self.proxies:
                    proxy.delay, proxy.spike = DELAY_S, SPIKE_S
            else:
                raise ValueError(f"unknown fault {kind!r}")
            await self.held()
            self.fw.heal()
            for proxy in self.proxies:
                proxy.delay = proxy.spike = 0.0

    async def held(self) -> None:
        self.load.answered_by = set()
        self.load.counting = True
        await asyncio.sleep(self.hold)
        self.load.counting = False

    # -- the run --------------------------------------------------------------------------------

    async def run(self, kinds: list[str], rounds: int) -> dict:
        for proxy in self.proxies:
            await proxy.start()
        try:
            return await self._run(kinds, rounds)
        finally:
            for proxy in self.proxies:
                await proxy.close()

    async def _run(self, kinds: list[str], rounds: int) -> dict:
        self.cluster.start()
        await asyncio.to_thread(self.cluster.wait_ready, 60)
        await asyncio.to_thread(self.cluster.wait_registered, 60)
        outcomes = {k: Outcome(k) for k in kinds}
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for _ in range(rounds):
                for kind in kinds:
                    stop = asyncio.Event()
                    self.load.phase = kind
                    before = len(self.load.acked)
                    load = asyncio.create_task(self.load.run(session, stop))
                    try:
                        await self.fault(kind)
                    finally:
                        self.fw.heal()
                        stop.set()
                        await load
                    outcomes[kind].acked += len(self.load.acked) - before
                    outcomes[kind].answering.append(len(self.load.answered_by))
                    outcomes[kind].converge_s.append(await asyncio.to_thread(self.converge))
                    outcomes[kind].slashed |= await asyncio.to_thread(self.slashed) - set().union(
                        *(o.slashed for o in outcomes.values() if o.kind != kind))
            report = await self.check(session)
        report["faults"] = {k: {"acked": o.acked, "lost": report["lost_by_fault"].get(k, 0),
                                "peers_answering": min(o.answering),
                                "converge_median_s": _median(o.converge_s),
                                "converge_max_s": max(o.converge_s),
                                "honest_slashed": sorted(o.slashed)} for k, o in outcomes.items()}
        return report

    def slashed(self) -> set[str]:
        """Peers (all honest here) that any ledger shows slashed or ejected."""
        return {p["name"] for lg in self.cluster.ledgers().values() for p in lg["peers"].values()
                if p["stake"] != DEPOSIT or p["status"] != "active"}

    def converge(self) -> float:
        """Seconds until every peer reports the same root and message count (inf: never)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < CONVERGE_LIMIT_S:
            ledgers = self.cluster.ledgers()
            if len(ledgers) == len(self.cluster.names) and \
                    len({(lg["root"], lg["messages"]) for lg in ledgers.values()}) == 1:
                return time.monotonic() - t0
            time.sleep(0.05)
        return float("inf")

    async def check(self, session: aiohttp.ClientSession) -> dict:
        lost = unsettled = 0
        lost_by_fault: dict[str, int] = {}
        unsettled_by_fault: dict[str, int] = {}
        sem = asyncio.Semaphore(16)

        async def held(url: str, qid: str, rid: str) -> tuple[bool, bool]:
            async with sem:
                async with session.get(f"{url}/message/{qid}") as r:
                    if r.status != 200:
                        return False, False
                async with session.get(f"{url}/round/{rid}") as r:
                    body = await r.json(content_type=None)
                    return True, r.status == 200 and body.get("settled") is not False

        missing: set[str] = set()
        for name in self.cluster.names:
            url = self.cluster.url(name)
            results = await asyncio.gather(*(held(url, q, r) for q, r, _ in self.load.acked))
            for (h, s), (qid, _, kind) in zip(results, self.load.acked):
                unsettled += h and not s
                if h and not s:
                    unsettled_by_fault[kind] = unsettled_by_fault.get(kind, 0) + 1
                if not h and qid not in missing:  # a query is lost if any peer lacks it
                    missing.add(qid)
                    lost += 1
                    lost_by_fault[kind] = lost_by_fault.get(kind, 0) + 1
        ledgers = await asyncio.to_thread(self.cluster.ledgers)
        honest_slashed = sorted(await asyncio.to_thread(self.slashed))
        return {
            "lost_by_fault": lost_by_fault,
            "unsettled_by_fault": unsettled_by_fault,
            "acked": len(self.load.acked),
            "attempts": self.load.attempts,
            "lost": lost,
            "unsettled": unsettled,
            "roots_equal": len({lg["root"] for lg in ledgers.values()}) == 1 and len(ledgers) == 5,
            "honest_slashed": honest_slashed,
        }


    def audit(self) -> int:
        """After the run, from every peer's log: each query was asked by a cluster key, holds
        only rows the clients sent, and no peer asked more rows than it was sent. Returns the
        number of rows that break this (what appeared that no one sent)."""
        from p2pml.ledger import Query
        from p2pml.store import DataDir
        from p2pml.wire import Verifier

        verifier = Verifier(self.cluster.net.genesis().id())
        peer_of = {p.key: i for i, p in enumerate(self.cluster.net.peers)}
        sent = {tuple(float(x) for x in row.split(",")) for row in self.load.rows}
        asked: dict[int, int] = {}
        seen: set[bytes] = set()
        bad = 0
        for name in self.cluster.names:
            data = DataDir(self.cluster.data_root / name)
            try:
                records = data.read_log()
            finally:
                data.close()
            for raw in records:
                msg = verifier.open(raw).msg
                if not isinstance(msg.body, Query) or msg.id in seen:
                    continue
                seen.add(msg.id)
                if msg.author not in peer_of:
                    bad += len(msg.body.items)
                    continue
                bad += sum(row not in sent for row in msg.body.items)
                asked[peer_of[msg.author]] = asked.get(peer_of[msg.author], 0) + len(msg.body.items)
        return bad + sum(max(0, n - self.load.attempts_to.get(i, 0)) for i, n in asked.items())


def verdict(report: dict) -> list[str]:
    """Everything that is wrong with a run (empty: it passed)."""
    wrong = []
    for key in ("lost", "unsettled", "phantom_rounds"):
        if report[key]:
            wrong.append(f"{key} = {report[key]}")
    if not report["roots_equal"]:
        wrong.append("roots differ")
    if report["honest_slashed"]:
        wrong.append(f"honest peers slashed: {report['honest_slashed']}")
    for kind, r in report["faults"].items():
        if r["converge_max_s"] == float("inf"):
            wrong.append(f"{kind}: never converged within {CONVERGE_LIMIT_S:.0f}s")
        need = 4 if kind in ("kill9", "pause") else 5  # a killed or paused peer cannot answer
        if r["peers_answering"] < need:
            wrong.append(f"{kind}: only {r['peers_answering']} peers answered during the fault")
    return wrong


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def report_table(report: dict) -> str:
    header = (f"{'fault':<12} {'acked':>6} {'answering':>9} {'lost':>5} {'converge median s':>18} "
              f"{'converge max s':>15}")
    lines = [header + "  honest slashed"]
    for kind, r in report["faults"].items():
        lines.append(f"{kind:<12} {r['acked']:>6} {r['peers_answering']:>7}/5 {r['lost']:>5} "
                     f"{r['converge_median_s']:>18.2f} "
                     f"{r['converge_max_s']:>15.2f}  {', '.join(r['honest_slashed']) or 'none'}")
    lines.append(f"acknowledged {report['acked']} of {report['attempts']} queries; lost {report['lost']}, "
                 f"unsettled {report['unsettled']}, rows nobody sent {report['phantom_rounds']}, "
                 f"roots equal: {report['roots_equal']}, honest peers slashed: "
                 f"{', '.join(report['honest_slashed']) or 'none'}, ledger rebuilds: "
                 f"{report.get('rebuilds', 0)}")
    lines.append("PASS" if not report["wrong"] else "FAIL: " + "; ".join(report["wrong"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m p2pml.faults", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1, help="times each fault kind is applied")
    ap.add_argument("--fault-seconds", type=float, default=3.0, help="how long each fault lasts")
    ap.add_argument("--kinds", default=",".join(FAULT_KINDS), help="comma-separated fault kinds")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--rounds-in-memory", type=int, default=None,
                    help="the nodes' rounds_in_memory (small: partitions reach behind it, and "
                         "the nodes rebuild their ledgers)")
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if k not in FAULT_KINDS]
    _, lo, hi = NETWORK_SETTINGS["rounds_in_memory"]
    keep_ok = args.rounds_in_memory is None or lo <= args.rounds_in_memory <= hi
    if bad or not kinds or args.rounds < 1 or args.fault_seconds <= 0 or not keep_ok:
        ap.error(f"--kinds from {', '.join(FAULT_KINDS)}; --rounds >= 1; --fault-seconds > 0; "
                 f"--rounds-in-memory in [{lo}, {hi}]"
                 + (f" (unknown: {', '.join(bad)})" if bad else ""))
    why = can_run()
    if why:
        print(f"p2pml.faults: cannot run: {why}", file=sys.stderr)
        return 2
    if os.environ.get(NAMESPACE_ENV) is None:
        return _in_new_namespace(sys.argv[1:] if argv is None else argv)
    root = Path(tempfile.mkdtemp(prefix="p2pml-faults-"))
    harness = Harness(root, args.fault_seconds, args.seed, args.rounds_in_memory)
    try:
        report = asyncio.run(harness.run(kinds, args.rounds))
    finally:
        harness.fw.heal()
        harness.cluster.stop()
    report["phantom_rounds"] = harness.audit()
    report["rebuilds"] = harness.rebuilds()
    report["wrong"] = verdict(report)
    if report["wrong"]:
        report["data"] = str(root)  # kept for a look
    else:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report) if args.json else report_table(report))
    return 1 if report["wrong"] else 0


def _in_new_namespace(argv: list[str]) -> int:
    """Run this module again inside a fresh network namespace, which is deleted afterwards."""
    name = f"p2pml-faults-{os.getpid()}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        env = {**os.environ, NAMESPACE_ENV: name}
        cmd = ["ip", "netns", "exec", name, sys.executable, "-m", "p2pml.faults", *argv]
        return subprocess.run(cmd, env=env, check=False).returncode
    finally:
        sh("ip", "netns", "delete", name)


if __name__ == "__main__":
    sys.exit(main())
