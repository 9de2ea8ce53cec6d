"""The small pure parts of gossip: suspicion formula, health score, queue, timers, settings."""

from __future__ import annotations

import pytest

from meshproxy.gossip.awareness import Awareness
from meshproxy.gossip.broadcasts import BroadcastQueue
from meshproxy.gossip.errors import GossipError
from meshproxy.gossip.messages import Ack, Message, Suspect
from meshproxy.gossip.settings import GossipSettings
from meshproxy.gossip.suspicion import Suspicion, suspicion_timeout
from meshproxy.gossip.timers import TimerKind, Timers


@pytest.mark.parametrize(
    ("confirmations", "k", "expected_s"),
    [
        # memberlist suspicion_test.go: min 2 s, max 30 s, k = 3
        (0, 3, 30.0),
        (1, 3, 16.0),
        (2, 3, 7.82),
        (3, 3, 2.0),
        (4, 3, 2.0),
        (0, 0, 2.0),
    ],
)
def test_suspicion_timeout_follows_the_lifeguard_log_formula(
    confirmations: int, k: int, expected_s: float
) -> None:
    """The timeout falls from max to min as log(c + 1) / log(k + 1), as in memberlist."""
    assert suspicion_timeout(confirmations, k, 2.0, 30.0) == pytest.approx(expected_s, abs=0.01)


def test_suspicion_counts_each_new_accuser_once_up_to_k() -> None:
    """The first accuser and repeats confirm nothing; at most k confirmations count."""
    s = Suspicion("a", k=2, min_s=1.0, max_s=4.0, start=10.0)
    assert s.deadline == 14.0
    assert not s.confirm("a")
    assert s.confirm("b")
    assert not s.confirm("b")
    assert s.confirm("c")
    assert s.deadline == 11.0
    assert not s.confirm("d")


def test_awareness_score_is_bounded_and_scales_timeouts() -> None:
    """The health score stays within [0, max - 1] and multiplies timeouts by score + 1."""
    a = Awareness(8)
    a.apply(-3)
    assert a.score == 0
    a.apply(20)
    assert a.score == 7
    assert a.scale(0.2) == pytest.approx(1.6)


def test_broadcast_queue_sends_fewest_transmitted_first_newest_first() -> None:
    """Fresh messages go newest first, before retransmissions; those take turns."""
    q = BroadcastQueue()
    q.put("a", Ack(1), 10)
    q.put("b", Ack(2), 10)
    assert q.take(10, limit=5)[0] == [Ack(2)]
    q.put("c", Ack(3), 10)
    assert q.take(20, limit=5)[0] == [Ack(3), Ack(1)]
    # All sent once now: the one that has waited longest since its last send goes first.
    assert q.take(100, limit=5)[0] == [Ack(2), Ack(3), Ack(1)]


def test_broadcast_queue_replaces_by_key_and_drops_at_the_limit() -> None:
    """A newer message about the same member replaces the old; each goes out limit times."""
    q = BroadcastQueue()
    first: Message = Suspect("x", 1, "a")
    q.put("x", first, 10)
    q.take(100, limit=3)
    newer: Message = Suspect("x", 2, "a")
    q.put("x", newer, 10)
    sent = [q.take(100, limit=3)[0] for _ in range(5)]
    assert sent == [[newer], [newer], [newer], [], []]
    assert "x" not in q


def test_broadcast_queue_skips_what_does_not_fit() -> None:
    """A message too big for the room left is skipped for a smaller one behind it."""
    q = BroadcastQueue()
    q.put("small", Ack(1), 5)
    q.put("big", Ack(2), 50)
    messages, used = q.take(20, limit=3)
    assert messages == [Ack(1)]
    assert used == 5


def test_timers_fire_in_deadline_order_and_rearm_replaces() -> None:
    """Timers pop in order; re-arming a key moves it; cancelled timers never fire."""
    t = Timers()
    t.set((TimerKind.GOSSIP, 0), 3.0)
    t.set((TimerKind.PROBE, 0), 1.0)
    t.set((TimerKind.REAP, 0), 2.0)
    t.set((TimerKind.PROBE, 0), 4.0)
    t.cancel((TimerKind.REAP, 0))
    assert t.next_deadline() == 3.0
    assert t.pop_due(2.5) is None
    assert t.pop_due(5.0) == (TimerKind.GOSSIP, 0)
    assert t.pop_due(5.0) == (TimerKind.PROBE, 0)
    assert t.pop_due(5.0) is None
    assert t.next_deadline() is None


def test_cluster_size_formulas_match_memberlist() -> None:
    """Retransmit limit, suspicion timeouts and push-pull period scale as in memberlist."""
    s = GossipSettings()
    assert [s.retransmit_limit(n) for n in (1, 9, 10, 99, 200)] == [4, 4, 8, 8, 12]
    small = s.suspicion_timeouts(5)
    assert (small.confirmations, small.min_s, small.max_s) == pytest.approx((2, 0.6, 3.6))
    assert s.suspicion_timeouts(3).confirmations == 1  # capped at n - 2, not dropped to 0
    assert s.suspicion_timeouts(2).confirmations == 0
    assert s.suspicion_timeouts(100).min_s == pytest.approx(1.2)
    assert s.push_pull_interval(32) == s.push_pull_interval_s
    assert s.push_pull_interval(200) == 4 * s.push_pull_interval_s


@pytest.mark.parametrize(
    "bad",
    [
        {"probe_interval_s": 0},
        {"probe_timeout_s": 0.5},
        {"suspicion_max_mult": 0.5},
        {"indirect_checks": -1},
        {"awareness_max": 0},
        {"reap_after_s": 1.0},
    ],
)
def test_settings_refuse_nonsense(bad: dict[str, float]) -> None:
    """Settings that would break the protocol's timing are refused with a GossipError."""
    with pytest.raises(GossipError):
        GossipSettings(**bad)  # type: ignore[arg-type]
