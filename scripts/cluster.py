"""Run a local p2pml cluster, send it queries, and report what every peer's ledger says.

    python scripts/cluster.py [--queries N] [--byzantine K] [--keep-running]

Starts the peers of peers.toml (or --peers FILE, any task) as separate processes, sends N of
the task's held-out rows to random peers, then prints the consensus' accuracy (for a regression:
its mean absolute error and R^2), one line per peer and whether all ledger roots agree. Exits 1 if they do not, 2 if a
peer fails to start (its port is taken, its config is wrong: the error and its log say which).
SIGINT, SIGTERM and SIGHUP stop every peer; a temporary data dir is removed at the end.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from tqdm import tqdm

from p2pml.cluster import LocalCluster, get_json
from p2pml.config import ConfigError, load
from p2pml.ledger import WEIGHT_ONE
from p2pml.store import StoreError

BAD_BEHAVIORS = ("random", "constant")  # others (wrong, equivocate): python -m p2pml.node --behavior


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=100, help="queries to send (default 100)")
    ap.add_argument("--byzantine", type=int, default=0, metavar="K",
                    help="run the last K peers misbehaving (random, constant, random, ...)")
    ap.add_argument("--keep-running", action="store_true", help="leave the cluster up until Ctrl-C")
    ap.add_argument("--peers", default="peers.toml", help="network file (default peers.toml)")
    ap.add_argument("--data-dir", help="where peers keep their state (default: a new temp dir)")
    ap.add_argument("--seed", type=int, default=1, help="which rows and peers are drawn")
    args = ap.parse_args()
    if args.queries < 0:
        ap.error("--queries must be 0 or more")
    try:
        net = load(args.peers)
    except ConfigError as exc:
        ap.error(str(exc))
    names = [p.name for p in net.peers]
    args.task_data = net.task_data()
    if not 0 <= args.byzantine <= len(names):
        ap.error(f"--byzantine must be between 0 and {len(names)}")
    if args.data_dir and Path(args.data_dir).exists() and not Path(args.data_dir).is_dir():
        ap.error(f"--data-dir {args.data_dir}: exists and is not a directory")
    # Closing the terminal (SIGHUP) or a kill (SIGTERM) stops the peers as Ctrl-C does: the
    # peers run in sessions of their own, so only this script can stop them.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # under nohup, SIGHUP stays ignored
            signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
    temp = args.data_dir is None
    data_root = Path(args.data_dir or tempfile.mkdtemp(prefix="p2pml-cluster-"))
    try:
        cluster = LocalCluster(args.peers, data_root)
    except (ConfigError, StoreError, OSError) as exc:
        if temp:
            shutil.rmtree(data_root, ignore_errors=True)
        ap.error(str(exc))
    code = 1
    bad = names[len(names) - args.byzantine:] if args.byzantine else []
    cluster.behaviors = {n: BAD_BEHAVIORS[i % 2] for i, n in enumerate(bad)}
    print(f"starting {len(names)} peers (state and logs in {data_root}"
          f"{', removed at the end' if temp else ''})")
    try:
        cluster.start()
        cluster.wait_ready()
        cluster.wait_registered()
        code = run(cluster, args)
        return code
    except (RuntimeError, TimeoutError) as exc:  # a peer did not start: say which, and why
        print(f"cluster.py: error: {exc}", file=sys.stderr)
        print_failed_logs(cluster)
        code = 2
        return code
    except KeyboardInterrupt:
        print("\ninterrupted; stopping peers")
        code = 130
        return code
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second signal must not
            signal.signal(sig, signal.SIG_IGN)  # cut the clean-up short
        cluster.stop()
        if temp:  # keys and logs of a throwaway network (pass --data-dir to keep them)
            shutil.rmtree(data_root, ignore_errors=True)


def print_failed_logs(cluster: LocalCluster, lines: int = 5) -> None:
    """The last lines of the log of every peer that exited (before its data dir goes)."""
    for name, proc in cluster.procs.items():
        if proc.poll() is not None:
            log = cluster.data_root / f"{name}.log"
            tail = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
            print(f"peer {name} exited with code {proc.returncode}:", file=sys.stderr)
            for line in tail:
                print(f"  {line}", file=sys.stderr)


def run(cluster: LocalCluster, args) -> int:
    data = args.task_data
    task = data.spec
    x, y = data.held_out()
    rng = random.Random(args.seed)
    answered = failed = 0
    votes_seen, truth, got = [], [], []
    print(f"task: {task.name} ({task.kind}, {len(task.features)} features"
          + (f", {len(task.classes)} classes" if task.classes else "") + f"), {len(x)} held-out rows")
    for _ in tqdm(range(args.queries), desc="queries", unit="q"):
        i = rng.randrange(len(y))
        name = rng.choice(cluster.names)
        features = ",".join(repr(float(v)) for v in x[i])
        try:
            result = get_json(f"{cluster.url(name)}/predict?features={features}")
        except (OSError, urllib.error.URLError, ValueError) as exc:
            failed += 1
            tqdm.write(f"query to {name} failed: {exc}")
            continue
        answered += 1
        truth.append(float(y[i]) if task.regression else task.classes[int(y[i])])
        got.append(result["prediction"])
        votes_seen.append(len(result["votes"]))
    t0 = time.monotonic()
    ledgers = cluster.wait_converged(timeout=15, strict=False)
    waited = time.monotonic() - t0
    roots = {lg["root"] for lg in ledgers.values()}
    agree = len(roots) == 1 and len(ledgers) == len(cluster.names)
    print()
    if answered:
        if task.regression:
            t, g = np.array(truth), np.array(got, dtype=np.float64)
            r2 = 1 - ((t - g) ** 2).sum() / (((t - t.mean()) ** 2).sum() or 1.0)
            quality = f"consensus MAE {np.abs(t - g).mean():.4g}, R² {r2:.3f}"
        else:
            quality = f"consensus accuracy {sum(a == b for a, b in zip(truth, got)) / answered:.1%}"
        print(f"answered {answered}/{args.queries} queries, {quality}, "
              f"votes per answer: min {min(votes_seen)}, mean {sum(votes_seen) / len(votes_seen):.1f}")
    if failed:
        print(f"{failed} queries failed")
    if not ledgers:
        print("no peer answered /ledger", file=sys.stderr)
        return 1
    view = next(iter(ledgers.values()))
    print(f"\n{'peer':<6} {'model':<20} {'behavior':<9} {'stake':>6} {'weight':>7} {'status':<8} "
          f"{'agreed':>13}  id")
    for pid, p in sorted(view["peers"].items(), key=lambda kv: kv[1]["name"]):
        behavior = cluster.behaviors.get(p["name"], "honest")
        agreement = f"{p['agreed']}/{p['votes']}" + (f" {p['agreed'] / p['votes']:.0%}" if p["votes"] else "")
        status = p["status"] + (f" ({p['reason']})" if p["reason"] else "")
        cards = view.get("cards", {}).get(pid) or [{"model": "?"}]
        print(f"{p['name']:<6} {cards[-1]['model'][:20]:<20} {behavior:<9} {p['stake']:>6} "
              f"{p['weight'] / WEIGHT_ONE:>7.3f} {status:<8} {agreement:>13}  {pid[:12]}")
    slashed = sum(p["slashed"] for p in view["peers"].values())
    rewarded = sum(p["rewarded"] for p in view["peers"].values())
    held = sum(a["balance"] for a in view["accounts"].values()) + sum(p["stake"] for p in view["peers"].values())
    print(f"\nsettled rounds {view['rounds']}, slashed {slashed}, paid to agreeing peers {rewarded}, "
          f"pool {view['pool']}, messages {view['messages']}")
    supply_ok = held + view["pool"] + view["unclaimed"] == view["supply"]
    print(f"supply {view['supply']}: balances + stakes + pool + unclaimed "
          f"{'equal it' if supply_ok else 'DO NOT equal it'}")
    if agree:
        print(f"ledger roots: all {len(ledgers)} equal ({next(iter(roots))[:16]}…), "
              f"converged {waited:.2f}s after the last answer")
    else:
        print("ledger roots DISAGREE:")
        for name, lg in ledgers.items():
            print(f"  {name}: {lg['root'][:16]}… ({lg['messages']} messages)")
    if args.keep_running:
        print("\ncluster is running: " + ", ".join(cluster.url(n) for n in cluster.names))
        print("Ctrl-C stops it")
        while True:
            time.sleep(3600)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
