"""A local cluster of real node processes, for ``scripts/cluster.py``, the tests and benchmarks.

Each peer runs as ``python -m p2pml.node`` in its own process with its own data dir and log file.
Only processes this object started are ever signalled, by their own pid.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self

from p2pml.config import MODEL_KINDS, REGRESSION_KINDS, NetworkConfig, load
from p2pml.ledger import peer_id
from p2pml.network import pin_keys
from p2pml.store import KEY_FILE
from p2pml.wire import Identity

PEER_NAMES = ("ada", "bo", "cy", "di", "ed", "flo", "gus", "hal", "ivy", "jo")


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Ports free right now (kept open together so they differ), picked at random below the
    kernel's ephemeral range: between this check and the node's bind, no outgoing connection
    (the nodes' own, a test's clients) can take one, as happened with ports the kernel handed
    out from that range; the random pick keeps concurrent callers apart."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    socks: list[socket.socket] = []
    try:
        for _ in range(100 * n):
            if len(socks) == n:
                break
            s = socket.socket()
            try:
                s.bind((host, rng.randrange(max(1024, low // 2), low) if low > 2048 else 0))
            except OSError:  # taken: try another
                s.close()
                continue
            socks.append(s)
        while len(socks) < n:  # nothing free down there: let the kernel choose
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_network(path: Path, ports: list[int], hosts: list[str] | None = None,
                  task: dict | None = None, models: list[str] | None = None,
                  accounts: dict[str, int] | None = None, **network) -> Path:
    """A peers file for ``len(ports)`` peers on loopback, model kinds in turn (or ``models``),
    with a ``[task]`` table if ``task`` is given, and an ``[[account]]`` per item of
    ``accounts`` (key hex -> balance)."""
    hosts = hosts or ["127.0.0.1"] * len(ports)
    if models is None:
        kinds = REGRESSION_KINDS if task and (task.get("kind") == "regression"
                                              or task.get("dataset") == "diabetes") else MODEL_KINDS
        models = [kinds[i % len(kinds)] for i in range(len(ports))]
    lines = ["[network]"] + [f"{k} = {v}" for k, v in network.items()]
    if task:
        lines += ["", "[task]"] + [f"{k} = {json.dumps(v)}" for k, v in task.items()]
    for i, port in enumerate(ports):
        lines += ["", "[[peer]]", f'name = "{PEER_NAMES[i]}"', f'host = "{hosts[i]}"',
                  f"port = {port}", f"model = {json.dumps(models[i])}"]
    for key, balance in (accounts or {}).items():
        lines += ["", "[[account]]", f'key = "{key}"', f"balance = {balance}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


class LocalCluster:
    def __init__(self, peers_file: str | Path, data_root: str | Path,
                 behaviors: dict[str, str] | None = None, log_level: str = "INFO",
                 bind_hosts: dict[str, str] | None = None, pin: bool = True):
        self.data_root = Path(data_root)
        self.data_root.mkdir(parents=True, exist_ok=True)
        # pinned (the default): every seat's key is made now, in its data dir, so that no other
        # key can take a seat; unpinned: a seat goes to the first registration, as by hand
        self.peers_file = (pin_keys(load(peers_file), self.data_root, self.data_root / "peers.pinned.toml")
                           if pin else Path(peers_file))
        self.net: NetworkConfig = load(self.peers_file)
        self.behaviors = behaviors or {}
        self.log_level = log_level
        self.bind_hosts = bind_hosts or {}  # peers that listen elsewhere than they are reached
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def peer_ids(self) -> dict[str, str]:
        """Each peer's id, as its ``/ready`` and ``/health`` give it: its pinned key's, else
        the key's in its data dir (None before its first start)."""
        out = {}
        for p in self.net.peers:
            key = p.key
            if key is None:
                seed = self.data_root / p.name / KEY_FILE
                key = Identity.from_seed(seed.read_bytes()).key if seed.exists() else None
            out[p.name] = peer_id(key) if key else None
        return out

    def port(self, name: str) -> int:
        return next(p.port for p in self.net.peers if p.name == name)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.net.peers]

    def url(self, name: str) -> str:
        """Where this harness reaches the peer: where it listens (peers may go through a proxy)."""
        peer = next(p for p in self.net.peers if p.name == name)
        return f"http://{self.bind_hosts.get(name, peer.host)}:{peer.port}"

    def start(self, name: str | None = None) -> None:
        """Start one peer, or all of them."""
        for peer in self.net.peers:
            if name is not None and peer.name != name:
                continue
            if peer.name in self.procs and self.procs[peer.name].poll() is None:
                continue
            data = self.data_root / peer.name
            cmd = [sys.executable, "-m", "p2pml.node", "--port", str(peer.port), "--name", peer.name,
                   "--peers", str(self.peers_file), "--data-dir", str(data),
                   "--behavior", self.behaviors.get(peer.name, "honest"),
                   "--log-level", self.log_level]
            if peer.name in self.bind_hosts:
                cmd += ["--host", self.bind_hosts[peer.name]]
            with open(self.data_root / f"{peer.name}.log", "ab") as logf:
                self.procs[peer.name] = subprocess.Popen(
                    cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True)  # Ctrl-C in a terminal reaches us, and we stop them

    def wait_ready(self, timeout: float = 60.0, names: list[str] | None = None) -> None:
        """Until each peer answers ``GET /ready`` with 200 (or one of them exits)."""
        deadline = time.monotonic() + timeout
        for name in names or self.names:
            while True:
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"peer {name} exited with code {proc.returncode}; "
                                       f"see {self.data_root / (name + '.log')}")
                try:  # 503 until ready: urllib raises HTTPError, an URLError
                    answer = get_json(self.url(name) + "/ready", timeout=1.0)
                except (OSError, urllib.error.URLError, ValueError):
                    answer = None
                if answer is not None:
                    expected = self.peer_ids[name]
                    if expected is not None and answer.get("peer") != expected:
                        raise RuntimeError(
                            f"{self.url(name)} answers as another node (id {answer.get('peer')}, not "
                            f"{expected}): is something else listening on port {self.port(name)}?")
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"peer {name} not ready after {timeout:.0f}s")
                time.sleep(0.1)

    def wait_registered(self, timeout: float = 30.0) -> None:
        """Until every running peer's ledger lists every peer: the network is ready to vote."""
        deadline = time.monotonic() + timeout
        while True:
            running = [n for n in self.names if n in self.procs and self.procs[n].poll() is None]
            ledgers = self.ledgers(running)
            if len(ledgers) == len(running) and all(len(lg["peers"]) == len(self.names)
                                                    for lg in ledgers.values()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"peers did not all register within {timeout:.0f}s")
            time.sleep(0.1)

    def signal(self, name: str, sig: int) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.kill(proc.pid, sig)

    def kill(self, name: str) -> None:
        """kill -9 one peer and reap it."""
        self.signal(name, signal.SIGKILL)
        self.procs[name].wait(timeout=10)

    def stop(self, name: str | None = None, timeout: float = 10.0) -> None:
        """SIGTERM (clean shutdown), then SIGKILL for any peer still running after ``timeout``."""
        targets = [name] if name else list(self.procs)
        for n in targets:
            self.signal(n, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for n in targets:
            proc = self.procs[n]
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def ledgers(self, names: list[str] | None = None) -> dict[str, dict]:
        out = {}
        for name in names or self.names:
            try:
                out[name] = get_json(self.url(name) + "/ledger")
            except (OSError, urllib.error.URLError, ValueError):
                pass
        return out

    def wait_converged(self, timeout: float = 15.0, names: list[str] | None = None,
                       strict: bool = True) -> dict[str, dict]:
        """Poll until every named peer reports the same root and message count. On timeout,
        raise TimeoutError naming what each peer reports; unless not ``strict``: then return the
        ledgers as they are (for a report that says whether they agree)."""
        names = names or self.names
        deadline = time.monotonic() + timeout
        while True:
            ledgers = self.ledgers(names)
            if len(ledgers) == len(names) and \
                    len({(lg["root"], lg["messages"]) for lg in ledgers.values()}) == 1:
                return ledgers
            if time.monotonic() > deadline:
                if not strict:
                    return ledgers
                seen = {n: (lg["root"][:12], lg["messages"]) for n, lg in ledgers.items()}
                raise TimeoutError(f"ledgers did not converge within {timeout:g}s: {seen}; "
                                   f"not answering: {sorted(set(names) - set(ledgers))}")
            time.sleep(0.1)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
