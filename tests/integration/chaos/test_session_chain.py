"""Chaos on the session-mode chain (A -> P1 -> {P2, P3, P4} -> B1): the edge owns its
clients' sessions, and they carry on through another middle when one is killed, paused,
cut off the mesh or from its backends, drained, or when the whole middle tier is
restarted one by one.

The load (``meshproxy.chaos.load --mode transactions``) keeps one session per worker for
the whole run and loops read-only and read-write transactions on it; each worker counts
the commits it saw succeed and reads its counter row back at the end. Every transaction's
answers are the same on any middle, so each one may be replayed. The bounds (issue 11):

- no error but the documented ones (9004 outcome unknown, 9005 rolled back), no failed
  connect and no broken session;
- nothing at all between transactions or in read-only transactions, and no 9005 (every
  transaction of the load is replayable); 9004 only on a read-write COMMIT cut off;
- no transaction committed twice: each client's counter row equals the commits it saw
  succeed, plus at most one per COMMIT that answered 9004;
- no statement waits longer than the detection bound plus 1 s (the gossip bound; for a
  middle cut off its backends, its health checks' fall time plus the gossip bound).

Each scenario's timeline (JSON, PNG) and the edge's ``session_moved`` log lines land in
the artifacts folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from meshproxy.chaos import analysis
from meshproxy.chaos.analysis import IN_SERVICE, NOT_REPLAYED, OUTCOME_UNKNOWN, RULED_OUT
from meshproxy.chaos.images import Images
from meshproxy.chaos.scenario import Scenario
from meshproxy.chaos.stack import Stack
from meshproxy.chaos.timeline import Check, Timeline
from meshproxy.topology.spec import Spec
from tests.integration.chaos.conftest import REPO, RunScenario, running_stack, wait_healthy
from tests.integration.chaos.kit import (
    START_ALLOWANCE_S,
    check_bound_s,
    conclude,
    detection_bound_s,
    edge,
    edge_tier,
    middles,
    node_settings,
    since,
)

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

SPEC = Path(
    os.environ.get("MESHPROXY_CHAOS_SESSION_SPEC", REPO / "topology" / "chain-session.toml")
)
WORKERS = 12  # the load's default
LOAD_ARGS = ("--mode", "transactions", "--workers", str(WORKERS))
WAIT_SLACK_S = 1.0  # a statement on a failed middle waits for detection, then this at most
DRAIN_TIMEOUT_S = 30.0  # the middles' drain_timeout_s (the default)


@pytest.fixture(scope="module")
def stack(chaos_images: Images) -> Iterator[Stack]:
    """The session-mode chain running in Docker for this module."""
    yield from running_stack(SPEC, chaos_images)


@pytest.fixture
def run(stack: Stack, artifacts: Path) -> Iterator[RunScenario]:
    """As the suite's ``run``, with the transactions load; each scenario also keeps the
    edge's session_moved lines beside its timeline."""
    runs: list[Scenario] = []

    def run(name: str, duration_s: float) -> Scenario:
        wait_healthy(stack)
        scenario = Scenario(stack, name, duration_s, artifacts, load_args=LOAD_ARGS)
        runs.append(scenario)
        return scenario

    yield run
    for scenario in runs:
        json_path, _ = scenario.write()
        # Log lines start with their UTC time (2026-12-06T06:23:22.694Z): this run's only.
        since_t0 = datetime.fromtimestamp(scenario.t0, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
        lines = [
            line
            for line in stack.logs(edge(stack.spec), tail=3000).splitlines()
            if line[:23] >= since_t0[:23]
            and ("session_moved" in line or "ERR" in line or "error" in line.lower())
        ]
        json_path.with_suffix(".edge.log").write_text("\n".join(lines) + "\n")


def session_checks(t: Timeline, fault: float, bound: float) -> list[Check]:
    """The bounds every session-mode scenario promises (see the module)."""
    unknown_commits = analysis.errors_with(t, OUTCOME_UNKNOWN, "COMMIT")
    mismatches = analysis.counter_mismatches(t)
    return [
        Check("errors but 9004/9005, broken sessions", analysis.undocumented_errors(t), 0, ""),
        Check(
            "errors between or in read-only transactions", analysis.errors_outside_writes(t), 0, ""
        ),
        Check(
            "replayable transactions rolled back (9005)",
            analysis.errors_with(t, NOT_REPLAYED),
            0,
            "",
        ),
        Check(
            "9004 but on a read-write COMMIT",
            analysis.errors_with(t, OUTCOME_UNKNOWN) - unknown_commits,
            0,
            "",
        ),
        # At most one COMMIT in flight per session when the fault strikes.
        Check("read-write COMMITs answered 9004", unknown_commits, WORKERS, ""),
        Check("clients whose counter != commits seen (+9004s)", len(mismatches), 0, ""),
        Check("clients that reported their counter", len(t.clients), WORKERS, "", at_least=True),
        Check("longest statement wait", analysis.longest_statement_wait(t), bound + WAIT_SLACK_S),
        Check(
            "transactions committed after the fault",
            analysis.transactions(t, fault),
            1,
            "",
            at_least=True,
        ),
    ]


def ruled_out(t: Timeline, p1: str, target: str, fault: float) -> float | None:
    return since(analysis.first_change(t, p1, target, RULED_OUT, fault), fault)


def ruled_out_checks(
    t: Timeline, target: str, fault: float, detect: float | None, bound: float
) -> list[Check]:
    """The edge ruled the middle out within ``bound`` of the fault (``detect``), and the
    middle had carried transactions before it (else the fault tested nothing)."""
    return [
        Check("edge rules the middle out", detect, bound),
        Check(
            "transactions through it before",
            analysis.sessions_on(t, target, 0, fault),
            20,
            "",
            at_least=True,
        ),
    ]


def busiest_middle(stack: Stack, scenario: Scenario, least: int = 20) -> str:
    """The middle of the edge's tier that has run the most transactions so far (sessions
    are persistent: a middle may carry none, and a fault on it would test nothing); waits
    up to 5 s for one to have run ``least``."""
    tier = middles(stack.spec, edge_tier(stack.spec))
    deadline = scenario.now() + 5.0
    while True:
        target = max(tier, key=scenario.sessions_through)
        if scenario.sessions_through(target) >= least or scenario.now() > deadline:
            return target
        scenario.settle(scenario.now() + 0.1)


Action = Callable[[str], None]  # a fault or repair of the middle named


def fault_on_a_middle(
    stack: Stack,
    run: RunScenario,
    name: str,
    duration_s: float,
    fault: tuple[str, Action],
    repair: tuple[str, Action],
    hold_s: float = 1.0,
    bound_of: Callable[[str], float] | None = None,
) -> None:
    """Run the load, inject ``fault`` on the busiest middle, wait until the edge rules it
    out, then ``hold_s``, ``repair`` it, and check the bounds. Actions are named with
    ``{}`` for the middle. The detection bound is the gossip layer's, or ``bound_of(the
    middle)``."""
    spec, p1 = stack.spec, edge(stack.spec)
    bound = detection_bound_s(spec)
    target = ""
    injected = repaired = False
    try:
        with run(name, duration_s) as scenario:
            scenario.settle(2.5)
            target = busiest_middle(stack, scenario)
            if bound_of is not None:
                bound = bound_of(target)
            injected = True
            at = scenario.inject(fault[0].format(target), lambda: fault[1](target))
            scenario.observer.wait_for(p1, target, "route", RULED_OUT, bound + 2)
            scenario.settle(scenario.now() + hold_s)
            scenario.inject(repair[0].format(target), lambda: repair[1](target))
            repaired = True
    finally:
        if injected and not repaired:
            repair[1](target)
    t = scenario.timeline
    detect = ruled_out(t, p1, target, at)
    out = at + (detect if detect is not None else bound) + 0.2
    conclude(
        t,
        [
            *ruled_out_checks(t, target, at, detect, bound),
            Check(
                "transactions through it while out",
                analysis.sessions_on(t, target, out, out + hold_s - 0.2),
                0,
                "",
            ),
            *session_checks(t, at, bound),
        ],
        detect,
        None,
    )


def test_session_kill_middle(stack: Stack, run: RunScenario) -> None:
    """A middle killed (SIGKILL) under transactions: its sessions carry on elsewhere."""
    fault_on_a_middle(
        stack, run, "session-kill-middle", 11.0, ("kill {}", stack.kill), ("start {}", stack.start)
    )


def test_session_pause_middle(stack: Stack, run: RunScenario) -> None:
    """A middle frozen (docker pause: SIGSTOP's cgroup twin) until the edge rules it out,
    then 2 s more, then thawed: statements in flight on it move within the bound (a replay
    that needs a row the frozen middle's transaction locked waits until the thaw)."""
    fault_on_a_middle(
        stack,
        run,
        "session-pause-middle",
        13.0,
        ("pause {}", stack.pause),
        ("unpause {}", stack.unpause_if_paused),
        hold_s=2.0,
    )


def test_session_cut_middle_from_mesh(stack: Stack, run: RunScenario) -> None:
    """A middle cut off the mesh network (edge and gossip lose it; it keeps its backend
    connections) until the edge rules it out, then a second more, then put back."""
    mesh = stack.spec.mesh_network
    fault_on_a_middle(
        stack,
        run,
        "session-cut-middle",
        13.0,
        (f"disconnect {{}} from {mesh}", lambda m: stack.disconnect(m, mesh)),
        (f"connect {{}} to {mesh}", lambda m: stack.connect(m, mesh)),
    )


def back_network(spec: Spec, middle: str) -> str:
    """The middle's network to its backends (its one that is not the mesh)."""
    node = next(n for n in spec.nodes if n.name == middle)
    return next(n for n in node.networks if n != spec.mesh_network)


def test_session_cut_middle_from_backends(stack: Stack, run: RunScenario) -> None:
    """A middle cut off its backends' network (edge and gossip still reach it) until the
    edge rules it out, then a second more, then put back. Nothing the edge sees fails
    at once: the middle's health checks must fail first (``fall`` checks, each ending at
    its timeout: ``check_bound_s`` of its pool's check), then it gossips that it has no
    healthy backend, which reaches the edge within the gossip bound; only then does the
    edge rule it out and, with ``close_sessions_on_down``, drop its connections to it, so
    that a statement left waiting on the cut middle's server connection moves. The
    detection bound is therefore fall x (interval + timeout) plus the gossip bound, as in
    the chain's cut-middle-from-backends (a statement the middle answers with its own
    9001/9003 before that moves at once). A replay that needs a row the cut middle's
    transaction locked on the server waits until the middle is back on the network and
    TCP's next retransmission lets the server end that transaction (as for the pause,
    until the thaw): the cut is kept short (1 s past detection) so that this stays
    within the bound; a cut longer than the load's read timeout breaks such sessions."""
    spec = stack.spec
    back = back_network(spec, middles(spec, edge_tier(spec))[0])
    fault_on_a_middle(
        stack,
        run,
        "session-cut-middle-from-backends",
        18.0,
        (f"disconnect {{}} from {back}", lambda m: stack.disconnect(m, back_network(spec, m))),
        (f"connect {{}} to {back}", lambda m: stack.connect(m, back_network(spec, m))),
        bound_of=lambda m: (
            check_bound_s(node_settings(spec, m).pool[0].check) + detection_bound_s(spec)
        ),
    )


def test_session_drain_middle(stack: Stack, run: RunScenario) -> None:
    """A middle stopped with SIGTERM drains: its sessions move at transaction boundaries,
    and it exits by itself; nobody sees anything."""
    spec, p1 = stack.spec, edge(stack.spec)
    bound = detection_bound_s(spec)
    codes: list[int] = []
    target = ""
    try:
        with run("session-drain-middle", 9.0) as scenario:
            scenario.settle(2.5)
            target = busiest_middle(stack, scenario)
            at = scenario.inject(f"SIGTERM {target}", stopper(stack, target, codes))
            exited = scenario.now()
    finally:
        if target:
            stack.start(target)
    t = scenario.timeline
    detect = ruled_out(t, p1, target, at)
    conclude(
        t,
        [
            *ruled_out_checks(t, target, at, detect, bound),
            Check("drained and exited by itself", 0 if codes == [0] else 1, 0, ""),
            Check("drain to exit", round(exited - at, 3), DRAIN_TIMEOUT_S),
            *session_checks(t, at, bound),
        ],
        detect,
        round(exited - at, 3),
    )


def stopper(stack: Stack, target: str, codes: list[int]) -> Callable[[], None]:
    """A fault: SIGTERM ``target`` and wait until it exits; its exit code goes to ``codes``."""
    return lambda: codes.append(stack.stop(target, DRAIN_TIMEOUT_S))


def starter(stack: Stack, target: str) -> Callable[[], None]:
    return lambda: stack.start(target)


def test_session_roll_middle_tier(stack: Stack, run: RunScenario) -> None:
    """Every middle of the tier in turn is stopped (SIGTERM: drained), started again, and
    taken back by the edge before the next one: a rolling restart under load loses
    nothing and nobody sees anything."""
    spec, p1 = stack.spec, edge(stack.spec)
    tier = middles(spec, edge_tier(spec))
    bound = detection_bound_s(spec)
    codes: list[int] = []
    back: list[float | None] = []
    try:
        with run("session-roll-middles", 8.0 + 7.0 * len(tier)) as scenario:
            scenario.settle(2.5)
            first = None
            for target in tier:
                stopped = scenario.inject(
                    f"SIGTERM {target}",
                    stopper(stack, target, codes),
                )
                first = stopped if first is None else first
                started = scenario.inject(f"start {target}", starter(stack, target))
                scenario.observer.wait_for(p1, target, "member", {"alive"}, START_ALLOWANCE_S)
                routed = scenario.observer.wait_for(
                    p1, target, "route", IN_SERVICE, START_ALLOWANCE_S
                )
                back.append(None if routed is None else round(routed - started, 3))
    finally:
        for target in tier:
            stack.start(target)
    t = scenario.timeline
    assert first is not None
    slowest = None if None in back else max(b for b in back if b is not None)
    conclude(
        t,
        [
            Check("middles drained and exited by themselves", sum(c != 0 for c in codes), 0, ""),
            Check("slowest back in the edge's routing", slowest, START_ALLOWANCE_S),
            *session_checks(t, first, bound),
        ],
        None,
        slowest,
    )
