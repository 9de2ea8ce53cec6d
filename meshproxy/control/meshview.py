"""What gossip means for routing, as pure functions: no sockets, no clocks.

* ``local_meta``: the metadata this node publishes (role, tier, mesh address, per service
  its healthy and total backends and which are down, draining, active connections), fitted
  into the size an alive message allows.
* ``tier_routing``: which members an edge's ``[[tier]]`` has, and which of them gossip
  rules out and why, from the gossip view and the static config.
* ``member_rows`` / ``format_members``: the ``GET /members`` document and its table.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from meshproxy.config import Address, Config, ServerConfig, TierConfig, UpstreamKind, UpstreamRef
from meshproxy.gossip import wire
from meshproxy.gossip.commands import Member
from meshproxy.gossip.messages import Alive, NodeMeta, ServiceHealth, State
from meshproxy.health.state import ServerState

MIDDLE = "middle"


# ---- this node's metadata --------------------------------------------------------------


def mesh_address(config: Config) -> str:
    """Where other nodes dial this node's mesh port, or "" when it has none."""
    mesh = config.node.mesh_advertise or config.node.mesh_bind
    return str(mesh) if mesh is not None else ""


def service_health(name: str, states: Iterable[tuple[str, ServerState]]) -> ServiceHealth:
    """Healthy (ONLINE) and total members of one service's upstream; the SHUNNED ones down.

    Servers an operator took offline count in the total but are not reported down: they are
    not failing, and the other middles have nothing to re-check.
    """
    rows = list(states)
    healthy = sum(1 for _, state in rows if state is ServerState.ONLINE)
    down = tuple(address for address, state in rows if state is ServerState.SHUNNED)
    return ServiceHealth(name, healthy, len(rows), down)


def local_meta(
    config: Config,
    upstream_states: Mapping[UpstreamRef, Sequence[tuple[str, ServerState]]],
    *,
    draining: bool,
    active_connections: int,
    writers: Sequence[str] = (),
) -> NodeMeta:
    """This node's gossip metadata, trimmed to fit in one alive message."""
    services = tuple(
        service_health(service.name, upstream_states.get(service.upstream, ()))
        for service in config.service
    )
    meta = NodeMeta(
        role=config.node.role,
        tier=config.node.tier,
        services=services,
        active_connections=max(0, active_connections),
        draining=draining,
        mesh=mesh_address(config),
        writers=tuple(writers)[: wire.MAX_DOWN_BACKENDS],
    )
    return fit(meta, config.node.name)


def _alive_size(meta: NodeMeta, name: str) -> int:
    # Worst-case address and counters, so that a fit today still fits after a refutation.
    alive = Alive(name, wire.MAX_INT, ("[" + "f" * 39 + "]", 65535), wire.MAX_INT, meta)
    return wire.message_size(alive)


def fit(meta: NodeMeta, name: str) -> NodeMeta:
    """``meta`` with the fewest down-backend names (then services) dropped to fit the limit.

    Counts are never dropped while names are: the other middles then re-check fewer
    backends early, which only costs them their normal check interval.
    """
    meta = replace(
        meta,
        services=tuple(
            replace(s, down=s.down[: wire.MAX_DOWN_BACKENDS])
            for s in meta.services[: wire.MAX_SERVICES]
        ),
    )
    while _alive_size(meta, name) > wire.MAX_ALIVE_BYTES:
        longest = max(meta.services, key=lambda s: len(s.down), default=None)
        if longest is not None and longest.down:
            services = tuple(
                replace(s, down=s.down[:-1]) if s is longest else s for s in meta.services
            )
        elif meta.services:
            services = meta.services[:-1]
        else:
            return replace(meta, tier=meta.tier[:32], mesh=meta.mesh[:64])
        meta = replace(meta, services=services)
    return meta


# ---- routing on gossip -----------------------------------------------------------------


def tier_services(config: Config, tier: str) -> frozenset[str]:
    """The services this node sends through ``tier``: what its members must offer."""
    ref = UpstreamRef(UpstreamKind.TIER, tier)
    names = {listener.service for listener in config.listener if listener.upstream == ref}
    names |= {service.name for service in config.service if service.upstream == ref}
    return frozenset(names)


def ineligible(member: Member, services: Collection[str]) -> str | None:
    """Why gossip rules this tier member out for new connections; None if it does not."""
    meta = member.meta
    if member.state is not State.ALIVE:
        return f"gossip: {member.name} {member.state}"
    if meta.draining:
        return f"gossip: {member.name} draining"
    offered = {s.name: s for s in meta.services}
    for name in sorted(services):
        health = offered.get(name)
        if health is None:
            return f"gossip: {member.name} does not offer service {name}"
        if health.healthy < 1:
            return f"gossip: {member.name} has no healthy backend for {name}"
    return None


