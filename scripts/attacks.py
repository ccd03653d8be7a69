"""Consensus quality with hostile peers, against the workshop's naive average of all models and
the best single model, on several tasks.

    python scripts/attacks.py [--passes 1] [--tasks iris,wine,breast_cancer,diabetes,houses]

For each task and for 0, 1 and 2 hostile peers of each kind (classification: random, constant,
wrong, copycat, withhold; regression: random, constant, wrong = a fixed bias; the last peers in
turn), runs a real 5-peer cluster, asks it every held-out row (--passes times, one at a time),
and prints: the network's consensus accuracy (regression: mean absolute error), the naive
average of every vote that was revealed, late ones included (every vote equal, as in the
workshop, which had no commit-reveal: the mean of the probabilities, or of the values), the
best single member's own votes, and each hostile peer's stake, weight and late votes on the
ledger afterwards. ``houses`` is a CSV task of synthetic house prices with categorical columns
(written by this script, the same every time).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import numpy as np

from p2pml.cluster import LocalCluster, free_ports, write_network
from p2pml.config import load
from p2pml.ledger import WEIGHT_ONE

CLASSIFICATION_KINDS = ("random", "constant", "wrong", "copycat", "withhold")
REGRESSION_KINDS = ("random", "constant", "wrong")


def houses_csv(path: Path) -> dict:
    """Synthetic house prices (the workshop's Housing task's shape): a [task] table for it."""
    rng = np.random.default_rng(0)
    lines = ["price,lotsize,bedrooms,bathrms,driveway,airco,prefarea"]
    for _ in range(546):
        lot, beds, baths = rng.integers(1650, 16200), rng.integers(1, 6), rng.integers(1, 4)
        drive, air, pref = (rng.choice(["yes", "no"], p=[p, 1 - p]) for p in (0.86, 0.32, 0.23))
        price = (3.5 * lot + 2500 * beds + 14000 * baths + 6000 * (drive == "yes") + 12000 * (air == "yes")
                 + 9000 * (pref == "yes") + rng.normal(0, 9000))
        lines.append(f"{round(max(price, 20000), -2):.0f},{lot},{beds},{baths},{drive},{air},{pref}")
    path.write_text("\n".join(lines) + "\n")
    return {"csv": str(path), "target": "price", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "kind": "regression"}


async def ask_all(cluster: LocalCluster, rows) -> list[dict]:
    urls = [cluster.url(n) for n in cluster.names]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        out = []
        for i, row in enumerate(rows):  # one at a time: every round sees the ledger of the last
            async with session.post(urls[i % len(urls)] + "/predict",
                                    json={"features": [float(x) for x in row]}) as r:
                out.append(await r.json())
        return out


def naive(answer: dict, classes: tuple[str, ...]):
    votes = answer["votes"] + answer["late_votes"]
    if not classes:
        return float(np.mean([v["prediction"] for v in votes]))
    total = {c: sum(v["probabilities"][c] for v in votes) for c in classes}
    return max(classes, key=lambda c: total[c])


def score(got: list, truth: list, regression: bool) -> float:
    """Accuracy, or the mean absolute error."""
    if regression:
        return float(np.mean([abs(g - t) for g, t in zip(got, truth)]))
    return sum(g == t for g, t in zip(got, truth)) / len(truth)


def run(task: dict | None, hostile: dict[str, str], passes: int, tmp: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix="run-", dir=tmp))
    peers = write_network(work / "peers.toml", free_ports(5), task=task)
    cluster = LocalCluster(peers, work / "data", behaviors=hostile, log_level="WARNING")
    data = cluster.net.task_data()
    spec, regression = data.spec, data.spec.regression
    x, y = data.held_out()
    rows = list(x) * passes
    truth = [float(t) if regression else spec.classes[int(t)] for t in y] * passes
    try:
        cluster.start()
        cluster.wait_ready()
        cluster.wait_registered()
        answers = asyncio.run(ask_all(cluster, rows))
        ledger = next(iter(cluster.wait_converged(timeout=15, strict=False).values()))
    finally:
        cluster.stop()
    peers_view = {p["name"]: p for p in ledger["peers"].values()}
    own: dict[str, list] = {}  # each member's own votes, where it voted (counted or late)
    for i, a in enumerate(answers):
        for v in a["votes"] + a["late_votes"]:
            own.setdefault(v["name"], []).append((v["prediction"], truth[i]))
    singles = {n: score([g for g, _ in vs], [t for _, t in vs], regression) for n, vs in own.items()
               if len(vs) == len(rows) and n not in hostile}
    best = (min if regression else max)(singles.values()) if singles else float("nan")
    return {
        "consensus": score([a["prediction"] for a in answers], truth, regression),
        "naive": score([naive(a, spec.classes) for a in answers], truth, regression),
        "best": best,
        "hostile": {n: (peers_view[n]["stake"], peers_view[n]["weight"] / WEIGHT_ONE, peers_view[n]["late"])
                    for n in hostile},
        "rounds": len(rows),
        "regression": regression,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", type=int, default=1, help="times each held-out row is asked")
    ap.add_argument("--tasks", default="iris,wine,breast_cancer,diabetes,houses",
                    help="comma-separated: built-in dataset names, or houses (a CSV task)")
    args = ap.parse_args()
    if args.passes < 1:
        ap.error("--passes must be at least 1")
    tmp = Path(tempfile.mkdtemp(prefix="p2pml-attacks-"))
    for name in args.tasks.split(","):
        task = houses_csv(tmp / "houses.csv") if name == "houses" else {"dataset": name}
        regression = load(write_network(tmp / "probe.toml", [1], task=task)).task.regression
        kinds = REGRESSION_KINDS if regression else CLASSIFICATION_KINDS
        configs = [{}] + [dict.fromkeys(("ed", "di")[:k], kind) for kind in kinds for k in (1, 2)]
        metric = "MAE" if regression else "accuracy"
        print(f"\n{name} ({metric})")
        print(f"{'hostile peers':<26} {'rounds':>6} {'consensus':>9} {'naive avg':>9} {'best one':>9}  "
              "hostile stake / weight / late votes after")
        for hostile in configs:
            r = run(task, hostile, args.passes, tmp)
            fmt = (lambda v: f"{v:>9.4g}") if regression else (lambda v: f"{v:>9.1%}")
            label = ", ".join(f"{n}={b}" for n, b in hostile.items()) or "none"
            after = ", ".join(f"{n} {s} / {w:.2f} / {late}" for n, (s, w, late) in r["hostile"].items()) or "-"
            print(f"{label:<26} {r['rounds']:>6} {fmt(r['consensus'])} {fmt(r['naive'])} {fmt(r['best'])}  {after}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
