"""Prometheus exposition of a node's counters and state, via prometheus_client."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from meshproxy.counters import Counters
from meshproxy.health.state import ServerState


class NodeCollector:
    """Reads the counters and the status at scrape time; nothing is copied in between."""

    def __init__(
        self,
        counters: Callable[[], Counters],
        status: Callable[[], dict[str, Any]],
        digests: Callable[[], Sequence[Mapping[str, Any]]] = list,
    ):
        self._counters = counters
        self._status = status
        self._digests = digests  # the top digests only: label values stay bounded

    def collect(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily] = {}
        for name, labels, value in self._counters().items():
            family = families.get(name)
            if family is None:
                family = CounterMetricFamily(
                    f"meshproxy_{name}", f"meshproxy counter {name}", labels=sorted(labels)
                )
                families[name] = family
            family.add_metric([labels[k] for k in sorted(labels)], value)
        yield from families.values()
        status = self._status()
        active = GaugeMetricFamily(
            "meshproxy_entrance_active_connections",
            "client connections open on a listener or the mesh port",
            labels=["entrance"],
        )
        for entrance, info in status["entrances"].items():
            active.add_metric([entrance], info["active"])
        yield active
        state = GaugeMetricFamily(
            "meshproxy_server_state",
            "1 for the state each upstream server is in",
            labels=["upstream", "server", "state"],
        )
        server_active = GaugeMetricFamily(
            "meshproxy_server_active_connections",
            "sessions open to each upstream server",
            labels=["upstream", "server"],
        )
        role = GaugeMetricFamily(
            "meshproxy_server_role",
            "1 for the side of its replication pool each server is on (writer, reader)",
            labels=["upstream", "server", "role"],
        )
        for upstream, servers in status["upstreams"].items():
            for server in servers:
                for candidate in ServerState:
                    one_hot = 1.0 if server["state"] == candidate else 0.0
                    state.add_metric([upstream, server["server"], candidate.value], one_hot)
                server_active.add_metric([upstream, server["server"]], server["active"])
                if server.get("role"):
                    role.add_metric([upstream, server["server"], server["role"]], 1.0)
        yield state
        yield server_active
        yield role
        yield from _session_gauges(status.get("session_mode"))
        yield from _digest_metrics(self._digests())
        tls = status.get("mesh_tls")
        if tls and "expires_in_s" in tls:
            expiry = GaugeMetricFamily(
                "meshproxy_mesh_tls_cert_expires_in_seconds",
                "seconds until this node's mesh certificate expires",
                labels=["cert"],
            )
            expiry.add_metric([tls["cert"]], tls["expires_in_s"])
            yield expiry


def _digest_metrics(rows: Sequence[Mapping[str, Any]]) -> Iterator[Metric]:
    labels = ["digest", "text", "user", "schema"]
    count = CounterMetricFamily(
        "meshproxy_digest_statements", "statements per top query digest", labels=labels
    )
    seconds = CounterMetricFamily(
        "meshproxy_digest_seconds", "time statements of a top digest took", labels=labels
    )
    errors = CounterMetricFamily(
        "meshproxy_digest_errors", "statements of a top digest that failed", labels=labels
    )
    for row in rows:
        values = [row["digest_id"], row["text"][:120], row["user"], row["schema"]]
        count.add_metric(values, row["count"])
        seconds.add_metric(values, row["total_s"])
        errors.add_metric(values, row["errors"])
    yield count
    yield seconds
    yield errors


def _session_gauges(session: dict[str, Any] | None) -> Iterator[Metric]:
    if not session:
        return
    backend = GaugeMetricFamily(
        "meshproxy_backend_connections",
        "session mode's backend connections per pool and server, by state",
        labels=["pool", "server", "state"],
    )
    for pool, servers in session["pools"].items():
        for server, figures in servers.items():
            backend.add_metric([pool, server, "in_use"], figures["in_use"])
            backend.add_metric([pool, server, "idle"], figures["idle"])
    yield backend
    clients = GaugeMetricFamily(
        "meshproxy_client_sessions", "session mode's client sessions open, by user", labels=["user"]
    )
    for user, count in session["users"].items():
        clients.add_metric([user], count)
    yield clients
    yield GaugeMetricFamily(
        "meshproxy_multiplexing_ratio",
        "client sessions per open backend connection",
        value=session["multiplexing_ratio"],
    )
