"""The [gossip] section and what it changes: keys, tiers from gossip, gossip-only nodes."""

from __future__ import annotations

import base64

import pytest

from meshproxy import config
from meshproxy.config import Address
from meshproxy.errors import ConfigError

KEY = base64.b64encode(bytes(range(32))).decode()
GOSSIP = f'\n[gossip]\nbind = "127.0.0.1:7946"\nseeds = ["127.0.0.1:7947"]\nkeys = ["{KEY}"]\n'

EDGE = """\
[node]
name = "p1"
role = "edge"

[[listener]]
name = "mysql"
bind = "127.0.0.1:6033"
upstream = "tier:middle"

[[tier]]
name = "middle"
"""

MIDDLE = """\
[node]
name = "p2"
role = "middle"
tier = "middle"
mesh_bind = "127.0.0.1:7001"

[[service]]
name = "mysql"
upstream = "pool:main"

[[pool]]
name = "main"
servers = ["127.0.0.1:3306"]
"""


def load(text: str) -> config.Config:
    import tomllib

    return config.parse(tomllib.loads(text), "node.toml")


def test_gossip_section_maps_to_settings() -> None:
    """A [gossip] section loads with its defaults, its tunables map to the protocol's
    settings, and the keys decode."""
    cfg = load(MIDDLE + GOSSIP + "probe_interval_ms = 500\nprobe_timeout_ms = 150\n")
    gossip = cfg.gossip
    assert gossip is not None
    assert gossip.advertised() == Address("127.0.0.1", 7946)
    assert gossip.seeds == (Address("127.0.0.1", 7947),)
    assert gossip.key_bytes() == (bytes(range(32)),)
    settings = gossip.settings()
    assert settings.probe_interval_s == 0.5
    assert settings.probe_timeout_s == 0.15
    assert settings.gossip_interval_s == 0.1


def test_an_edge_tier_may_have_no_static_members_with_gossip() -> None:
    """With gossip, an edge's tier needs no static members (gossip supplies them); without,
    it still does."""
    assert load(EDGE + GOSSIP).tier[0].members == ()
    with pytest.raises(ConfigError) as info:
        load(EDGE)
    assert info.value.key == "tier[0].members"


def test_a_gossip_only_node_needs_no_listener_or_service() -> None:
    """With gossip, a node that serves nothing (a seed, a benchmark member) is valid."""
    cfg = load('[node]\nname = "s1"\nrole = "middle"\n' + GOSSIP)
    assert cfg.service == ()
    assert cfg.listener == ()


KEY_16 = base64.b64encode(b"k" * 16).decode()
ERRORS = [
    ("no-key", EDGE + '\n[gossip]\nbind = "127.0.0.1:7946"\n', "gossip.keys", "allow_plaintext"),
    ("bad-base64", EDGE + GOSSIP.replace(KEY, "not base64!"), "gossip.keys[0]", "base64"),
    (
        "short-key",
        EDGE + GOSSIP.replace(KEY, base64.b64encode(b"short").decode()),
        "gossip.keys[0]",
        "decodes to 5 bytes",
    ),
    ("unknown-key", EDGE + GOSSIP + "probe_ms = 5\n", "gossip.probe_ms", "unknown key"),
    (
        "wildcard-without-advertise",
        EDGE + GOSSIP.replace("127.0.0.1:7946", "0.0.0.0:7946"),
        "gossip.advertise",
        "wildcard",
    ),
    (
        "timeout-not-below-interval",
        EDGE + GOSSIP + "probe_interval_ms = 100\nprobe_timeout_ms = 100\n",
        "gossip.probe_timeout_ms",
        "shorter than probe_interval_ms",
    ),
    (
        "middle-without-tier",
        MIDDLE.replace('tier = "middle"\n', "") + GOSSIP,
        "node.tier",
        "names the tier",
    ),
    (
        "middle-wildcard-mesh",
        MIDDLE.replace('mesh_bind = "127.0.0.1:7001"', 'mesh_bind = "0.0.0.0:7001"') + GOSSIP,
        "node.mesh_advertise",
        "wildcard",
    ),
    (
        "port-clash",
        MIDDLE + GOSSIP.replace("127.0.0.1:7946", "127.0.0.1:7001"),
        "gossip.bind",
        "already bound by node.mesh_bind",
    ),
    ("bad-discovery", EDGE + GOSSIP + 'discovery = "dht"\n', "gossip.discovery", "'dns'"),
    ("dns-without-names", EDGE + GOSSIP + 'discovery = "dns"\n', "gossip.dns_names", "one name"),
    (
        "bad-dns-name",
        EDGE + GOSSIP + 'discovery = "dns"\ndns_names = ["tasks..middle"]\n',
        "gossip.dns_names[0]",
        "not a DNS name",
    ),
    (
        "bad-dns-interval",
        EDGE + GOSSIP + "dns_interval_s = 0\n",
        "gossip.dns_interval_s",
        "at least 1",
    ),
    (
        "bad-advertise-network",
        EDGE.replace('role = "edge"', 'role = "edge"\nadvertise_network = "10.1.2"') + GOSSIP,
        "node.advertise_network",
        "CIDR",
    ),
    (
        "negative-fanout",
        EDGE + GOSSIP + "gossip_fanout = 0\n",
        "gossip.gossip_fanout",
        "at least 1",
    ),
]


