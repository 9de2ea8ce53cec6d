"""Whole clusters in the simulator: detection bounds, loss, partitions, pauses, restarts."""

from __future__ import annotations

import statistics

import pytest

from meshproxy.gossip.messages import NodeMeta, ServiceHealth, State
from meshproxy.gossip.settings import GossipSettings
from meshproxy.gossip.sim import LinkProfile, Simulation

SETTINGS = GossipSettings()
LAN = LinkProfile(delay_s=0.0002, jitter_s=0.0003)


def cluster(
    n: int, seed: int, link: LinkProfile = LAN, seeds_per_node: int = 2
) -> tuple[Simulation, list[str]]:
    """A converged cluster of ``n`` nodes."""
    sim = Simulation(seed=seed, settings=SETTINGS, link=link)
    names = sim.add_cluster(n, seeds_per_node=seeds_per_node)
    assert sim.run_until_true(sim.converged, timeout=90.0, step=0.25)
    return sim, names


def deaths(sim: Simulation, since: float, member: str | None = None) -> list[tuple[str, str]]:
    """(observer, member) for every member declared dead since ``since``."""
    return [
        (c.observer, c.member)
        for c in sim.changes
        if c.at >= since and c.new is State.DEAD and member in (None, c.member)
    ]


def kill_and_measure(sim: Simulation, victim: str) -> list[float]:
    """Kill ``victim``; return how long each live node took to see it dead."""
    killed_at = sim.now
    sim.kill(victim)
    bound = SETTINGS.detection_bound_s(len(sim.nodes))
    sim.run_until_true(lambda: sim.all_see(victim, [State.DEAD]), timeout=bound + 5.0, step=0.02)
    times = []
    for observer in sim.running():
        at = sim.first_change(observer, victim, State.DEAD, after=killed_at)
        times.append(float("inf") if at is None else at - killed_at)
    assert {m for _, m in deaths(sim, killed_at)} == {victim}, "a live node was declared dead"
    return times


@pytest.mark.parametrize(("n", "runs"), [(3, 8), (5, 8), (20, 3)])
def test_every_live_node_sees_a_kill_within_the_bound(n: int, runs: int) -> None:
    """After a kill -9, every live node sees the victim dead within detection_bound_s(n)."""
    bound = SETTINGS.detection_bound_s(n)
    for seed in range(runs):
        sim, names = cluster(n, seed)
        sim.run_for(1.0 + seed * 0.0371)  # kill at different phases of the probe cycle
        times = kill_and_measure(sim, names[seed % n])
        assert max(times) <= bound, (seed, times)


def test_kill_detected_within_the_bound_at_200_nodes() -> None:
    """At N = 200 too, every one of the 199 survivors sees the kill within the bound."""
    sim, names = cluster(200, seed=7, seeds_per_node=3)
    times = kill_and_measure(sim, names[123])
    assert len(times) == 199
    assert max(times) <= SETTINGS.detection_bound_s(200), max(times)


def test_median_detection_at_5_nodes_is_within_the_target() -> None:
    """The issue's target: median detection at N = 5 of at most 1.5 s (Serf local: ~4.5 s)."""
    medians = []
    for seed in range(12):
        sim, names = cluster(5, seed=100 + seed)
        sim.run_for(1.0 + seed * 0.0173)
        medians.append(statistics.median(kill_and_measure(sim, names[seed % 5])))
    assert statistics.median(medians) <= 1.5, medians


def test_no_live_node_is_declared_dead_at_10_percent_loss() -> None:
    """Three virtual minutes at N = 20 with 10 % loss: suspicions are refuted, nobody dies.

    (Ten-minute runs over several seeds, too slow for the unit suite, are in the report:
    ``python -m meshproxy.gossip.simreport --nodes --loss-minutes 10``.)
    """
    sim, _ = cluster(20, seed=11, link=LinkProfile(loss=0.10, delay_s=0.0002, jitter_s=0.0005))
    start = sim.now
    sim.run_for(180.0)
    assert deaths(sim, start) == []
    refutations = sum(n.membership.stats["refutations"] for n in sim.nodes.values())
    assert refutations > 0, "the loss never caused a suspicion: the test proves nothing"


