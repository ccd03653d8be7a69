"""Mutation check: does the fast part of the suite catch a rule that changes by accident?

    python scripts/mutate.py [--only NAME]

Changes each documented constant and each hash-domain string in turn, in a copy of the tree
(the working tree is never touched), runs the fast tests on the copy, and prints whether each
mutation was caught (some test failed). Every one must be: exit 1 otherwise. Each run is
bounded (``--timeout`` seconds a mutation).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST_TESTS = ["tests/test_vectors.py", "tests/test_ledger.py", "tests/test_wire.py",
              "tests/test_docs.py::test_the_repository_genesis_id_is_the_documented_one"]

# name -> (file, text as in the code, the mutated text)
MUTATIONS = {
    "DEPOSIT 1000 -> 2000": ("p2pml/ledger.py", "DEPOSIT = 1000", "DEPOSIT = 2000"),
    "STAKE_FLOOR 500 -> 50": ("p2pml/ledger.py", "STAKE_FLOOR = 500", "STAKE_FLOOR = 50"),
    "INITIAL_WEIGHT 1/2 -> 1/4": ("p2pml/ledger.py", "INITIAL_WEIGHT = WEIGHT_ONE // 2", "INITIAL_WEIGHT = WEIGHT_ONE // 4"),
    "WEIGHT_STEP_QUOTIENT 10 -> 8": ("p2pml/ledger.py", "WEIGHT_STEP_QUOTIENT = 10", "WEIGHT_STEP_QUOTIENT = 8"),
    "ACCURACY_WINDOW 20 -> 10": ("p2pml/ledger.py", "ACCURACY_WINDOW = 20", "ACCURACY_WINDOW = 10"),
    "MIN_AGREEMENT_BPS 60% -> 50%": ("p2pml/ledger.py", "MIN_AGREEMENT_BPS = 6_000", "MIN_AGREEMENT_BPS = 5_000"),
    "INACCURACY_SLASH_BPS 10% -> 25%": ("p2pml/ledger.py", "INACCURACY_SLASH_BPS = 1_000", "INACCURACY_SLASH_BPS = 2_500"),
    "EQUIVOCATION_SLASH_BPS 50% -> 90%": ("p2pml/ledger.py", "EQUIVOCATION_SLASH_BPS = 5_000", "EQUIVOCATION_SLASH_BPS = 9_000"),
    "LEDGER_VERSION 4 -> 5": ("p2pml/ledger.py", "LEDGER_VERSION = 4", "LEDGER_VERSION = 5"),
    "GENESIS_BALANCE 9000 -> 8000": ("p2pml/ledger.py", "GENESIS_BALANCE = 9000", "GENESIS_BALANCE = 8000"),
    "genesis tag": ("p2pml/ledger.py", '"p2pml-genesis"', '"p2pml-genesis2"'),
    "COMMIT_DOMAIN": ("p2pml/ledger.py", 'COMMIT_DOMAIN = b"p2pml/commit\\x00"', 'COMMIT_DOMAIN = b"p2pml/commit2\\x00"'),
    "QUERY_VOTE_DOMAIN": ("p2pml/ledger.py", 'QUERY_VOTE_DOMAIN = b"p2pml/query-vote\\x00"',
                          'QUERY_VOTE_DOMAIN = b"p2pml/query-vote2\\x00"'),
    "message DOMAIN": ("p2pml/wire.py", 'DOMAIN = b"p2pml/v1/message\\x00"', 'DOMAIN = b"p2pml/v2/message\\x00"'),
    "LINK_DOMAIN": ("p2pml/wire.py", 'LINK_DOMAIN = b"p2pml/v1/link\\x00"', 'LINK_DOMAIN = b"p2pml/v2/link\\x00"'),
    "salt domain": ("p2pml/wire.py", 'b"p2pml/salt\\x00"', 'b"p2pml/salt2\\x00"'),
}


def copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="run only the mutation with this name")
    ap.add_argument("--timeout", type=float, default=300, help="seconds allowed per mutation's test run")
    args = ap.parse_args()
    chosen = {k: v for k, v in MUTATIONS.items() if args.only in (None, k)}
    if not chosen:
        print(f"no mutation named {args.only!r}; names: {', '.join(MUTATIONS)}", file=sys.stderr)
        return 2
    missed = 0
    print(f"{'mutation':36} {'caught':7} {'tests failed':>12} {'s':>6}")
    for name, (path, old, new) in chosen.items():
        with tempfile.TemporaryDirectory(prefix="p2pml-mutate-") as tmp:
            tree = Path(tmp)
            copy_tree(tree)
            text = (tree / path).read_text()
            if text.count(old) != 1:
                print(f"{name}: {old!r} appears {text.count(old)} times in {path}; fix MUTATIONS", file=sys.stderr)
                return 2
            (tree / path).write_text(text.replace(old, new))
            t0 = time.monotonic()
            run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FAST_TESTS],
                                 cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                                 capture_output=True, text=True, timeout=args.timeout)
            tail = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
            failed = next((w for w, n in zip(tail.split()[1:], tail.split()) if w.startswith("failed")), None)
            count = tail.split()[0] if failed else "0"
            caught = run.returncode != 0
            missed += not caught
            print(f"{name:36} {'yes' if caught else 'NO':7} {count:>12} {time.monotonic() - t0:6.1f}")
    print("every mutation caught" if not missed else f"{missed} mutation(s) NOT caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
