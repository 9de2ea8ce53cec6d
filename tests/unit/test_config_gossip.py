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
    ("bad-discovery", EDGE + GOSSIP + 'discovery = "dns"\n', "gossip.discovery", "'mdns'"),
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
