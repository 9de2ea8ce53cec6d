"""One node: its control plane (health, ejection, warm pools) wired to its data plane.

The control plane owns the mutable health state and publishes, per upstream group, an
immutable tuple of members; the data plane only reads the latest tuple. Every background
loop runs under ``_supervised``, which logs a crash and restarts the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from meshproxy import log
from meshproxy.config import (
    Address,
    AdminState,
    CheckConfig,
    Config,
    EjectConfig,
    ServerConfig,
    UpstreamKind,
    UpstreamRef,
)
from meshproxy.counters import Counters
from meshproxy.dataplane.hop import HopHeader
from meshproxy.dataplane.listener import Entrance, Inbound
from meshproxy.dataplane.mysql import ER_PROXY_NO_UPSTREAM, error_packet
from meshproxy.dataplane.pump import Session, link
from meshproxy.dataplane.router import Member
from meshproxy.dataplane.upstream import Connector, WarmPool
from meshproxy.errors import UpstreamError, describe
from meshproxy.health.checks import run_check
from meshproxy.health.state import ServerHealth, ServerState, Transition


@dataclass(frozen=True)
class Route:
    """What an entrance does with a client: which group, and which hop header to send."""

    ref: UpstreamRef
    service: str
    greeting: bool


class Group:
    """Control-plane state of one pool or tier: each server's health, and its snapshot."""

    def __init__(
        self,
        ref: UpstreamRef,
        servers: tuple[ServerConfig, ...],
        check: CheckConfig,
        eject: EjectConfig,
        close_sessions_on_down: bool,
        source_ip: str,
    ) -> None:
        self.ref = ref
        self.source_ip = source_ip
        self.check = check
        self.close_sessions_on_down = close_sessions_on_down
        self.servers = {s.address: s for s in servers}
        self.health = {s.address: ServerHealth(s.state, check, eject) for s in servers}
        self.members: tuple[Member, ...] = ()
        self.publish()

    def publish(self) -> None:
        self.members = tuple(
            Member(address, self.servers[address].weight, health.state)
            for address, health in self.health.items()
        )


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.counters = Counters()
        self.groups: dict[UpstreamRef, Group] = {}
        for pool in config.pool:
            ref = UpstreamRef(UpstreamKind.POOL, pool.name)
            self.groups[ref] = Group(
                ref,
                pool.servers,
                pool.check,
                pool.eject,
                pool.close_sessions_on_down,
                pool.source_ip,
            )
        for tier in config.tier:
            ref = UpstreamRef(UpstreamKind.TIER, tier.name)
            self.groups[ref] = Group(
                ref, tier.members, tier.check, tier.eject, False, tier.source_ip
            )
        self.warm = {tier.name: WarmPool() for tier in config.tier if tier.warm_connections}
        self.active: dict[Address, int] = {}
        self.sessions: dict[Address, set[Session]] = {}
        timeouts = config.timeouts
        self.connector = Connector(
            groups=self.groups,
            active=self.active,
            report=self._connect_report,
            warm=self.warm,
            connect_s=timeouts.connect_ms / 1000,
            budget_s=timeouts.connect_budget_ms / 1000,
            counters=self.counters,
        )
        self.routes: dict[str, Route] = {}
        self.entrances: list[Entrance] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.started = time.monotonic()

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Bind every port and start the background loops; raises OSError if a bind fails."""
        config = self.config
        loop = asyncio.get_running_loop()
        try:
            for listener in config.listener:
                entrance = Entrance(
                    listener.name,
                    mesh=False,
                    max_connections=listener.max_connections,
                    header_timeout_s=config.timeouts.hop_header_s,
                    speaks_mysql=listener.protocol == "mysql",
                )
                self.routes[listener.name] = Route(
                    listener.upstream, listener.service, listener.protocol == "mysql"
                )
                entrance.server = await loop.create_server(
                    functools.partial(Inbound, entrance, self._serve, self.counters),
                    listener.bind.host,
                    listener.bind.port,
                    backlog=listener.backlog,
                    reuse_address=True,
                )
                self.entrances.append(entrance)
                log.event("listening", listener=listener.name, bind=str(listener.bind))
            if config.node.mesh_bind is not None:
                mesh = Entrance(
                    "mesh", True, config.node.mesh_max_connections, config.timeouts.hop_header_s
                )
                mesh.server = await loop.create_server(
                    functools.partial(Inbound, mesh, self._serve, self.counters),
                    config.node.mesh_bind.host,
                    config.node.mesh_bind.port,
                    backlog=1024,
                    reuse_address=True,
                )
                self.entrances.append(mesh)
                log.event("listening", listener="mesh", bind=str(config.node.mesh_bind))
        except OSError:
            await self.stop()
            raise
        for service in config.service:
            self.routes[f"service:{service.name}"] = Route(
                service.upstream, service.name, service.protocol == "mysql"
            )
        for group in self.groups.values():
            for address in group.health:
                if group.check.type != "none":
                    self._spawn(f"check {group.ref} {address}", self._check_loop, group, address)
        self._spawn("ejection expiry", self._expiry_loop)
        self._spawn("idle sweeper", self._sweep_loop)
        for tier in config.tier:
            if tier.warm_connections:
                self._spawn(f"warm pool {tier.name}", self._warm_loop, tier.name)

    async def stop(self) -> None:
        for entrance in self.entrances:
            if entrance.server is not None:
                entrance.server.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for pool in self.warm.values():
            pool.close()
        for sessions in list(self.sessions.values()):
            for session in list(sessions):
                session.close()
        for entrance in self.entrances:
            if entrance.server is not None:
                await entrance.server.wait_closed()
        self.entrances.clear()

    def _spawn(
        self, name: str, fn: Callable[..., Coroutine[Any, Any, None]], *args: object
    ) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(_supervised(name, fn, *args)))

    # ----------------------------------------------------------------- data plane

    async def _serve(self, inbound: Inbound, header: HopHeader | None) -> None:
        """Find the route for a new client, connect its upstream, and start the pump."""
        entrance = inbound.entrance
        if header is None:
            route = self.routes[entrance.name]
            client = inbound.peer
            hops = 0
        else:
            found = self.routes.get(f"service:{header.service}")
            if found is None:
                return self._refuse(inbound, f"unknown service {header.service!r}")
            if header.hops > self.config.node.max_hops:
                return self._refuse(inbound, f"hop limit exceeded ({header.hops} hops)")
            route, client, hops = found, header.client, header.hops
        next_header = (
            HopHeader(route.service, client, hops + 1)
            if route.ref.kind is UpstreamKind.TIER
            else None
        )
        session = Session(functools.partial(self._closed, entrance))
        transport = inbound.transport
        assert transport is not None
        try:
            await self.connector.open(route.ref, session, transport, next_header, route.greeting)
        except UpstreamError as exc:
            self.counters.inc("connect_failures", upstream=str(route.ref))
            log.warning("upstream_unavailable", client=client, upstream=str(route.ref), error=exc)
            if entrance.speaks_mysql:
                # Only where the client itself connected: on a mesh port, closing without a
                # byte is what tells the previous hop to try another member instead.
                message = (
                    f"meshproxy {self.config.node.name}: no upstream reachable for service "
                    f"{route.service!r} ({route.ref}) within {self.connector.budget_s:g} s"
                )
                transport.write(error_packet(ER_PROXY_NO_UPSTREAM, message))
            transport.close()
            return None
        if inbound.lost:  # the client went away while we were connecting
            session.closed = True
            session.upstream.transport.close()  # type: ignore[union-attr]
            return None
        inbound.linked = True
        member = session.member
        assert member is not None
        self.active[member] = self.active.get(member, 0) + 1
        self.sessions.setdefault(member, set()).add(session)
        session.idle_since = time.monotonic()
        link(session, transport, bytes(inbound.pending), inbound.eof)
        return None

    def _refuse(self, inbound: Inbound, reason: str) -> None:
        self.counters.inc("hops_refused", reason=reason.split(" (", maxsplit=1)[0])
        log.warning("hop_refused", peer=inbound.peer, reason=reason)
        if inbound.transport is not None:
            inbound.transport.abort()

    def _closed(self, entrance: Entrance, session: Session) -> None:
        entrance.active -= 1
        member = session.member
        if member is not None:
            self.active[member] -= 1
            self.sessions[member].discard(session)
        self._count_bytes(session)
        self.counters.inc("connections_closed", entrance=entrance.name)

    def _count_bytes(self, session: Session) -> int:
        """Add what the session moved since the last call to the counters; return its total."""
        from_client, from_upstream = session.nbytes()
        swept_client, swept_upstream = session.swept_nbytes
        if from_client != swept_client:
            self.counters.inc("bytes_from_clients", from_client - swept_client)
        if from_upstream != swept_upstream:
            self.counters.inc("bytes_from_upstreams", from_upstream - swept_upstream)
        session.swept_nbytes = (from_client, from_upstream)
        return from_client + from_upstream

    # ----------------------------------------------------------------- control plane

    def _connect_report(self, ref: UpstreamRef, address: Address, error: str | None) -> None:
        health = self.groups[ref].health.get(address)
        if health is None:
            return
        if error is None:
            health.connect_succeeded()
            return
        self.counters.inc("connect_attempt_failures", upstream=str(ref), server=str(address))
        log.event("connect_failed", upstream=str(ref), server=str(address), error=error)
        self._apply(self.groups[ref], address, health.connect_failed(error, time.monotonic()))

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
            sessions = list(self.sessions.get(address, ()))
            for session in sessions:
                session.close(abort=True)
            if sessions:
                log.event("sessions_closed", server=str(address), count=len(sessions))

    def set_admin_state(self, ref: UpstreamRef, address: Address, state: AdminState) -> None:
        group = self.groups[ref]
        self._apply(group, address, group.health[address].set_admin(state))

    async def _check_loop(self, group: Group, address: Address) -> None:
        interval = group.check.interval_ms / 1000
        # Spread the checks of many servers over the interval instead of bursting.
        await asyncio.sleep(random.uniform(0, interval))
        health = group.health[address]
        while True:
            result = await run_check(group.check, address)
            self.counters.inc("health_checks", upstream=str(group.ref), ok=str(result.ok).lower())
            self._apply(
                group, address, health.check_result(result.ok, result.detail, time.monotonic())
            )
            await asyncio.sleep(interval)

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for group in self.groups.values():
                for address, health in group.health.items():
                    self._apply(group, address, health.tick(now))

    async def _sweep_loop(self) -> None:
        idle_s = self.config.timeouts.idle_s
        period = min(max(idle_s / 8, 0.1), 5.0)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for sessions in list(self.sessions.values()):
                for session in list(sessions):
                    total = self._count_bytes(session)
                    if total != session.last_nbytes:
                        session.last_nbytes = total
                        session.idle_since = now
                    elif now - session.idle_since >= idle_s:
                        self.counters.inc("idle_timeouts")
                        log.event("idle_timeout", server=str(session.member))
                        session.close()

    async def _warm_loop(self, tier_name: str) -> None:
        tier = self.config.tiers()[tier_name]
        group = self.groups[UpstreamRef(UpstreamKind.TIER, tier_name)]
        pool = self.warm[tier_name]
        connect_s = self.config.timeouts.connect_ms / 1000
        while True:
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
            "entrances": {e.name: {"active": e.active} for e in self.entrances},
            "upstreams": {
                str(ref): [
                    {
                        "server": str(m.address),
                        "state": m.state,
                        "weight": m.weight,
                        "active": self.active.get(m.address, 0),
                        "last_check": group.health[m.address].last_detail,
                    }
                    for m in group.members
                ]
                for ref, group in self.groups.items()
            },
            "counters": self.counters.as_dict(),
        }


async def _supervised(
    name: str, fn: Callable[..., Coroutine[Any, Any, None]], *args: object
) -> None:
    """Run a background loop forever; a crash is logged and the loop restarted."""
    while True:
        try:
            await fn(*args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("task_crashed", task=name, error=repr(exc))
            await asyncio.sleep(1.0)
