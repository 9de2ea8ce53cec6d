"""Replicated pools: roles and lag from check results, and which servers a side may use."""

from __future__ import annotations

from meshproxy.config import Address, ReplicationConfig, ServerConfig, UpstreamKind, UpstreamRef
from meshproxy.control.group import Group
from meshproxy.dataplane.router import Member, Role
from meshproxy.dataplane.routing import Gtid
from meshproxy.dataplane.sessionmode import _of_side
from meshproxy.health.checks import CheckResult
from meshproxy.health.state import ServerState

A, B, C = (Address("10.0.0.1", p) for p in (3306, 3307, 3308))


def group() -> Group:
    g = Group(UpstreamRef(UpstreamKind.POOL, "main"))
    g.replication = ReplicationConfig(enabled=True, max_lag_s=5)
    g.configure(
        tuple(ServerConfig(a) for a in (A, B, C)),
        g.check,
        g.eject,
        close_sessions_on_down=False,
        source_ip="",
    )
    return g


def seen(read_only: bool, replica: bool = False, lag: float | None = None) -> CheckResult:
    return CheckResult(True, "", read_only, replica, lag)


def test_roles_follow_read_only_and_lag_shuns_readers() -> None:
    """read_only makes a reader, its absence the writer; a reader past max_lag_s or not
    replicating routes as SHUNNED, and is back once within the bound."""
    g = group()
    assert g.replication_seen(A, seen(False)) == "unknown -> writer"
    assert g.replication_seen(B, seen(True, True, 1.0)) == "unknown -> reader"
    assert g.replication_seen(C, seen(True, True, None)) == (
        "unknown -> reader, lagging (replication stopped)"
    )
    g.publish()
    states = {m.address: (m.role, m.state) for m in g.members}
    assert states == {
        A: (Role.WRITER, ServerState.ONLINE),
        B: (Role.READER, ServerState.ONLINE),
        C: (Role.READER, ServerState.SHUNNED),
    }
    assert g.replication_seen(B, seen(True, True, 9.0)) == "lagging (lag 9 s > max_lag_s 5)"
    assert g.replication_seen(C, seen(True, True, 0.0)) == "caught up"
    assert g.replication_seen(C, seen(True, True, 0.0)) is None


def test_a_failed_check_changes_no_role() -> None:
    """A check that fails leaves the server's side as it was (its health shuns it)."""
    g = group()
    g.replication_seen(A, seen(False))
    assert g.replication_seen(A, CheckResult(False, "timed out")) is None
    assert g.roles[A] == Role.WRITER


def test_a_promotion_swaps_the_sides() -> None:
    """The old writer turned read_only and a reader turned writable swap roles."""
    g = group()
    g.replication_seen(A, seen(False))
    g.replication_seen(B, seen(True, True, 0.0))
    assert g.replication_seen(A, seen(True, True, 0.0)) == "writer -> reader"
    assert g.replication_seen(B, seen(False)) == "reader -> writer"


def member(address: Address, role: str, state: ServerState = ServerState.ONLINE) -> Member:
    return Member(address, 1, state, role)


def test_sides_and_their_fallbacks() -> None:
    """Writes take the writer (else an unchecked server); reads take ONLINE readers, then
    the writer as writer_reads allows."""
    members = (member(A, Role.WRITER), member(B, Role.READER), member(C, Role.READER))
    assert _of_side(members, Role.WRITER, "fallback", ()) == (members[0],)
    assert _of_side(members, Role.READER, "fallback", ()) == members[1:]
    assert _of_side(members, Role.READER, "always", ()) == (*members[1:], members[0])
    down = (members[0], member(B, Role.READER, ServerState.SHUNNED))
    assert _of_side(down, Role.READER, "fallback", ()) == (members[0],)
    assert _of_side(down, Role.READER, "never", ()) == ()
    fresh = (member(A, Role.ANY), member(B, Role.ANY))
    assert _of_side(fresh, Role.WRITER, "fallback", ()) == fresh
    assert _of_side(members, Role.READER, "fallback", (B, C)) == (members[0],)


def test_gtids_parse_and_order_within_a_domain() -> None:
    """A MariaDB GTID parses into domain and sequence; anything else is no GTID."""
    gtid = Gtid.parse("0-1-42\n")
    assert gtid is not None
    assert (gtid.text, gtid.domain, gtid.sequence) == ("0-1-42", 0, 42)
    for text in ("", "0-1", "a-b-c", "0-1-2-3", "0-1-2,1-1-3"):
        assert Gtid.parse(text) is None