def test_duplicated_and_reordered_packets_do_no_harm() -> None:
    """With 30 % duplication and jitter that reorders packets, the cluster stays whole."""
    link = LinkProfile(delay_s=0.001, jitter_s=0.02, duplicate=0.3)
    sim, _ = cluster(8, seed=12, link=link)
    start = sim.now
    sim.run_for(60.0)
    assert deaths(sim, start) == []
    assert sim.converged()
    assert sum(n.stats["rejected_replay"] for n in sim.nodes.values()) > 0


def test_partition_heals_into_one_view() -> None:
    """Two halves that declared each other dead merge back once the network heals."""
    sim, names = cluster(10, seed=13)
    left, right = names[:5], names[5:]
    sim.partition(left, right)
    sim.run_for(20.0)
    assert all(sim.state_of(left[0], m) is State.DEAD for m in right)
    assert all(sim.state_of(right[0], m) is State.DEAD for m in left)
    sim.heal()
    healed_at = sim.now
    # A rejoin tick (every rejoin_interval_s +-20 %) on either side pushes state across.
    assert sim.run_until_true(sim.converged, timeout=3 * SETTINGS.rejoin_interval_s, step=0.1)
    assert sim.now - healed_at <= 3 * SETTINGS.rejoin_interval_s


def test_one_way_link_failure_declares_nobody_dead() -> None:
    """If a cannot reach b (but b reaches a), indirect probes route around it: no deaths."""
    sim, names = cluster(6, seed=14)
    sim.block(names[0], names[1])
    start = sim.now
    sim.run_for(60.0)
    assert deaths(sim, start) == []
    assert sim.converged()


def test_node_that_cannot_hear_is_declared_dead_and_returns_after_healing() -> None:
    """A node whose inbound traffic is cut (it can still send) is dead to others until healed."""
    sim, names = cluster(6, seed=15)
    deaf = names[2]
    for other in names:
        if other != deaf:
            sim.block(other, deaf)
    sim.run_for(15.0)
    assert sim.all_see(deaf, [State.DEAD], observers=[n for n in names if n != deaf])
    sim.heal()
    assert sim.run_until_true(sim.converged, timeout=3 * SETTINGS.rejoin_interval_s)


def test_short_pause_is_refuted_and_never_declared_dead() -> None:
    """A node stopped for less than the suspicion timeout refutes on resume: never dead."""
    sim, names = cluster(5, seed=16)
    start = sim.now
    sim.pause(names[1])
    sim.run_for(0.5)
    sim.resume(names[1])
    sim.run_for(20.0)
    assert deaths(sim, start) == []
    assert sim.converged()


def test_long_paused_node_refutes_on_resume_and_stays_alive() -> None:
    """A node paused past its suspicion is declared dead, then refutes on resume and stays."""
    sim, names = cluster(5, seed=17)
    paused = names[3]
    sim.pause(paused)
    sim.run_for(8.0)
    assert sim.all_see(paused, [State.DEAD], observers=[n for n in names if n != paused])
    dead_incarnation = sim.nodes[names[0]].membership.member(paused)
    assert dead_incarnation is not None
    sim.resume(paused)
    resumed_at = sim.now
    assert sim.run_until_true(lambda: sim.all_see(paused, [State.ALIVE]), timeout=2.0, step=0.01)
    assert sim.nodes[paused].membership.incarnation > dead_incarnation.incarnation
    sim.run_for(60.0)
    assert deaths(sim, resumed_at) == []
    assert sim.converged()


def test_graceful_leave_is_seen_as_left_not_dead() -> None:
    """A node that leaves is reported left by everyone, quickly, and never as dead."""
    sim, names = cluster(5, seed=18)
    start = sim.now
    sim.leave(names[2])
    assert sim.run_until_true(lambda: sim.all_see(names[2], [State.LEFT]), timeout=1.0, step=0.01)
    sim.run_for(SETTINGS.leave_timeout_s + 5.0)
    assert sim.nodes[names[2]].left, "LeaveComplete was never issued"
    assert deaths(sim, start) == []
    assert sim.all_see(names[2], [State.LEFT])


