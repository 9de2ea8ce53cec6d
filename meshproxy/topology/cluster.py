"""Node configs for orchestrators, where a node learns its name and address when it starts.

Compose gives every container of a spec a fixed address, so each node gets its own config.
Kubernetes and Docker Swarm schedule *workloads*: the middles of a tier become one workload
with a replica per middle of the spec, and each edge one workload whose replicas sit next
to its applications. The replicas of a workload share one config file: their node name and
address come from the environment (``${MESHPROXY_NODE}``, ``${MESHPROXY_ADDRESS}``, see
:func:`meshproxy.config.expand_environment`) or from the network they are on
(``node.advertise_network``); gossip finds the other nodes through DNS
(``gossip.discovery = "dns"``), and an edge takes its tier's members from gossip. The
replicas of a workload share its mesh certificate (``mesh_tls.name`` names the workload).

Pure, like :mod:`meshproxy.topology.render`: data in, TOML-shaped data out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from meshproxy.topology import secrets
from meshproxy.topology.render import ADMIN_PORT, GOSSIP_PORT, MESH_PORT, MYSQL_PORT
from meshproxy.topology.spec import BACKENDS, Node, Spec

NODE_ENV = "MESHPROXY_NODE"  # the orchestrator sets it to a name unique to the replica
ADDRESS_ENV = "MESHPROXY_ADDRESS"  # Kubernetes: the pod's IP (the downward API)
CONFIG_FILE = "meshproxy.toml"


@dataclass(frozen=True)
class Workload:
    """The proxies of a spec that one orchestrator object runs: a tier's middles, or one
    edge."""

    name: str
    role: Literal["edge", "middle"]
    tier: str  # middle: the tier it serves in; edge: the tier it sends to
    nodes: tuple[Node, ...]

    @property
    def replicas(self) -> int:
        return len(self.nodes)


def workloads(spec: Spec) -> list[Workload]:
    """The edges (one workload each, in spec order), then one workload per middle tier."""
    found = [Workload(n.name, "edge", n.tier, (n,)) for n in spec.nodes if n.role == "edge"]
    for tier in spec.tiers:
        members = tuple(n for n in spec.nodes if n.role == "middle" and n.tier == tier.name)
        found.append(Workload(tier.name, "middle", tier.name, members))
    return found


def workload_of(spec: Spec, node: Node) -> Workload:
    return next(w for w in workloads(spec) if node in w.nodes)


@dataclass(frozen=True)
class Placement:
    """What differs between orchestrators: where a replica learns its address, which DNS
    names list the gossip peers, where secrets are mounted and backends reached."""

    # Either the environment variable ADDRESS_ENV carries the replica's address, or the
    # replica finds its address in this network (CIDR) on its own interfaces.
    advertise_network: str
    gossip_names: tuple[str, ...]
    secret: Callable[[str], str]  # secret name -> its path in the container
    backend: Callable[[str], str]  # backend name -> host:port the middles dial
    monitor_password: str  # the health checks' password, or a ${VARIABLE} holding it


def _advertised(place: Placement, port: int) -> dict[str, str]:
    if place.advertise_network:
        return {}
    return {"advertise": f"${{{ADDRESS_ENV}}}:{port}"}


def workload_config(spec: Spec, workload: Workload, place: Placement) -> dict[str, Any]:
    """The config every replica of ``workload`` runs (TOML-shaped data)."""
    node: dict[str, Any] = {"name": f"${{{NODE_ENV}}}", "role": workload.role}
    if workload.role == "middle":
        node["tier"] = workload.tier
        node["mesh_bind"] = f"0.0.0.0:{MESH_PORT}"
        if not place.advertise_network:
            node["mesh_advertise"] = f"${{{ADDRESS_ENV}}}:{MESH_PORT}"
    if place.advertise_network:
        node["advertise_network"] = place.advertise_network
    data: dict[str, Any] = {
        "node": node,
        "admin": {
            "bind": f"0.0.0.0:{ADMIN_PORT}",
            "token_file": place.secret(secrets.ADMIN_TOKEN),
        },
        "angel": {"watchdog_s": 2.0, "fast_crash_s": 10.0, "max_fast_crashes": 5},
        "gossip": {
            "bind": f"0.0.0.0:{GOSSIP_PORT}",
            **_advertised(place, GOSSIP_PORT),
            "discovery": "dns",
            "dns_names": list(place.gossip_names),
            "keys_file": place.secret(secrets.GOSSIP_KEYS),
        },
        "mesh_tls": {
            "ca": place.secret(secrets.CA),
            "cert": place.secret(secrets.cert_of(workload.name)),
            "key": place.secret(secrets.key_of(workload.name)),
            "name": workload.name,
        },
    }

    def tier_table(name: str) -> dict[str, Any]:
        # No members: gossip says which middles serve the tier, wherever they run.
        return {
            "name": name,
            "close_sessions_on_down": True,
            "check": {"type": "tcp", "interval_ms": 500, "timeout_ms": 250, "rise": 2, "fall": 2},
        }

    if workload.role == "edge":
        data["listener"] = [
            {
                "name": s.name,
                "bind": f"0.0.0.0:{s.port}",
                "service": s.name,
                "upstream": f"tier:{workload.tier}",
            }
            for s in spec.services
        ]
        data["tier"] = [tier_table(workload.tier)]
        return data
    upstream = next(t.upstream for t in spec.tiers if t.name == workload.tier)
    if upstream != BACKENDS:
        data["service"] = [{"name": s.name, "upstream": f"tier:{upstream}"} for s in spec.services]
        data["tier"] = [tier_table(upstream)]
        return data
    data["service"] = [{"name": s.name, "upstream": f"pool:{s.name}"} for s in spec.services]
    data["pool"] = [
        {
            "name": s.name,
            "servers": [place.backend(b) for b in s.backends],
            "check": {
                "type": "mysql",
                "user": spec.monitor_user,
                "password": place.monitor_password,
                "interval_ms": 1000,
                "timeout_ms": 500,
                "rise": 2,
                "fall": 2,
            },
        }
        for s in spec.services
    ]
    return data


def identities(spec: Spec) -> list[secrets.Identity]:
    """Who gets a mesh certificate: each workload."""
    return [(w.name, w.role) for w in workloads(spec)]


def backend_address(name: str) -> str:
    """A backend reached by its service name on the MySQL port."""
    return f"{name}:{MYSQL_PORT}"
