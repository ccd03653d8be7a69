"""The network description (``peers.toml``), validated once at start into frozen dataclasses."""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from p2pml.ledger import IRIS, MAX_AMOUNT, REGRESSION, Genesis, Slot, Task
from p2pml.task import TaskData, TaskError, TaskSource

MODEL_KINDS = ("logistic_regression", "random_forest", "gradient_boosting", "knn", "svm")
REGRESSION_KINDS = ("linear_regression", "random_forest", "gradient_boosting", "knn", "svm")
MODEL_FILE = "file:"  # model = "file:PATH": a skops or ONNX file of the operator's own
TASK_FIELDS = ("dataset", "csv", "target", "sha256", "kind", "band_bps", "tolerance")

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
    model: str  # a built-in kind, or MODEL_FILE + a path (this node's own choice: not in the genesis)
    key: bytes | None = None  # pins the slot to one Ed25519 public key

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        return f"http://{host}:{self.port}"


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
    task_source: TaskSource | None = None  # None: Iris
    accounts: tuple[tuple[bytes, int], ...] = ()  # [[account]]: funded keys besides the seats

    @property
    def task(self) -> Task:
        return IRIS if self.task_source is None else self.task_data().spec

    def task_data(self) -> TaskData:
        """The task's rows (loaded once per process)."""
        return _task_data(self.task_source)

    def genesis(self) -> Genesis:
        return Genesis(tuple(Slot(p.name, p.key) for p in self.peers), self.task, self.accounts)

    def peer_by_port(self, port: int, host: str | None = None, name: str | None = None) -> PeerConfig:
        """This node's own entry: by ``name`` if given, else by port, and by host where peers on
        different hosts share the port (never the first of several)."""
        if name is not None:
            match = [p for p in self.peers if p.name == name]
            if not match:
                raise ConfigError(f"no peer in the network is named {name!r} "
                                  f"(names: {', '.join(p.name for p in self.peers)})")
            if match[0].port != port:
                raise ConfigError(f"peer {name!r} has port {match[0].port}, not {port}")
            return match[0]
        match = [p for p in self.peers if p.port == port]
        if not match:
            ports = ", ".join(str(p.port) for p in self.peers)
            raise ConfigError(f"no peer in the network has port {port} (ports: {ports})")
        if len(match) > 1:
            on_host = [p for p in match if host is not None and _same_host(p.host, host)]
            if len(on_host) != 1:
                where = ", ".join(f"{p.name}@{p.host}" for p in match)
                given = f"none of them is on host {host}; " if host is not None else ""
                raise ConfigError(f"several peers have port {port} ({where}): {given}"
                                  f"pass --host with one of their hosts, or --name")
            return on_host[0]
        return match[0]


_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_LOCALHOST = ipaddress.ip_address("127.0.0.1")


def _address(host: str):
    """The address a host stands for where that is known without a lookup, else its lower-case
    name: two entries that are the same address and port would be one peer under two names."""
    if host.lower() == "localhost":
        return _LOCALHOST
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return host.lower()


def _same_host(a: str, b: str) -> bool:
    return _address(a) == _address(b)


def _check_host(host, name: str, where: str) -> str:
    """An IP address (not 0.0.0.0 or ::, where nobody can be reached) or a DNS name."""
    if not isinstance(host, str) or not host:
        raise ConfigError(f"{where}: peer {name!r} needs a 'host' (an IP address or a DNS name)")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.lower().split(".")):
            raise ConfigError(f"{where}: peer {name!r} has host {host!r}, which is neither an IP "
                              "address nor a valid DNS name") from None
        return host
    if address.is_unspecified or address.is_multicast:
        raise ConfigError(f"{where}: peer {name!r} has host {host!r}: peers must be reachable there "
                          "(bind to it with --host, but name the address others reach)")
    return host


def _task_data(source: TaskSource | None) -> TaskData:
    from p2pml import task

    return task.cached(source)


