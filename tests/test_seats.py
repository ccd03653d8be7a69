"""Seats, hosts and genesis, as a user meets them: a seat taken by another key, peers that
share a port on different hosts, a data dir started with another network's peers file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

from p2pml.cluster import LocalCluster, free_ports, get_json, write_network
from p2pml.config import load
from p2pml.ledger import DEPOSIT, Register, peer_id
from p2pml.network import GENESIS_FILE
from p2pml.store import KEY_FILE, LOG_FILE
from p2pml.wire import Identity


def run_node(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2pml.node", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def status_of(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def write_seed(data_dir, seed: bytes) -> None:
    data_dir.mkdir(parents=True)
    (data_dir / KEY_FILE).write_bytes(seed)
    (data_dir / KEY_FILE).chmod(0o600)


def test_a_node_whose_seat_another_key_took_says_so_and_serves_no_queries(tmp_path):
    """Unpinned seats: while cy is down, another node registers for cy and its registration
    wins (the lower id). The original cy, back, logs an error and answers 503 everywhere."""
    peers = write_network(tmp_path / "peers.toml", free_ports(3), query_timeout_ms=400)
    net = load(peers)
    gid, model = net.genesis().id(), net.peers[2].model
    seeds = [bytes([i]) * 32 for i in range(1, 40)]
    from p2pml.model import Model

    cy_card = Model(model).card  # the card cy's node will register with (the same training)
    reg = {s: Identity.from_seed(s).sign(gid, Register("cy", cy_card, DEPOSIT)).msg.id for s in seeds}
    seeds.sort(key=reg.get)
    winner, loser = seeds[0], seeds[-1]  # the intruder's registration has the lower id
    data = tmp_path / "data"
    write_seed(data / "cy", loser)
    with LocalCluster(peers, data, pin=False) as cluster:
        cluster.start()
        cluster.wait_ready()
        cluster.wait_registered()
        cluster.stop("cy")
        shutil.move(data / "cy", data / "cy-original")
        write_seed(data / "cy", winner)  # another node on cy's port, with its own key
        cluster.start("cy")
        cluster.wait_ready(names=["cy"])
        intruder = peer_id(Identity.from_seed(winner).key)
        deadline = time.monotonic() + 20
        while any(lg["peers"].get(intruder, {}).get("name") != "cy"
                  for lg in cluster.ledgers(["ada", "bo"]).values()):
            assert time.monotonic() < deadline, "the intruder's registration never won the seat"
            time.sleep(0.2)
        cluster.stop("cy")
        shutil.move(data / "cy", data / "cy-intruder")
        shutil.move(data / "cy-original", data / "cy")
        cluster.start("cy")  # the original cy, back
        url = cluster.url("cy")
        original = peer_id(Identity.from_seed(loser).key)
        deadline = time.monotonic() + 30
        while True:
            try:
                status, health = status_of(url + "/health")
                if status == 503 and health.get("status") == "seat held by another key":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the original cy never said its seat was taken"
            time.sleep(0.2)
        assert intruder in health["error"] and original in health["error"] and "'cy'" in health["error"]
        status, ready = status_of(url + "/ready")
        assert status == 503 and "held by another key" in ready["error"]
        status, answer = status_of(url + "/predict?features=5.1,3.5,1.4,0.2")
        assert status == 503 and "held by another key" in answer["error"]
        log = (data / "cy.log").read_text()
        assert "ERROR" in log and "seat 'cy' is held by another key" in log
        assert log.count("seat 'cy' is held by another key") == 1  # once, not once per message


def test_peers_sharing_a_port_are_told_apart_by_host_or_name(tmp_path):
    port = free_ports(1)[0]
    peers = write_network(tmp_path / "peers.toml", [port, port], hosts=["127.0.0.2", "127.0.0.3"])
    r = run_node("--port", str(port), "--peers", str(peers), "--data-dir", str(tmp_path / "d"), "--show-key")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"several peers have port {port}" in r.stderr and "--host" in r.stderr and "--name" in r.stderr
    key = {}
    for how in (["--host", "127.0.0.3"], ["--name", "bo"]):
        r = run_node("--port", str(port), "--peers", str(peers), "--data-dir", str(tmp_path / "bo"),
                     "--show-key", *how)
        assert r.returncode == 0, r.stderr
        key[how[0]] = r.stdout
    assert key["--host"] == key["--name"]
    r = run_node("--port", str(port), "--peers", str(peers), "--data-dir", str(tmp_path / "x"),
                 "--show-key", "--host", "127.0.0.9")
    assert r.returncode == 2 and "127.0.0.9" in r.stderr


def test_a_data_dir_of_another_network_is_refused_and_kept(tmp_path):
    ports = free_ports(3)
    two = write_network(tmp_path / "two.toml", ports[:2])
    data = tmp_path / "data"
    with LocalCluster(two, data) as cluster:
        cluster.start("ada")
        cluster.wait_ready(names=["ada"], timeout=30)
        get_json(cluster.url("ada") + "/health")
    pinned = cluster.peers_file
    log_before = (data / "ada" / LOG_FILE).read_bytes()
    assert len(log_before) > 100 and (data / "ada" / GENESIS_FILE).exists()
    # the same peers with ada's key pinned, plus a third peer: another genesis
    text = pinned.read_text() + "\n[[peer]]\nname = \"cy\"\nhost = \"127.0.0.1\"\n" \
        f"port = {ports[2]}\nmodel = \"gradient_boosting\"\n"
    other = tmp_path / "other.toml"
    other.write_text(text)
    ours, theirs = load(pinned).genesis().id().hex(), load(other).genesis().id().hex()
    r = run_node("--port", str(ports[0]), "--peers", str(other), "--data-dir", str(data / "ada"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "belongs to another network" in r.stderr
    assert ours[:16] in r.stderr and theirs[:16] in r.stderr and "peer 'cy' added" in r.stderr
    assert (data / "ada" / LOG_FILE).read_bytes() == log_before
    # a data dir from before genesis.json: told by its log's first record
    (data / "ada" / GENESIS_FILE).unlink()
    r = run_node("--port", str(ports[0]), "--peers", str(other), "--data-dir", str(data / "ada"))
    assert r.returncode == 2 and "messages of another network" in r.stderr and theirs[:16] in r.stderr
    assert (data / "ada" / LOG_FILE).read_bytes() == log_before
    assert not (data / "ada" / GENESIS_FILE).exists()
    # with its own peers file it starts, and everything is still there
    r = run_node("--port", str(ports[0]), "--peers", str(pinned), "--data-dir", str(data / "ada"), "--show-key")
    assert r.returncode == 0, r.stderr
    assert json.loads((data / "ada" / GENESIS_FILE).read_text())["id"] == ours
    assert (data / "ada" / LOG_FILE).read_bytes() == log_before


def test_a_damaged_genesis_record_is_a_clear_error(tmp_path):
    peers = write_network(tmp_path / "peers.toml", free_ports(1))
    port = load(peers).peers[0].port
    data = tmp_path / "d"
    r = run_node("--port", str(port), "--peers", str(peers), "--data-dir", str(data), "--show-key")
    assert r.returncode == 0, r.stderr
    for damage in ('{"id": 5}', '{"id": "ab", "slots": [1]}', "not json"):
        (data / GENESIS_FILE).write_text(damage)
        r = run_node("--port", str(port), "--peers", str(peers), "--data-dir", str(data), "--show-key")
        assert r.returncode == 2 and "genesis.json is damaged" in r.stderr and "Traceback" not in r.stderr, r.stderr
