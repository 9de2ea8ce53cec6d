"""What the chaos scenarios share: whom they pick as victims, the bounds they promise, and
how a scenario records its checks on its timeline before asserting them."""

from __future__ import annotations

import socket
import threading
import time

from meshproxy import config as node_config
from meshproxy.chaos import analysis
from meshproxy.chaos.timeline import Check, Timeline
from meshproxy.topology.spec import BACKENDS, Spec
from tests.integration.chaos.conftest import REPO

RECONNECT_BOUND_S = 1.0  # a client whose session broke is through another middle within this
ANGEL_BOUND_S = 1.0
TCP_SYN_RETRY_S = 1.0  # Linux's initial SYN retransmission timeout
SAMPLE_S = 0.2  # the observer samples every 100 ms; a change can show up one sample late
START_ALLOWANCE_S = 10.0  # a container's processes starting (Python, MariaDB recovery)


def edge(spec: Spec) -> str:
    return next(n.name for n in spec.nodes if n.role == "edge")


def middles(spec: Spec, tier: str) -> list[str]:
    return [n.name for n in spec.nodes if n.role == "middle" and n.tier == tier]


def edge_tier(spec: Spec) -> str:
    return next(n.tier for n in spec.nodes if n.role == "edge")


def victim(spec: Spec) -> str:
    """A middle the edge routes to (the second, so the first is not always the one spared)."""
    candidates = middles(spec, edge_tier(spec))
    return candidates[1 % len(candidates)]


def backend_diallers(spec: Spec) -> list[str]:
    """The middles whose tier talks to the backends."""
    return [m for t in spec.tiers if t.upstream == BACKENDS for m in middles(spec, t.name)]


def node_settings(spec: Spec, name: str) -> node_config.Config:
    # The container's config: its secrets are mounted there, not here.
    return node_config.load(REPO / "compose" / spec.name / "configs" / f"{name}.toml", files=False)


def detection_bound_s(spec: Spec) -> float:
    """The gossip layer's claim: every member sees a crashed member dead within this."""
    gossip = node_settings(spec, edge(spec)).gossip
    assert gossip is not None
    return gossip.settings().detection_bound_s(len(spec.proxies())) + SAMPLE_S


def victim_sessions_end(timeline: Timeline, victim: str, fault: float, bound: float) -> list[Check]:
    """No query through a ruled-out ``victim`` waits longer than ``bound`` after the fault
    (the edge ends its session; without that it hangs until the middle wakes or the client
    gives up), none is left to the client's read timeout, and each broken session's client
    is served by another middle right after."""
    broken = analysis.broken_sessions(timeline, victim, fault)
    delays = analysis.reconnects(timeline, victim, fault)
    return [
        # A session the edge leaves open hangs until the middle wakes: a stall, not an error.
        Check(
            "longest wait of a query on it", analysis.longest_wait(timeline, victim, fault), bound
        ),
        Check("sessions left to the client's timeout", sum(t for _, t in broken), 0, ""),
        Check(
            "broken session to reconnect",
            round(max((d for d, _ in delays), default=0.0), 3),
            RECONNECT_BOUND_S,
        ),
        Check("reconnects through it", sum(1 for _, m in delays if m == victim), 0, ""),
    ]


def check_bound_s(check: node_config.CheckConfig) -> float:
    """Active checks mark a server down within ``fall`` checks. The next check starts an
    interval after the last one ended, and a check of an unreachable server ends only at
    its timeout: fall x (interval + timeout) after the last success."""
    return check.fall * (check.interval_ms + check.timeout_ms) / 1000 + SAMPLE_S


def rise_bound_s(check: node_config.CheckConfig) -> float:
    """Likewise ``rise`` checks bring it back (a check of a live server ends at once)."""
    return (check.rise * check.interval_ms + check.timeout_ms) / 1000 + SAMPLE_S


class Prober:
    """A client with a short connect timeout, trying the edge every 20 ms: when did a new
    connection first get a server greeting again? (A client whose SYN went out while the
    node's processes died may wait for TCP's one-second SYN retry; this one gives up on
    such a SYN after 100 ms and sends a fresh one, as a pooled client with a short connect
    timeout would.)"""

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self.tries: list[tuple[float, bool]] = []  # (when it ended, greeted)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                with socket.create_connection(self.address, timeout=0.1) as sock:
                    sock.settimeout(0.5)
                    greeted = bool(sock.recv(4))
            except OSError:
                greeted = False
            self.tries.append((time.time(), greeted))

    def served_again(self, epoch: float) -> float | None:
        """When, after the first failed try since ``epoch``, a try was greeted again
        (``epoch`` itself when no try failed: the service never stopped)."""
        later = [(t, ok) for t, ok in self.tries if t >= epoch]
        failed = next((i for i, (_, ok) in enumerate(later) if not ok), None)
        if failed is None:
            return epoch
        return next((t for t, ok in later[failed:] if ok), None)


def since(t: float | None, start: float) -> float | None:
    return None if t is None else round(t - start, 3)


def conclude(
    timeline: Timeline, checks: list[Check], detect: float | None, recover: float | None
) -> None:
    """Record the scenario's checks and figures on its timeline, then assert them all."""
    timeline.checks = checks
    timeline.detect_s, timeline.recover_s = detect, recover
    failed = [f"{c.name}: {c.value} (bound {c.bound} {c.unit})" for c in checks if not c.ok]
    assert not failed, f"{timeline.scenario}: " + "; ".join(failed)
