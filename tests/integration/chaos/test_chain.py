"""Chaos on the chain topology (A -> P1 -> {P2, P3, P4} -> {B1, B2}) under steady load.

Every scenario runs a few seconds of load from the app container, injects one fault and
asserts the bound it promises; its timeline (JSON and PNG) lands in the artifacts folder.
The spec is ``topology/chain.toml``; ``MESHPROXY_CHAOS_SPEC`` points the same scenarios at
another spec (its compose files rendered into ``compose/<name>/``). Victims are picked by
role: the first edge, a middle of that edge's tier, a middle that dials the backends, the
first backend.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshproxy.chaos import analysis
from meshproxy.chaos.analysis import IN_SERVICE, RULED_OUT
from meshproxy.chaos.images import Images
from meshproxy.chaos.scenario import Scenario
from meshproxy.chaos.stack import Stack
from meshproxy.chaos.timeline import Check
from tests.integration.chaos.conftest import REPO, RunScenario, running_stack
from tests.integration.chaos.kit import (
    ANGEL_BOUND_S,
    RECONNECT_BOUND_S,
    SAMPLE_S,
    START_ALLOWANCE_S,
    TCP_SYN_RETRY_S,
    Prober,
    backend_diallers,
    check_bound_s,
    conclude,
    detection_bound_s,
    edge,
    edge_tier,
    middles,
    node_settings,
    rise_bound_s,
    since,
    victim,
    victim_sessions_end,
)

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

SPEC = Path(os.environ.get("MESHPROXY_CHAOS_SPEC", REPO / "topology" / "chain.toml"))


@pytest.fixture(scope="module")
def stack(chaos_images: Images) -> Iterator[Stack]:
    """The chain topology running in Docker for this module."""
    yield from running_stack(SPEC, chaos_images)


def test_kill_middle(stack: Stack, run: RunScenario) -> None:
    """A killed middle fails no new connection; its sessions end and reconnect elsewhere in 1 s."""
    spec, p1, target = stack.spec, edge(stack.spec), victim(stack.spec)
    try:
        with run("kill-middle", 8.0) as scenario:
            scenario.settle(2.5)
            fault = scenario.inject(f"kill {target}", lambda: stack.kill(target))
            scenario.observer.wait_for(p1, target, "member", {"dead"}, detection_bound_s(spec) + 2)
    finally:
        stack.start(target)
    t = scenario.timeline
    detect = since(analysis.first_change(t, p1, target, RULED_OUT, fault), fault)
    delays = analysis.reconnects(t, target, fault)
    worst = max((d for d, _ in delays), default=0.0)
    through_victim = sum(1 for _, m in delays if m == target)
    conclude(
        t,
        [
            Check("new connections failed", analysis.connect_errors(t, fault), 0, ""),
            Check("edge rules the middle out", detect, detection_bound_s(spec)),
            Check("broken session to reconnect", round(worst, 3), RECONNECT_BOUND_S),
            Check("reconnects through the dead middle", through_victim, 0, ""),
            Check(
                "errors not on the dead middle", analysis.errors_elsewhere(t, fault, target), 0, ""
            ),
        ],
        detect,
        round(worst, 3),
    )


def test_pause_middle(stack: Stack, run: RunScenario) -> None:
    """A paused middle gets no new sessions within the detection bound, and rejoins on unpause."""
    spec, p1, target = stack.spec, edge(stack.spec), victim(stack.spec)
    bound = detection_bound_s(spec)
    try:
        with run("pause-middle", 16.0) as scenario:
            scenario.settle(2.5)
            scenario.settle_on(target, 20, 5.0)
            fault = scenario.inject(f"pause {target}", lambda: stack.pause(target))
            scenario.observer.wait_for(p1, target, "route", RULED_OUT, bound + 2)
            scenario.settle(fault + bound + 1.0)
            repair = scenario.inject(f"unpause {target}", lambda: stack.unpause(target))
            scenario.observer.wait_for(p1, target, "route", IN_SERVICE, 8.0)
    finally:
        stack.unpause_if_paused(target)
    t = scenario.timeline
    detect = since(analysis.first_change(t, p1, target, RULED_OUT, fault, "route"), fault)
    back = since(analysis.first_change(t, p1, target, IN_SERVICE, repair, "route"), repair)
    # New sessions through the paused middle: none can start while it is frozen.
    stuck = analysis.sessions_on(t, target, fault + (detect or bound), repair)
    conclude(
        t,
        [
            Check("edge stops routing to it", detect, bound),
            Check("new sessions through it while paused", stuck, 0, ""),
            Check("new connections failed", analysis.connect_errors(t, fault), 0, ""),
            Check("back in the edge's routing after unpause", back, bound),
            *victim_sessions_end(t, target, fault, bound),
        ],
        detect,
        back,
    )


def test_cut_middle_from_backends(stack: Stack, run: RunScenario) -> None:
    """Edges route around a middle cut off its backends; only sessions through it fail."""
    spec, p1, target = stack.spec, edge(stack.spec), backend_diallers(stack.spec)[0]
    back_net = next(
        n
        for n in next(x for x in spec.nodes if x.name == target).networks
        if n != spec.mesh_network
    )
    pool_check = node_settings(spec, target).pool[0].check
    bound = check_bound_s(pool_check) + detection_bound_s(spec)
    try:
        with run("cut-middle-from-backends", 12.0) as scenario:
            scenario.settle(2.5)
            scenario.settle_on(target, 20, 5.0)
            fault = scenario.inject(
                f"disconnect {target} from {back_net}", lambda: stack.disconnect(target, back_net)
            )
            scenario.observer.wait_for(p1, target, "route", RULED_OUT, bound + 2)
    finally:
        stack.connect(target, back_net)
    t = scenario.timeline
    detect = since(analysis.first_change(t, p1, target, RULED_OUT, fault, "route"), fault)
    died = analysis.first_change(t, p1, target, frozenset({"dead", "suspect"}), fault, "member")
    after_detect = fault + (detect or bound) + SAMPLE_S
    conclude(
        t,
        [
            Check("edge routes around it", detect, bound),
            Check("times gossip suspected it", 0 if died is None else 1, 0, ""),
            Check(
                "errors not on the cut middle", analysis.errors_elsewhere(t, fault, target), 0, ""
            ),
            Check(
                "new sessions through it after",
                analysis.sessions_on(t, target, after_detect),
                0,
                "",
            ),
            *victim_sessions_end(t, target, fault, bound),
        ],
        detect,
        None,
    )


def test_partition_edge_from_one_middle(stack: Stack, run: RunScenario) -> None:
    """An edge cut off one middle that the others still reach stops using it; nothing fails."""
    spec, p1, target = stack.spec, edge(stack.spec), victim(stack.spec)
    tier_check = node_settings(spec, p1).tier[0].check
    bound = check_bound_s(tier_check)
    try:
        with run("partition-edge-middle", 11.0) as scenario:
            scenario.settle(2.5)
            scenario.settle_on(target, 20, 5.0)
            fault = scenario.inject(
                f"partition {p1} | {target}", lambda: stack.partition(p1, target)
            )
            scenario.observer.wait_for(p1, target, "route", RULED_OUT, bound + 2)
            scenario.settle(fault + 4.5)
            repair = scenario.inject(f"heal {p1} | {target}", stack.heal)
    finally:
        stack.heal()
    t = scenario.timeline
    detect = since(analysis.first_change(t, p1, target, RULED_OUT, fault, "route"), fault)
    others = [m for m in middles(spec, edge_tier(spec)) if m != target]
    other_view = analysis.first_change(t, others[0], target, frozenset({"dead"}), fault, "member")
    after_detect = fault + (detect or bound) + SAMPLE_S
    conclude(
        t,
        [
            Check("edge avoids the middle", detect, bound),
            Check("new connections failed", analysis.connect_errors(t, fault), 0, ""),
            Check(
                "new sessions through it after",
                analysis.sessions_on(t, target, after_detect, repair),
                0,
                "",
            ),
            Check("other middles declared it dead", 0 if other_view is None else 1, 0, ""),
            *victim_sessions_end(t, target, fault, bound),
        ],
        detect,
        None,
    )


def test_kill_backend(stack: Stack, run: RunScenario) -> None:
    """A killed backend leaves every middle's pool within fall x interval, and comes back."""
    spec = stack.spec
    target = spec.backends[0].name
    diallers = backend_diallers(spec)
    check = node_settings(spec, diallers[0]).pool[0].check
    try:
        with run("kill-backend", 16.0) as scenario:
            scenario.settle(2.5)
            fault = scenario.inject(f"kill {target}", lambda: stack.kill(target))
            for middle in diallers:
                scenario.observer.wait_for(
                    middle, target, "route", RULED_OUT, check_bound_s(check) + 2
                )
            scenario.settle(fault + 4.0)
            repair = scenario.inject(f"start {target}", lambda: stack.start(target))
            for middle in diallers:
                scenario.observer.wait_for(middle, target, "route", IN_SERVICE, START_ALLOWANCE_S)
    finally:
        stack.start(target)
    t = scenario.timeline
    downs = [analysis.first_change(t, m, target, RULED_OUT, fault, "route") for m in diallers]
    ups = [analysis.first_change(t, m, target, IN_SERVICE, repair, "route") for m in diallers]
    detect = None if None in downs else round(max(d for d in downs if d is not None) - fault, 3)
    back = None if None in ups else round(max(u for u in ups if u is not None) - repair, 3)
    conclude(
        t,
        [
            Check("every middle marks it down", detect, check_bound_s(check)),
            Check("new connections failed", analysis.connect_errors(t, fault), 0, ""),
            Check("every middle takes it back", back, rise_bound_s(check) + START_ALLOWANCE_S),
        ],
        detect,
        back,
    )


