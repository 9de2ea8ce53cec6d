"""Failure-detection figures from the simulator: ``python -m meshproxy.gossip.simreport``.

For each cluster size it converges a cluster, kills one member at a random phase of the
probe cycle and records, per surviving node, when it first saw the victim suspect and
dead; repeated over seeds. It also measures the traffic of an idle cluster and, optionally,
false positives under packet loss. Virtual time only: the figures describe the protocol
and its settings, not a Python process on a busy machine (that is the benchmark's job).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from meshproxy.gossip.messages import State
from meshproxy.gossip.settings import GossipSettings
from meshproxy.gossip.sim import LinkProfile, Simulation

_LAN = LinkProfile(delay_s=0.0002, jitter_s=0.0003)


@dataclass(frozen=True, slots=True)
class Detection:
    """One kill: seconds from the kill until the first / median / last survivor saw it."""

    first_suspect: float
    first_dead: float
    median_dead: float
    all_dead: float


def _converged(n: int, seed: int, settings: GossipSettings, link: LinkProfile) -> Simulation:
    sim = Simulation(seed=seed, settings=settings, link=link)
    sim.add_cluster(n, seeds_per_node=2 if n < 100 else 3)
    if not sim.run_until_true(sim.converged, timeout=120.0, step=0.25):
        raise RuntimeError(f"{n} nodes did not converge (seed {seed})")
    return sim


def detect(n: int, seed: int, settings: GossipSettings, link: LinkProfile = _LAN) -> Detection:
    sim = _converged(n, seed, settings, link)
    sim.run_for(1.0 + (seed % 17) * settings.probe_interval_s / 17)
    victim = sorted(sim.nodes)[seed % n]
    killed_at = sim.now
    sim.kill(victim)
    sim.run_until_true(
        lambda: sim.all_see(victim, [State.DEAD]),
        timeout=settings.detection_bound_s(n) * 3,
        step=0.02,
    )
    dead, suspect = [], []
    for observer in sim.running():
        at = sim.first_change(observer, victim, State.DEAD, after=killed_at)
        dead.append(float("inf") if at is None else at - killed_at)
        seen = sim.first_change(observer, victim, State.SUSPECT, after=killed_at)
        if seen is not None:
            suspect.append(seen - killed_at)
    dead.sort()
    return Detection(min(suspect, default=dead[0]), dead[0], statistics.median(dead), dead[-1])


def idle_traffic(n: int, settings: GossipSettings, seconds: float = 120.0) -> tuple[float, float]:
    """Packets and bytes (push-pull included) sent per node per second by a quiet cluster."""
    sim = _converged(n, 1, settings, _LAN)
    sim.run_for(5.0)

    def totals() -> list[tuple[int, int]]:
        return [
            (s.stats["packets_sent"], s.stats["bytes_sent"] + s.stats["sync_bytes_sent"])
            for s in sim.nodes.values()
        ]

    before = totals()
    sim.run_for(seconds)
    after = totals()
    packets = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    data = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    return packets / n / seconds, data / n / seconds


def false_deaths(n: int, loss: float, seconds: float, seed: int, settings: GossipSettings) -> int:
    """Members declared dead while none failed, with ``loss`` of every packet dropped."""
    link = LinkProfile(loss=loss, delay_s=0.0002, jitter_s=0.0005)
    sim = _converged(n, seed, settings, link)
    start = sim.now
    sim.run_for(seconds)
    return sum(1 for c in sim.changes if c.at >= start and c.new is State.DEAD)


def _quantiles(values: Sequence[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return f"p50 {statistics.median(ordered):5.2f}  p90 {p90:5.2f}  max {ordered[-1]:5.2f}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, nargs="*", default=[3, 5, 20, 200])
    parser.add_argument("--runs", type=int, default=30, help="kills per size (fewer at 200)")
    parser.add_argument("--loss-minutes", type=float, default=0.0, help="false-positive runs")
    parser.add_argument("--loss-seeds", type=int, default=3)
    args = parser.parse_args(argv)
    settings = GossipSettings()
    print(
        f"probe {settings.probe_interval_s}s/{settings.probe_timeout_s}s, suspicion mult "
        f"{settings.suspicion_mult} (max x{settings.suspicion_max_mult}, "
        f"k={settings.suspicion_confirmations}), gossip {settings.gossip_interval_s}s "
        f"x{settings.gossip_fanout}"
    )
    for n in args.nodes:
        runs = args.runs if n < 100 else max(1, args.runs // 10)
        results = [detect(n, seed, settings) for seed in range(runs)]
        print(f"N={n:<4} kills={runs:<3} bound={settings.detection_bound_s(n):5.2f}s")
        print(f"  first suspect   {_quantiles([r.first_suspect for r in results])}")
        print(f"  first dead      {_quantiles([r.first_dead for r in results])}")
        print(f"  median survivor {_quantiles([r.median_dead for r in results])}")
        print(f"  all survivors   {_quantiles([r.all_dead for r in results])}")
        if n <= 20:
            packets, data = idle_traffic(n, settings)
            print(f"  idle: {packets:.1f} packets/s, {data:.0f} bytes/s sent per node")
    for seed in range(args.loss_seeds if args.loss_minutes else 0):
        deaths = false_deaths(20, 0.10, args.loss_minutes * 60, seed, settings)
        print(f"N=20, 10 % loss, {args.loss_minutes:g} min, seed {seed}: {deaths} false deaths")


if __name__ == "__main__":
    main()
