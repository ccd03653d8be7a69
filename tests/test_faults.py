"""The fast fault-injection run (each fault kind once, 1.5 s each) against real node processes in a
network namespace of its own; the long run is scripts/faults.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from p2pml.faults import FAULT_KINDS, can_run

# CI sets P2PML_REQUIRE_FAULTS=1 (.ci/run): there a missing tool fails the run instead of
# skipping the only test of partitions, loss, delay and one-way links.
REQUIRED = os.environ.get("P2PML_REQUIRE_FAULTS") == "1"
if can_run() is not None and REQUIRED:
    pytestmark = pytest.mark.usefixtures("_faults_required")
else:
    pytestmark = pytest.mark.skipif(can_run() is not None, reason=f"fault injection {can_run()}")


@pytest.fixture
def _faults_required():
    pytest.fail(f"P2PML_REQUIRE_FAULTS=1 but fault injection {can_run()}: install iproute2 and "
                f"nftables and run as root (.ci/run does)")


def test_every_fault_kind_loses_nothing_and_converges():
    r = subprocess.run([sys.executable, "-m", "p2pml.faults", "--fault-seconds", "1.5", "--json"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.stdout.strip(), r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["wrong"] == [], report["wrong"]
    assert report["lost"] == 0 and report["unsettled"] == 0, report
    assert report["phantom_rounds"] == 0
    assert report["roots_equal"] is True
    assert report["honest_slashed"] == []
    assert set(report["faults"]) == set(FAULT_KINDS)
    for kind, r_kind in report["faults"].items():
        assert r_kind["acked"] > 0, kind
        # every side keeps answering while the fault is in force (a killed or paused peer cannot)
        assert r_kind["peers_answering"] >= (4 if kind in ("kill9", "pause") else 5), (kind, r_kind)
        assert r_kind["converge_max_s"] < 10, (kind, r_kind)
    assert r.returncode == 0
