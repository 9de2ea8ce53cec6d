"""What every node thinks of every other, sampled from their admin APIs every 100 ms.

One thread per proxy node reads ``/members`` (gossip states) and ``/status`` (routing
states of each upstream server) and records a :class:`Change` whenever a state differs from
the last sample. A node that does not answer (paused, killed) simply has no new samples.
Servers are named by the spec: an address on any network maps to its container's name.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Set
from typing import Any

from meshproxy.chaos.timeline import Change
from meshproxy.topology.render import ADMIN_PORT
from meshproxy.topology.spec import Spec

INTERVAL_S = 0.1
TIMEOUT_S = 0.5

View = dict[tuple[str, str], str]  # (subject, kind) -> state


def names_by_ip(spec: Spec) -> dict[str, str]:
    return {spec.address(c.name, net): c.name for c in spec.containers() for net in c.networks}


def parse_views(
    members: dict[str, Any] | None, status: dict[str, Any], ips: dict[str, str]
) -> View:
    """One node's current view, from its ``/members`` and ``/status`` documents."""
    view: View = {}
    for member in (members or {}).get("members", []):
        view[(member["name"], "member")] = member["state"]
    for servers in status.get("upstreams", {}).values():
        for server in servers:
            ip = server["server"].rpartition(":")[0]
            view[(ips.get(ip, ip), "route")] = server["state"]
    return view


class _Poller:
    def __init__(self, host: str, token: str) -> None:
        self.host = host
        self.headers = {"Authorization": f"Bearer {token}"}
        self.conn: http.client.HTTPConnection | None = None

    def get(self, path: str) -> dict[str, Any] | None:
        """The JSON document at ``path``, or None when the node does not answer in time."""
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, ADMIN_PORT, timeout=TIMEOUT_S)
            self.conn.request("GET", path, headers=self.headers)
            response = self.conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            return None
        if response.status != 200:
            return None
        document: dict[str, Any] = json.loads(body)
        return document

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Observer:
    """Samples every proxy node's view until :meth:`stop`; thread-safe readers."""

    def __init__(self, spec: Spec, t0: float, admin_token: str) -> None:
        self.spec = spec
        self.t0 = t0
        self.admin_token = admin_token
        self.changes: list[Change] = []
        self.views: dict[str, View] = {}
        self._ips = names_by_ip(spec)
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(node.name,), daemon=True)
            for node in spec.proxies()
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def _run(self, name: str) -> None:
        poller = _Poller(self.spec.address(name, self.spec.mesh_network), self.admin_token)
        while not self._stop.is_set():
            started = time.time()
            status = poller.get("/status")
            if status is not None:
                self._record(name, parse_views(poller.get("/members"), status, self._ips))
            self._stop.wait(max(0.0, INTERVAL_S - (time.time() - started)))
        poller.close()

    def _record(self, observer: str, view: View) -> None:
        now = time.time() - self.t0
        with self._lock:
            old = self.views.get(observer, {})
            for (subject, kind), state in sorted(view.items()):
                if old.get((subject, kind)) != state:
                    self.changes.append(Change(round(now, 3), observer, subject, kind, state))
            self.views[observer] = view
            self._lock.notify_all()

    def state(self, observer: str, subject: str, kind: str) -> str | None:
        with self._lock:
            return self.views.get(observer, {}).get((subject, kind))

    def wait_until(self, holds: Callable[[dict[str, View]], bool], timeout_s: float) -> bool:
        """Whether ``holds(views)`` became true within ``timeout_s``; re-checked per sample."""
        deadline = time.time() + timeout_s
        with self._lock:
            while not holds(self.views):
                left = deadline - time.time()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True

    def wait_for(
        self, observer: str, subject: str, kind: str, states: Set[str], timeout_s: float
    ) -> float | None:
        """Seconds since ``t0`` at which the state became one of ``states``, or None."""
        if not self.wait_until(
            lambda views: views.get(observer, {}).get((subject, kind)) in states, timeout_s
        ):
            return None
        with self._lock:
            return self._since(observer, subject, kind)

    def _since(self, observer: str, subject: str, kind: str) -> float:
        for change in reversed(self.changes):
            if (change.observer, change.subject, change.kind) == (observer, subject, kind):
                return change.t
        return 0.0
