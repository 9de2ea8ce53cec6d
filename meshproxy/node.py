"""One node: its control plane (health, ejection, warm pools, runtime changes) wired to its
data plane.

The control plane owns the mutable health state and publishes, per upstream group, an
immutable tuple of members; the data plane only reads the latest tuple. Every background
loop runs under ``_supervised``, which logs a crash and restarts the loop. ``apply`` puts a
new, already validated config into effect without a restart and without touching
established sessions (except where an operator asked for OFFLINE_HARD).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

from meshproxy import log
from meshproxy.config import (
    Address,
    CheckConfig,
    Config,
    EjectConfig,
    ListenerConfig,
    ServerConfig,
    UpstreamKind,
    UpstreamRef,
)
from meshproxy.counters import Counters
from meshproxy.dataplane.listener import Entrance
from meshproxy.dataplane.plane import DataPlane, Route
from meshproxy.dataplane.router import Member
from meshproxy.dataplane.upstream import WarmPool
from meshproxy.errors import MeshproxyError, describe
from meshproxy.health.checks import run_check
from meshproxy.health.state import ServerHealth, ServerState, Transition

MESH = "mesh"


class ApplyError(MeshproxyError):
    """A valid config could not be put into effect; nothing of it was applied."""


class Group:
    """Control-plane state of one pool or tier: each server's health, and its snapshot."""

    def __init__(self, ref: UpstreamRef) -> None:
        self.ref = ref
        self.check = CheckConfig()
        self.eject = EjectConfig()
        self.close_sessions_on_down = False
        self.source_ip = ""
        self.servers: dict[Address, ServerConfig] = {}
        self.health: dict[Address, ServerHealth] = {}
        self.members: tuple[Member, ...] = ()

    def configure(
        self,
        servers: tuple[ServerConfig, ...],
        check: CheckConfig,
        eject: EjectConfig,
        close_sessions_on_down: bool,
        source_ip: str,
    ) -> list[tuple[Address, Transition]]:
        """Take a new configuration; servers still present keep their health history."""
        self.check, self.eject = check, eject
        self.close_sessions_on_down, self.source_ip = close_sessions_on_down, source_ip
        self.servers = {s.address: s for s in servers}
        transitions = []
        health: dict[Address, ServerHealth] = {}
        for server in servers:
            known = self.health.get(server.address)
            if known is None:
                health[server.address] = ServerHealth(server.state, check, eject)
                continue
            known.reconfigure(check, eject)
            transition = known.set_admin(server.state)
            if transition is not None:
                transitions.append((server.address, transition))
            health[server.address] = known
        self.health = health
        self.publish()
        return transitions

    def publish(self) -> None:
        self.members = tuple(
            Member(address, self.servers[address].weight, health.state)
            for address, health in self.health.items()
        )


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
            False,
            tier.source_ip,
        )
    return settings


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.counters = Counters()
        self.groups: dict[UpstreamRef, Group] = {}
        self.warm: dict[str, WarmPool] = {}
        timeouts = config.timeouts
        self.plane = DataPlane(
            node_name=config.node.name,
            counters=self.counters,
            groups=self.groups,
            warm=self.warm,
            report=self._connect_report,
            connect_s=timeouts.connect_ms / 1000,
            budget_s=timeouts.connect_budget_ms / 1000,
            max_hops=config.node.max_hops,
        )
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.started = time.monotonic()

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Bind every port and start the background loops; raises OSError if a bind fails."""
        try:
            self.plane.routes = _routes(self.config)
            await self._bind_changed({}, self.config)
        except OSError:
            await self.plane.close()
            raise
        self._take(self.config)
        self._spawn("ejection expiry", self._expiry_loop)
        self._spawn("idle sweeper", self._sweep_loop)

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for pool in self.warm.values():
            pool.close()
        await self.plane.close()

    def _spawn(self, name: str, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        self._cancel(name)
        loop = asyncio.get_running_loop()
        self._tasks[name] = loop.create_task(_supervised(name, fn, *args), name=name)

    def _cancel(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()

    # ----------------------------------------------------------------- runtime changes

    async def apply(self, new: Config) -> list[str]:
        """Put a validated config into effect; on ApplyError nothing has changed."""
        old = self.config
        for key in ("name", "role"):
            if getattr(old.node, key) != getattr(new.node, key):
                raise ApplyError(f"node.{key} cannot change at runtime: restart the node")
        old_admin = old.admin.bind if old.admin else None
        if old_admin != (new.admin.bind if new.admin else None):
            raise ApplyError("admin.bind cannot change at runtime: restart the node")
        # New listeners must find their route from their first client on.
        self.plane.routes = {**self.plane.routes, **_routes(new)}
        try:
            changes = await self._bind_changed(_binds(old), new)
        except OSError as exc:
            raise ApplyError(f"cannot bind: {describe(exc)}") from None
        changes += self._take(new)
        return changes

    async def _bind_changed(self, before: dict[str, tuple[Address, int]], new: Config) -> list[str]:
        """Bind what is new or moved first: the one step that can fail. Undo it on failure."""
        wanted = _binds(new)
        listeners = {listener.name: listener for listener in new.listener}
        changes = []
        bound: list[str] = []
        try:
            for name, (address, backlog) in wanted.items():
                if before.get(name, (None, 0))[0] == address and name in self.plane.entrances:
                    continue
                entrance = self.plane.entrances.get(name) or Entrance(
                    name, mesh=name == MESH, max_connections=1, header_timeout_s=1.0
                )
                _configure_entrance(entrance, new, listeners.get(name))
                await self.plane.bind(entrance, address, backlog)
                bound.append(name)
                changes.append(f"listener {name} bound to {address}")
        except OSError:
            for name in bound:
                if name not in before:
                    self.plane.unbind(name)
            raise
        for name in set(self.plane.entrances) - set(wanted):
            self.plane.unbind(name)
            changes.append(f"listener {name} removed")
        return changes

    def _take(self, new: Config) -> list[str]:
        """Everything after binding; none of it can fail."""
        old, self.config = self.config, new
        changes = []
        plane = self.plane
        plane.max_hops = new.node.max_hops
        plane.node_name = new.node.name
        plane.connector.connect_s = new.timeouts.connect_ms / 1000
        plane.connector.budget_s = new.timeouts.connect_budget_ms / 1000
        log.set_level(new.node.log_level)
        listeners = {listener.name: listener for listener in new.listener}
        for name, entrance in plane.entrances.items():
            _configure_entrance(entrance, new, listeners.get(name))
        plane.routes = _routes(new)
        settings = _group_settings(new)
        for ref in set(self.groups) - set(settings):
            del self.groups[ref]
            changes.append(f"{ref} removed")
        for ref, args in settings.items():
            group = self.groups.get(ref)
            if group is None:
                group = self.groups[ref] = Group(ref)
                changes.append(f"{ref} added")
            before = (dict(group.servers), group.check, group.eject)
            for address, transition in group.configure(*args):
                self._apply(group, address, transition)
            changes += _describe_group_change(ref, before, group)
        self._sync_loops(new)
        if old is not new:
            changes += _describe_changes(old, new)
        return changes

    def _sync_loops(self, config: Config) -> None:
        """Run exactly the check and warm-pool loops the config asks for, with its settings."""
        wanted: dict[str, tuple[Callable[..., Coroutine[Any, Any, None]], tuple[Any, ...]]] = {}
        for ref, group in self.groups.items():
            if group.check.type != "none":
                for address in group.health:
                    key = f"check {ref} {address} {id(group)} {group.check}"
                    wanted[key] = (self._check_loop, (group, address))
        for tier in config.tier:
            if tier.warm_connections:
                self.warm.setdefault(tier.name, WarmPool())
                key = f"warm {tier.name} {tier.warm_connections} {tier.warm_max_idle_s}"
                wanted[key] = (self._warm_loop, (tier.name,))
        for name in list(self.warm):
            if not any(t.name == name and t.warm_connections for t in config.tier):
                self.warm.pop(name).close()
        for key in [
            k for k in self._tasks if k.startswith(("check ", "warm ")) and k not in wanted
        ]:
            self._cancel(key)
        for key, (fn, args) in wanted.items():
            if key not in self._tasks:
                self._spawn(key, fn, *args)

    # ----------------------------------------------------------------- health

    def _connect_report(self, ref: UpstreamRef, address: Address, error: str | None) -> None:
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

    def _apply(self, group: Group, address: Address, transition: Transition | None) -> None:
        """Publish a state change: log it, count it, and act on the sessions it concerns."""
        if transition is None:
            return
        group.publish()
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
        hard = transition.new is ServerState.OFFLINE_HARD
        down = transition.new is ServerState.SHUNNED and group.close_sessions_on_down
        if hard or down:
            closed = self.plane.close_sessions(address)
            if closed:
                log.event("sessions_closed", server=str(address), count=closed)

    async def _check_loop(self, group: Group, address: Address) -> None:
        interval = group.check.interval_ms / 1000
        # Spread the checks of many servers over the interval instead of bursting.
        await asyncio.sleep(random.uniform(0, interval))
        while True:
            health = group.health.get(address)
            if health is None:
                return
            result = await run_check(group.check, address)
            self.counters.inc("health_checks", upstream=str(group.ref), ok=str(result.ok).lower())
            transition = health.check_result(result.ok, result.detail, time.monotonic())
            self._apply(group, address, transition)
            await asyncio.sleep(interval)

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for group in list(self.groups.values()):
                for address, health in list(group.health.items()):
                    self._apply(group, address, health.tick(now))

    async def _sweep_loop(self) -> None:
        while True:
            idle_s = self.config.timeouts.idle_s
            await asyncio.sleep(min(max(idle_s / 8, 0.1), 5.0))
            self.plane.sweep(idle_s, time.monotonic())

    async def _warm_loop(self, tier_name: str) -> None:
        tier = self.config.tiers()[tier_name]
        group = self.groups[UpstreamRef(UpstreamKind.TIER, tier_name)]
        pool = self.warm[tier_name]
        while True:
            connect_s = self.config.timeouts.connect_ms / 1000
            eligible = {m.address for m in group.members if m.state is ServerState.ONLINE}
            pool.recycle(tier.warm_max_idle_s, eligible)
            for address in eligible:
                for _ in range(tier.warm_connections - pool.count(address)):
                    try:
                        await pool.fill(address, connect_s)
                    except (OSError, TimeoutError) as exc:
                        self._connect_report(group.ref, address, describe(exc))
                        break
            pool.wanted.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await pool.wanted.wait()

    # ----------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        return {
            "node": self.config.node.name,
            "role": self.config.node.role,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "sessions": self.plane.session_count(),
            "entrances": {
                name: {"active": e.active, "max_connections": e.max_connections}
                for name, e in self.plane.entrances.items()
            },
            "upstreams": {
                str(ref): [
                    {
                        "server": str(m.address),
                        "state": m.state.value,
                        "weight": m.weight,
                        "active": self.plane.active.get(m.address, 0),
                        "last_check": group.health[m.address].last_detail,
                    }
                    for m in group.members
                ]
                for ref, group in self.groups.items()
            },
            "counters": self.counters.as_dict(),
        }


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


def _routes(config: Config) -> dict[str, Route]:
    routes = {
        listener.name: Route(listener.upstream, listener.service, listener.protocol == "mysql")
        for listener in config.listener
    }
    for service in config.service:
        routes[f"service:{service.name}"] = Route(
            service.upstream, service.name, service.protocol == "mysql"
        )
    return routes


def _binds(config: Config) -> dict[str, tuple[Address, int]]:
    binds = {listener.name: (listener.bind, listener.backlog) for listener in config.listener}
    if config.node.mesh_bind is not None:
        binds[MESH] = (config.node.mesh_bind, 1024)
    return binds


def _configure_entrance(
    entrance: Entrance, config: Config, listener: ListenerConfig | None
) -> None:
    entrance.header_timeout_s = config.timeouts.hop_header_s
    if listener is None:  # the mesh port
        entrance.max_connections = config.node.mesh_max_connections
        entrance.speaks_mysql = False
    else:
        entrance.max_connections = listener.max_connections
        entrance.speaks_mysql = listener.protocol == "mysql"


async def _supervised(name: str, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
    """Run a background loop until it returns; a crash is logged and the loop restarted."""
    while True:
        try:
            await fn(*args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("task_crashed", task=name, error=repr(exc))
            await asyncio.sleep(1.0)
        else:
            return