def _task(raw, where: str, folder: Path) -> TaskSource:
    """The [task] table, checked in form (its data is read and checked by p2pml.task)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: [task] must be a table")
    unknown = set(raw) - set(TASK_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown [task] field(s) {sorted(unknown)}; known: {', '.join(TASK_FIELDS)}")
    if ("dataset" in raw) == ("csv" in raw):
        raise ConfigError(f"{where}: [task] needs either dataset = \"NAME\" or csv = \"PATH\" (with "
                          f"target and sha256), not both or neither")
    for key in ("dataset", "csv", "target", "sha256", "kind"):
        if key in raw and (not isinstance(raw[key], str) or not raw[key]):
            raise ConfigError(f"{where}: [task] {key} must be a non-empty string")
    kind = raw.get("kind")
    if kind is not None and kind not in ("classification", REGRESSION):
        raise ConfigError(f"{where}: [task] kind must be \"classification\" or \"regression\", not {kind!r}")
    if "csv" in raw:
        missing = [k for k in ("target", "sha256", "kind") if k not in raw]
        if missing:
            raise ConfigError(f"{where}: a csv task needs {', '.join(missing)} too (the target column, "
                              f"the file's SHA-256, classification or regression)")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", raw["sha256"]):
            raise ConfigError(f"{where}: [task] sha256 must be 64 hex digits (sha256sum FILE)")
    elif "target" in raw or "sha256" in raw:
        raise ConfigError(f"{where}: [task] target and sha256 are for csv tasks")
    band = raw.get("band_bps")
    if band is not None and (type(band) is not int or not 0 <= band <= 10_000):
        raise ConfigError(f"{where}: [task] band_bps must be an integer in [0, 10000], got {band!r}")
    tolerance = raw.get("tolerance")
    if tolerance is not None and (type(tolerance) not in (int, float) or not 0 <= tolerance <= 1e9):
        raise ConfigError(f"{where}: [task] tolerance must be a number in [0, 1e9], got {tolerance!r}")
    csv_path = str((folder / raw["csv"]).resolve()) if "csv" in raw else None
    return TaskSource(raw.get("dataset"), csv_path, raw.get("target"), raw.get("sha256"), kind, band,
                      None if tolerance is None else float(tolerance))


def _peer(i: int, raw, where: str, kinds: tuple[str, ...] = MODEL_KINDS) -> PeerConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: [[peer]] #{i + 1} must be a table")
    unknown = set(raw) - {"name", "host", "port", "model", "key"}
    if unknown:
        raise ConfigError(f"{where}: peer #{i + 1} has unknown field(s) {sorted(unknown)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name or len(name) > 64 or not name.isprintable():
        raise ConfigError(f"{where}: peer #{i + 1} needs a printable 'name' of 1-64 characters")
    host = _check_host(raw.get("host", "127.0.0.1"), name, where)
    port = raw.get("port")
    if type(port) is not int or not 1 <= port <= 65535:
        raise ConfigError(f"{where}: peer {name!r} needs an integer 'port' in 1-65535, got {port!r}")
    model = raw.get("model")
    if isinstance(model, str) and model.startswith(MODEL_FILE):
        if not model[len(MODEL_FILE):]:
            raise ConfigError(f"{where}: peer {name!r} has model \"file:\" without a path")
    elif model not in kinds:
        raise ConfigError(f"{where}: peer {name!r} has model {model!r}; choose one of {', '.join(kinds)}, "
                          f"or \"file:PATH\" (a skops or ONNX file)")
    key = raw.get("key")
    if key is not None:
        try:
            key = bytes.fromhex(key)
        except (TypeError, ValueError):
            key = b""
        if len(key) != 32:
            raise ConfigError(f"{where}: peer {name!r} 'key' must be 64 hex digits (an Ed25519 public key)")
    return PeerConfig(name, host, port, model, key)


def _accounts(raw, where: str) -> tuple[tuple[bytes, int], ...]:
    """[[account]] tables: ``key`` (64 hex digits) and ``balance`` (whole tokens), each key once."""
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: account must be [[account]] tables")
    out: dict[bytes, int] = {}
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or set(entry) != {"key", "balance"}:
            raise ConfigError(f"{where}: [[account]] #{i + 1} needs exactly key = \"HEX\" and balance = N")
        try:
            key = bytes.fromhex(entry["key"]) if isinstance(entry["key"], str) else b""
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ConfigError(f"{where}: [[account]] #{i + 1} key must be 64 hex digits (an Ed25519 public key)")
        balance = entry["balance"]
        if type(balance) is not int or not 1 <= balance <= MAX_AMOUNT:
            raise ConfigError(f"{where}: [[account]] #{i + 1} balance must be an integer in [1, 2**53], "
                              f"got {balance!r}")
        if key in out:
            raise ConfigError(f"{where}: [[account]] key {key.hex()[:16]}... is listed twice")
        out[key] = balance
    return tuple(sorted(out.items()))


def parse(text: str, where: str = "peers.toml", folder: Path | None = None) -> NetworkConfig:
    """``folder``: where relative paths in the file (a csv task, model files) start from."""
    folder = Path.cwd() if folder is None else folder
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    unknown = set(doc) - {"network", "peer", "task", "account"}
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)}; expected [network], [task], "
                          f"[[peer]] and [[account]]")
    accounts = _accounts(doc["account"], where) if "account" in doc else ()
    source = _task(doc["task"], where, folder) if "task" in doc else None
    if source is not None:
        try:
            _task_data(source)
        except TaskError as exc:
            raise ConfigError(str(exc)) from None
    regression = source is not None and _task_data(source).spec.regression
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
    kinds = REGRESSION_KINDS if regression else MODEL_KINDS
    peers = tuple(_peer(i, raw, where, kinds) for i, raw in enumerate(raw_peers))
    if any(p.model.startswith(MODEL_FILE) for p in peers):
        peers = tuple(p if not p.model.startswith(MODEL_FILE) else PeerConfig(
            p.name, p.host, p.port, MODEL_FILE + str((folder / p.model[len(MODEL_FILE):]).resolve()), p.key)
            for p in peers)
    names: set[str] = set()
    places: dict[tuple, PeerConfig] = {}
    for p in peers:
        if p.name in names:
            raise ConfigError(f"{where}: two peers share the name {p.name!r}")
        names.add(p.name)
        other = places.setdefault((_address(p.host), p.port), p)
        if other is not p:
            raise ConfigError(f"{where}: peers {other.name!r} ({other.host}:{other.port}) and {p.name!r} "
                              f"({p.host}:{p.port}) are the same address and port")
    return NetworkConfig(peers, **settings, task_source=source, accounts=accounts)


def load(path: str | Path) -> NetworkConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse(text, str(path), path.resolve().parent)
