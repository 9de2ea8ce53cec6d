"""Config loading: valid files become frozen dataclasses, every mistake a precise ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshproxy import config
from meshproxy.config import (
    Address,
    AdminState,
    CheckConfig,
    Config,
    ListenerConfig,
    NodeConfig,
    PoolConfig,
    ServerConfig,
    ServiceConfig,
    TierConfig,
    UpstreamKind,
    UpstreamRef,
)
from meshproxy.errors import ConfigError

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
members = ["127.0.0.1:7001", "127.0.0.1:7002"]
"""

MIDDLE = """\
[node]
name = "p2"
role = "middle"
mesh_bind = "127.0.0.1:7001"

[[service]]
name = "mysql"
upstream = "pool:main"

[[pool]]
name = "main"
servers = ["127.0.0.1:3306", "127.0.0.1:3307"]

[pool.check]
type = "mysql"
user = "monitor"
password = "monitor"
interval_ms = 1000
timeout_ms = 500
rise = 2
fall = 2
"""


def edit(text: str, old: str, new: str) -> str:
    """Replace exactly one occurrence of ``old``, so a typo in a case cannot go unnoticed."""
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)


def load_text(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "node.toml"
    path.write_text(text, encoding="utf-8")
    return config.load(path)


def load_error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return info.value


def addr(text: str) -> Address:
    return Address.parse(text)


# --- valid configurations ------------------------------------------------------------------


def test_edge_config_parses_with_defaults(tmp_path: Path) -> None:
    """The example edge config becomes the expected tree, with defaults for every omitted key."""
    loaded = load_text(tmp_path, EDGE)
    expected = Config(
        node=NodeConfig(name="p1", role="edge"),
        listener=(
            ListenerConfig(
                name="mysql",
                bind=Address("127.0.0.1", 6033),
                upstream=UpstreamRef(UpstreamKind.TIER, "middle"),
            ),
        ),
        tier=(
            TierConfig(
                name="middle",
                members=(
                    ServerConfig(Address("127.0.0.1", 7001)),
                    ServerConfig(Address("127.0.0.1", 7002)),
                ),
            ),
        ),
    )
    assert loaded == expected
    assert loaded.source == str(tmp_path / "node.toml")
    assert loaded.service == ()
    assert loaded.pool == ()
    listener = loaded.listener[0]
    assert listener.service == "mysql"
    assert listener.protocol == "mysql"
    assert loaded.tier[0].members[0].weight == 1
    assert loaded.tier[0].members[0].state is AdminState.ONLINE
    assert loaded.tier[0].check.type == "none"
    assert loaded.timeouts.idle_s >= 8 * 3600, "MySQL sessions are long-lived: idle >= 8 h"
    assert loaded.node.mesh_bind is None
    assert loaded.tiers() == {"middle": loaded.tier[0]}


def test_middle_config_parses_with_defaults(tmp_path: Path) -> None:
    """The example middle config becomes the expected tree, with its check block as written."""
    loaded = load_text(tmp_path, MIDDLE)
    expected = Config(
        node=NodeConfig(name="p2", role="middle", mesh_bind=Address("127.0.0.1", 7001)),
        service=(ServiceConfig(name="mysql", upstream=UpstreamRef(UpstreamKind.POOL, "main")),),
        pool=(
            PoolConfig(
                name="main",
                servers=(
                    ServerConfig(Address("127.0.0.1", 3306)),
                    ServerConfig(Address("127.0.0.1", 3307)),
                ),
                check=CheckConfig(
                    type="mysql",
                    user="monitor",
                    password="monitor",
                    interval_ms=1000,
                    timeout_ms=500,
                    rise=2,
                    fall=2,
                ),
            ),
        ),
    )
    assert loaded == expected
    assert loaded.listener == ()
    assert loaded.pools() == {"main": loaded.pool[0]}
    assert loaded.pool[0].close_sessions_on_down is False


def test_config_tree_is_frozen(tmp_path: Path) -> None:
    """A loaded config cannot be mutated in place; changes need a new tree."""
    loaded = load_text(tmp_path, EDGE)
    with pytest.raises(AttributeError):
        loaded.node.name = "other"  # type: ignore[misc]


def test_servers_as_strings_and_inline_tables(tmp_path: Path) -> None:
    """Servers may be bare addresses or {address, weight, state} tables, mixed in one array."""
    text = edit(
        MIDDLE,
        'servers = ["127.0.0.1:3306", "127.0.0.1:3307"]',
        'servers = [{address = "127.0.0.1:3306", weight = 3, state = "OFFLINE_SOFT"},'
        ' "127.0.0.1:3307", {address = "127.0.0.1:3308"}]',
    )
    servers = load_text(tmp_path, text).pool[0].servers
    assert servers == (
        ServerConfig(Address("127.0.0.1", 3306), weight=3, state=AdminState.OFFLINE_SOFT),
        ServerConfig(Address("127.0.0.1", 3307), weight=1, state=AdminState.ONLINE),
        ServerConfig(Address("127.0.0.1", 3308), weight=1, state=AdminState.ONLINE),
    )


def test_ipv6_address_parses_and_prints_bracketed(tmp_path: Path) -> None:
    """A bracketed IPv6 literal parses to its bare host and prints back in brackets."""
    text = edit(MIDDLE, '"127.0.0.1:3307"', '"[::1]:3306"')
    server = load_text(tmp_path, text).pool[0].servers[1]
    assert server.address == Address("::1", 3306)
    assert str(server.address) == "[::1]:3306"
    assert str(addr("db.example:3306")) == "db.example:3306"


def test_ipv6_spellings_of_one_address_are_duplicates(tmp_path: Path) -> None:
    """Two spellings of the same IPv6 address in one pool are refused as a duplicate server."""
    text = edit(MIDDLE, '"127.0.0.1:3307"', '"[::1]:3306", "[0::1]:3306"')
    with pytest.raises(ConfigError, match=r"servers\[2\]: duplicate server \[::1\]:3306"):
        load_text(tmp_path, text)


def test_float_key_accepts_an_integer(tmp_path: Path) -> None:
    """A float key such as eject.backoff_s also accepts a TOML integer."""
    text = MIDDLE + "\n[pool.eject]\nconsecutive_failures = 5\nbackoff_s = 2\n"
    eject = load_text(tmp_path, text).pool[0].eject
    assert eject.consecutive_failures == 5
    assert eject.backoff_s == 2.0


def test_parse_from_memory_names_the_given_source() -> None:
    """config.parse reports errors against the source name it was given."""
    with pytest.raises(ConfigError) as info:
        config.parse({"node": {"name": "x", "role": "edge"}}, source="inline")
    assert info.value.source == "inline"
    assert str(info.value).startswith("inline: listener: ")


# --- errors: each names the file, the key path and the reason ------------------------------

ERROR_CASES: list[tuple[str, str, str, str]] = [
    # id, toml text, key path, fragment of the reason
    ("unknown-top-level", 'colour = "blue"\n' + EDGE, "colour", "unknown key"),
    ("unknown-in-node", edit(EDGE, 'role = "edge"\n', 'role = "edge"\nrloe = 1\n'), "node.rloe",
     "unknown key"),
    ("unknown-in-listener", edit(EDGE, 'bind = "127.0.0.1:6033"', 'bnd = "127.0.0.1:6033"'),
     "listener[0].bnd", "unknown key"),
    ("unknown-in-check", edit(MIDDLE, "rise = 2", "rize = 2"), "pool[0].check.rize",
     "unknown key"),
    ("unknown-in-server-table", edit(MIDDLE, '"127.0.0.1:3307"',
     '{address = "127.0.0.1:3307", wieght = 2}'), "pool[0].servers[1].wieght", "unknown key"),
    ("missing-node", edit(EDGE, '[node]\nname = "p1"\nrole = "edge"\n', ""), "node",
     "required key is missing"),
    ("missing-bind", edit(EDGE, 'bind = "127.0.0.1:6033"\n', ""), "listener[0].bind",
     "required key is missing"),
    ("string-for-int", edit(EDGE, 'upstream = "tier:middle"',
     'upstream = "tier:middle"\nmax_connections = "100"'), "listener[0].max_connections",
     "expected an integer, got a string"),
    ("int-for-string", edit(EDGE, 'name = "p1"', "name = 1"), "node.name",
     "expected a string, got an integer"),
    ("bool-for-int", edit(MIDDLE, "rise = 2", "rise = true"), "pool[0].check.rise",
     "expected an integer, got a boolean"),
    ("float-for-int", edit(MIDDLE, "interval_ms = 1000", "interval_ms = 1000.5"),
     "pool[0].check.interval_ms", "expected an integer, got a float"),
    ("int-for-bool", edit(MIDDLE, 'name = "main"', 'name = "main"\nclose_sessions_on_down = 1'),
     "pool[0].close_sessions_on_down", "expected true or false, got an integer"),
    ("bool-for-float", MIDDLE + "\n[pool.eject]\nbackoff_s = false\n", "pool[0].eject.backoff_s",
     "expected a float, got a boolean"),
    ("table-for-array", edit(EDGE, "[[listener]]", "[listener]"), "listener",
     "expected an array, got a table"),
    ("array-for-table", edit(EDGE, "[node]", "[[node]]"), "node",
     "expected a table, got an array"),
    ("int-for-server", edit(MIDDLE, '"127.0.0.1:3307"', "3307"), "pool[0].servers[1]",
     "expected a table, got an integer"),
    ("string-for-servers-array", edit(MIDDLE, 'servers = ["127.0.0.1:3306", "127.0.0.1:3307"]',
     'servers = "127.0.0.1:3306"'), "pool[0].servers", "expected an array, got a string"),
    ("int-for-address", edit(EDGE, 'bind = "127.0.0.1:6033"', "bind = 6033"), "listener[0].bind",
     "expected a string, got an integer"),
    ("address-without-port", edit(EDGE, '"127.0.0.1:6033"', '"127.0.0.1"'), "listener[0].bind",
     "host:port"),
    ("address-port-0", edit(EDGE, '"127.0.0.1:6033"', '"127.0.0.1:0"'), "listener[0].bind",
     "port must be 1-65535"),
    ("address-port-70000", edit(EDGE, '"127.0.0.1:6033"', '"127.0.0.1:70000"'),
     "listener[0].bind", "port must be 1-65535"),
    ("address-port-not-a-number", edit(EDGE, '"127.0.0.1:6033"', '"127.0.0.1:mysql"'),
     "listener[0].bind", "port must be 1-65535"),
    ("address-no-host", edit(EDGE, '"127.0.0.1:6033"', '":6033"'), "listener[0].bind",
     "host:port"),
    ("address-unbracketed-ipv6", edit(EDGE, '"127.0.0.1:6033"', '"::1:6033"'),
     "listener[0].bind", "must be bracketed"),
    ("address-unbalanced-bracket", edit(EDGE, '"127.0.0.1:6033"', '"[::1:6033"'),
     "listener[0].bind", "unbalanced brackets"),
    ("address-bad-server", edit(MIDDLE, '"127.0.0.1:3307"', '"127.0.0.1"'),
     "pool[0].servers[1].address", "host:port"),
    ("address-bad-mesh-bind", edit(MIDDLE, '"127.0.0.1:7001"', '"127.0.0.1:0"'),
     "node.mesh_bind", "port must be 1-65535"),
    ("bad-role", edit(EDGE, 'role = "edge"', 'role = "leaf"'), "node.role",
     "must be one of 'edge', 'middle', got 'leaf'"),
    ("bad-check-type", edit(MIDDLE, 'type = "mysql"', 'type = "http"'), "pool[0].check.type",
     "must be one of 'none', 'tcp', 'mysql', got 'http'"),
    ("bad-log-format", edit(EDGE, 'role = "edge"', 'role = "edge"\nlog_format = "xml"'),
     "node.log_format", "must be one of"),
    ("bad-server-state", edit(MIDDLE, '"127.0.0.1:3307"',
     '{address = "127.0.0.1:3307", state = "DRAINING"}'), "pool[0].servers[1].state",
     "must be one of ONLINE, OFFLINE_SOFT, OFFLINE_HARD, got 'DRAINING'"),
    ("bad-upstream-syntax", edit(EDGE, '"tier:middle"', '"middle"'), "listener[0].upstream",
     "expected 'pool:<name>' or 'tier:<name>'"),
    ("duplicate-listener", EDGE + '\n[[listener]]\nname = "mysql"\nbind = "127.0.0.1:6034"\n'
     'upstream = "tier:middle"\n', "listener[1].name", "duplicate name 'mysql'"),
    ("duplicate-service", MIDDLE + '\n[[service]]\nname = "mysql"\nupstream = "pool:main"\n',
     "service[1].name", "duplicate name 'mysql'"),
    ("duplicate-pool", MIDDLE + '\n[[pool]]\nname = "main"\nservers = ["127.0.0.1:3309"]\n',
     "pool[1].name", "duplicate name 'main'"),
    ("duplicate-tier", EDGE + '\n[[tier]]\nname = "middle"\nmembers = ["127.0.0.1:7009"]\n',
     "tier[1].name", "duplicate name 'middle'"),
    ("duplicate-server", edit(MIDDLE, '"127.0.0.1:3307"', '"127.0.0.1:3306"'),
     "pool[0].servers[1]", "duplicate server 127.0.0.1:3306"),
    ("duplicate-tier-member", edit(EDGE, '"127.0.0.1:7002"', '"127.0.0.1:7001"'),
     "tier[0].members[1]", "duplicate server 127.0.0.1:7001"),
    ("empty-pool", edit(MIDDLE, 'servers = ["127.0.0.1:3306", "127.0.0.1:3307"]', "servers = []"),
     "pool[0].servers", "needs at least one server"),
    ("listener-undefined-pool", edit(EDGE, '"tier:middle"', '"pool:main"'),
     "listener[0].upstream", "no pool named 'main' (defined: none)"),
    ("listener-undefined-tier", edit(EDGE, '"tier:middle"', '"tier:nowhere"'),
     "listener[0].upstream", "no tier named 'nowhere' (defined: middle)"),
    ("service-undefined-pool", edit(MIDDLE, '"pool:main"', '"pool:other"'),
     "service[0].upstream", "no pool named 'other' (defined: main)"),
    ("service-undefined-tier", edit(MIDDLE, '"pool:main"', '"tier:deeper"'),
     "service[0].upstream", "no tier named 'deeper'"),
    ("listener-bind-clashes-mesh-bind", edit(MIDDLE, "[[service]]", '[[listener]]\nname = "l"\n'
     'bind = "127.0.0.1:7001"\nupstream = "pool:main"\n\n[[service]]'), "listener[0].bind",
     "already bound by node.mesh_bind"),
    ("middle-without-mesh-bind", edit(MIDDLE, 'mesh_bind = "127.0.0.1:7001"\n', ""),
     "node.mesh_bind", "a middle needs a mesh port"),
    ("middle-without-services", edit(MIDDLE, '[[service]]\nname = "mysql"\n'
     'upstream = "pool:main"\n', ""), "service", "a middle needs at least one [[service]]"),
    ("edge-without-listeners", edit(EDGE, '[[listener]]\nname = "mysql"\n'
     'bind = "127.0.0.1:6033"\nupstream = "tier:middle"\n', ""), "listener",
     "an edge needs at least one [[listener]]"),
    ("mysql-check-without-user", edit(MIDDLE, 'user = "monitor"\n', ""), "pool[0].check.user",
     "a mysql check needs a monitor user"),
    ("check-timeout-equals-interval", edit(MIDDLE, "timeout_ms = 500", "timeout_ms = 1000"),
     "pool[0].check.timeout_ms", "must be shorter than interval_ms"),
    ("check-timeout-above-interval", edit(MIDDLE, "timeout_ms = 500", "timeout_ms = 5000"),
     "pool[0].check.timeout_ms", "must be shorter than interval_ms"),
    ("tier-mysql-check", EDGE + '\n[tier.check]\ntype = "mysql"\nuser = "monitor"\n',
     "tier[0].check.type", "use 'tcp'"),
    ("below-minimum-rise", edit(MIDDLE, "rise = 2", "rise = 0"), "pool[0].check.rise",
     "must be at least 1, got 0"),
    ("below-minimum-interval", edit(MIDDLE, "interval_ms = 1000", "interval_ms = 5"),
     "pool[0].check.interval_ms", "must be at least 10, got 5"),
    ("below-minimum-weight", edit(MIDDLE, '"127.0.0.1:3307"',
     '{address = "127.0.0.1:3307", weight = 0}'), "pool[0].servers[1].weight",
     "must be at least 1, got 0"),
    ("below-minimum-max-hops", edit(EDGE, 'role = "edge"', 'role = "edge"\nmax_hops = 0'),
     "node.max_hops", "must be at least 1, got 0"),
    ("below-minimum-backoff", MIDDLE + "\n[pool.eject]\nbackoff_s = -1.5\n",
     "pool[0].eject.backoff_s", "must be at least 0, got -1.5"),
    ("below-minimum-timeout", "[timeouts]\nconnect_ms = 0\n\n" + EDGE, "timeouts.connect_ms",
     "must be at least 1, got 0"),
    ("connect-budget-below-connect", "[timeouts]\nconnect_ms = 2000\nconnect_budget_ms = 1000\n\n"
     + EDGE, "timeouts.connect_budget_ms", "must be at least timeouts.connect_ms (2000)"),
    ("backoff-nan", MIDDLE + "\n[pool.eject]\nbackoff_s = nan\n", "pool[0].eject.backoff_s",
     "must be a finite number"),
    ("backoff-inf", MIDDLE + "\n[pool.eject]\nbackoff_s = inf\n", "pool[0].eject.backoff_s",
     "must be a finite number"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [pytest.param(text, key, reason, id=case_id) for case_id, text, key, reason in ERROR_CASES],
)
def test_config_error_names_file_key_and_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    """Each invalid config is refused with a ConfigError naming the file, key path and reason."""
    error = load_error(tmp_path, text)
    source = str(tmp_path / "node.toml")
    assert error.source == source
    assert error.key == key
    assert reason in error.reason
    assert str(error) == f"{source}: {key}: {error.reason}"


def test_unknown_key_lists_the_known_keys(tmp_path: Path) -> None:
    """An unknown-key error tells the user which keys are valid at that place."""
    error = load_error(tmp_path, edit(EDGE, 'role = "edge"\n', 'role = "edge"\nrloe = 1\n'))
    assert "name" in error.reason
    assert "role" in error.reason
    assert "mesh_bind" in error.reason


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    """A file that is not TOML is refused with the file name and 'invalid TOML'."""
    error = load_error(tmp_path, EDGE + "\nthis is = = not toml\n")
    source = str(tmp_path / "node.toml")
    assert error.source == source
    assert error.key == ""
    assert "invalid TOML" in error.reason
    assert str(error).startswith(f"{source}: invalid TOML")


def test_file_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """A file that is not UTF-8 is refused with the file name and the reason."""
    path = tmp_path / "node.toml"
    path.write_bytes(b'[node]\nname = "\xff\xfe"\n')
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.source == str(path)
    assert "not valid UTF-8" in str(info.value)


@pytest.mark.parametrize("name", ["missing.toml", "."])
def test_unreadable_file_is_a_config_error(tmp_path: Path, name: str) -> None:
    """A missing file or a directory is refused with the path and the OS reason."""
    path = tmp_path / name
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: cannot read file: ")


def test_environment_references_are_expanded_in_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``${NAME}`` in a config file's strings becomes that environment variable, in
    tables and arrays alike, and ``$${NAME}`` stays literal."""
    monkeypatch.setenv("POD_NAME", "edge-7f9c")
    monkeypatch.setenv("MIDDLE_PORT", "7002")
    text = edit(EDGE, 'name = "p1"', 'name = "${POD_NAME}"')
    text = edit(text, '"127.0.0.1:7002"', '"127.0.0.1:${MIDDLE_PORT}"')
    text = edit(text, 'name = "mysql"', 'name = "my$${SQL}"')
    cfg = load_text(tmp_path, text)
    assert cfg.node.name == "edge-7f9c"
    assert cfg.tier[0].members[1].address == addr("127.0.0.1:7002")
    assert cfg.listener[0].name == "my${SQL}"


def test_an_unset_environment_reference_names_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reference to an unset variable is a ConfigError naming the key that holds it."""
    monkeypatch.delenv("MESHPROXY_UNSET_FOR_TEST", raising=False)
    text = edit(EDGE, '"127.0.0.1:7002"', '"${MESHPROXY_UNSET_FOR_TEST}:7002"')
    error = load_error(tmp_path, text)
    assert error.key == "tier[0].members[1]"
    assert error.reason == "environment variable MESHPROXY_UNSET_FOR_TEST is not set"