def test_angel_restarts_edge_process(stack: Stack, run: RunScenario) -> None:
    """When every process of the edge but its angel is killed (standbys too), the angel has
    it greeting new connections again within 1 s."""
    p1 = edge(stack.spec)
    with edge_prober(stack) as prober, run("kill-edge-process", 7.0) as scenario:
        scenario.settle(2.5)
        fault = scenario.inject(
            f"kill -9 {p1} node processes",
            lambda: stack.kill_process(p1, "meshproxy.runtime.child"),
        )
    conclude_served_again(scenario, prober, fault)


def test_standby_replaces_killed_edge_worker(stack: Stack, run: RunScenario) -> None:
    """When the edge's worker alone is killed, its standby greets new connections within 1 s
    (sooner than a fresh process: no interpreter to start)."""
    p1 = edge(stack.spec)
    with edge_prober(stack) as prober, run("kill-edge-worker", 7.0) as scenario:
        scenario.settle(2.5)
        worker = int(last_worker_start(stack, p1).split("pid=")[1].split()[0])
        fault = scenario.inject(f"kill -9 {p1} worker", lambda: stack.kill_pid(p1, worker))
    conclude_served_again(scenario, prober, fault)
    assert "standby=yes" in last_worker_start(stack, p1), "the standby did not take over"


