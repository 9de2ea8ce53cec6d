"""Which servers' sessions a pool or tier ends when it publishes new members."""

from __future__ import annotations

from meshproxy.config import (
    Address,
    AdminState,
    CheckConfig,
    EjectConfig,
    ServerConfig,
    UpstreamKind,
    UpstreamRef,
)
from meshproxy.control.group import Group

A, B, C = (Address("127.0.0.1", port) for port in (7002, 7003, 7004))


def group(*, close_sessions_on_down: bool, hard: Address | None = None) -> Group:
    """A tier of A, B and C, all ONLINE but ``hard`` (OFFLINE_HARD)."""
    tier = Group(UpstreamRef(UpstreamKind.TIER, "middle"))
    servers = tuple(
        ServerConfig(a, state=AdminState.OFFLINE_HARD if a == hard else AdminState.ONLINE)
        for a in (A, B, C)
    )
    tier.configure(servers, CheckConfig(), EjectConfig(), close_sessions_on_down, "")
    return tier


def test_failing_members_end_their_sessions_once() -> None:
    """A member gossip rules out as failing has its sessions ended when it is first ruled
    out, not again while it stays out, and again if it fails after coming back."""
    tier = group(close_sessions_on_down=True)
    assert tier.newly_ended() == frozenset()
    tier.blocked, tier.failed = {B: "gossip: p3 dead"}, frozenset({B})
    tier.publish()
    assert tier.newly_ended() == {B}
    assert tier.newly_ended() == frozenset()
    tier.blocked, tier.failed = {}, frozenset()
    tier.publish()
    assert tier.newly_ended() == frozenset()
    tier.blocked, tier.failed = {B: "gossip: p3 dead"}, frozenset({B})
    tier.publish()
    assert tier.newly_ended() == {B}


def test_a_dead_member_gossip_dropped_ends_its_sessions() -> None:
    """A failing member that is no longer in the group at all (dead) still has its sessions
    ended: they are open on the data planes whatever the members say."""
    tier = group(close_sessions_on_down=True)
    tier.failed = frozenset({C})
    tier.configure((ServerConfig(A), ServerConfig(B)), CheckConfig(), EjectConfig(), True, "")
    assert tier.newly_ended() == {C}


def fail_checks(tier: Group, address: Address) -> None:
    """Fail the server's checks until its own health makes it SHUNNED."""
    for _ in range(tier.check.fall):
        tier.health[address].check_result(False, "refused", 0.0)
    tier.publish()


def test_a_member_its_checks_shun_ends_its_sessions() -> None:
    """A member whose own checks fail (cut off from this edge) has its sessions ended."""
    tier = group(close_sessions_on_down=True)
    fail_checks(tier, A)
    assert tier.newly_ended() == {A}


def test_draining_and_suspect_members_keep_their_sessions() -> None:
    """A draining member keeps its sessions even when its checks fail (it closed its
    listener and ends its sessions itself), and so does a suspect one, which may refute."""
    tier = group(close_sessions_on_down=True)
    tier.blocked = {A: "gossip: p2 draining", B: "gossip: p3 suspect"}
    tier.draining = frozenset({A})
    fail_checks(tier, A)
    assert tier.newly_ended() == frozenset()


def test_without_close_sessions_on_down_only_offline_hard_ends_sessions() -> None:
    """Without close_sessions_on_down a failing member keeps its sessions, while an operator's
    OFFLINE_HARD ends them either way."""
    tier = group(close_sessions_on_down=False, hard=C)
    tier.blocked, tier.failed = {B: "gossip: p3 dead"}, frozenset({B})
    tier.publish()
    assert tier.newly_ended() == {C}
