"""peers.toml: the repository's own file, and every way a hand-written one can be wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pml.config import MODEL_KINDS, NETWORK_SETTINGS, ConfigError, NetworkConfig, PeerConfig, load, parse
from p2pml.ledger import Slot

REPO_PEERS = Path(__file__).resolve().parent.parent / "peers.toml"
KEY_HEX = "ab" * 32


def peers_toml(*peers: str, network: str = "") -> str:
    out = f"[network]\n{network}\n" if network else ""
    for body in peers:
        out += f"\n[[peer]]\n{body}\n"
    return out


ADA = 'name = "ada"\nport = 8001\nmodel = "knn"'
BO = 'name = "bo"\nport = 8002\nmodel = "svm"'


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, "test.toml")
    message = str(info.value)
    assert message.startswith("test.toml: "), message  # says where
    return message


# -- the repository's file ---------------------------------------------------------------------


def test_repository_peers_toml():
    net = load(REPO_PEERS)
    assert isinstance(net, NetworkConfig)
    assert len(net.peers) == 5
    assert [p.port for p in net.peers] == [8001, 8002, 8003, 8004, 8005]
    assert len({p.model for p in net.peers}) == 5
    assert {p.model for p in net.peers} <= set(MODEL_KINDS)
    assert len({p.name for p in net.peers}) == 5
    assert all(p.host == "127.0.0.1" and p.key is None for p in net.peers)
    assert net.peer_by_port(8003).url == "http://127.0.0.1:8003"
    assert net.query_timeout_ms == 300
    assert net.anti_entropy_interval_ms == 500
    assert net.request_timeout_ms == 2000
    assert net.batch_window_ms == NETWORK_SETTINGS["batch_window_ms"][0]
    assert len(net.genesis().slots) == 5


def test_defaults_and_values():
    net = parse(peers_toml(ADA + '\nhost = "10.0.0.7"', network="batch_window_ms = 7"))
    assert net.peers == (PeerConfig("ada", "10.0.0.7", 8001, "knn", None),)
    assert net.batch_window_ms == 7
    for name, (default, _lo, _hi) in NETWORK_SETTINGS.items():
        if name != "batch_window_ms":
            assert getattr(net, name) == default
    assert parse(peers_toml(ADA)).peers[0].host == "127.0.0.1"


@pytest.mark.parametrize("name", sorted(NETWORK_SETTINGS))
def test_network_setting_bounds_accepted(name):
    _default, lo, hi = NETWORK_SETTINGS[name]
    assert getattr(parse(peers_toml(ADA, network=f"{name} = {lo}")), name) == lo
    assert getattr(parse(peers_toml(ADA, network=f"{name} = {hi}")), name) == hi


def test_port_bounds_accepted():
    assert parse(peers_toml('name = "a"\nport = 1\nmodel = "knn"')).peers[0].port == 1
    assert parse(peers_toml('name = "a"\nport = 65535\nmodel = "knn"')).peers[0].port == 65535


# -- errors ------------------------------------------------------------------------------------


def test_invalid_toml():
    assert "not valid TOML" in config_error("[[peer]\nname = ")
    assert "not valid TOML" in config_error('name = "a"\nname = "b"\n')


def test_unknown_section():
    message = config_error(peers_toml(ADA) + "\n[netwrok]\nquery_timeout_ms = 5\n")
    assert "unknown section" in message and "netwrok" in message


def test_unknown_top_level_key():
    assert "unknown section" in config_error('peers = 3\n' + peers_toml(ADA))


def test_network_not_a_table():
    assert "[network] must be a table" in config_error('network = 5\n' + peers_toml(ADA))


def test_unknown_network_setting():
    message = config_error(peers_toml(ADA, network="query_timeout = 300"))
    assert "unknown [network] setting" in message and "query_timeout" in message
    assert "query_timeout_ms" in message  # lists the known ones


@pytest.mark.parametrize("name", sorted(NETWORK_SETTINGS))
@pytest.mark.parametrize("kind", ["below", "above", "float", "string", "bool"])
def test_network_setting_out_of_range_or_wrong_type(name, kind):
    _default, lo, hi = NETWORK_SETTINGS[name]
    value = {"below": str(lo - 1), "above": str(hi + 1), "float": f"{lo + 1}.0",
             "string": f'"{lo + 1}"', "bool": "true"}[kind]
    message = config_error(peers_toml(ADA, network=f"{name} = {value}"))
    assert name in message and f"[{lo}, {hi}]" in message


@pytest.mark.parametrize("text", ["", "[network]\nquery_timeout_ms = 300\n", "peer = []\n",
                                  "[peer]\nname = 'ada'\nport = 8001\nmodel = 'knn'\n", 'peer = "ada"\n'])
def test_no_peers(text):
    assert "no [[peer]] entries" in config_error(text)


def test_peer_not_a_table():
    assert "must be a table" in config_error("peer = [1, 2]\n")


def test_unknown_peer_field():
    message = config_error(peers_toml(ADA + '\nmodle = "svm"'))
    assert "unknown field" in message and "modle" in message and "#1" in message


@pytest.mark.parametrize("name_line", ["", 'name = ""', "name = 5", 'name = "a\\tb"', f'name = "{"x" * 65}"'],
                         ids=["missing", "empty", "int", "unprintable", "too-long"])
def test_missing_or_bad_name(name_line):
    message = config_error(peers_toml(BO, f"{name_line}\nport = 8001\nmodel = \"knn\""))
    assert "'name'" in message and "#2" in message


@pytest.mark.parametrize("port", ["0", "70000", '"8001"', "-1", "8001.0", "true", "65536"])
def test_bad_port(port):
    message = config_error(peers_toml(f'name = "ada"\nport = {port}\nmodel = "knn"'))
    assert "'port'" in message and "'ada'" in message


def test_missing_port():
    assert "'port'" in config_error(peers_toml('name = "ada"\nmodel = "knn"'))


@pytest.mark.parametrize("model", ['"neural_net"', '"KNN"', '""', "3"])
def test_unknown_model(model):
    message = config_error(peers_toml(f'name = "ada"\nport = 8001\nmodel = {model}'))
    assert "model" in message and "'ada'" in message
    assert all(kind in message for kind in MODEL_KINDS)  # says what to choose


def test_missing_model():
    assert "model None" in config_error(peers_toml('name = "ada"\nport = 8001'))


def test_bad_host():
    assert "'host'" in config_error(peers_toml(ADA + '\nhost = ""'))
    assert "'host'" in config_error(peers_toml(ADA + "\nhost = 127"))


@pytest.mark.parametrize("key", ['"zz"', '"' + "ab" * 31 + '"', '"' + "ab" * 33 + '"', '""',
                                 '"' + "g" * 64 + '"', "5", '"' + "ab" * 31 + 'a"'],
                         ids=["not-hex", "31-bytes", "33-bytes", "empty", "g-digits", "int", "odd"])
def test_bad_key(key):
    message = config_error(peers_toml(ADA + f"\nkey = {key}"))
    assert "'key'" in message and "64 hex digits" in message


def test_duplicate_names():
    message = config_error(peers_toml(ADA, 'name = "ada"\nport = 8002\nmodel = "svm"'))
    assert "two peers share the name 'ada'" in message


def test_duplicate_host_and_port():
    message = config_error(peers_toml(ADA, 'name = "bo"\nport = 8001\nmodel = "svm"'))
    assert "'ada' (127.0.0.1:8001) and 'bo' (127.0.0.1:8001) are the same address and port" in message
    # Same port on different hosts is fine.
    net = parse(peers_toml(ADA, 'name = "bo"\nhost = "10.0.0.2"\nport = 8001\nmodel = "svm"'))
    assert [p.host for p in net.peers] == ["127.0.0.1", "10.0.0.2"]


def test_load_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "peers.toml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(path) in str(info.value) and "no such file" in str(info.value)


def test_load_names_the_file_in_parse_errors(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(peers_toml(ADA, network="query_timeout_ms = 1"), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}: ")


def test_load_undecodable_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# \xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load(path)


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "127.0.0.1"])
def test_localhost_is_127_0_0_1(host):
    message = config_error(peers_toml(ADA, f'name = "bo"\nhost = "{host}"\nport = 8001\nmodel = "svm"'))
    assert "'bo' (" in message and "are the same address and port" in message


@pytest.mark.parametrize("host", ["bad host", "0.0.0.0", "::", "a..b", "-x.example", "224.0.0.1",
                                  "x" * 64 + ".example"])
def test_invalid_hosts(host):
    message = config_error(peers_toml(ADA + f'\nhost = "{host}"'))
    assert repr(host) in message and "'ada'" in message


def test_valid_hosts():
    for host in ("10.0.0.7", "::1", "node-1.example.org", "Peer7"):
        assert parse(peers_toml(ADA + f'\nhost = "{host}"')).peers[0].host == host


def test_own_entry_by_host_where_a_port_is_shared():
    net = parse(peers_toml('name = "alpha"\nhost = "127.0.0.2"\nport = 8004\nmodel = "knn"',
                           'name = "beta"\nhost = "127.0.0.3"\nport = 8004\nmodel = "svm"'))
    assert net.peer_by_port(8004, "127.0.0.3").name == "beta"
    assert net.peer_by_port(8004, "127.0.0.2").name == "alpha"
    assert net.peer_by_port(8004, None, "beta").name == "beta"
    for host in (None, "0.0.0.0", "127.0.0.9"):
        with pytest.raises(ConfigError) as info:
            net.peer_by_port(8004, host)
        assert "several peers have port 8004 (alpha@127.0.0.2, beta@127.0.0.3)" in str(info.value)
    with pytest.raises(ConfigError, match="'beta' has port 8004, not 8005"):
        net.peer_by_port(8005, None, "beta")
    with pytest.raises(ConfigError, match="no peer in the network is named 'gamma'"):
        net.peer_by_port(8004, None, "gamma")


def test_peer_by_port():
    net = parse(peers_toml(ADA, BO))
    assert net.peer_by_port(8002).name == "bo"
    with pytest.raises(ConfigError) as info:
        net.peer_by_port(9999)
    assert "9999" in str(info.value) and "8001, 8002" in str(info.value)


# -- genesis -----------------------------------------------------------------------------------


def test_pinned_key_in_genesis():
    net = parse(peers_toml(ADA + f'\nkey = "{KEY_HEX}"', BO))
    assert net.peers[0].key == bytes.fromhex(KEY_HEX)
    assert net.genesis().slots == (Slot("ada", bytes.fromhex(KEY_HEX)), Slot("bo", None))
    # Upper-case hex is the same key.
    upper = parse(peers_toml(ADA + f'\nkey = "{KEY_HEX.upper()}"', BO))
    assert upper.genesis().id() == net.genesis().id()
    # Pinning changes the network's identity.
    assert parse(peers_toml(ADA, BO)).genesis().id() != net.genesis().id()


def test_genesis_id_ignores_host_and_port():
    a = parse(peers_toml(ADA, BO, network="query_timeout_ms = 900"))
    b = parse(peers_toml('name = "ada"\nhost = "192.168.1.5"\nport = 9001\nmodel = "knn"',
                         'name = "bo"\nhost = "192.168.1.6"\nport = 9001\nmodel = "svm"'))
    assert a.genesis().id() == b.genesis().id()
    assert len(a.genesis().id()) == 32


def test_genesis_id_depends_on_name_order_and_task_not_on_models():
    """A member's model is in its signed card, not in the genesis: changing it makes no other
    network. The task is in the genesis: another task is another network."""
    base = parse(peers_toml(ADA, BO)).genesis().id()
    other_model = parse(peers_toml(ADA, 'name = "bo"\nport = 8002\nmodel = "knn"')).genesis().id()
    other_name = parse(peers_toml(ADA, 'name = "bob"\nport = 8002\nmodel = "svm"')).genesis().id()
    reordered = parse(peers_toml(BO, ADA)).genesis().id()
    wine = parse('[task]\ndataset = "wine"\n' + peers_toml(ADA, BO)).genesis().id()
    assert other_model == base
    assert len({base, other_name, reordered, wine}) == 4
