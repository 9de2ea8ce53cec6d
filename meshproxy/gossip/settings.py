"""Gossip tuning: one frozen record, and the formulas that scale it with the cluster size.

The formulas are memberlist's (``suspicionTimeout``, ``retransmitLimit``, ``pushPullScale``),
so that figures measured against Serf compare like with like; the defaults are ours, tuned
for loopback and LAN meshes where an ack comes back in well under a millisecond.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshproxy.gossip.errors import GossipError


@dataclass(frozen=True, slots=True)
class SuspicionTimeouts:
    """How long a suspected member has to refute, given the cluster size."""

    confirmations: int  # independent suspicions that shrink the timeout from max to min
    min_s: float
    max_s: float


@dataclass(frozen=True, slots=True)
class GossipSettings:
    """Timing and fan-out of the membership protocol (seconds, counts)."""

    # A probe round per interval. 200 ms is five times Serf's `local` pace: loopback and LAN
    # acks take well under 1 ms, so the interval is bounded by CPU and packet rate, not RTT.
    probe_interval_s: float = 0.2
    # Direct ack wait before asking peers. It leaves room inside one interval for the
    # indirect round (request, relay ping, relay's own timeout, nack back: about 2x this),
    # so that nacks arrive before the probe is judged and Lifeguard can trust their absence.
    probe_timeout_s: float = 0.08
    indirect_checks: int = 3
    # Lifeguard suspicion: min = mult * max(1, log10 n) * probe interval; max = max_mult * min.
    # A member that really died is soon suspected by others too, and their confirmations
    # take the timeout down to min (0.6 s up to 10 members), which is what sets detection
    # time. A lone accuser (likely itself the sick one, or behind a lossy link) has to wait
    # for max (3.6 s), ample time for the accused to refute: max costs nothing on real
    # failures, so it is generous (memberlist's 6).
    suspicion_mult: float = 3.0
    suspicion_max_mult: float = 6.0
    # Independent confirmations that take the timeout down to min (memberlist: mult - 2).
    # In small clusters it is capped at the members that could confirm (n - 2).
    suspicion_confirmations: int = 2
    gossip_interval_s: float = 0.1
    gossip_fanout: int = 3
    retransmit_mult: int = 4
    # Keep gossiping to a dead member this long, so a paused one learns it was declared dead
    # when it wakes up, and refutes.
    gossip_to_dead_s: float = 15.0
    push_pull_interval_s: float = 15.0
    # Re-join seeds that are not alive members, and push-pull with one dead member, this
    # often: that is what merges two halves of a healed partition.
    rejoin_interval_s: float = 10.0
    # While alone (no live peer), retry the seeds this often.
    join_retry_s: float = 1.0
    # Forget dead and left members this long after they died or left.
    reap_after_s: float = 300.0
    # Lifeguard local health: probe interval and timeout are scaled by (score + 1), score
    # capped at awareness_max - 1.
    awareness_max: int = 8
    # Graceful leave: gossip the leave until it has been retransmitted enough, at most this.
    leave_timeout_s: float = 2.0
    # Woken this much later than the timer deadline it asked for, this node was stalled
    # (SIGSTOP, a starved event loop): its overdue timers are not trusted (Membership._on_stall).
    stall_threshold_s: float = 1.0

    def __post_init__(self) -> None:
        positive = {
            "probe_interval_s": self.probe_interval_s,
            "probe_timeout_s": self.probe_timeout_s,
            "gossip_interval_s": self.gossip_interval_s,
            "push_pull_interval_s": self.push_pull_interval_s,
            "rejoin_interval_s": self.rejoin_interval_s,
            "join_retry_s": self.join_retry_s,
            "leave_timeout_s": self.leave_timeout_s,
            "stall_threshold_s": self.stall_threshold_s,
            "suspicion_mult": self.suspicion_mult,
        }
        for name, value in positive.items():
            if not value > 0:
                raise GossipError(f"gossip setting {name} must be > 0, got {value!r}")
        if self.probe_timeout_s >= self.probe_interval_s:
            raise GossipError("gossip setting probe_timeout_s must be below probe_interval_s")
        if self.suspicion_max_mult < 1:
            raise GossipError("gossip setting suspicion_max_mult must be >= 1")
        for name, count in {
            "indirect_checks": self.indirect_checks,
            "suspicion_confirmations": self.suspicion_confirmations,
            "gossip_fanout": self.gossip_fanout,
            "retransmit_mult": self.retransmit_mult,
        }.items():
            if count < 0:
                raise GossipError(f"gossip setting {name} must be >= 0, got {count}")
        if self.awareness_max < 1:
            raise GossipError("gossip setting awareness_max must be >= 1")
        if self.gossip_to_dead_s < 0 or self.reap_after_s < self.gossip_to_dead_s:
            raise GossipError("gossip setting reap_after_s must be >= gossip_to_dead_s >= 0")

    def suspicion_timeouts(self, n: int) -> SuspicionTimeouts:
        """Timeouts for a suspicion raised in a cluster of ``n`` live members (self included)."""
        # Ourselves and the suspect cannot confirm, so expect at most the others. (memberlist
        # expects nobody then, which in a 3-node cluster lets one accuser kill in min time.)
        k = max(0, min(self.suspicion_confirmations, n - 2))
        node_scale = max(1.0, math.log10(max(1.0, float(n))))
        min_s = self.suspicion_mult * node_scale * self.probe_interval_s
        return SuspicionTimeouts(k, min_s, self.suspicion_max_mult * min_s)

    def retransmit_limit(self, n: int) -> int:
        """Sends of one broadcast before it is dropped: mult * ceil(log10(n + 1))."""
        return self.retransmit_mult * math.ceil(math.log10(n + 1))

    def detection_bound_s(self, n: int) -> float:
        """Time within which every live member sees a crashed member dead (healthy network).

        The sum of, from the crash:

        * first probe: randomized round-robin makes each of the n - 1 probers ping the
          victim at least once in any 2(n - 1) - 1 consecutive probes; for larger n we take
          10 intervals, which all n - 1 probers miss with probability below e^-10;
        * that probe failing: one interval;
        * the suspicion reaching everyone: log2(n) + 2 gossip intervals;
        * the suspicion timing out without a single confirmation: the max timeout (with
          confirmations, the usual case, it is the min timeout instead).

        Assumes no local health penalty (the score rises only when acks and nacks go
        missing). Typical detection is well below: see the simulator figures.
        """
        first_probe = min(2 * (n - 1) - 1, 10) * self.probe_interval_s
        spread = (math.ceil(math.log2(max(n, 2))) + 2) * self.gossip_interval_s
        return first_probe + self.probe_interval_s + spread + self.suspicion_timeouts(n).max_s

    def push_pull_interval(self, n: int) -> float:
        """Anti-entropy period, stretched logarithmically above 32 members (memberlist)."""
        if n <= 32:
            return self.push_pull_interval_s
        multiplier = math.ceil(math.log2(n) - math.log2(32)) + 1
        return self.push_pull_interval_s * multiplier
