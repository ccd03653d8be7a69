"""Command line for an account holder: ``python -m p2pml.client transfer|account ...``.

    python -m p2pml.client transfer --key-file D1/node.key --to KEY --amount 1000 --peer http://127.0.0.1:8001
    python -m p2pml.client account [--key-file F | --key KEY] --peer URL

A transfer is signed here, with the key file's key (a node's ``node.key``, or any 32-byte
Ed25519 seed kept owner-only), and sent to the peer, which gossips it to the others. The
client asks the peer for the account's next sequence number and the ledger's lamport first,
then waits until the ledger has settled the transfer and says whether it was applied or void
(and why). Nothing here is trusted by the network: the transfer's signature is what counts.
"""

from __future__ import annotations

import argparse
import json
import stat
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from p2pml.ledger import MAX_AMOUNT, Transfer
from p2pml.wire import Identity, WireError, pack_batch

MSGPACK = "application/msgpack"


class ClientError(Exception):
    """What went wrong, in words for the user."""


def _request(url: str, data: bytes | None = None, timeout: float = 10.0) -> dict:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": MSGPACK} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            error = exc.reason
        raise ClientError(f"{url.split('?')[0]} answered {exc.code}: {error}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ClientError(f"cannot reach {url.split('/', 3)[2] if '//' in url else url}: {reason}") from None
    except ValueError:
        raise ClientError(f"{url} did not answer JSON") from None


def load_key(path: str) -> Identity:
    p = Path(path)
    try:
        info = p.stat()
        seed = p.read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read the key file {path}: {exc.strerror or exc}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ClientError(f"{path} can be read by others (mode {stat.S_IMODE(info.st_mode):o}): "
                          f"chmod 600 it first")
    if len(seed) != 32:
        raise ClientError(f"{path} is not a key file: {len(seed)} bytes, a seed is 32")
    return Identity.from_seed(seed)


def parse_key(text: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ClientError(f"{text[:70]!r} is not a key: 64 hex digits (python -m p2pml.node ... --show-key prints one)")
    return key


def account(peer: str, key: bytes) -> dict:
    return _request(f"{peer}/account/{key.hex()}")


def transfer(peer: str, me: Identity, to: bytes, amount: int, wait: float = 10.0) -> dict:
    """Sign, send, and wait for the ledger's verdict. Returns the transfer's /message view."""
    if to == me.key:
        raise ClientError("a transfer to oneself changes nothing: give another key with --to")
    if not 1 <= amount <= MAX_AMOUNT:
        raise ClientError(f"--amount must be a whole number of tokens in [1, 2**53], not {amount}")
    ledger = _request(f"{peer}/ledger")
    mine = account(peer, me.key)
    if mine["balance"] < amount:
        raise ClientError(f"the balance of {me.key.hex()} is {mine['balance']}, less than {amount}")
    body = Transfer(max(mine["lamport"], ledger["lamport"]) + 1, mine["next_seq"], to, amount)
    try:
        signed = me.sign(bytes.fromhex(ledger["genesis"]), body)
    except WireError as exc:
        raise ClientError(f"cannot make this transfer: {exc}") from None
    answer = _request(f"{peer}/gossip", pack_batch([signed.raw]))
    if answer.get("accepted") != 1 and answer.get("duplicate") != 1:
        raise ClientError(f"{peer} did not take the transfer: {answer.get('errors') or answer}")
    deadline = time.monotonic() + wait
    while True:
        view = _request(f"{peer}/message/{signed.msg.id.hex()}")
        if view.get("applied") is not None or time.monotonic() > deadline:
            return view
        time.sleep(0.1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m p2pml.client", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("transfer", help="move tokens from the key file's account to another key")
    t.add_argument("--key-file", required=True, help="the sender's 32-byte key (a node's node.key)")
    t.add_argument("--to", required=True, help="the recipient's public key, 64 hex digits")
    t.add_argument("--amount", required=True, type=int, help="whole tokens")
    t.add_argument("--peer", required=True, help="a peer's URL, e.g. http://127.0.0.1:8001")
    t.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the verdict (default 10)")
    a = sub.add_parser("account", help="show one account's balance, sequence number and stake")
    who = a.add_mutually_exclusive_group(required=True)
    who.add_argument("--key-file", help="the account of this key file's key")
    who.add_argument("--key", help="a public key, 64 hex digits")
    a.add_argument("--peer", required=True, help="a peer's URL, e.g. http://127.0.0.1:8001")
    args = ap.parse_args(argv)
    peer = args.peer.rstrip("/")
    try:
        if args.command == "account":
            key = load_key(args.key_file).key if args.key_file else parse_key(args.key)
            print(json.dumps(account(peer, key), indent=2))
            return 0
        me, to = load_key(args.key_file), parse_key(args.to)
        view = transfer(peer, me, to, args.amount, args.wait)
    except ClientError as exc:
        print(f"p2pml.client: error: {exc}", file=sys.stderr)
        return 2
    if view.get("applied"):
        after = account(peer, me.key)
        print(f"transferred {args.amount} to {to.hex()} (transfer {view['id']}, seq {view['seq']}); "
              f"balance now {after['balance']}")
        return 0
    if view.get("applied") is False:
        print(f"p2pml.client: error: transfer {view['id']} is void: {view['void']}", file=sys.stderr)
        return 1
    print(f"p2pml.client: error: transfer {view['id']} was taken but is not settled after "
          f"{args.wait:g} s; see {peer}/message/{view['id']}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
