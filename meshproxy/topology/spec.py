"""Topology specs: a TOML file naming networks, services, tiers, backends and nodes.

Pure: no I/O beyond reading the one file. Every mistake is a ConfigError naming the file,
the key path (``node[2].tier``) and the reason, like node configs.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from meshproxy.config import read_toml
from meshproxy.errors import ConfigError

BACKENDS = "backends"  # a tier's upstream when its middles talk to the MariaDB servers
ROLES = ("app", "edge", "middle")
MODES = ("passthrough", "session")  # a service's: edges pump bytes, or own the sessions
FIRST_HOST = 10  # containers get addresses .10, .11, ... of each subnet, in spec order
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")  # usable as compose service and host name


@dataclass(frozen=True)
class Network:
    name: str
    subnet: ipaddress.IPv4Network


@dataclass(frozen=True)
class Service:
    name: str
    port: int
    backends: tuple[str, ...]
    # "session": edges own their clients' sessions (session-mode listener on their tier)
    # and middles run them (session-mode service); the logins are the topology's monitor
    # login, whose password reaches the proxies from secrets/ (never a rendered file).
    mode: str = "passthrough"


@dataclass(frozen=True)
class Tier:
    name: str
    upstream: str  # BACKENDS or the name of the next tier


@dataclass(frozen=True)
class Backend:
    name: str
    networks: tuple[str, ...]


@dataclass(frozen=True)
class Node:
    name: str
    role: Literal["app", "edge", "middle"]
    networks: tuple[str, ...]
    tier: str = ""  # middle: the tier it serves in; edge: the tier it sends to
    edge: str = ""  # app: the edge it connects through


@dataclass(frozen=True)
class Spec:
    name: str
    mesh_network: str
    monitor_user: str
    monitor_password: str
    networks: tuple[Network, ...]
    services: tuple[Service, ...]
    tiers: tuple[Tier, ...]
    backends: tuple[Backend, ...]
    nodes: tuple[Node, ...]
    source: str = "<memory>"

    def containers(self) -> list[Node | Backend]:
        """Every container in address order: nodes, then backends."""
        return [*self.nodes, *self.backends]

    def address(self, container: str, network: str) -> str:
        """The fixed IPv4 address of a container on one of its networks."""
        index = [c.name for c in self.containers()].index(container)
        subnet = next(n.subnet for n in self.networks if n.name == network)
        return str(subnet[FIRST_HOST + index])

    def edge_address(self, app: str) -> str:
        """Where app ``app`` reaches its edge: the edge's address on a network they share."""
        node = next(n for n in self.nodes if n.name == app)
        edge = next(n for n in self.nodes if n.name == node.edge)
        network = next(net for net in node.networks if net in edge.networks)
        return self.address(edge.name, network)

    def proxies(self) -> list[Node]:
        return [n for n in self.nodes if n.role != "app"]

    def session_mode(self) -> bool:
        """Whether any service runs in session mode (its proxies need the login's password)."""
        return any(s.mode == "session" for s in self.services)

    def require_passthrough(self, target: str) -> None:
        """Refuse a session-mode spec for a target that renders passthrough only."""
        for i, service in enumerate(self.services):
            if service.mode != "passthrough":
                raise ConfigError(
                    self.source,
                    f"service[{i}].mode",
                    f"{target} renders passthrough services only; session mode is"
                    " rendered for compose (--target compose)",
                )


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.source, key, reason)

    def table(
        self, raw: object, key: str, required: set[str], optional: set[str]
    ) -> Mapping[str, Any]:
        if not isinstance(raw, Mapping):
            raise self.fail(key, f"expected a table, got {_kind(raw)}")
        known = required | optional
        for name in sorted(raw):
            if name not in known:
                where = f"{key}.{name}" if key else name
                raise self.fail(where, f"unknown key (known keys: {', '.join(sorted(known))})")
        for name in sorted(required):
            if name not in raw:
                raise self.fail(f"{key}.{name}" if key else name, "required key is missing")
        return raw

    def string(self, raw: object, key: str) -> str:
        if not isinstance(raw, str):
            raise self.fail(key, f"expected a string, got {_kind(raw)}")
        return raw

    def name(self, raw: object, key: str) -> str:
        text = self.string(raw, key)
        if not _NAME.match(text):
            raise self.fail(key, f"must be lower-case letters, digits and '-', got {text!r}")
        return text

    def names(self, raw: object, key: str) -> tuple[str, ...]:
        if not isinstance(raw, list):
            raise self.fail(key, f"expected an array, got {_kind(raw)}")
        if not raw:
            raise self.fail(key, "must not be empty")
        items = tuple(self.name(item, f"{key}[{i}]") for i, item in enumerate(raw))
        for i, item in enumerate(items):
            if item in items[:i]:
                raise self.fail(f"{key}[{i}]", f"duplicate {item!r}")
        return items

    def array(self, data: Mapping[str, Any], section: str) -> list[object]:
        raw = data.get(section, [])
        if not isinstance(raw, list) or not raw:
            raise self.fail(section, f"expected at least one [[{section}]] table")
        return raw


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {str: "a string", int: "an integer", float: "a float", list: "an array"}.get(
        type(value), "a table" if isinstance(value, Mapping) else type(value).__name__
    )


