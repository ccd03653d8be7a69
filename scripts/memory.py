"""How a node's memory grows under sustained load, on loopback.

    python scripts/memory.py [--seconds 90] [--clients 32] [--every 5] [--rounds-in-memory N]

Starts the 5-peer network (free ports, a temporary data dir), keeps N clients asking
``/predict`` of the peers in turn for a fixed time, and prints every few seconds the queries
answered, the rounds settled and each node's resident memory (``/proc/PID/status``); then the
growth per round once the nodes hold ``rounds_in_memory`` rounds (older rounds leave memory).
Every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp

from p2pml.cluster import LocalCluster, free_ports, get_json, write_network
from p2pml.config import NETWORK_SETTINGS

ROWS = ("6.1,2.8,4.7,1.2", "5.1,3.5,1.4,0.2", "7.7,3.0,6.1,2.3", "6.3,2.5,4.9,1.5")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run(cluster: LocalCluster, seconds: float, clients: int, every: float) -> list[tuple]:
    """Samples of (seconds, queries answered, rounds settled, largest node RSS in MB)."""
    urls = [cluster.url(n) + "/predict?features=" for n in cluster.names]
    pids = [p.pid for p in cluster.procs.values()]
    samples: list[tuple] = []
    answered = 0
    start = time.monotonic()

    async def client(session: aiohttp.ClientSession, k: int) -> None:
        nonlocal answered
        n = k
        while time.monotonic() - start < seconds:
            async with session.get(urls[n % len(urls)] + ROWS[n % len(ROWS)]) as r:
                await r.read()
                answered += r.status == 200
            n += 1

    async def monitor() -> None:
        while True:
            rounds = (await asyncio.to_thread(get_json, cluster.url(cluster.names[0]) + "/ledger"))["rounds"]
            sizes = [rss_mb(pid) for pid in pids]
            t = time.monotonic() - start
            samples.append((t, answered, rounds, max(sizes)))
            print(f"t={t:5.1f}s answered={answered:6d} rounds={rounds:6d} rss MB: "
                  + " ".join(f"{s:.0f}" for s in sizes), flush=True)
            if t >= seconds:
                return
            await asyncio.sleep(min(every, max(0.1, seconds - t)))

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=2 * clients)) as s:
        await asyncio.gather(monitor(), *(client(s, k) for k in range(clients)))
    return samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=90.0, help="how long the load runs")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--rounds-in-memory", type=int, default=None, help="the nodes' rounds_in_memory")
    args = ap.parse_args()
    _, lo, hi = NETWORK_SETTINGS["rounds_in_memory"]
    if args.seconds <= 0 or args.clients < 1 or args.every <= 0:
        ap.error("--seconds and --every must be positive, --clients at least 1")
    if args.rounds_in_memory is not None and not lo <= args.rounds_in_memory <= hi:
        ap.error(f"--rounds-in-memory must be in [{lo}, {hi}]")
    tmp = Path(tempfile.mkdtemp(prefix="p2pml-memory-"))
    extra = {} if args.rounds_in_memory is None else {"rounds_in_memory": args.rounds_in_memory}
    cluster = LocalCluster(write_network(tmp / "peers.toml", free_ports(5), **extra), tmp / "data",
                           log_level="WARNING")
    keep = cluster.net.rounds_in_memory
    try:
        cluster.start()
        cluster.wait_ready()
        cluster.wait_registered()
        samples = asyncio.run(run(cluster, args.seconds, args.clients, args.every))
    finally:
        cluster.stop()
    full = [s for s in samples if s[2] >= 1.5 * keep]  # well past the first rounds_in_memory
    if len(full) >= 2 and full[-1][2] > full[0][2]:
        (_, _, r0, m0), (_, _, r1, m1) = full[0], full[-1]
        print(f"growth once {keep} rounds are held: {(m1 - m0) * 1024 / (r1 - r0):.2f} KB a round "
              f"({m0:.0f} -> {m1:.0f} MB from round {r0} to {r1})")
    else:
        print(f"growth once {keep} rounds are held: not reached (run longer, or lower --rounds-in-memory)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
