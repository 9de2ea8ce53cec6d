"""The control plane of a node: health of every upstream server, runtime changes, status.

It owns the mutable health state and publishes, per upstream group, an immutable tuple of
members to every data plane it is linked to (``PlaneLink``: the one in this process, or
one per worker process); data planes only read the latest tuple and report connect
outcomes back. ``apply`` puts a new, already validated config into effect without a
restart and without touching established sessions (except where an operator asked for
OFFLINE_HARD).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from meshproxy import log
from meshproxy.config import (
    Address,
    CheckConfig,
    Config,
    EjectConfig,
    ReplicationConfig,
    ServerConfig,
    UpstreamKind,
    UpstreamRef,
)
from meshproxy.control import certwatch
from meshproxy.control.group import Group
from meshproxy.counters import Counters
from meshproxy.dataplane.host import PlaneHost, binds
from meshproxy.dataplane.router import Member
from meshproxy.errors import MeshproxyError, describe
from meshproxy.health.checks import run_check
from meshproxy.health.state import ServerState, Transition
from meshproxy.routing.digests import DigestStats
from meshproxy.supervise import Supervisor

if TYPE_CHECKING:
    from meshproxy.control.meshgossip import MeshGossip


QUICK_RECHECK_S = 0.1


class ApplyError(MeshproxyError):
    """A valid config could not be put into effect; nothing of it was applied."""


def _group_settings(config: Config) -> dict[UpstreamRef, tuple[Any, ...]]:
    settings: dict[UpstreamRef, tuple[Any, ...]] = {}
    for pool in config.pool:
        settings[UpstreamRef(UpstreamKind.POOL, pool.name)] = (
            pool.servers,
            pool.check,
            pool.eject,
            pool.close_sessions_on_down,
            pool.source_ip,
        )
    for tier in config.tier:
        settings[UpstreamRef(UpstreamKind.TIER, tier.name)] = (
            tier.members,
            tier.check,
            tier.eject,
            tier.close_sessions_on_down,
            tier.source_ip,
        )
    return settings


class PlaneLink(Protocol):
    """How the control plane reaches one data plane, in this process or in a worker."""

    @property
    def bound(self) -> bool:
        """Whether its listeners are bound, so it serves."""

    async def apply_config(self, new: Config) -> None: ...

    def members(self, ref: UpstreamRef, members: tuple[Member, ...]) -> None: ...

    def close_sessions(self, address: Address) -> None: ...

    def reset_digests(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    def counters(self) -> Counters: ...


class LocalLink:
    """A data plane in the control process itself (``--no-angel``, or tests)."""

    def __init__(self, host: PlaneHost) -> None:
        self.host = host
        self.bound = True  # attached once the host has started

    async def apply_config(self, new: Config) -> None:
        await self.host.apply_config(new)

    def members(self, ref: UpstreamRef, members: tuple[Member, ...]) -> None:
        self.host.apply_members(ref, members)

    def close_sessions(self, address: Address) -> None:
        closed = self.host.plane.close_sessions(address)
        if closed:
            log.event("sessions_closed", server=str(address), count=closed)

    def reset_digests(self) -> None:
        self.host.plane.session_mode.reset_digests()

    def stats(self) -> dict[str, Any]:
        return self.host.stats()

    def counters(self) -> Counters:
        return self.host.counters


class Node:
    """The control plane: health of every upstream server, runtime changes, status."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.counters = Counters()
        self.groups: dict[UpstreamRef, Group] = {}
        self.links: list[PlaneLink] = []
        self.retired = Counters()  # counters of data planes that have gone away
        self.tasks = Supervisor()
        self.started = time.monotonic()
        self.gossip: MeshGossip | None = None
        self.draining = False
        self.angel_pid: int | None = None  # the supervising angel, when there is one
        # Health checks that gossip asked to run now (another middle saw the server down),
        # and how many quick re-checks each still gets.
        self._recheck: dict[tuple[UpstreamRef, Address], asyncio.Event] = {}
        self._quick_checks: dict[tuple[UpstreamRef, Address], int] = {}

    def add_link(self, link: PlaneLink) -> None:
        """Attach a data plane and bring it up to date with every group's members."""
        self.links.append(link)
        for ref, group in self.groups.items():
            link.members(ref, group.members)

    def remove_link(self, link: PlaneLink) -> None:
        self.links.remove(link)
        for name, labels, value in link.counters().items():
            self.retired.inc(name, value, **labels)

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Configure the groups and start the health loops."""
        self._take(self.config)
        self.tasks.spawn("ejection expiry", self._expiry_loop)
        if self.config.mesh_tls is not None:
            self.tasks.spawn("certificate expiry", self._cert_loop)

    async def start_gossip(self) -> None:
        """Join the gossip mesh if the config has [gossip] (raises OSError if it cannot bind)."""
        if self.config.gossip is None:
            return
        from meshproxy.control.meshgossip import MeshGossip  # pulls in the codec's crypto

        gossip = MeshGossip(self, self.config.gossip)
        await gossip.start()
        self.gossip = gossip

    def set_draining(self) -> None:
        """Shutdown began (or an operator asked for a drain): tell the mesh, so that edges
        stop sending new connections here, and stop reporting ready."""
        self.draining = True
        if self.gossip is not None:
            self.gossip.set_draining()

    def upgrade(self) -> int:
        """Ask the angel for a hitless upgrade (SIGUSR2); returns its pid. Raises
        ApplyError when there is no angel to ask."""
        if self.angel_pid is None:
            raise ApplyError("this node runs without an angel (--no-angel): restart it instead")
        os.kill(self.angel_pid, signal.SIGUSR2)
        log.event("upgrade_requested", angel_pid=self.angel_pid)
        return self.angel_pid

    def readiness(self) -> dict[str, bool]:
        """What an orchestrator's readiness probe asks: every data plane has bound its
        listeners, gossip has joined the mesh, and the node is not draining."""
        checks = {
            "listening": bool(self.links) and all(link.bound for link in self.links),
            "gossip_joined": self.gossip is None or self.gossip.joined(),
            "draining": self.draining,
        }
        checks["ready"] = checks["listening"] and checks["gossip_joined"] and not self.draining
        return checks

    async def stop(self, leave: bool = True) -> None:
        """Stop; with ``leave``, leave the mesh gracefully first (others see "left", not
        "dead"). Without, the node goes quiet: a successor rejoins under its name."""
        if self.gossip is not None:
            await self.gossip.stop(leave)
            self.gossip = None
        await self.tasks.stop()

    # ----------------------------------------------------------------- runtime changes

    async def apply(self, new: Config) -> list[str]:
        """Put a validated config into effect; on ApplyError nothing has changed."""
        old = self.config
        for key in ("name", "role", "workers"):
            if getattr(old.node, key) != getattr(new.node, key):
                raise ApplyError(f"node.{key} cannot change at runtime: restart the node")
        old_admin = old.admin.bind if old.admin else None
        if old_admin != (new.admin.bind if new.admin else None):
            raise ApplyError("admin.bind cannot change at runtime: restart the node")
        if old.gossip != new.gossip:
            raise ApplyError("the [gossip] section cannot change at runtime: restart the node")
        if old.dataplane != new.dataplane:
            raise ApplyError("dataplane.accel cannot change at runtime: restart the node")
        if (old.mesh_tls is None) != (new.mesh_tls is None):
            raise ApplyError(
                "[mesh_tls] cannot be added or removed at runtime: restart the node"
                " (its files can change: a reload reads them again)"
            )
        probe_binds(old, new)
        try:
            for link in self.links:
                await link.apply_config(new)
        except OSError as exc:
            raise ApplyError(f"cannot bind: {describe(exc)}") from None
        changes = _describe_binds(old, new) + self._take(new)
        certwatch.warn_if_needed(new)
        return changes

    def _take(self, new: Config) -> list[str]:
        old, self.config = self.config, new
        log.set_level(new.node.log_level)
        changes = _describe_changes(old, new) if old is not new else []
        settings = _group_settings(new)
        replication = {UpstreamRef(UpstreamKind.POOL, p.name): p.replication for p in new.pool}
        for ref in set(self.groups) - set(settings):
            del self.groups[ref]
            changes.append(f"{ref} removed")
        for ref, args in settings.items():
            group = self.groups.get(ref)
            if group is None:
                group = self.groups[ref] = Group(ref)
                changes.append(f"{ref} added")
            before = (dict(group.servers), group.check, group.eject)
            group.replication = replication.get(ref, ReplicationConfig())
            if not group.replication.enabled:
                group.roles.clear()
                group.lagging.clear()
            if self.gossip is not None and ref.kind is UpstreamKind.TIER:
                # With gossip, a tier's members are the middles gossip knows for it.
                args = (self.gossip.tier_servers(group, new), *args[1:])
            transitions = group.configure(*args)
            self._publish(group)
            for address, transition in transitions:
                self._apply(group, address, transition)
            changes += _describe_group_change(ref, before, group)
        self.sync_checks()
        if self.gossip is not None:
            self.gossip.health_changed()  # services, tier or mesh address may have changed
        return changes

    def regroup(self, group: Group, servers: tuple[ServerConfig, ...]) -> None:
        """Give a group new members, keeping its other settings (gossip changed a tier)."""
        transitions = group.configure(
            servers, group.check, group.eject, group.close_sessions_on_down, group.source_ip
        )
        self._publish(group)
        for address, transition in transitions:
            self._apply(group, address, transition)

    def sync_checks(self) -> None:
        """Run one check loop per checked server of every group, and no other."""
        wanted = {}
        for ref, group in self.groups.items():
            if group.check.type != "none":
                for address in group.health:
                    wanted[f"check {ref} {address} {id(group)} {group.check}"] = (group, address)
        self.tasks.keep_only("check ", set(wanted))
        for key, (group, address) in wanted.items():
            if key not in self.tasks:
                self.tasks.spawn(key, self._check_loop, group, address)
        checked = {(group.ref, address) for group, address in wanted.values()}
        for stale in set(self._recheck) - checked:
            del self._recheck[stale]
            self._quick_checks.pop(stale, None)

    # ----------------------------------------------------------------- health

    def connect_report(self, ref: UpstreamRef, address: Address, error: str | None) -> None:
        """A data plane's connect outcome: failures feed passive ejection."""
        group = self.groups.get(ref)
        health = group.health.get(address) if group is not None else None
        if group is None or health is None:
            return
        if error is None:
            health.connect_succeeded()
            return
        self.counters.inc("connect_attempt_failures", upstream=str(ref), server=str(address))
        log.event("connect_failed", upstream=str(ref), server=str(address), error=error)
        self._apply(group, address, health.connect_failed(error, time.monotonic()))

    def _publish(self, group: Group) -> None:
        """Send a group's members to every data plane, and end the sessions on servers that
        were just ruled out (by health, an operator or gossip) where the group asks for it."""
        group.publish()
        ended = group.newly_ended()
        for link in self.links:
            link.members(group.ref, group.members)
            for address in ended:
                link.close_sessions(address)
        if self.gossip is not None:
            self.gossip.health_changed()

    def _apply(self, group: Group, address: Address, transition: Transition | None) -> None:
        """Publish a state change: log it, count it, and act on the sessions it concerns."""
        if transition is None:
            return
        self._publish(group)
        self.counters.inc("health_transitions", upstream=str(group.ref), to=transition.new)
        if "ejected" in transition.reason:
            self.counters.inc("ejections", upstream=str(group.ref))
        log.event(
            "server_state",
            upstream=str(group.ref),
            server=str(address),
            old=transition.old,
            new=transition.new,
            reason=transition.reason,
        )

    async def _check_loop(self, group: Group, address: Address) -> None:
        interval = group.check.interval_ms / 1000
        key = (group.ref, address)
        # Spread the checks of many servers over the interval instead of bursting.
        await self._pause(key, random.uniform(0, interval))
        while True:
            health = group.health.get(address)
            if health is None:
                return
            result = await run_check(group.check, address, group.replication.enabled)
            self.counters.inc("health_checks", upstream=str(group.ref), ok=str(result.ok).lower())
            transition = health.check_result(result.ok, result.detail, time.monotonic())
            self._apply(group, address, transition)
            replication = group.replication_seen(address, result)
            if replication is not None:
                self._replication_changed(group, address, replication)
            delay = interval
            quick = self._quick_checks.pop(key, 0) - 1
            if quick > 0 and not result.ok and health.state is ServerState.ONLINE:
                # Another middle sees it down: confirm (or not) within `fall` quick checks.
                self._quick_checks[key] = quick
                delay = min(interval, QUICK_RECHECK_S)
            await self._pause(key, delay)

    def _replication_changed(self, group: Group, address: Address, change: str) -> None:
        """A server changed sides or lag state: route on it at once, and say so."""
        self._publish(group)
        self.counters.inc("replication_changes", upstream=str(group.ref), server=str(address))
        log.event("replication_state", upstream=str(group.ref), server=str(address), change=change)

    async def _pause(self, key: tuple[UpstreamRef, Address], delay: float) -> None:
        """Sleep until the next check, or until gossip asks for this server now."""
        wake = self._recheck.setdefault(key, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await wake.wait()
        wake.clear()

    def recheck(self, ref: UpstreamRef, address: Address) -> bool:
        """Check a server at once (another middle reports it down); False if not checked."""
        group = self.groups.get(ref)
        health = group.health.get(address) if group is not None else None
        if group is None or health is None or group.check.type == "none":
            return False
        if health.state is not ServerState.ONLINE:
            return False
        key = (ref, address)
        self._quick_checks[key] = group.check.fall
        self._recheck.setdefault(key, asyncio.Event()).set()
        return True

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for group in list(self.groups.values()):
                for address, health in list(group.health.items()):
                    self._apply(group, address, health.tick(now))

    async def _cert_loop(self) -> None:
        """Warn about the mesh certificate at start, on every reload and every hour."""
        while True:
            certwatch.warn_if_needed(self.config)
            await asyncio.sleep(3600)

    # ----------------------------------------------------------------- status

    def total_counters(self) -> Counters:
        """This process's counters plus every data plane's, live and retired."""
        total = Counters()
        for source in (self.counters, self.retired, *(link.counters() for link in self.links)):
            for name, labels, value in source.items():
                total.inc(name, value, **labels)
        return total

    def status(self) -> dict[str, Any]:
        stats = [link.stats() for link in self.links]
        entrances: dict[str, dict[str, int]] = {}
        active: Counter[str] = Counter()
        for stat in stats:
            for name, (count, limit) in stat["entrances"].items():
                entry = entrances.setdefault(name, {"active": 0, "max_connections": limit})
                entry["active"] += count
            active.update(stat["active"])
        return {
            "node": self.config.node.name,
            "role": self.config.node.role,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "angel_pid": self.angel_pid,
            "data_planes": len(self.links),
            "sessions": sum(stat["sessions"] for stat in stats),
            "entrances": entrances,
            "upstreams": {
                str(ref): [
                    {
                        "server": str(m.address),
                        "state": m.state.value,
                        "weight": m.weight,
                        "active": active[str(m.address)],
                        "last_check": group.health[m.address].last_detail,
                        "gossip": group.blocked.get(m.address, ""),
                        **(
                            {"role": m.role, "lag": group.lagging.get(m.address, "")}
                            if group.replication.enabled
                            else {}
                        ),
                    }
                    for m in group.members
                ]
                for ref, group in self.groups.items()
            },
            "counters": self.total_counters().as_dict(),
            "session_mode": session_totals(stat.get("session_mode") for stat in stats),
            "gossip": self.gossip.summary() if self.gossip is not None else None,
            "mesh_tls": certwatch.cert_status(self.config),
        }

    def active_sessions(self) -> int:
        """Sessions open on every data plane (as of their last report)."""
        return sum(int(link.stats()["sessions"]) for link in self.links)

    def reset_digests(self) -> None:
        """Every data plane starts its digest statistics over (ProxySQL's _reset table)."""
        for link in self.links:
            link.reset_digests()
        log.event("digests_reset")

    def digests(self) -> DigestStats:
        """Every data plane's digest statistics, merged (as of their last report)."""
        merged = DigestStats(self.config.digests.top_n, self.config.digests.max_tracked)
        for link in self.links:
            part = link.stats().get("session_mode")
            if part:
                merged.merge(part.get("digests", []))
        return merged

    def members(self) -> dict[str, Any] | None:
        """The gossip membership as this node sees it; None without [gossip]."""
        return self.gossip.members_document() if self.gossip is not None else None


def session_totals(parts: Iterable[dict[str, Any] | None]) -> dict[str, Any]:
    """Session mode's figures of every data plane, summed: client sessions, statements,
    users' sessions, and backend connections per pool and server."""
    total: dict[str, Any] = {
        "client_sessions": 0,
        "statements": 0,
        "users": {},
        "pools": {},
        "query_cache": {},
    }
    for part in parts:
        if not part:
            continue
        for name, value in part.get("query_cache", {}).items():
            total["query_cache"][name] = total["query_cache"].get(name, 0) + value
        total["client_sessions"] += part["client_sessions"]
        total["statements"] += part["statements"]
        for user, count in part["users"].items():
            total["users"][user] = total["users"].get(user, 0) + count
        for pool, servers in part["pools"].items():
            into = total["pools"].setdefault(pool, {})
            for server, figures in servers.items():
                sums = into.setdefault(server, dict.fromkeys(figures, 0))
                for name, value in figures.items():
                    sums[name] = sums.get(name, 0) + value
    backend = sum(f["open"] for servers in total["pools"].values() for f in servers.values())
    # Client sessions per backend connection: what the pool saves the servers.
    total["multiplexing_ratio"] = round(total["client_sessions"] / backend, 2) if backend else 0
    return total


def _describe_changes(old: Config, new: Config) -> list[str]:
    """What changed outside the pools, tiers and binds (which describe themselves)."""
    changes = [
        f"{section} changed"
        for section in ("node", "timeouts")
        if getattr(old, section) != getattr(new, section)
    ]
    for section in ("listener", "service"):
        before = {item.name: item for item in getattr(old, section)}
        for item in getattr(new, section):
            if item.name in before and before[item.name] != item:
                changes.append(f"{section} {item.name} changed")
            elif item.name not in before and section == "service":
                changes.append(f"service {item.name} added")
        removed = set(before) - {item.name for item in getattr(new, section)}
        changes += [f"service {name} removed" for name in sorted(removed) if section == "service"]
    return changes


def _describe_group_change(
    ref: UpstreamRef,
    before: tuple[dict[Address, ServerConfig], CheckConfig, EjectConfig],
    group: Group,
) -> list[str]:
    servers, check, eject = before
    changes = [f"{ref}: server {a} added" for a in group.servers if a not in servers]
    changes += [f"{ref}: server {a} removed" for a in servers if a not in group.servers]
    for address, new in group.servers.items():
        old = servers.get(address)
        if old is not None and old.weight != new.weight:
            changes.append(f"{ref}: server {address} weight {old.weight} -> {new.weight}")
        if old is not None and old.state != new.state:
            changes.append(f"{ref}: server {address} state {old.state} -> {new.state}")
    if check != group.check:
        changes.append(f"{ref}: check changed")
    if eject != group.eject:
        changes.append(f"{ref}: ejection changed")
    return changes


def _describe_binds(old: Config, new: Config) -> list[str]:
    before, after = binds(old), binds(new)
    changes = [
        f"listener {name} bound to {address}"
        for name, (address, _) in after.items()
        if before.get(name, (None, 0))[0] != address
    ]
    return changes + [f"listener {name} removed" for name in before if name not in after]


def probe_binds(old: Config, new: Config) -> None:
    """Try each new or moved address before any data plane binds it, so that a port that
    cannot be bound rejects the whole change instead of leaving workers half-configured."""
    before = binds(old)
    for name, (address, _) in binds(new).items():
        if before.get(name, (None, 0))[0] == address:
            continue
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        try:
            infos = socket.getaddrinfo(address.host, address.port, family, socket.SOCK_STREAM)
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(infos[0][4])
        except OSError as exc:
            raise ApplyError(f"listener {name}: cannot bind {address}: {describe(exc)}") from None
