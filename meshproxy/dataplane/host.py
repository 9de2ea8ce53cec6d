"""One process's data plane runtime: it applies configs and member snapshots it is given.

A host binds the entrances a config names, keeps routes and timeouts current, keeps warm
sockets to tier members, sweeps idle sessions and drains on request. It learns everything
from the control plane through ``apply_config`` and ``apply_members`` and reports connect
outcomes back through ``report``; the same host runs inside the control process (one
process, ``--no-angel``) or in each worker process (``workers = N``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

from meshproxy import log
from meshproxy.config import Address, Config, ListenerConfig, UpstreamKind, UpstreamRef
from meshproxy.counters import Counters
from meshproxy.dataplane.listener import Entrance
from meshproxy.dataplane.listensockets import ListenSource, OwnSockets
from meshproxy.dataplane.plane import DataPlane, Route
from meshproxy.dataplane.router import Member
from meshproxy.dataplane.sessionmode import maintain_forever
from meshproxy.dataplane.sockmap import Sockmap, Unavailable
from meshproxy.dataplane.upstream import ConnectReport, WarmPool
from meshproxy.errors import ConnectFailed, describe
from meshproxy.health.state import ServerState
from meshproxy.security.meshtls import MeshTls
from meshproxy.supervise import Supervisor

MESH = "mesh"


@dataclass
class GroupView:
    """The data plane's read-only view of one pool or tier."""

    members: tuple[Member, ...] = ()
    source_ip: str = ""


