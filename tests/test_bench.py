"""The benchmark script runs end to end with tiny settings (a smoke test, not a timing test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_runs_end_to_end():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--sequential", "4",
                        "--seconds", "1", "--clients", "4"],
                       capture_output=True, text=True, timeout=180, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    for label in ("sequential p50 latency", "throughput, 4 clients", "CPU per query",
                  "resident memory", "ledger roots agree after load stops", "KB a round"):
        assert label in r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("errors under load"))
    assert line.split()[3:5] == ["0", "0"], line


def test_memory_script_runs_end_to_end():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "memory.py"), "--seconds", "3",
                        "--every", "1", "--clients", "4", "--rounds-in-memory", "16"],
                       capture_output=True, text=True, timeout=180, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert sum(line.startswith("t=") for line in lines) >= 3
    assert lines[-1].startswith("growth once 16 rounds are held: ")
    assert "KB a round" in lines[-1], lines[-1]
