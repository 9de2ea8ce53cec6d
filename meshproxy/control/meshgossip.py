"""A node's gossip: its agent, the metadata it publishes, and routing on what it hears.

Runs in the control plane (``run_single`` and the control process, never in workers):

* publishes this node's metadata (``meshview.local_meta``) at once when a server's state
  or the draining flag changes, and with the active connection count at most once per
  ``gossip.meta_refresh_s``;
* keeps every ``[[tier]]`` group's members and gossip verdicts current
  (``meshview.tier_routing``), logging each change with its reason, and publishing a new
  snapshot to the data planes;
* when another middle reports a backend down that this node also uses, checks it at once;
* leaves gracefully on shutdown.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from meshproxy import log
from meshproxy.config import (
    Address,
    Config,
    GossipConfig,
    ServerConfig,
    UpstreamKind,
    UpstreamRef,
)
from meshproxy.control import meshview
from meshproxy.control.group import Group
from meshproxy.counters import Counters
from meshproxy.dataplane.router import Role
from meshproxy.gossip.agent import Agent
from meshproxy.gossip.commands import MemberChanged
from meshproxy.gossip.messages import NodeMeta, State
from meshproxy.supervise import Supervisor


class GossipHost(Protocol):
    """What gossip needs of the control plane it feeds (``Node`` provides it)."""

    config: Config
    groups: dict[UpstreamRef, Group]
    counters: Counters

    def recheck(self, ref: UpstreamRef, address: Address) -> bool: ...

    def regroup(self, group: Group, servers: tuple[ServerConfig, ...]) -> None: ...

    def sync_checks(self) -> None: ...

    def active_sessions(self) -> int: ...


def _addr(address: Address) -> tuple[str, int]:
    return (address.host, address.port)


class MeshGossip:
    def __init__(self, node: GossipHost, config: GossipConfig) -> None:
        self.node = node
        self.config = config
        self.draining = False
        self._active = 0  # active connections as last published (rate-limited)
        self._downs: dict[str, frozenset[str]] = {}  # backends each middle reports down
        self._modes: dict[UpstreamRef, str] = {}
        self._names: dict[UpstreamRef, dict[Address, str]] = {}
        self._gone: dict[UpstreamRef, dict[Address, str]] = {}
        self._meta_scheduled = False
        self._refresh_scheduled = False
        self.tasks = Supervisor()
        self.discovery: Any = None
        self.agent = Agent(
            node.config.node.name,
            _addr(config.bind),
            _addr(config.advertised()),
            config.settings(),
            config.key_bytes(),
            allow_plaintext=config.allow_plaintext,
            meta=self._meta(),
            counters=node.counters,
            on_change=self._on_change,
        )

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self.config.allow_plaintext:
            log.warning(
                "gossip_plaintext",
                reason="gossip.allow_plaintext: unkeyed gossip is accepted, and sent"
                " unauthenticated when no key is set; give every node gossip.keys",
            )
        await self.agent.start([_addr(seed) for seed in self.config.seeds])
        self.tasks.spawn("gossip metadata", self._meta_loop)
        if self.config.discovery == "mdns":
            from meshproxy.gossip.discovery import MdnsDiscovery

            self.discovery = MdnsDiscovery(
                self.node.config.node.name, _addr(self.config.advertised()), self.agent.join
            )
            await self.discovery.start()
        elif self.config.discovery == "dns":
            from meshproxy.gossip.dnsdiscovery import DnsDiscovery  # pulls in dnspython

            config = self.config
            self.discovery = DnsDiscovery(
                config.dns_names,
                _addr(config.advertised()),
                self.agent.join,
                alone=self._alone,
                counters=self.node.counters,
                interval_s=config.dns_interval_s,
                timeout_s=config.dns_timeout_ms / 1000,
                servers=[_addr(server) for server in config.dns_servers],
            )
            await self.discovery.start()

    def _alone(self) -> bool:
        """Whether this node knows no live peer (discovery then joins every seed it has)."""
        me = self.node.config.node.name
        return not any(m.state is State.ALIVE and m.name != me for m in self.agent.members())

    async def stop(self, leave: bool = True) -> None:
        if self.discovery is not None:
            await self.discovery.stop()
        if leave:
            self.draining = True
            self._publish_meta()
            await self.agent.leave()
        await self.tasks.stop()
        await self.agent.stop()
        log.event("gossip_stopped")

    def joined(self) -> bool:
        """Whether this node is in a mesh: it sees a live peer, or it has nobody to join
        (no seeds, and its discovery has found nobody)."""
        if not self._alone():
            return True
        return not self.config.seeds and (self.discovery is None or not self.discovery.found)

    def set_draining(self) -> None:
        if not self.draining:
            self.draining = True
            log.event("gossip_draining")
            self._publish_meta()

    # ---- metadata ----------------------------------------------------------------------

    def _meta(self) -> NodeMeta:
        node = self.node
        states = {
            ref: [(str(m.address), m.state) for m in group.members]
            for ref, group in node.groups.items()
        }
        writers = sorted(
            str(m.address)
            for group in node.groups.values()
            if group.replication.enabled
            for m in group.members
            if m.role == Role.WRITER
        )
        return meshview.local_meta(
            node.config,
            states,
            draining=self.draining,
            active_connections=self._active,
            writers=writers,
        )

    def health_changed(self) -> None:
        """A server's state changed: publish new metadata soon (once per loop iteration)."""
        if not self._meta_scheduled:
            self._meta_scheduled = True
            asyncio.get_running_loop().call_soon(self._publish_meta)

    def _publish_meta(self) -> None:
        self._meta_scheduled = False
        self.agent.set_meta(self._meta())

    async def _meta_loop(self) -> None:
        while True:
            await asyncio.sleep(max(self.config.meta_refresh_s, 0.1))
            active = self.node.active_sessions()
            if active != self._active:
                self._active = active
                self._publish_meta()

    # ---- what others say ---------------------------------------------------------------

    def _on_change(self, change: MemberChanged) -> None:
        member = change.member
        me = member.name == self.node.config.node.name
        if change.old != change.new:
            log.event(
                "gossip_member",
                member=member.name,
                address=f"{member.addr[0]}:{member.addr[1]}",
                old=str(change.old) if change.old is not None else "-",
                new=str(change.new) if change.new is not None else "forgotten",
                incarnation=member.incarnation,
                reason=change.reason,
            )
        elif me and change.reason.startswith("refuted"):
            log.event("gossip_refuted", incarnation=member.incarnation, reason=change.reason)
        if not me:
            self._recheck_reported_downs(change)
            self._recheck_other_writers(change)
        if not self._refresh_scheduled:
            self._refresh_scheduled = True
            asyncio.get_running_loop().call_soon(self.refresh_tiers)

    def _recheck_reported_downs(self, change: MemberChanged) -> None:
        member = change.member
        if change.new is None or member.state is not State.ALIVE:
            self._downs.pop(member.name, None)
            return
        downs = frozenset(a for s in member.meta.services for a in s.down)
        fresh = downs - self._downs.get(member.name, frozenset())
        self._downs[member.name] = downs
        for text in sorted(fresh):
            try:
                address = Address.parse(text)
            except ValueError:
                continue
            for ref in list(self.node.groups):
                if ref.kind is UpstreamKind.POOL and self.node.recheck(ref, address):
                    self.node.counters.inc("gossip_rechecks", upstream=str(ref))
                    log.event(
                        "gossip_recheck", upstream=str(ref), server=text, reported_by=member.name
                    )

    def _recheck_other_writers(self, change: MemberChanged) -> None:
        """Another middle writes elsewhere in a replication pool we share: check both
        sides now (a promotion it saw first), instead of at our next interval."""
        member = change.member
        if change.new is None or member.state is not State.ALIVE or not member.meta.writers:
            return
        theirs = set(member.meta.writers)
        for ref, group in list(self.node.groups.items()):
            if not group.replication.enabled:
                continue
            servers = {str(a) for a in group.health}
            ours = {str(m.address) for m in group.members if m.role == Role.WRITER}
            for text in sorted((theirs & servers) ^ ours):
                if self.node.recheck(ref, Address.parse(text)):
                    self.node.counters.inc("gossip_rechecks", upstream=str(ref))
                    log.event(
                        "gossip_recheck", upstream=str(ref), server=text, reported_by=member.name
                    )

    # ---- routing -----------------------------------------------------------------------

    def tier_servers(self, group: Group, config: Config) -> tuple[ServerConfig, ...]:
        """The members ``group`` (a tier) should have now; sets its gossip verdicts."""
        tier = config.tiers()[group.ref.name]
        routing = meshview.tier_routing(
            tier,
            self.agent.members(),
            meshview.tier_services(config, tier.name),
            config.node.name,
        )
        group.blocked, group.failed, group.draining = (
            routing.blocked,
            routing.failed,
            routing.draining,
        )
        old_mode = self._modes.get(group.ref)
        if old_mode != routing.mode:
            self._modes[group.ref] = routing.mode
            if old_mode is not None or routing.mode != "static":
                log.event(
                    "gossip_routing",
                    upstream=str(group.ref),
                    mode=routing.mode,
                    members=len(routing.servers),
                )
        self._names[group.ref] = routing.names
        self._gone[group.ref] = routing.gone
        return routing.servers

    def refresh_tiers(self) -> None:
        """Bring every tier group in line with the gossip view; log each change and why."""
        self._refresh_scheduled = False
        node = self.node
        changed = False
        for ref, group in list(node.groups.items()):
            if ref.kind is not UpstreamKind.TIER:
                continue
            before = {m.address: m.state for m in group.members}
            old_servers, old_blocked = dict(group.servers), dict(group.blocked)
            old_verdicts = (group.failed, group.draining)
            servers = self.tier_servers(group, node.config)
            if (servers, group.blocked, (group.failed, group.draining)) == (
                tuple(old_servers.values()),
                old_blocked,
                old_verdicts,
            ):
                continue
            changed = True
            node.regroup(group, servers)
            self._log_changes(group, before)
        if changed:
            node.sync_checks()

    def _log_changes(self, group: Group, before: dict[Address, Any]) -> None:
        ref = group.ref
        names, gone = self._names.get(ref, {}), self._gone.get(ref, {})
        after = {m.address: m.state for m in group.members}
        for address in sorted(after.keys() - before.keys()):
            name = names.get(address, "static member")
            self.node.counters.inc("gossip_route_changes", upstream=str(ref), change="added")
            log.event(
                "tier_member",
                upstream=str(ref),
                server=str(address),
                change="added",
                state=after[address],
                reason=group.blocked.get(address) or f"gossip: {name} alive",
            )
        for address in sorted(before.keys() - after.keys()):
            self.node.counters.inc("gossip_route_changes", upstream=str(ref), change="removed")
            log.event(
                "tier_member",
                upstream=str(ref),
                server=str(address),
                change="removed",
                reason=gone.get(address, "gossip: no longer in this tier"),
            )
        for address in sorted(after.keys() & before.keys()):
            old, new = before[address], after[address]
            if old is new:
                continue
            name = names.get(address, str(address))
            reason = group.blocked.get(address) or f"gossip: {name} eligible again"
            self.node.counters.inc("gossip_route_changes", upstream=str(ref), change="state")
            log.event(
                "server_state",
                upstream=str(ref),
                server=str(address),
                old=old,
                new=new,
                reason=reason,
            )

    # ---- views -------------------------------------------------------------------------

    def members_document(self) -> dict[str, Any]:
        agent = self.agent
        rows = [meshview.member_row(m, agent.wall_time(m.since)) for m in agent.members()]
        return {
            "node": self.node.config.node.name,
            "health_score": agent.membership.health_score,
            "members": rows,
        }

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for member in self.agent.members():
            counts[str(member.state)] = counts.get(str(member.state), 0) + 1
        return {
            "incarnation": self.agent.membership.incarnation,
            "health_score": self.agent.membership.health_score,
            "members": counts,
            "routing": {str(ref): mode for ref, mode in self._modes.items()},
            "traffic": dict(self.agent.stats),
        }