@dataclass(frozen=True)
class TierRouting:
    """One tier's members as gossip and the config make them, for the control plane."""

    mode: str  # "static" (gossip knows no member yet), "gossip", or "fail-open"
    servers: tuple[ServerConfig, ...]
    blocked: dict[Address, str]  # members present but ruled out, with the reason
    names: dict[Address, str]  # gossip name of each member's mesh address
    gone: dict[Address, str]  # gossip members not in the set (dead, left), with the reason
    # Members ruled out on a confirmed failure (dead, no healthy backend), not because they
    # drain or left: nothing on their side will end the sessions still open on them. A
    # suspect is not failed yet: suspicion is often refuted within a probe interval (a busy
    # or briefly stalled node), and ending sessions cannot be undone, while avoiding it for
    # new sessions can; its sessions end when it is declared dead, within the bound.
    failed: frozenset[Address] = frozenset()
    draining: frozenset[Address] = frozenset()  # members that announce they drain


def _mesh(member: Member) -> Address | None:
    try:
        return Address.parse(member.meta.mesh) if member.meta.mesh else None
    except ValueError:
        return None


def tier_routing(
    tier: TierConfig, members: Iterable[Member], services: Collection[str], self_name: str
) -> TierRouting:
    """The members of an edge's tier and the gossip verdict on each.

    Gossip decides membership: the middles whose metadata names this tier. Static
    ``members`` bootstrap routing until gossip knows any middle of the tier, and lend their
    weight and admin state to the gossip member at the same mesh address. A middle that is
    dead or has left is dropped; one that is suspect, draining or has no healthy backend for
    a service we route through the tier stays (its health history kept) but is ruled out.
    When gossip rules out every member, none is ruled out (fail open): the edge's own
    passive view decides, so a gossip outage on this node never stops all traffic.
    """
    static = {server.address: server for server in tier.members}
    found: dict[Address, Member] = {}
    for member in members:
        if member.name == self_name or member.meta.role != MIDDLE or member.meta.tier != tier.name:
            continue
        address = _mesh(member)
        if address is None:
            continue
        known = found.get(address)
        # Two names at one address: a restarted node under a new name; the live one wins.
        if known is None or _rank(member) > _rank(known):
            found[address] = member
    if not found:
        return TierRouting("static", tier.members, {}, {}, {})
    present = {a: m for a, m in found.items() if m.state in (State.ALIVE, State.SUSPECT)}
    gone = {a: f"gossip: {m.name} {m.state}" for a, m in found.items() if a not in present}
    blocked = {
        address: reason
        for address, member in present.items()
        if (reason := ineligible(member, services)) is not None
    }
    names = {address: member.name for address, member in found.items()}
    mode = "gossip"
    if len(blocked) == len(present):
        mode, blocked = "fail-open", {}
        # Nobody passes: every middle gossip knows is worth a try, and the static ones.
        present = {a: m for a, m in found.items() if m.state is not State.LEFT}
        gone = {a: r for a, r in gone.items() if a not in present}
    servers = [static.get(address, ServerConfig(address)) for address in sorted(present)]
    failed: frozenset[Address] = frozenset()
    if mode == "fail-open":
        servers += [s for a, s in static.items() if a not in present]
    else:
        failed = frozenset(
            address
            for address, member in found.items()
            if member.state is State.DEAD
            or (member.state is State.ALIVE and address in blocked and not member.meta.draining)
        )
    draining = frozenset(a for a, m in present.items() if m.meta.draining)
    return TierRouting(mode, tuple(servers), blocked, names, gone, failed, draining)


def _rank(member: Member) -> tuple[int, int]:
    live = member.state in (State.ALIVE, State.SUSPECT)
    return (int(live), member.incarnation)


# ---- the members table -----------------------------------------------------------------


def member_row(member: Member, changed_at: float) -> dict[str, Any]:
    """One member as ``GET /members`` shows it (``changed_at``: wall-clock seconds)."""
    meta = member.meta
    return {
        "name": member.name,
        "address": f"{member.addr[0]}:{member.addr[1]}",
        "role": meta.role,
        "tier": meta.tier,
        "state": str(member.state),
        "incarnation": member.incarnation,
        "meta_version": member.meta_version,
        "mesh": meta.mesh,
        "draining": meta.draining,
        "active_connections": meta.active_connections,
        "services": [
            {"name": s.name, "healthy": s.healthy, "total": s.total, "down": list(s.down)}
            for s in meta.services
        ],
        "changed_at": round(changed_at, 3),
    }


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def format_members(rows: Sequence[Mapping[str, Any]], now: float | None = None) -> str:
    """A ``serf members``-like table of ``GET /members`` rows."""
    now = time.time() if now is None else now
    header = ("NAME", "ADDRESS", "ROLE", "TIER", "STATE", "INC", "BACKENDS", "CHANGED")
    table = [header]
    for row in rows:
        services = " ".join(f"{s['name']}={s['healthy']}/{s['total']}" for s in row["services"])
        state = str(row["state"]) + (" (draining)" if row.get("draining") else "")
        table.append(
            (
                str(row["name"]),
                str(row["address"]),
                str(row["role"]) or "-",
                str(row["tier"]) or "-",
                state,
                str(row["incarnation"]),
                services or "-",
                _ago(now - float(row["changed_at"])),
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in table
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"
