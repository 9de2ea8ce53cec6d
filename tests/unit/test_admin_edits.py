"""Pure edits behind the admin API, and the config's plain-data round trip they rely on."""

from __future__ import annotations

from typing import Any

import pytest

from meshproxy import config
from meshproxy.admin import edits
from meshproxy.cli.ctl import _assignments
from meshproxy.errors import ConfigError

DOC: dict[str, Any] = {
    "node": {"name": "p2", "role": "middle", "mesh_bind": "127.0.0.1:7001"},
    "service": [{"name": "mysql", "upstream": "pool:main"}],
    "pool": [{"name": "main", "servers": ["127.0.0.1:3306", "[::1]:3307"]}],
}


def test_config_round_trips_through_plain_data() -> None:
    """to_dict of a parsed config parses back to an equal config."""
    parsed = config.parse(DOC, "x")
    assert config.parse(config.to_dict(parsed), "x") == parsed


def test_merge_patch_merges_tables_replaces_values_and_deletes_on_null() -> None:
    """RFC 7386: nested tables merge, scalars and arrays replace, null removes the key."""
    target = {"a": {"b": 1, "c": 2}, "d": [1], "e": 1}
    patch = {"a": {"b": 5, "c": None}, "d": [2, 3], "f": {"g": 1}, "e": None}
    assert edits.merge_patch(target, patch) == {"a": {"b": 5}, "d": [2, 3], "f": {"g": 1}}
    assert target == {"a": {"b": 1, "c": 2}, "d": [1], "e": 1}


def test_member_edits_find_servers_by_any_spelling_of_their_address() -> None:
    """A server is found whatever spelling of its address the request uses."""
    doc = edits.patch_member(DOC, "pool", "main", "[0::1]:3307", {"weight": 4})
    servers = doc["pool"][0]["servers"]
    assert servers[1] == {"address": "[::1]:3307", "weight": 4}
    doc = edits.remove_member(doc, "pool", "main", "127.0.0.1:3306")
    assert [s["address"] for s in doc["pool"][0]["servers"]] == ["[::1]:3307"]
    assert DOC["pool"][0]["servers"] == ["127.0.0.1:3306", "[::1]:3307"]


def test_adding_a_server_yields_a_config_that_parses() -> None:
    """An added server appears in the parsed config with its weight and state."""
    doc = edits.add_member(
        DOC, "pool", "main", {"address": "127.0.0.1:3308", "weight": 2, "state": "OFFLINE_SOFT"}
    )
    server = config.parse(doc, "x").pool[0].servers[2]
    assert (str(server.address), server.weight, server.state) == (
        "127.0.0.1:3308",
        2,
        "OFFLINE_SOFT",
    )


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: edits.patch_member(DOC, "pool", "nope", "127.0.0.1:3306", {}), edits.NotFound),
        (lambda: edits.remove_member(DOC, "pool", "main", "127.0.0.1:9"), edits.NotFound),
        (lambda: edits.remove_member(DOC, "pool", "main", "not-an-address"), edits.BadEdit),
        (lambda: edits.patch_item(DOC, "listener", "x", {}), edits.NotFound),
    ],
)
def test_edits_of_missing_things_are_refused(call: Any, error: type[Exception]) -> None:
    """Naming a pool, server or listener that does not exist raises NotFound (or BadEdit)."""
    with pytest.raises(error):
        call()


def test_an_edit_with_an_unknown_field_is_refused_by_validation() -> None:
    """An unknown field smuggled in through an edit fails config validation with its path."""
    doc = edits.patch_item(DOC, "pool", "main", {"colour": "blue"})
    with pytest.raises(ConfigError, match=r"pool\[0\]\.colour: unknown key"):
        config.parse(doc, "admin API")


def test_ctl_assignments_build_nested_typed_values() -> None:
    """KEY=VALUE pairs become nested tables with TOML-typed values, bare words as strings."""
    assert _assignments(["timeouts.connect_ms=500", "node.log_level=debug", "a.b.c=true"]) == {
        "timeouts": {"connect_ms": 500},
        "node": {"log_level": "debug"},
        "a": {"b": {"c": True}},
    }