def edge_prober(stack: Stack) -> Prober:
    """A prober of the first edge's first service, at the address its apps use."""
    spec = stack.spec
    app = next(n.name for n in spec.nodes if n.role == "app")
    return Prober(spec.edge_address(app), spec.services[0].port)


def last_worker_start(stack: Stack, node: str) -> str:
    """The node's angel's last ``angel_started_child`` line for its worker."""
    lines = stack.logs(node, tail=500).splitlines()
    return [line for line in lines if "angel_started_child" in line and "worker-0" in line][-1]


def conclude_served_again(scenario: Scenario, prober: Prober, fault: float) -> None:
    """The restart bound on the prober's first greeting; the load's clients are reported
    with a looser bound, as one whose SYN went out into the restart may wait for TCP's
    one-second SYN retry."""
    t = scenario.timeline
    greeted = prober.served_again(t.t0 + fault)
    served = since(None if greeted is None else greeted - t.t0, fault)
    clients = since(analysis.first_connect(t, fault), fault)
    conclude(
        t,
        [
            Check("edge greets new connections again", served, ANGEL_BOUND_S),
            Check("a load client's next session", clients, ANGEL_BOUND_S + TCP_SYN_RETRY_S),
            # The angel holds the listening sockets: what connects meanwhile waits in the
            # queue for the replacement workers.
            Check("new connections failed", analysis.later_connect_errors(t, fault), 0, ""),
        ],
        served,
        clients,
    )


def test_restart_killed_middle(stack: Stack, run: RunScenario) -> None:
    """A killed middle that is started again rejoins gossip and takes new connections again."""
    spec, p1, target = stack.spec, edge(stack.spec), victim(stack.spec)
    bound = detection_bound_s(spec)
    try:
        with run("restart-middle", 14.0) as scenario:
            scenario.settle(2.0)
            scenario.inject(f"kill {target}", lambda: stack.kill(target))
            scenario.observer.wait_for(p1, target, "member", {"dead"}, bound + 2)
            repair = scenario.inject(f"start {target}", lambda: stack.start(target))
            scenario.observer.wait_for(p1, target, "route", IN_SERVICE, START_ALLOWANCE_S)
    finally:
        stack.start(target)
    t = scenario.timeline
    alive = since(
        analysis.first_change(t, p1, target, frozenset({"alive"}), repair, "member"), repair
    )
    routed = since(analysis.first_change(t, p1, target, IN_SERVICE, repair, "route"), repair)
    taken = analysis.sessions_on(t, target, repair + (routed or 0.0))
    conclude(
        t,
        [
            Check("rejoins gossip", alive, START_ALLOWANCE_S),
            Check("back in the edge's routing", routed, START_ALLOWANCE_S),
            Check("new sessions through it after", taken, 1, "", at_least=True),
        ],
        routed,
        routed,
    )
