"""A node's log tells an operator what happened: one INFO line per slash (with its reason),
ejection, start and stop; never one line per message."""

from __future__ import annotations

import re

from tests.test_network import ask

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.1, 2.8, 4.7, 1.2], [7.7, 3.0, 6.1, 2.3], [5.9, 3.0, 5.1, 1.8]]


async def test_slashes_ejections_start_and_stop_are_logged_once_each(make_cluster):
    cluster = make_cluster(5, behaviors={"cy": "constant"})
    answers = await ask(cluster, ROWS * 45, concurrency=6, targets=["ada", "bo", "di", "ed"])
    assert all(status == 200 for status, _, _ in answers), [b for s, b, _ in answers if s != 200][:3]
    ledger = cluster.wait_converged()["ada"]
    cy = next(p for p in ledger["peers"].values() if p["name"] == "cy")
    assert cy["status"] == "ejected" and cy["slashed"] > 0, cy
    cluster.stop()
    text = (cluster.data_root / "ada.log").read_text()
    slashes = [line for line in text.splitlines() if " INFO slashed cy " in line]
    paid = sum(int(re.search(r": (\d+) tokens to the peers that agreed", line)[1]) for line in slashes)
    assert paid == cy["slashed"], slashes  # every token slashed is accounted for, once
    assert all("agreed with the consensus on less than 60% of a 20-vote window" in line for line in slashes)
    assert len(slashes) <= 7  # at most one a window (seven windows take it below the floor)
    ejected = [line for line in text.splitlines() if "INFO ejected cy " in line]
    assert len(ejected) == 1 and "stake below floor" in ejected[0]
    assert "listening on http://" in text and "stopping on SIGTERM" in text and "stopped cleanly" in text
    assert len(text.splitlines()) < 60, text  # hundreds of messages, a few dozen lines


def test_a_node_stops_cleanly_on_sighup_too(tmp_path):
    """Closing the terminal a node runs in (SIGHUP) is a clean stop, not a crash."""
    import signal

    from p2pml.cluster import LocalCluster, free_ports, write_network
    from p2pml.store import RUNNING_FILE

    peers = write_network(tmp_path / "peers.toml", free_ports(1))
    with LocalCluster(peers, tmp_path / "data") as cluster:
        cluster.start()
        cluster.wait_ready()
        assert (cluster.data_root / "ada" / RUNNING_FILE).exists()
        cluster.signal("ada", signal.SIGHUP)
        assert cluster.procs["ada"].wait(timeout=30) == 0
    assert not (cluster.data_root / "ada" / RUNNING_FILE).exists()
    text = (cluster.data_root / "ada.log").read_text()
    assert "stopping on SIGHUP" in text and "stopped cleanly" in text
