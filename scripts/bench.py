"""p2pml against the centralized ensemble it replaces, side by side in one run, on loopback.

    python scripts/bench.py [--sequential 300] [--seconds 10] [--clients 32]

Starts the 5-peer network (free ports, a temporary data dir) and scripts/baseline.py, then for
each: sequential latency p50/p99, throughput and p99 with N concurrent clients for a fixed time,
CPU seconds per query (all server processes), resident memory per process; for p2pml also how
long after the load stops all ledger roots agree. The two take turns in slices (6 sequential, 2
under load), so that the shared machine's drifting speed falls on both alike. Prints a table and
the p2pml/baseline ratios. Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp
from sklearn.datasets import load_iris

from p2pml.cluster import LocalCluster, free_ports, get_json, write_network

TICK = os.sysconf("SC_CLK_TCK")
SLICES = 6  # sequential slices per target, alternating
LOAD_SLICES = 2  # slices of the load phase per target, alternating


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


class Target:
    def __init__(self, name: str, urls: list[str], pids: list[int]):
        self.name, self.urls, self.pids = name, urls, pids
        self.results: dict[str, float] = {}
        self.seq_times: list[float] = []  # every sequential latency, over all slices
        self.seq_p50s: list[float] = []  # each slice's p50
        self.load_times: list[float] = []  # every latency under load, over all slices
        self.load_seconds = self.load_cpu = 0.0
        self.errors = 0


async def sequential(session, target: Target, rows: list[str], n: int) -> None:
    times = []
    for i in range(n):
        url = f"{target.urls[i % len(target.urls)]}/predict?features={rows[i % len(rows)]}"
        t0 = time.perf_counter()
        async with session.get(url) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(f"{target.name}: {r.status} {await r.text()}")
        times.append(time.perf_counter() - t0)
    target.seq_times += times
    target.seq_p50s.append(pct(times, 0.5))


async def concurrent(session, target: Target, rows: list[str], clients: int, seconds: float) -> None:
    times: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    cpu0 = sum(cpu_seconds(p) for p in target.pids)

    async def client(k: int) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < deadline:
            url = f"{target.urls[i % len(target.urls)]}/predict?features={rows[i % len(rows)]}"
            i += clients
            t0 = time.perf_counter()
            async with session.get(url) as r:
                await r.read()
                errors += r.status != 200
            times.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    target.load_seconds += time.perf_counter() - t0
    target.load_cpu += sum(cpu_seconds(p) for p in target.pids) - cpu0
    target.load_times += times
    target.errors += errors
    target.results["rss_mb"] = max(rss_mb(p) for p in target.pids)


def summarize(target: Target) -> None:
    n = len(target.load_times)
    target.results.update(
        seq_p50_ms=pct(target.seq_times, 0.5) * 1e3, seq_p99_ms=pct(target.seq_times, 0.99) * 1e3,
        qps=n / target.load_seconds, conc_p99_ms=pct(target.load_times, 0.99) * 1e3,
        cpu_ms_per_query=target.load_cpu / max(1, n) * 1e3, errors=target.errors)


def wait_roots(cluster: LocalCluster, timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        ledgers = cluster.ledgers()
        if len(ledgers) == len(cluster.names) and len({lg["root"] for lg in ledgers.values()}) == 1:
            return time.perf_counter() - t0
        time.sleep(0.01)
    return float("inf")


async def run(args, cluster: LocalCluster, baseline_url: str, baseline_pid: int) -> None:
    iris = load_iris()
    rows = [",".join(f"{x:g}" for x in r) for r in iris.data]
    p2p = Target("p2pml", [cluster.url(n) for n in cluster.names],
                 [p.pid for p in cluster.procs.values()])
    base = Target("baseline", [baseline_url], [baseline_pid])
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=args.clients * 2)
    p2p.results["rss_start_mb"] = max(rss_mb(p) for p in p2p.pids)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        for target in (base, p2p):  # warm up both
            await sequential(session, target, rows, 20)
            target.seq_times.clear()
            target.seq_p50s.clear()
        # Alternate the two in slices, so that the machine's noise (it is shared, and its speed
        # drifts by tens of percent within a minute) falls on both alike.
        for k in range(SLICES):
            for target in (base, p2p):
                n = args.sequential // SLICES + (k < args.sequential % SLICES)
                await sequential(session, target, rows, max(1, n))
        for k in range(LOAD_SLICES):
            for target in (base, p2p):
                await concurrent(session, target, rows, args.clients, args.seconds / LOAD_SLICES)
        p2p.results["roots_agree_s"] = wait_roots(cluster, 30)
        ledgers = cluster.ledgers().values()
        p2p.results["rounds"] = max(lg["rounds_in_memory"] for lg in ledgers)
        p2p.results["rounds_kept"] = cluster.net.rounds_in_memory
        p2p.results["rss_end_mb"] = max(rss_mb(p) for p in p2p.pids)
        for target in (base, p2p):
            summarize(target)
        ratios = sorted(p / b for p, b in zip(p2p.seq_p50s, base.seq_p50s))
        p2p.results["seq_ratio_median"] = ratios[len(ratios) // 2]
    report(base, p2p, args)


def report(base: Target, p2p: Target, args) -> None:
    rows = [
        ("sequential p50 latency (ms)", "seq_p50_ms", "{:.2f}"),
        ("sequential p99 latency (ms)", "seq_p99_ms", "{:.2f}"),
        (f"throughput, {args.clients} clients (queries/s)", "qps", "{:.0f}"),
        (f"p99 latency, {args.clients} clients (ms)", "conc_p99_ms", "{:.1f}"),
        ("CPU per query, all processes (ms)", "cpu_ms_per_query", "{:.2f}"),
        ("resident memory, largest process (MB)", "rss_mb", "{:.0f}"),
        ("errors under load", "errors", "{:.0f}"),
    ]
    print(f"\n{'':42} {'baseline':>10} {'p2pml':>10} {'p2pml/baseline':>15}")
    for label, key, fmt in rows:
        b, p = base.results[key], p2p.results[key]
        ratio = f"{p / b:.2f}" if b else "-"
        print(f"{label:42} {fmt.format(b):>10} {fmt.format(p):>10} {ratio:>15}")
    print(f"{'ledger roots agree after load stops (s)':42} {'-':>10} {p2p.results['roots_agree_s']:>10.3f}")
    print(f"sequential p50 ratio, slice by slice ({SLICES} side by side): median "
          f"{p2p.results['seq_ratio_median']:.2f}")
    # Every node keeps every round it saw: how fast it grows, and where that leads.
    start, end, rounds = p2p.results["rss_start_mb"], p2p.results["rss_end_mb"], p2p.results["rounds"]
    keep = p2p.results["rounds_kept"]
    per_round_kb = (end - start) * 1024 / max(1, rounds)
    print(f"p2pml node memory: {start:.0f} MB at start, {end:.0f} MB holding {rounds} rounds in memory: "
          f"{per_round_kb:.1f} KB a round; at most {keep} are held (about "
          f"{start + keep * per_round_kb / 1024:.0f} MB), older ones leave memory")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequential", type=int, default=300, help="sequential queries per target")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the concurrent phase")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients")
    args = ap.parse_args()
    if args.sequential < 2 or args.seconds <= 0 or args.clients < 1:
        ap.error("--sequential must be at least 2, --seconds and --clients positive")
    tmp = Path(tempfile.mkdtemp(prefix="p2pml-bench-"))
    ports = free_ports(6)
    cluster = LocalCluster(write_network(tmp / "peers.toml", ports[:5]), tmp / "data", log_level="WARNING")
    baseline = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "baseline.py"), "--port", str(ports[5])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cluster.start()
        cluster.wait_ready()
        cluster.wait_registered()
        baseline_url = f"http://127.0.0.1:{ports[5]}"
        deadline = time.monotonic() + 60
        while True:
            try:
                get_json(baseline_url + "/health", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or baseline.poll() is not None:
                    raise RuntimeError("the baseline did not start") from None
                time.sleep(0.1)
        asyncio.run(run(args, cluster, baseline_url, baseline.pid))
    finally:
        cluster.stop()
        if baseline.poll() is None:
            os.kill(baseline.pid, signal.SIGTERM)
            baseline.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
