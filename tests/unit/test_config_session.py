"""Session mode's configuration: modes, logins, pool connections, and their errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from meshproxy import config
from meshproxy.config import UpstreamKind
from meshproxy.errors import ConfigError

BASE = """
[node]
name = "s1"
role = "edge"

[[listener]]
name = "mysql"
bind = "127.0.0.1:3306"
upstream = "pool:main"
mode = "session"

[[pool]]
name = "main"
servers = ["127.0.0.1:3307"]

[[user]]
name = "app"
password = "app"
"""


def parse(text: str) -> config.Config:
    return config.parse(tomllib.loads(text), "node.toml")


def refused(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    return caught.value


def test_a_session_mode_node_parses_with_its_defaults() -> None:
    """A session-mode listener, a login and a pool parse; connections take their defaults."""
    cfg = parse(BASE)
    assert cfg.listener[0].mode == "session"
    assert cfg.listener[0].upstream.kind is UpstreamKind.POOL
    connections = cfg.pool[0].connections
    assert (connections.idle, connections.max_per_server) == (4, 64)
    assert connections.checkout_timeout_ms == 3000
    assert cfg.user[0].auth_plugin == ""
    assert cfg.user[0].max_connections == 10000


@pytest.mark.parametrize(
    ("change", "key", "reason"),
    [
        (
            ('mode = "session"', 'mode = "session"\nprotocol = "tcp"'),
            "listener[0].mode",
            "protocol = 'mysql'",
        ),
        (('[[user]]\nname = "app"\npassword = "app"', ""), "user", "at least one [[user]]"),
        (('password = "app"', 'password = "app"\npool = "nope"'), "user[0].pool", "no pool"),
        (('password = "app"', 'password = "*1234"'), "user[0].password", "40 hexadecimal"),
        (
            (
                'password = "app"',
                'password = "*' + "A" * 40 + '"\nauth_plugin = "caching_sha2_password"',
            ),
            "user[0].auth_plugin",
            "clear password",
        ),
        (
            ('password = "app"', 'password = "app"\npassword_env = "X"'),
            "user[0].password_env",
            "not both",
        ),
        (
            ('password = "app"', 'password = "app"\nauth_plugin = "dialog"'),
            "user[0].auth_plugin",
            "must be one of",
        ),
        (
            ('mode = "session"', 'mode = "session"\ntls_cert = "c.pem"'),
            "listener[0].tls_key",
            "go together",
        ),
        (('mode = "session"', 'mode = "sessions"'), "listener[0].mode", "must be one of"),
        (
            (
                'servers = ["127.0.0.1:3307"]',
                'servers = ["127.0.0.1:3307"]\n[pool.connections]\nmax_per_server = 0',
            ),
            "pool[0].connections.max_per_server",
            "at least 1",
        ),
        (
            (
                'servers = ["127.0.0.1:3307"]',
                'servers = ["127.0.0.1:3307"]\n[pool.connections]\nidle_count = 3',
            ),
            "pool[0].connections.idle_count",
            "unknown key",
        ),
        (
            ('[[user]]\nname = "app"', '[[user]]\nname = "app"\n[[user]]\nname = "app"'),
            "user[1].name",
            "duplicate name",
        ),
    ],
)
def test_every_session_config_error_names_its_key(
    change: tuple[str, str], key: str, reason: str
) -> None:
    """Each kind of session-mode mistake is refused with the key path that holds it."""
    old, new = change
    assert old in BASE
    error = refused(BASE.replace(old, new, 1))
    assert error.key == key
    assert reason in error.reason


def test_tls_on_a_passthrough_listener_is_refused() -> None:
    """TLS to clients needs session mode: a passthrough listener never sees the handshake."""
    text = BASE.replace('mode = "session"', 'tls_cert = "c.pem"\ntls_key = "k.pem"')
    error = refused(text)
    assert error.key == "listener[0].tls_cert"


def test_session_mode_in_front_of_a_tier_is_taken_unless_a_pool_has_its_name() -> None:
    """An edge may own its sessions in front of a tier of middles; that tier may not share
    its name with a pool (session mode keeps its connections by group name)."""
    text = BASE.replace('upstream = "pool:main"', 'upstream = "tier:middle"')
    text += '\n[[tier]]\nname = "middle"\nmembers = ["127.0.0.1:7000"]\n'
    text += "\n[tier.connections]\nidle = 2\n"
    assert parse(text).tier[0].connections.idle == 2
    error = refused(text.replace('"middle"', '"main"').replace("tier:middle", "tier:main"))
    assert error.key == "listener[0].upstream"
    assert "share its name with a pool" in error.reason


def test_a_password_from_an_unset_environment_variable_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A login whose password_env is not set is a config error, never an empty password."""
    monkeypatch.delenv("MESHPROXY_TEST_PW", raising=False)
    text = BASE.replace('password = "app"', 'password_env = "MESHPROXY_TEST_PW"')
    error = refused(text)
    assert error.key == "user[0].password_env"
    monkeypatch.setenv("MESHPROXY_TEST_PW", "app")
    assert parse(text).user[0].secret() == "app"


def test_backend_tls_keys(tmp_path: Path) -> None:
    """connections.tls takes off, on or verify; an unreadable or non-PEM tls_ca is named."""
    cfg = parse(BASE + '[pool.connections]\ntls = "verify"\n')
    assert (cfg.pool[0].connections.tls, cfg.pool[0].connections.tls_ca) == ("verify", "")
    assert refused(BASE + '[pool.connections]\ntls = "maybe"\n').key == "pool[0].connections.tls"
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    for path in (bad, tmp_path / "missing.pem"):
        text = BASE + f'[pool.connections]\ntls = "verify"\ntls_ca = "{path}"\n'
        assert refused(text).key == "pool[0].connections.tls_ca"