@pytest.mark.parametrize(
    ("text", "key", "reason"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_gossip_mistakes_name_the_key(text: str, key: str, reason: str) -> None:
    """Each mistake in a [gossip] setup is refused with the key path that holds it."""
    with pytest.raises(ConfigError) as info:
        load(text)
    assert info.value.key == key
    assert reason in info.value.reason


def test_plaintext_only_when_asked_for() -> None:
    """Gossip without keys is accepted only with allow_plaintext = true."""
    cfg = load(EDGE + '\n[gossip]\nbind = "127.0.0.1:7946"\nallow_plaintext = true\n')
    assert cfg.gossip is not None
    assert cfg.gossip.key_bytes() == ()
    assert load(EDGE + GOSSIP.replace(KEY, KEY_16)).gossip is not None


def test_dns_discovery_keys_load() -> None:
    """discovery = "dns" takes names, an interval, a timeout and optional resolvers."""
    cfg = load(
        EDGE
        + GOSSIP
        + 'discovery = "dns"\ndns_names = ["tasks.middle", "meshproxy-gossip.db.svc."]\n'
        + 'dns_servers = ["127.0.0.1:5353"]\n'
    )
    gossip = cfg.gossip
    assert gossip is not None
    assert gossip.dns_names == ("tasks.middle", "meshproxy-gossip.db.svc.")
    assert (gossip.dns_interval_s, gossip.dns_timeout_ms) == (10.0, 2000)
    assert gossip.dns_servers == (Address("127.0.0.1", 5353),)


WILDCARD_MIDDLE = MIDDLE.replace('mesh_bind = "127.0.0.1:7001"', 'mesh_bind = "0.0.0.0:7001"')
WILDCARD_GOSSIP = GOSSIP.replace("127.0.0.1:7946", "0.0.0.0:7946")


def test_advertise_network_finds_this_hosts_address_for_wildcard_binds() -> None:
    """With node.advertise_network, wildcard mesh and gossip binds advertise this host's
    address in that network (loopback here), and explicit advertise addresses win."""
    text = WILDCARD_MIDDLE.replace(
        'tier = "middle"', 'tier = "middle"\nadvertise_network = "127.0.0.0/8"'
    )
    cfg = load(text + WILDCARD_GOSSIP)
    assert cfg.node.mesh_advertise == Address("127.0.0.1", 7001)
    assert cfg.gossip is not None
    assert cfg.gossip.advertised() == Address("127.0.0.1", 7946)
    told = load(text + WILDCARD_GOSSIP + 'advertise = "127.0.0.9:7946"\n')
    assert told.gossip is not None
    assert told.gossip.advertised() == Address("127.0.0.9", 7946)


def test_advertise_network_without_an_address_here_is_refused_only_on_the_node() -> None:
    """A network this host has no address in is refused where the node loads its config,
    and accepted when the config is checked for elsewhere (files=False)."""
    import tomllib

    text = WILDCARD_MIDDLE.replace(
        'tier = "middle"', 'tier = "middle"\nadvertise_network = "203.0.113.0/24"'
    )
    with pytest.raises(ConfigError) as info:
        load(text + WILDCARD_GOSSIP)
    assert info.value.key == "node.advertise_network"
    assert "no interface of this host has an address in 203.0.113.0/24" in info.value.reason
    cfg = config.parse(tomllib.loads(text + WILDCARD_GOSSIP), "node.toml", files=False)
    assert cfg.node.mesh_advertise is None