def parse(data: Mapping[str, Any], source: str = "<memory>") -> Spec:
    """Build and cross-check a Spec from decoded TOML data."""
    r = _Reader(source)
    r.table(data, "", {"topology", "network", "service", "tier", "backend", "node"}, set())
    raw_top = data.get("topology")
    for gone in ("admin_token", "gossip_key"):
        if isinstance(raw_top, Mapping) and gone in raw_top:
            raise r.fail(
                f"topology.{gone}",
                "secrets no longer sit in specs: rendering makes the admin token, the gossip"
                " key and the mesh certificates in a secrets/ folder that git ignores",
            )
    top = r.table(
        data["topology"], "topology", {"name", "mesh_network", "monitor"}, {"description"}
    )
    monitor = r.table(top["monitor"], "topology.monitor", {"user", "password"}, set())
    if "description" in top:
        r.string(top["description"], "topology.description")

    networks = []
    for i, raw in enumerate(r.array(data, "network")):
        key = f"network[{i}]"
        t = r.table(raw, key, {"name", "subnet"}, set())
        try:
            subnet = ipaddress.IPv4Network(r.string(t["subnet"], f"{key}.subnet"))
        except ValueError as exc:
            raise r.fail(f"{key}.subnet", f"not an IPv4 subnet: {exc}") from None
        networks.append(Network(r.name(t["name"], f"{key}.name"), subnet))
    services = []
    for i, raw in enumerate(r.array(data, "service")):
        key = f"service[{i}]"
        t = r.table(raw, key, {"name", "port", "backends"}, {"mode"})
        port = t["port"]
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise r.fail(f"{key}.port", f"expected a port number 1-65535, got {port!r}")
        name = r.name(t["name"], f"{key}.name")
        mode = r.string(t.get("mode", "passthrough"), f"{key}.mode")
        if mode not in MODES:
            raise r.fail(f"{key}.mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
        services.append(Service(name, port, r.names(t["backends"], f"{key}.backends"), mode))
    tiers = []
    for i, raw in enumerate(r.array(data, "tier")):
        key = f"tier[{i}]"
        t = r.table(raw, key, {"name", "upstream"}, set())
        tiers.append(
            Tier(r.name(t["name"], f"{key}.name"), r.name(t["upstream"], f"{key}.upstream"))
        )
    backends = []
    for i, raw in enumerate(r.array(data, "backend")):
        key = f"backend[{i}]"
        t = r.table(raw, key, {"name", "networks"}, set())
        backends.append(
            Backend(r.name(t["name"], f"{key}.name"), r.names(t["networks"], f"{key}.networks"))
        )
    nodes = []
    for i, raw in enumerate(r.array(data, "node")):
        key = f"node[{i}]"
        t = r.table(raw, key, {"name", "role", "networks"}, {"tier", "edge"})
        role = r.string(t["role"], f"{key}.role")
        if role not in ROLES:
            raise r.fail(f"{key}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        wanted = "edge" if role == "app" else "tier"
        for field_name in ("tier", "edge"):
            if field_name == wanted and field_name not in t:
                raise r.fail(f"{key}.{field_name}", f"required for a node of role {role!r}")
            if field_name != wanted and field_name in t:
                raise r.fail(f"{key}.{field_name}", f"not allowed for a node of role {role!r}")
        nodes.append(
            Node(
                name=r.name(t["name"], f"{key}.name"),
                role=role,  # type: ignore[arg-type]  # checked against ROLES above
                networks=r.names(t["networks"], f"{key}.networks"),
                tier=r.name(t["tier"], f"{key}.tier") if "tier" in t else "",
                edge=r.name(t["edge"], f"{key}.edge") if "edge" in t else "",
            )
        )
    spec = Spec(
        name=r.name(top["name"], "topology.name"),
        mesh_network=r.name(top["mesh_network"], "topology.mesh_network"),
        monitor_user=r.string(monitor["user"], "topology.monitor.user"),
        monitor_password=r.string(monitor["password"], "topology.monitor.password"),
        networks=tuple(networks),
        services=tuple(services),
        tiers=tuple(tiers),
        backends=tuple(backends),
        nodes=tuple(nodes),
        source=source,
    )
    _check(spec, r)
    return spec


def load(path: str | Path) -> Spec:
    """Read a topology spec file; every problem is a ConfigError naming the key."""
    return parse(read_toml(path), str(path))


def _unique(r: _Reader, section: str, names: list[str], taken: dict[str, str]) -> None:
    for i, name in enumerate(names):
        key = f"{section}[{i}].name"
        if name in taken:
            raise r.fail(key, f"duplicate name {name!r} (already used by {taken[name]})")
        taken[name] = key


def _check(spec: Spec, r: _Reader) -> None:
    _unique(r, "network", [n.name for n in spec.networks], {})
    _unique(r, "service", [s.name for s in spec.services], {})
    _unique(r, "tier", [t.name for t in spec.tiers], {})
    containers: dict[str, str] = {}
    _unique(r, "node", [n.name for n in spec.nodes], containers)
    _unique(r, "backend", [b.name for b in spec.backends], containers)

    networks = {n.name: n for n in spec.networks}
    if spec.mesh_network not in networks:
        raise r.fail("topology.mesh_network", _missing("network", spec.mesh_network, networks))
    count = len(containers)
    for i, network in enumerate(spec.networks):
        if network.subnet.num_addresses < FIRST_HOST + count + 1:
            raise r.fail(
                f"network[{i}].subnet",
                f"too small for {count} containers from host .{FIRST_HOST} on",
            )
        for j, other in enumerate(spec.networks[:i]):
            if network.subnet.overlaps(other.subnet):
                raise r.fail(f"network[{i}].subnet", f"overlaps network[{j}].subnet")
    backends = {b.name: b for b in spec.backends}
    for i, backend in enumerate(spec.backends):
        for j, net in enumerate(backend.networks):
            if net not in networks:
                raise r.fail(f"backend[{i}].networks[{j}]", _missing("network", net, networks))
    for i, service in enumerate(spec.services):
        for j, name in enumerate(service.backends):
            if name not in backends:
                raise r.fail(f"service[{i}].backends[{j}]", _missing("backend", name, backends))
    tiers = {t.name: t for t in spec.tiers}
    for i, tier in enumerate(spec.tiers):
        if tier.upstream != BACKENDS and tier.upstream not in tiers:
            raise r.fail(
                f"tier[{i}].upstream",
                f"must be {BACKENDS!r} or a tier name; {_missing('tier', tier.upstream, tiers)}",
            )
        seen = [tier.name]
        step = tier
        while step.upstream != BACKENDS:
            step = tiers[step.upstream]
            if step.name in seen:
                raise r.fail(
                    f"tier[{i}].upstream", f"tiers form a loop: {' -> '.join([*seen, step.name])}"
                )
            seen.append(step.name)
    nodes = {n.name: n for n in spec.nodes}
    for i, node in enumerate(spec.nodes):
        key = f"node[{i}]"
        for j, net in enumerate(node.networks):
            if net not in networks:
                raise r.fail(f"{key}.networks[{j}]", _missing("network", net, networks))
        if node.role == "app":
            edge = nodes.get(node.edge)
            if edge is None or edge.role != "edge":
                edges = {n.name: n for n in spec.nodes if n.role == "edge"}
                raise r.fail(f"{key}.edge", _missing("edge", node.edge, edges))
            if not set(node.networks) & set(edge.networks):
                raise r.fail(f"{key}.networks", f"shares no network with its edge {edge.name!r}")
            continue
        if node.tier not in tiers:
            raise r.fail(f"{key}.tier", _missing("tier", node.tier, tiers))
        if spec.mesh_network not in node.networks:
            raise r.fail(
                f"{key}.networks",
                f"an {node.role} must be on the mesh network {spec.mesh_network!r}",
            )
        if node.role == "middle" and tiers[node.tier].upstream == BACKENDS:
            for service in spec.services:
                for name in service.backends:
                    if not set(node.networks) & set(backends[name].networks):
                        raise r.fail(f"{key}.networks", f"shares no network with backend {name!r}")
    for i, tier in enumerate(spec.tiers):
        if not any(n.role == "middle" and n.tier == tier.name for n in spec.nodes):
            raise r.fail(f"tier[{i}].name", f"no middle serves in tier {tier.name!r}")
    if spec.session_mode():
        # An edge owns the sessions and a middle runs them on its pool: one tier between.
        for i, tier in enumerate(spec.tiers):
            if tier.upstream != BACKENDS:
                raise r.fail(
                    f"tier[{i}].upstream",
                    "a session-mode topology has one tier, dialling the backends"
                    f" (service mode 'session'), not a cascade to {tier.upstream!r}",
                )


def _missing(what: str, name: str, defined: Mapping[str, object]) -> str:
    return f"no {what} named {name!r} (defined: {', '.join(sorted(defined)) or 'none'})"
