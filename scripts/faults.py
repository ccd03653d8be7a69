"""The long fault-injection run: every fault kind several times, then the checker's table.

    sudo python scripts/faults.py [--rounds 5] [--fault-seconds 5] [--kinds ...] [--json]

Needs root, iproute2 and nftables (it works inside a network namespace of its own). The fast
version runs in CI as tests/test_faults.py. Exits 1 if anything was lost, appeared from nowhere,
stayed diverged, or an honest peer was slashed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pml.faults import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--rounds" not in argv:
        argv += ["--rounds", "5"]
    if "--fault-seconds" not in argv:
        argv += ["--fault-seconds", "5"]
    sys.exit(main(argv))
