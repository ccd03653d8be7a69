"""Which network a data dir belongs to, and ``python -m p2pml.network --peers peers.toml --out
DIR``, which makes a pinned network.

A data dir records the genesis it was started with (``genesis.json``); a node refuses to start
it with a peers file that describes another network, naming both genesis ids and what differs,
instead of ignoring every record of its log as badly signed.

An unpinned seat goes to whichever key registers for it first (the lowest registration id):
fine on one trusted machine, but anyone who can reach the peers could take a seat whose node is
down. This command makes one data dir per peer with its key (``DIR/NAME``; an existing key is
kept) and writes ``DIR/peers.toml`` with every seat pinned to its key, in one step. Give each
operator their data dir (it holds the private key: move it, do not copy it around) and everyone
the same ``DIR/peers.toml``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from p2pml.config import NETWORK_SETTINGS, ConfigError, NetworkConfig, load
from p2pml.ledger import LEDGER_VERSION, Genesis
from p2pml.store import DataDir, StoreError, write_atomic
from p2pml.wire import Identity, Verifier, WireError

GENESIS_FILE = "genesis.json"


def describe(genesis: Genesis) -> dict:
    """What ``genesis.json`` holds: the id and what it was computed from."""
    return {"id": genesis.id().hex(), "version": LEDGER_VERSION, "task": genesis.task.canonical(),
            "slots": [{"name": s.name, "key": s.key.hex() if s.key else None} for s in genesis.slots]}


def differences(recorded: dict, current: dict) -> list[str]:
    """How two genesis descriptions differ, in words."""
    out = []
    if recorded.get("version") != current["version"]:
        out.append(f"ledger version {recorded.get('version')} then, {current['version']} now")
    old_task, new_task = recorded.get("task") or {}, current["task"]
    if not isinstance(old_task, dict):
        old_task = {}
    for field in sorted(new_task):
        if old_task.get(field) != new_task[field]:
            out.append(f"task {field}: {str(old_task.get(field))[:60]} then, {str(new_task[field])[:60]} now")
    old = {s["name"]: s for s in recorded.get("slots", [])}
    new = {s["name"]: s for s in current["slots"]}
    out += [f"peer {n!r} added" for n in new if n not in old]
    out += [f"peer {n!r} removed" for n in old if n not in new]
    for n in new.keys() & old.keys():
        for field in ("key",):
            if old[n].get(field) != new[n][field]:
                out.append(f"peer {n!r}: {field} {old[n].get(field)} then, {new[n][field]} now")
    if not out and [s["name"] for s in recorded.get("slots", [])] != [s["name"] for s in current["slots"]]:
        out.append("the peers are in another order")
    return sorted(out)


def check_data_dir(data: DataDir, genesis: Genesis, verifier: Verifier) -> None:
    """Refuse (StoreError) a data dir of another network; record the genesis in a new one.
    A data dir from before ``genesis.json`` is checked by its log's first record."""
    path = data.path / GENESIS_FILE
    current = describe(genesis)
    if path.exists():
        try:
            recorded = json.loads(path.read_bytes())
            recorded_id = recorded["id"]
            if not isinstance(recorded_id, str) or not isinstance(recorded.get("slots", []), list) or \
                    not all(isinstance(s, dict) for s in recorded.get("slots", [])):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise StoreError(f"{path} is damaged; it names the network this data dir belongs "
                             f"to: restore it, or move the data dir away") from None
        if recorded_id != current["id"]:
            what = "; ".join(differences(recorded, current)) or "the genesis differs"
            raise StoreError(f"data dir {data.path} belongs to another network: genesis "
                             f"{recorded_id[:16]} there, {current['id'][:16]} in this peers file "
                             f"({what}). Start it with the peers file it was made with, or use "
                             f"another data dir; nothing was changed")
        return
    records = data.records()
    try:
        first = next(records, None)
    finally:
        records.close()
    if first is not None:
        try:
            verifier.open(first[1])
        except WireError as exc:
            raise StoreError(f"data dir {data.path} holds messages of another network: its "
                             f"first logged message does not verify under genesis "
                             f"{current['id'][:16]} of this peers file ({exc}). Start it with "
                             f"the peers file it was made with, or use another data dir; "
                             f"nothing was changed") from None
    write_atomic(path, json.dumps(current, indent=1).encode() + b"\n")


def pin_keys(net: NetworkConfig, data_root: Path, path: Path) -> Path:
    """Make (or load) every unpinned peer's key in ``data_root/NAME``, and write a copy of the
    network file to ``path`` with every seat pinned to its key."""
    lines = ["[network]"] + [f"{k} = {getattr(net, k)}" for k in NETWORK_SETTINGS]
    if net.task_source is not None:
        lines += ["", "[task]"] + [f"{k} = {json.dumps(v)}" for k, v in net.task_source.describe().items()]
    for peer in net.peers:
        key = peer.key
        if key is None:
            data = DataDir(data_root / peer.name)
            try:
                key = Identity.from_seed(data.load_or_create_seed(lambda: Identity.generate().seed())).key
            finally:
                data.close()
        lines += ["", "[[peer]]", f"name = {json.dumps(peer.name)}", f"host = {json.dumps(peer.host)}",
                  f"port = {peer.port}", f"model = {json.dumps(peer.model)}", f'key = "{key.hex()}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m p2pml.network", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="peers.toml", help="the network to pin (default: peers.toml)")
    ap.add_argument("--out", required=True, help="directory for the pinned peers.toml and one data dir per peer")
    args = ap.parse_args(argv)
    prog = "p2pml.network"
    out = Path(args.out)
    try:
        net = load(args.peers)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        peers_file = pin_keys(net, out, out / "peers.toml")
        load(peers_file)  # what we wrote must read back
    except (ConfigError, StoreError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {peers_file} with {len(net.peers)} pinned seats; start each peer with:")
    for peer in net.peers:
        where = f" --data-dir {out / peer.name}" if peer.key is None else " --data-dir <its own data dir>"
        print(f"  python -m p2pml.node --peers {peers_file} --name {peer.name} --port {peer.port}{where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
