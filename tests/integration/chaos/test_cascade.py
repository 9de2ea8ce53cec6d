"""Chaos on the cascade topology (A -> P1 -> {M1, M2} -> {D1, D2} -> {B1, B2}) under load.

A node of each middle tier is killed in turn. The backends see the inner tier's address,
so sessions are attributed to inner middles; for the outer kill every broken session counts.
A client's next session crosses two proxy hops here; the reconnect bound is the chain's 1 s
plus TCP's one-second SYN retry (seen once in a fresh-clone run: 1.01 s, the only time over
1 s in any run).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meshproxy.chaos import analysis
from meshproxy.chaos.analysis import RULED_OUT
from meshproxy.chaos.images import Images
from meshproxy.chaos.stack import Stack
from meshproxy.chaos.timeline import Check
from tests.integration.chaos.conftest import REPO, RunScenario, running_stack
from tests.integration.chaos.kit import (
    RECONNECT_BOUND_S,
    TCP_SYN_RETRY_S,
    backend_diallers,
    conclude,
    detection_bound_s,
    edge,
    edge_tier,
    middles,
    since,
)

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@pytest.fixture(scope="module")
def stack(chaos_images: Images) -> Iterator[Stack]:
    """The cascade topology running in Docker for this module."""
    yield from running_stack(REPO / "topology" / "cascade.toml", chaos_images)


def kill_and_check(
    stack: Stack, run: RunScenario, name: str, target: str, observers: list[str]
) -> None:
    """Kill ``target`` under load; the observers rule it out, no new connection fails, and
    every broken session is through another middle within the reconnect bound."""
    spec = stack.spec
    bound = detection_bound_s(spec)
    inner = target in backend_diallers(spec)
    try:
        with run(name, 8.0) as scenario:
            scenario.settle(2.5)
            fault = scenario.inject(f"kill {target}", lambda: stack.kill(target))
            for observer in observers:
                scenario.observer.wait_for(observer, target, "route", RULED_OUT, bound + 2)
    finally:
        stack.start(target)
    t = scenario.timeline
    seen = [analysis.first_change(t, o, target, RULED_OUT, fault, "route") for o in observers]
    detect = None if None in seen else since(max(s for s in seen if s is not None), fault)
    delays = analysis.reconnects(t, target if inner else None, fault)
    worst = round(max((d for d, _ in delays), default=0.0), 3)
    conclude(
        t,
        [
            Check("new connections failed", analysis.connect_errors(t, fault), 0, ""),
            Check(f"{', '.join(observers)} rule it out", detect, bound),
            Check("broken session to reconnect", worst, RECONNECT_BOUND_S + TCP_SYN_RETRY_S),
            Check("reconnects through the dead middle", sum(m == target for _, m in delays), 0, ""),
        ],
        detect,
        worst,
    )


def test_kill_outer_middle(stack: Stack, run: RunScenario) -> None:
    """Killing a middle of the outer tier fails no new connection; the edge routes around it."""
    spec = stack.spec
    outer = middles(spec, edge_tier(spec))
    kill_and_check(stack, run, "kill-outer-middle", outer[-1], [edge(spec)])


def test_kill_inner_middle(stack: Stack, run: RunScenario) -> None:
    """Killing a middle of the inner tier fails no new connection; the outer tier avoids it."""
    spec = stack.spec
    outer = middles(spec, edge_tier(spec))
    inner = backend_diallers(spec)
    kill_and_check(stack, run, "kill-inner-middle", inner[-1], outer)
