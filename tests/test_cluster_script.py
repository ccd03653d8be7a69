"""``scripts/cluster.py`` as a user runs it: it notices peers that did not start, stops every
peer on SIGINT, SIGTERM and SIGHUP, and leaves no temporary data dir behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from p2pml.cluster import free_ports, write_network

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cluster.py"


def run_script(tmp_path: Path, *args: str, timeout: float = 120, cwd: Path | None = None
               ) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd or tmp_path)


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "tmp").iterdir())


def peers_using(peers_file: Path) -> list[int]:
    """Pids of running processes whose command line names this peers file (our nodes)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(peers_file.parent) in cmd and "p2pml.node" in cmd:
                pids.append(int(proc.name))
    return pids


class OtherNetwork(BaseHTTPRequestHandler):
    """Another network's node on our port: ready, but not ours."""

    def do_GET(self):
        body = json.dumps({"ready": True, "peer": "0" * 32, "status": "ok"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_port_taken_by_another_network_fails_the_run(tmp_path):
    ports = free_ports(2)
    peers = write_network(tmp_path / "peers.toml", ports)
    # on the first peer's port: polled at once, while that peer's process is still starting
    server = ThreadingHTTPServer(("127.0.0.1", ports[0]), OtherNetwork)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = run_script(tmp_path, "--peers", str(peers), "--queries", "5")
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 2, done.stdout + done.stderr
    assert "answers as another node" in done.stderr, done.stderr
    assert "answered" not in done.stdout and "ledger roots" not in done.stdout
    assert "Traceback" not in done.stderr
    assert leftovers(tmp_path) == []
    assert peers_using(peers) == []


def test_a_port_in_use_by_a_plain_listener_fails_the_run(tmp_path):
    ports = free_ports(2)
    peers = write_network(tmp_path / "peers.toml", ports)
    with socket.socket() as taken:  # listens, never answers: the node cannot bind
        taken.bind(("127.0.0.1", ports[1]))
        taken.listen()
        done = run_script(tmp_path, "--peers", str(peers), "--queries", "5")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "exited with code 2" in done.stderr and "cannot listen" in done.stderr, done.stderr
    assert leftovers(tmp_path) == []


def test_every_stop_signal_stops_every_peer(tmp_path):
    """SIGINT, SIGTERM and SIGHUP, each to a script of its own (the three run side by side):
    every peer stops and nothing is left behind."""
    runs = []
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            where = tmp_path / sig.name
            (where / "tmp").mkdir(parents=True)
            peers = write_network(where / "peers.toml", free_ports(2))
            script = subprocess.Popen([sys.executable, str(SCRIPT), "--peers", str(peers), "--queries", "2",
                                       "--keep-running"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, cwd=where, env={**os.environ, "TMPDIR": str(where / "tmp")})
            runs.append((sig, where, peers, script))
        deadline = time.monotonic() + 90
        for sig, _, peers, script in runs:
            seen = []
            for line in script.stdout:  # bounded: the script ends or the deadline fails the test
                seen.append(line)
                if line.startswith("cluster is running") or time.monotonic() > deadline:
                    break
            assert any(line.startswith("cluster is running") for line in seen), (sig.name, "".join(seen))
            assert len(peers_using(peers)) == 2, sig.name
        for sig, _, _, script in runs:
            os.kill(script.pid, sig)
        for _, _, _, script in runs:
            script.wait(timeout=30)
    finally:
        for _, _, _, script in runs:
            if script.poll() is None:
                script.kill()
                script.wait()
            script.stdout.close()
    for sig, where, peers, script in runs:
        assert script.returncode != 0, sig.name
        assert peers_using(peers) == [], sig.name
        assert leftovers(where) == [], sig.name


def test_failed_runs_leave_nothing_and_print_no_traceback(tmp_path):
    peers = write_network(tmp_path / "peers.toml", free_ports(3))
    (tmp_path / "README.md").write_text("not a directory\n")
    for args, says in [(["--peers", str(peers), "--byzantine", "6"], "--byzantine must be between 0 and 3"),
                       (["--peers", str(tmp_path / "missing.toml")], "missing.toml"),
                       (["--peers", str(peers), "--data-dir", "README.md"], "not a directory")]:
        done = run_script(tmp_path, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert says in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
        assert leftovers(tmp_path) == [], args
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_script(tmp_path, cwd=elsewhere)  # the default peers.toml, from the wrong directory
    assert done.returncode == 2 and "peers.toml" in done.stderr and "Traceback" not in done.stderr
    assert leftovers(tmp_path) == []
