"""The gossip agent's I/O shell on real loopback sockets, in one process: join, crash, leave."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from meshproxy.counters import Counters
from meshproxy.gossip import GossipSettings, MemberChanged, State
from meshproxy.gossip.agent import Agent
from tests.integration.harness import HOST, free_port

pytestmark = pytest.mark.integration

KEY = bytes(range(32))
SETTINGS = GossipSettings()


class Changes:
    """Every membership change any agent reports, and an event to wait for the next one."""

    def __init__(self) -> None:
        self.seen: list[MemberChanged] = []
        self.event = asyncio.Event()

    def __call__(self, change: MemberChanged) -> None:
        self.seen.append(change)
        self.event.set()

    async def until(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        """Wait until ``predicate`` holds; it is re-evaluated after each change."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self.event.clear()
                await self.event.wait()


def make(name: str, changes: Changes) -> Agent:
    port = free_port()
    return Agent(
        name,
        (HOST, port),
        (HOST, port),
        SETTINGS,
        [KEY],
        counters=Counters(),
        on_change=changes,
        rng=random.Random(name),
    )


def test_agents_join_detect_a_crash_and_see_a_leave() -> None:
    """Three agents on loopback find each other through one seed; one that stops without a
    word is declared dead by the others within the detection bound; one that leaves is seen
    as left, not dead; every packet decoded (no rejections)."""

    async def scenario() -> None:
        changes = Changes()
        a, b, c = make("a", changes), make("b", changes), make("c", changes)
        await a.start()
        await b.start([a.membership.addr])
        await c.start([a.membership.addr])
        try:

            def all_alive() -> bool:
                return all(
                    len(x.members()) == 3 and all(m.state is State.ALIVE for m in x.members())
                    for x in (a, b, c)
                )

            await changes.until(all_alive, 10)
            await c.stop()  # no leave: a crash, as far as the others can tell
            await changes.until(
                lambda: (
                    a.membership.state_of("c") is State.DEAD
                    and b.membership.state_of("c") is State.DEAD
                ),
                SETTINGS.detection_bound_s(3) + 2,
            )
            assert await b.leave()
            await changes.until(lambda: a.membership.state_of("b") is State.LEFT, 5)
            assert a.counters.get("gossip_rejected") == 0
            assert a.counters.get("gossip_packets_received") > 0
        finally:
            for agent in (a, b, c):
                await agent.stop()

    asyncio.run(scenario())