def test_restarted_node_rejoins_with_a_higher_incarnation() -> None:
    """A killed node restarted with empty state outbids the incarnation it died at."""
    sim, names = cluster(5, seed=19)
    victim = names[4]
    sim.kill(victim)
    assert sim.run_until_true(lambda: sim.all_see(victim, [State.DEAD]), timeout=10.0)
    seen = sim.nodes[names[0]].membership.member(victim)
    assert seen is not None
    sim.run_for(2.0)
    sim.restart(victim)
    assert sim.run_until_true(sim.converged, timeout=5.0, step=0.05)
    for observer in names:
        member = sim.nodes[observer].membership.member(victim)
        assert member is not None
        assert member.incarnation > seen.incarnation


def test_metadata_change_reaches_every_node() -> None:
    """A middle's new backend health is in every node's view within a second, at N = 20."""
    sim, names = cluster(20, seed=20)
    meta = NodeMeta(
        role="middle",
        tier="mid",
        services=(ServiceHealth("orders", 1, 2, ("b2",)),),
        active_connections=40,
    )
    sim.set_meta(names[5], meta)

    def everyone_knows() -> bool:
        views = (sim.nodes[o].membership.member(names[5]) for o in names)
        return all(m is not None and m.meta == meta for m in views)

    assert sim.run_until_true(everyone_knows, timeout=1.0, step=0.01)


def test_node_with_the_wrong_key_is_kept_out() -> None:
    """A node sealing with a key nobody else holds never gets into anyone's view."""
    sim, names = cluster(4, seed=21)
    sim.add("intruder", seeds=[names[0]], keys=[bytes(32)])
    sim.run_for(10.0)
    assert all(sim.state_of(n, "intruder") is None for n in names)
    assert sim.nodes[names[0]].stats["rejected_auth_failed"] > 0
    assert sim.state_of("intruder", names[0]) is None


def test_replayed_and_tampered_packets_are_rejected() -> None:
    """Captured packets replayed later, or altered, are dropped and counted by the receiver."""
    sim, _ = cluster(3, seed=22)
    captured: list[tuple[str, str, bytes]] = []
    sim.tap = lambda src, dst, data: captured.append((src, dst, data))
    sim.run_for(1.0)
    sim.tap = None
    src, dst, data = captured[-1]
    receiver = sim.nodes[dst]
    sim.inject(sim.nodes[src].addr, dst, data)
    assert receiver.stats["rejected_replay"] == 1
    sim.run_for(40.0)
    sim.inject(sim.nodes[src].addr, dst, data)
    assert receiver.stats["rejected_stale"] == 1
    tampered = bytearray(captured[-2][2])
    tampered[-3] ^= 0xFF
    sim.inject(sim.nodes[src].addr, captured[-2][1], bytes(tampered))
    assert sim.nodes[captured[-2][1]].stats["rejected_auth_failed"] == 1


def test_the_simulation_is_deterministic() -> None:
    """The same seed replays the same run, change for change, even with loss and jitter."""
    logs = []
    for _ in range(2):
        sim, names = cluster(5, seed=23, link=LinkProfile(loss=0.05, jitter_s=0.01))
        sim.kill(names[1])
        sim.run_for(10.0)
        logs.append(sim.changes)
    assert logs[0] == logs[1]


def test_simreport_figures_are_ordered_and_within_the_bound() -> None:
    """The report's detection figures come out ordered (suspect, first, median, all dead)."""
    from meshproxy.gossip.simreport import detect

    d = detect(4, seed=3, settings=SETTINGS)
    assert d.first_suspect <= d.first_dead <= d.median_dead <= d.all_dead
    assert d.all_dead <= SETTINGS.detection_bound_s(4)
