"""What the chaos scenarios share: whom they pick as victims, the bounds they promise, and
how a scenario records its checks on its timeline before asserting them."""

from __future__ import annotations

from meshproxy import config as node_config
from meshproxy.chaos.timeline import Check, Timeline
from meshproxy.topology.spec import BACKENDS, Spec
from tests.integration.chaos.conftest import REPO

RECONNECT_BOUND_S = 1.0  # a client whose session broke is through another middle within this
ANGEL_BOUND_S = 1.0
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
    return node_config.load(REPO / "compose" / spec.name / "configs" / f"{name}.toml")


def detection_bound_s(spec: Spec) -> float:
    """The gossip layer's claim: every member sees a crashed member dead within this."""
    gossip = node_settings(spec, edge(spec)).gossip
    assert gossip is not None
    return gossip.settings().detection_bound_s(len(spec.proxies())) + SAMPLE_S


def check_bound_s(check: node_config.CheckConfig) -> float:
    """Active checks mark a dead server down within fall x interval (+ the last timeout)."""
    return (check.fall * check.interval_ms + check.timeout_ms) / 1000 + SAMPLE_S


def rise_bound_s(check: node_config.CheckConfig) -> float:
    return (check.rise * check.interval_ms + check.timeout_ms) / 1000 + SAMPLE_S


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
