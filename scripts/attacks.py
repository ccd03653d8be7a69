"""Consensus accuracy with hostile peers, against the workshop's naive average of all models.

    python scripts/attacks.py [--passes 2]

For 0, 1 and 2 hostile peers of each kind (random, constant, wrong, copycat, withhold; the
last peers in turn), runs a real 5-peer cluster, asks it every held-out Iris row (--passes
times), and prints: the network's consensus accuracy, the accuracy of the plain average of the
probabilities of every vote that was revealed, late ones included (every vote equal, as in the
workshop, which had no commit-reveal), and each hostile peer's stake, weight and late votes on
the ledger afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from p2pml.cluster import LocalCluster, free_ports, write_network
from p2pml.ledger import CLASSES, WEIGHT_ONE
from p2pml.model import held_out

KINDS = ("random", "constant", "wrong", "copycat", "withhold")


async def ask_all(cluster: LocalCluster, rows) -> list[dict]:
    urls = [cluster.url(n) for n in cluster.names]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        out = []
        for i, row in enumerate(rows):  # one at a time: every round sees the ledger of the last
            async with session.post(urls[i % len(urls)] + "/predict",
                                    json={"features": [float(x) for x in row]}) as r:
                out.append(await r.json())
        return out


def naive(answer: dict) -> str:
    votes = answer["votes"] + answer["late_votes"]
    total = {c: sum(v["probabilities"][c] for v in votes) for c in CLASSES}
    return max(CLASSES, key=lambda c: total[c])


def run(hostile: dict[str, str], passes: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="p2pml-attacks-"))
    cluster = LocalCluster(write_network(tmp / "peers.toml", free_ports(5)), tmp / "data",
                           behaviors=hostile, log_level="WARNING")
    x, y = held_out()
    rows, truth = list(x) * passes, [CLASSES[t] for t in y] * passes
    try:
        cluster.start()
        cluster.wait_ready()
        cluster.wait_registered()
        answers = asyncio.run(ask_all(cluster, rows))
        ledger = next(iter(cluster.wait_converged(timeout=15, strict=False).values()))
    finally:
        cluster.stop()
    peers = {p["name"]: p for p in ledger["peers"].values()}
    return {
        "consensus": sum(a["prediction"] == t for a, t in zip(answers, truth)) / len(rows),
        "naive": sum(naive(a) == t for a, t in zip(answers, truth)) / len(rows),
        "hostile": {n: (peers[n]["stake"], peers[n]["weight"] / WEIGHT_ONE, peers[n]["late"])
                    for n in hostile},
        "rounds": len(rows),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", type=int, default=2, help="times each held-out row is asked")
    args = ap.parse_args()
    if args.passes < 1:
        ap.error("--passes must be at least 1")
    configs = [{}] + [dict.fromkeys(("ed", "di")[:k], kind) for kind in KINDS for k in (1, 2)]
    print(f"{'hostile peers':<26} {'rounds':>6} {'consensus':>9} {'naive avg':>9}  "
          "hostile stake / weight / late votes after")
    for hostile in configs:
        r = run(hostile, args.passes)
        label = ", ".join(f"{n}={b}" for n, b in hostile.items()) or "none"
        after = ", ".join(f"{n} {s} / {w:.2f} / {late}" for n, (s, w, late) in r["hostile"].items()) or "-"
        print(f"{label:<26} {r['rounds']:>6} {r['consensus']:>9.1%} {r['naive']:>9.1%}  {after}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
