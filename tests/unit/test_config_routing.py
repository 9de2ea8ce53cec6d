"""Routing's configuration: replication pools, query rules, cache and digests, and errors."""

from __future__ import annotations

import pytest

from meshproxy.dataplane.sessionmode import counts_digests
from meshproxy.errors import ConfigError
from tests.unit.test_config_session import BASE as SESSION_BASE
from tests.unit.test_config_session import parse

# The session-mode node of the session config tests, its pool replicated, and one more.
BASE = SESSION_BASE.replace(
    'servers = ["127.0.0.1:3307"]',
    'servers = ["127.0.0.1:3307", "127.0.0.1:3308"]\n'
    'check = { type = "mysql", user = "monitor", password = "monitor" }\n'
    "replication.enabled = true\n\n"
    '[[pool]]\nname = "other"\nservers = ["127.0.0.1:3309"]',
)


def test_routing_defaults() -> None:
    """A replication pool, no rules, a 64 MiB cache and digests counted (on a node whose
    statements run on a pool) are the defaults."""
    cfg = parse(BASE)
    replication = cfg.pool[0].replication
    assert (replication.enabled, replication.read_your_writes) == (True, "gtid")
    assert (replication.max_lag_s, replication.gtid_wait_ms) == (10.0, 250)
    assert replication.writer_reads == "fallback"
    assert not cfg.pool[1].replication.enabled
    assert cfg.query_rule == ()
    assert (cfg.query_cache.max_mib, cfg.digests.top_n) == (64, 50)
    assert counts_digests(cfg)


def test_an_edge_whose_statements_all_go_to_middles_leaves_digests_to_them() -> None:
    """Unset, ``digests.enabled`` counts where statements run on servers: not on an edge
    whose session-mode listeners all lead to tiers, unless set there."""
    edge = SESSION_BASE.replace('upstream = "pool:main"', 'upstream = "tier:middle"')
    edge += '\n[[tier]]\nname = "middle"\nmembers = ["127.0.0.1:7000"]\n'
    assert not counts_digests(parse(edge))
    assert counts_digests(parse(edge + "\n[digests]\nenabled = true\n"))
    assert not counts_digests(parse(SESSION_BASE + "\n[digests]\nenabled = false\n"))


def test_rules_parse_in_order() -> None:
    """Query rules keep their file order and every action key."""
    cfg = parse(
        BASE
        + """
[[query_rule]]
name = "firewall"
match_digest = "^DROP"
error = "not here"

[[query_rule]]
match_pattern = "^SELECT .* FOR UPDATE"
route = "writer"
multiplex = false
statement_timeout_ms = 2000
then = "continue"
"""
    )
    first, second = cfg.query_rule
    assert (first.name, first.error, second.route, second.multiplex) == (
        "firewall",
        "not here",
        "writer",
        False,
    )
    assert (second.statement_timeout_ms, second.then) == (2000, "continue")


@pytest.mark.parametrize(
    ("extra", "key", "reason"),
    [
        ('[[query_rule]]\nmatch_pattern = "(("', "query_rule[0].match_pattern", "regular"),
        ('[[query_rule]]\nmatch_digest = "[a"', "query_rule[0].match_digest", "regular"),
        ('[[query_rule]]\nclient = "10.0.0.0/33"', "query_rule[0].client", "network"),
        ('[[query_rule]]\npool = "nope"', "query_rule[0].pool", "no pool named 'nope'"),
        ('[[query_rule]]\nmirror = "nope"', "query_rule[0].mirror", "no pool named 'nope'"),
        ('[[query_rule]]\nlistener = "x"', "query_rule[0].listener", "no listener"),
        ('[[query_rule]]\nrewrite = "x"', "query_rule[0].rewrite", "match_pattern"),
        (
            '[[query_rule]]\npool = "other"\nroute = "reader"',
            "query_rule[0].route",
            "no writer and readers",
        ),
        ('[[query_rule]]\nroute = "primary"', "query_rule[0].route", "writer"),
        ('[[query_rule]]\nthen = "goto"', "query_rule[0].then", "stop"),
        ("[[query_rule]]\ncache_ttl_ms = -1", "query_rule[0].cache_ttl_ms", "at least 0"),
        ('[[query_rule]]\nname = "a"\n[[query_rule]]\nname = "a"', "query_rule[1].name", "twice"),
        ("[query_cache]\nmax_entry_kib = 0", "query_cache.max_entry_kib", "at least 1"),
        ("[digests]\ntop_n = 0", "digests.top_n", "at least 1"),
    ],
)
def test_routing_errors_name_their_key(extra: str, key: str, reason: str) -> None:
    """Every routing config error names its key path and why."""
    with pytest.raises(ConfigError) as caught:
        parse(BASE + extra)
    assert caught.value.key == key
    assert reason in caught.value.reason


def test_replication_needs_mysql_checks() -> None:
    """A replication pool without mysql checks is refused: roles come from read_only."""
    text = BASE.replace('check = { type = "mysql", user = "monitor", password = "monitor" }\n', "")
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert caught.value.key == "pool[0].replication.enabled"


def test_lag_and_read_your_writes_keys_are_checked() -> None:
    """read_your_writes takes only its three modes."""
    with pytest.raises(ConfigError) as caught:
        parse(
            BASE.replace("replication.enabled = true", 'replication = { read_your_writes = "x" }')
        )
    assert caught.value.key == "pool[0].replication.read_your_writes"
