"""Control-plane state of one pool or tier: each server's health, and the members it publishes."""

from __future__ import annotations

from meshproxy.config import (
    Address,
    CheckConfig,
    EjectConfig,
    ReplicationConfig,
    ServerConfig,
    UpstreamRef,
)
from meshproxy.dataplane.router import Member, Role
from meshproxy.health.checks import CheckResult
from meshproxy.health.state import ServerHealth, ServerState, Transition


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
        # Tier members gossip rules out (suspect, draining, no healthy backend), with why:
        # routing sees them SHUNNED while their own health history carries on underneath.
        self.blocked: dict[Address, str] = {}
        # Tier members gossip has seen fail (dead, no healthy backend) and those that drain:
        # a middle that stopped answering cannot end its sessions, so close_sessions_on_down
        # ends them here; a draining one ends its own, so they are left to it.
        self.failed: frozenset[Address] = frozenset()
        self.draining: frozenset[Address] = frozenset()
        self.ended: frozenset[Address] = frozenset()  # servers whose sessions were ended
        # A replication pool: each server's side from its read_only, and the readers too
        # far behind (or not replicating), with why. Lagging readers route as SHUNNED.
        self.replication = ReplicationConfig()
        self.roles: dict[Address, str] = {}
        self.lagging: dict[Address, str] = {}

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
        roles = self.roles if self.replication.enabled else {}
        self.members = tuple(
            Member(
                address,
                self.servers[address].weight,
                self._state(address, health),
                roles.get(address, Role.ANY),
            )
            for address, health in self.health.items()
        )

    def replication_seen(self, address: Address, result: CheckResult) -> str | None:
        """Take a check's view of a server's replication; what changed, if anything.
        A failed check changes nothing here: its server goes SHUNNED by its health."""
        if not self.replication.enabled or not result.ok or result.read_only is None:
            return None
        role = Role.READER if result.read_only else Role.WRITER
        lag = ""
        if result.replica and role == Role.READER:
            if result.lag_s is None:
                lag = "replication stopped"
            elif result.lag_s > self.replication.max_lag_s:
                lag = f"lag {result.lag_s:g} s > max_lag_s {self.replication.max_lag_s:g}"
        changes = []
        if self.roles.get(address) != role:
            changes.append(f"{self.roles.get(address) or 'unknown'} -> {role}")
            self.roles[address] = role
        if lag and address not in self.lagging:
            changes.append(f"lagging ({lag})")
        elif not lag and address in self.lagging:
            changes.append("caught up")
        if lag:
            self.lagging[address] = lag
        else:
            self.lagging.pop(address, None)
        return ", ".join(changes) or None

    def newly_ended(self) -> frozenset[Address]:
        """Servers whose sessions must end now that they did not have to before: every
        OFFLINE_HARD one; with ``close_sessions_on_down`` also every one its own health
        made SHUNNED (unless it drains) and every one gossip has seen fail."""
        states = {address: health.state for address, health in self.health.items()}
        ending = {a for a, state in states.items() if state is ServerState.OFFLINE_HARD}
        if self.close_sessions_on_down:
            shunned = {a for a, state in states.items() if state is ServerState.SHUNNED}
            ending |= (shunned - self.draining) | self.failed
        newly, self.ended = frozenset(ending) - self.ended, frozenset(ending)
        return newly

    def _state(self, address: Address, health: ServerHealth) -> ServerState:
        state = health.state
        if state is ServerState.ONLINE and (address in self.blocked or address in self.lagging):
            return ServerState.SHUNNED
        return state
