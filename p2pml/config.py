"""The network description (``peers.toml``), validated once at start into frozen dataclasses."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from p2pml.ledger import Genesis, Slot

MODEL_KINDS = ("logistic_regression", "random_forest", "gradient_boosting", "knn", "svm")

# [network] settings: name -> (default, lowest, highest)
NETWORK_SETTINGS = {
    "query_timeout_ms": (300, 10, 10_000),  # how long /predict waits for missing votes
    "anti_entropy_interval_ms": (500, 50, 60_000),  # how often a node reconciles with a peer
    "request_timeout_ms": (2_000, 100, 60_000),  # total time for one request to a peer
    "batch_window_ms": (0, 0, 100),  # extra wait to fill a query batch (0: only what queued)
    "invalid_message_limit": (64, 1, 1_000_000),  # invalid messages (decaying) before a source is ignored
    "ignore_ms": (30_000, 0, 3_600_000),  # how long a source that hit the limit is ignored
    "idle_timeout_ms": (10_000, 100, 3_600_000),  # a connection with no request in progress for this long is closed
    "rounds_in_memory": (8_192, 16, 100_000_000),  # rounds whose tables a node keeps; older ones are folded for good
}


class ConfigError(ValueError):
    """peers.toml or a command-line setting is wrong; the message says where and how."""


@dataclass(frozen=True, slots=True)
class PeerConfig:
    name: str
    host: str
    port: int
    model: str
    key: bytes | None = None  # pins the slot to one Ed25519 public key

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    peers: tuple[PeerConfig, ...]
    query_timeout_ms: int = 300
    anti_entropy_interval_ms: int = 500
    request_timeout_ms: int = 2_000
    batch_window_ms: int = 0
    invalid_message_limit: int = 64
    ignore_ms: int = 30_000
    idle_timeout_ms: int = 10_000
    rounds_in_memory: int = 8_192

    def genesis(self) -> Genesis:
        return Genesis(tuple(Slot(p.name, p.model, p.key) for p in self.peers))

    def peer_by_port(self, port: int) -> PeerConfig:
        for p in self.peers:
            if p.port == port:
                return p
        ports = ", ".join(str(p.port) for p in self.peers)
        raise ConfigError(f"no peer in the network has port {port} (ports: {ports})")


def _peer(i: int, raw, where: str) -> PeerConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: [[peer]] #{i + 1} must be a table")
    unknown = set(raw) - {"name", "host", "port", "model", "key"}
    if unknown:
        raise ConfigError(f"{where}: peer #{i + 1} has unknown field(s) {sorted(unknown)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name or len(name) > 64 or not name.isprintable():
        raise ConfigError(f"{where}: peer #{i + 1} needs a printable 'name' of 1-64 characters")
    host = raw.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host:
        raise ConfigError(f"{where}: peer {name!r} has a bad 'host'")
    port = raw.get("port")
    if type(port) is not int or not 1 <= port <= 65535:
        raise ConfigError(f"{where}: peer {name!r} needs an integer 'port' in 1-65535, got {port!r}")
    model = raw.get("model")
    if model not in MODEL_KINDS:
        raise ConfigError(f"{where}: peer {name!r} has model {model!r}; choose one of {', '.join(MODEL_KINDS)}")
    key = raw.get("key")
    if key is not None:
        try:
            key = bytes.fromhex(key)
        except (TypeError, ValueError):
            key = b""
        if len(key) != 32:
            raise ConfigError(f"{where}: peer {name!r} 'key' must be 64 hex digits (an Ed25519 public key)")
    return PeerConfig(name, host, port, model, key)


def parse(text: str, where: str = "peers.toml") -> NetworkConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    unknown = set(doc) - {"network", "peer"}
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)}; expected [network] and [[peer]]")
    net = doc.get("network", {})
    if not isinstance(net, dict):
        raise ConfigError(f"{where}: [network] must be a table")
    bad = set(net) - set(NETWORK_SETTINGS)
    if bad:
        raise ConfigError(f"{where}: unknown [network] setting(s) {sorted(bad)}; known: {sorted(NETWORK_SETTINGS)}")
    settings = {}
    for key, (default, lo, hi) in NETWORK_SETTINGS.items():
        value = net.get(key, default)
        if type(value) is not int or not lo <= value <= hi:
            raise ConfigError(f"{where}: [network] {key} must be an integer in [{lo}, {hi}], got {value!r}")
        settings[key] = value
    raw_peers = doc.get("peer")
    if not isinstance(raw_peers, list) or not raw_peers:
        raise ConfigError(f"{where}: no [[peer]] entries; the network needs at least one peer")
    peers = tuple(_peer(i, raw, where) for i, raw in enumerate(raw_peers))
    for attr in ("name", "port"):
        seen = set()
        for p in peers:
            value = getattr(p, attr) if attr == "name" else (p.host, p.port)
            if value in seen:
                raise ConfigError(f"{where}: two peers share the {attr} {value!r}")
            seen.add(value)
    return NetworkConfig(peers, **settings)


def load(path: str | Path) -> NetworkConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse(text, str(path))
