"""Chaos on the two-edges topology: two app hosts, each with its edge, sharing a middle tier.

Both edges learn of a killed middle through gossip and must agree: each rules it out within
the detection bound, their views differ only briefly, and they end with the same view.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meshproxy.chaos import analysis
from meshproxy.chaos.images import Images
from meshproxy.chaos.stack import Stack
from meshproxy.chaos.timeline import Check
from tests.integration.chaos.conftest import REPO, RunScenario, running_stack
from tests.integration.chaos.kit import conclude, detection_bound_s, edge_tier, middles, since

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

AGREEMENT_BOUND_S = 1.0  # gossip spreads a death to everyone within a few gossip rounds


@pytest.fixture(scope="module")
def stack(chaos_images: Images) -> Iterator[Stack]:
    """The two-edges topology running in Docker for this module."""
    yield from running_stack(REPO / "topology" / "two-edges.toml", chaos_images)


def test_edges_agree_on_a_killed_middle(stack: Stack, run: RunScenario) -> None:
    """Both edges see a killed middle dead in the bound, within 1 s of each other, and agree."""
    spec = stack.spec
    edges = [n.name for n in spec.nodes if n.role == "edge"]
    target = middles(spec, edge_tier(spec))[1]
    bound = detection_bound_s(spec)
    try:
        with run("edges-agree", 8.0) as scenario:
            scenario.settle(2.5)
            fault = scenario.inject(f"kill {target}", lambda: stack.kill(target))
            for e in edges:
                scenario.observer.wait_for(e, target, "member", {"dead"}, bound + 2)
            scenario.settle(7.0)
            final = {e: dict(scenario.observer.views.get(e, {})) for e in edges}
    finally:
        stack.start(target)
    t = scenario.timeline
    dead = [
        analysis.first_change(t, e, target, frozenset({"dead"}), fault, "member") for e in edges
    ]
    known = [d for d in dead if d is not None]
    detect = since(max(known), fault) if len(known) == len(edges) else None
    spread = round(max(known) - min(known), 3) if len(known) == len(edges) else None
    members = [{k: v for k, v in view.items() if k[1] == "member"} for view in final.values()]
    disagree = len(set(members[0].items()) ^ set(members[1].items()))
    conclude(
        t,
        [
            Check("both edges see it dead", detect, bound),
            Check("between the two edges", spread, AGREEMENT_BOUND_S),
            Check("members the edges disagree on at the end", disagree, 0, ""),
            Check("new connections failed", analysis.connect_errors(t, fault), 0, ""),
        ],
        detect,
        None,  # nothing to recover from: the middle stays dead; the spread is a check
    )
