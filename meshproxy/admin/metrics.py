"""Prometheus exposition of a node's counters and state, via prometheus_client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from meshproxy.counters import Counters
from meshproxy.health.state import ServerState


class NodeCollector:
    """Reads the counters and the status at scrape time; nothing is copied in between."""

    def __init__(self, counters: Callable[[], Counters], status: Callable[[], dict[str, Any]]):
        self._counters = counters
        self._status = status

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
        for upstream, servers in status["upstreams"].items():
            for server in servers:
                for candidate in ServerState:
                    one_hot = 1.0 if server["state"] == candidate else 0.0
                    state.add_metric([upstream, server["server"], candidate.value], one_hot)
                server_active.add_metric([upstream, server["server"]], server["active"])
        yield state
        yield server_active
        tls = status.get("mesh_tls")
        if tls and "expires_in_s" in tls:
            expiry = GaugeMetricFamily(
                "meshproxy_mesh_tls_cert_expires_in_seconds",
                "seconds until this node's mesh certificate expires",
                labels=["cert"],
            )
            expiry.add_metric([tls["cert"]], tls["expires_in_s"])
            yield expiry