class PlaneHost:
    def __init__(
        self,
        config: Config,
        counters: Counters,
        report: ConnectReport,
        sockets: ListenSource | None = None,
    ) -> None:
        self.config = config
        self.sockets = sockets or OwnSockets()
        self.counters = counters
        self.groups: dict[UpstreamRef, GroupView] = {}
        self.warm: dict[str, WarmPool] = {}
        self.plane = DataPlane(
            node_name=config.node.name,
            counters=counters,
            groups=self.groups,
            warm=self.warm,
            report=report,
            connect_s=config.timeouts.connect_ms / 1000,
            budget_s=config.timeouts.connect_budget_ms / 1000,
            max_hops=config.node.max_hops,
        )
        self._report = report
        self.tasks = Supervisor()
        self.draining = False
        self.tls: MeshTls | None = None
        self.addresses: dict[str, Address] = {}  # where each entrance listens
        self._sync_groups(config)  # member snapshots may arrive before start()

    # ----------------------------------------------------------------- config

    async def start(self) -> None:
        """Bind what the config names and start the loops.

        A port that cannot be bound is reported and the rest serves (a later reload tries
        it again); only when nothing at all could be bound does this raise OSError.
        """
        self.plane.routes = routes(self.config)
        self._sync_groups(self.config)
        self._take_tls(self.config)
        wanted = binds(self.config)
        failure: OSError | None = None
        for name, (address, backlog) in wanted.items():
            failure = await self._bind_reporting(name, address, backlog, self.config) or failure
        if wanted and not self.plane.entrances:
            await self.plane.close()
            raise failure or OSError("nothing could be bound")
        self._keep_bound()
        self.take(self.config)
        # After binding: a standby taking over serves at once, on the pump until this is in.
        await self._load_accel()
        self.tasks.spawn("idle sweeper", self._sweep_loop)
        self.tasks.spawn("session pools", maintain_forever, self.plane.session_mode)

    async def _bind_reporting(
        self, name: str, address: Address, backlog: int, new: Config
    ) -> OSError | None:
        """Bind, or log and count why not; the other entrances carry on either way."""
        try:
            await self._bind_one(name, address, backlog, new)
        except OSError as exc:
            self.counters.inc("bind_failures", entrance=name)
            log.warning("bind_failed", listener=name, bind=str(address), error=describe(exc))
            return exc
        return None

    async def _bind_one(self, name: str, address: Address, backlog: int, new: Config) -> None:
        listener = next((item for item in new.listener if item.name == name), None)
        entrance = self.plane.entrances.get(name) or Entrance(
            name, mesh=name == MESH, max_connections=1, header_timeout_s=1.0
        )
        configure_entrance(entrance, new, listener)
        entrance.tls = self.tls if entrance.mesh else None  # before its first client
        sockets = await self.sockets.listening(address, backlog)
        try:
            await self.plane.bind(entrance, address, sockets, backlog)
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        self.addresses[name] = address

    def _keep_bound(self) -> None:
        """Tell the socket source which addresses are served now (it may close the rest)."""
        self.addresses = {n: a for n, a in self.addresses.items() if n in self.plane.entrances}
        self.sockets.keep(self.addresses.values())

    async def bind(self, keep: set[str], new: Config) -> list[str]:
        """Bind entrances that are new or moved; on OSError undo what this call bound.

        ``keep`` names the entrances whose address did not change and stay bound.
        """
        wanted = binds(new)
        # New listeners must find their route from their first client on.
        self.plane.routes = {**self.plane.routes, **routes(new)}
        changes = []
        bound: list[str] = []
        try:
            for name, (address, backlog) in wanted.items():
                if name in keep:
                    if name not in self.plane.entrances:  # failed at start: try again
                        await self._bind_reporting(name, address, backlog, new)
                    continue
                existed = name in self.plane.entrances
                await self._bind_one(name, address, backlog, new)
                if not existed:
                    bound.append(name)
                changes.append(f"listener {name} bound to {address}")
        except OSError:
            for name in bound:
                self.plane.unbind(name)
            self._keep_bound()
            raise
        for name in set(self.plane.entrances) - set(wanted):
            self.plane.unbind(name)
            changes.append(f"listener {name} removed")
        self._keep_bound()
        return changes

    def take(self, new: Config) -> None:
        """Apply everything of ``new`` except binding; none of it can fail."""
        self.config = new
        # A worker process has no Node of its own to set its log level: the host does.
        log.set_level(new.node.log_level)
        plane = self.plane
        plane.max_hops = new.node.max_hops
        plane.node_name = new.node.name
        plane.connector.connect_s = new.timeouts.connect_ms / 1000
        plane.connector.budget_s = new.timeouts.connect_budget_ms / 1000
        listeners = {listener.name: listener for listener in new.listener}
        for name, entrance in plane.entrances.items():
            configure_entrance(entrance, new, listeners.get(name))
            entrance.tls = self.tls if entrance.mesh else None
        plane.routes = routes(new)
        self._sync_groups(new)
        self._sync_warm(new)
        plane.session_mode.mesh_tls = self.tls
        plane.session_mode.configure(new)
        for ref, view in self.groups.items():
            plane.session_mode.set_members(ref, view.members)

    async def apply_config(self, new: Config) -> list[str]:
        """Bind, then take the rest (raises OSError with nothing changed if a bind fails).
        A draining host ignores it: its listeners stay closed whatever a late config says."""
        if self.draining:
            log.event("config_ignored", reason="draining")
            return []
        self._take_tls(new)
        before = binds(self.config)
        keep = {name for name, spec in binds(new).items() if before.get(name) == spec}
        changes = await self.bind(keep, new)
        self.take(new)
        return changes

    def _take_tls(self, new: Config) -> None:
        """Read the mesh TLS files again: every config change and reload rotates them. A
        file that no longer loads keeps the contexts as they were, and says so. (Adding or
        removing [mesh_tls] takes a restart: the control plane refuses it at runtime.)"""
        wanted = new.mesh_tls
        if wanted is None:
            return
        if self.tls is None:
            self.tls = MeshTls(wanted.ca, wanted.cert, wanted.key, self._tls_refused)
        else:
            try:
                self.tls.load(wanted.ca, wanted.cert, wanted.key)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                self.counters.inc("mesh_tls_reload_failures")
                log.warning("mesh_tls_reload_failed", error=describe(exc))
        self.plane.connector.tls = self.tls

    async def _load_accel(self) -> None:
        """The kernel fast path, when the config asks for it and this host can run it.
        (Compiling the program takes a few hundred ms: in a thread, off the loop.)"""
        if self.config.dataplane.accel != "sockmap":
            return
        try:
            self.plane.connector.sockmap = await asyncio.to_thread(Sockmap)
        except Unavailable as exc:
            self.counters.inc("accel_unavailable")
            log.warning("accel_unavailable", accel="sockmap", reason=str(exc), using="python pump")
            return
        log.event("accel_ready", accel="sockmap")

    def _tls_refused(self, reason: str, detail: str) -> None:
        self.counters.inc("mesh_tls_refused", entrance=MESH, reason=reason)
        log.warning("mesh_tls_refused", reason=reason, detail=detail)

    def _sync_groups(self, config: Config) -> None:
        groups = {
            UpstreamRef(UpstreamKind.POOL, p.name): (p.servers, p.source_ip) for p in config.pool
        }
        groups |= {
            UpstreamRef(UpstreamKind.TIER, t.name): (t.members, t.source_ip) for t in config.tier
        }
        for ref in set(self.groups) - set(groups):
            del self.groups[ref]
        for ref, (servers, source_ip) in groups.items():
            view = self.groups.get(ref)
            if view is None:
                # Until the control plane says otherwise, servers are as configured, like
                # the control plane's own starting view.
                view = self.groups[ref] = GroupView(
                    tuple(Member(s.address, s.weight, ServerState(s.state.value)) for s in servers)
                )
            view.source_ip = source_ip

    def apply_members(self, ref: UpstreamRef, members: tuple[Member, ...]) -> None:
        view = self.groups.get(ref)
        if view is not None:
            gone = {m.address for m in view.members} - {m.address for m in members}
            view.members = members
            # Connects still waiting for a member that is no longer eligible move on now.
            for address in gone:
                self.plane.connector.abandon(address, "no longer a member")
            for member in members:
                if member.state is not ServerState.ONLINE:
                    self.plane.connector.abandon(member.address, f"{member.state} now")
            pool = self.warm.get(ref.name) if ref.kind is UpstreamKind.TIER else None
            if pool is not None:
                pool.wanted.set()
            self.plane.session_mode.set_members(ref, members)

    # ----------------------------------------------------------------- loops

    def _sync_warm(self, config: Config) -> None:
        wanted = {}
        for tier in config.tier:
            if tier.warm_connections:
                self.warm.setdefault(tier.name, WarmPool())
                key = f"warm {tier.name} {tier.warm_connections} {tier.warm_max_idle_s}"
                wanted[key] = tier.name
        for name in list(self.warm):
            if name not in wanted.values():
                self.warm.pop(name).close()
        self.tasks.keep_only("warm ", set(wanted))
        for key, name in wanted.items():
            if key not in self.tasks:
                self.tasks.spawn(key, self._warm_loop, name)

    async def _sweep_loop(self) -> None:
        while True:
            idle_s = self.config.timeouts.idle_s
            await asyncio.sleep(min(max(idle_s / 8, 0.1), 5.0))
            now = time.monotonic()
            self.plane.sweep(idle_s, now)
            self.plane.session_mode.sweep(idle_s, now)

    async def _warm_loop(self, tier_name: str) -> None:
        tier = self.config.tiers()[tier_name]
        ref = UpstreamRef(UpstreamKind.TIER, tier_name)
        pool = self.warm[tier_name]
        while not self.draining:
            group = self.groups.get(ref, GroupView())
            connect_s = self.config.timeouts.connect_ms / 1000
            eligible = {m.address for m in group.members if m.state is ServerState.ONLINE}
            pool.recycle(tier.warm_max_idle_s, eligible)
            for address in eligible:
                for _ in range(tier.warm_connections - pool.count(address)):
                    try:
                        await pool.fill(address, connect_s, self.tls)
                    except ConnectFailed as exc:
                        self._report(ref, address, exc.reason)
                        break
                    except (OSError, TimeoutError) as exc:
                        self._report(ref, address, describe(exc))
                        break
            pool.wanted.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await pool.wanted.wait()

    # ----------------------------------------------------------------- shutdown

    async def drain(self, timeout_s: float) -> int:
        """Stop accepting and let sessions finish for up to ``timeout_s``; return those left."""
        self.draining = True
        for name in list(self.plane.entrances):
            self.plane.unbind(name)
        for pool in self.warm.values():
            pool.close()
        log.event("draining", sessions=self.plane.open_sessions, timeout_s=timeout_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.plane.no_sessions.wait()
        return self.plane.open_sessions

    async def stop(self) -> None:
        await self.tasks.stop()
        for pool in self.warm.values():
            pool.close()
        await self.plane.close()

    def stats(self) -> dict[str, Any]:
        """What the control plane sums across hosts for status and metrics."""
        return {
            "sessions": self.plane.open_sessions,
            "entrances": {
                name: [e.active, e.max_connections] for name, e in self.plane.entrances.items()
            },
            "active": {str(a): n for a, n in self.plane.active.items() if n},
            "session_mode": self.plane.session_mode.stats(),
        }


def routes(config: Config) -> dict[str, Route]:
    table = {
        listener.name: Route(
            listener.upstream,
            listener.service,
            listener.protocol == "mysql",
            listener.mode == "session",
        )
        for listener in config.listener
    }
    for service in config.service:
        table[f"service:{service.name}"] = Route(
            service.upstream, service.name, service.protocol == "mysql", service.mode == "session"
        )
    return table


def binds(config: Config) -> dict[str, tuple[Address, int]]:
    table = {listener.name: (listener.bind, listener.backlog) for listener in config.listener}
    if config.node.mesh_bind is not None:
        table[MESH] = (config.node.mesh_bind, 1024)
    return table


def configure_entrance(entrance: Entrance, config: Config, listener: ListenerConfig | None) -> None:
    entrance.header_timeout_s = config.timeouts.hop_header_s
    if listener is None:  # the mesh port
        entrance.max_connections = config.node.mesh_max_connections
        entrance.speaks_mysql = False
    else:
        entrance.max_connections = listener.max_connections
        entrance.speaks_mysql = listener.protocol == "mysql"
