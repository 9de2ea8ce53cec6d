"""Playbook tests of the SWIM core: events in, commands out, time supplied by the test."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import pytest

from meshproxy.gossip import wire
from meshproxy.gossip.commands import (
    Command,
    LeaveComplete,
    MemberChanged,
    SendPacket,
    SendSync,
)
from meshproxy.gossip.core import Membership
from meshproxy.gossip.errors import GossipError
from meshproxy.gossip.events import (
    Event,
    Join,
    Leave,
    LocalMetaChanged,
    PacketReceived,
    SyncReceived,
    Tick,
)
from meshproxy.gossip.messages import (
    Ack,
    Addr,
    Alive,
    Dead,
    IndirectPing,
    MemberRecord,
    Message,
    Nack,
    NodeMeta,
    Ping,
    PushPull,
    ServiceHealth,
    State,
    Suspect,
)
from meshproxy.gossip.settings import GossipSettings

NAMES = "abcdefghijklmnop"
ADDR: dict[str, Addr] = {n: (f"10.0.0.{i + 1}", 7946) for i, n in enumerate(NAMES)}
NAME_OF = {addr: name for name, addr in ADDR.items()}
S = GossipSettings()


def alive(name: str, inc: int = 0, version: int = 0, meta: NodeMeta | None = None) -> Alive:
    return Alive(name, inc, ADDR[name], version, meta or NodeMeta())


class Driver:
    """Feeds one Membership, keeps the clock, and records every command.

    Peers named in ``responsive`` answer pings (directly and through relays) at once, as a
    healthy cluster would; the others are silent.
    """

    def __init__(
        self,
        name: str = "a",
        peers: Sequence[str] = ("b", "c", "d", "e"),
        settings: GossipSettings = S,
        seed: int = 1,
        responsive: bool = True,
    ) -> None:
        self.m = Membership(name, ADDR[name], settings, random.Random(seed))
        self.now = 0.0
        self.log: list[Command] = []
        self.responsive = set(peers) if responsive else set()
        self.feed(Join(()))
        if peers:
            self.feed(PacketReceived(ADDR[peers[0]], tuple(alive(p) for p in peers)))

    def feed(self, event: Event) -> list[Command]:
        commands = self.m.handle(event, self.now)
        self.log.extend(commands)
        replies: list[Event] = []
        for to, msg in sent(commands):
            peer = NAME_OF.get(to)
            if peer not in self.responsive:
                continue
            if isinstance(msg, Ping):
                replies.append(PacketReceived(to, (Ack(msg.seq),)))
            elif isinstance(msg, IndirectPing):
                answer = Ack(msg.seq) if msg.target in self.responsive else Nack(msg.seq)
                replies.append(PacketReceived(to, (answer,)))
        for reply in replies:
            commands = commands + self.feed(reply)
        return commands

    def receive(self, sender: str, *messages: Message) -> list[Command]:
        return self.feed(PacketReceived(ADDR[sender], messages))

    def advance(self, seconds: float) -> list[Command]:
        """Let ``seconds`` pass, firing every timer on time."""
        end = self.now + seconds
        out: list[Command] = []
        while (deadline := self.m.next_deadline()) is not None and deadline <= end:
            self.now = max(self.now, deadline)
            out += self.feed(Tick())
        self.now = end
        return out

    def until_probe(self, limit_s: float = 5.0) -> tuple[str, Ping, list[Command]]:
        """Advance until this node pings someone directly; return whom, the ping, commands."""
        end = self.now + limit_s
        while self.now < end:
            deadline = self.m.next_deadline()
            assert deadline is not None
            self.now = max(self.now, deadline)
            commands = self.feed(Tick())
            for to, msg in sent(commands):
                if isinstance(msg, Ping):
                    return NAME_OF[to], msg, commands
        raise AssertionError("no probe sent")


def sent(commands: Iterable[Command]) -> list[tuple[Addr, Message]]:
    """Every message sent, flattened out of its packets, with its destination."""
    return [(c.to, m) for c in commands if isinstance(c, SendPacket) for m in c.messages]


def changes(commands: Iterable[Command]) -> list[MemberChanged]:
    return [c for c in commands if isinstance(c, MemberChanged)]


def test_learning_members_from_alive_messages_reports_each_join() -> None:
    """An alive message about an unknown member adds it, alive, and reports the join."""
    d = Driver(peers=())
    out = d.receive("b", alive("b"), alive("c", inc=3))
    assert [(c.member.name, c.old, c.new) for c in changes(out)] == [
        ("b", None, State.ALIVE),
        ("c", None, State.ALIVE),
    ]
    assert d.m.member("c") is not None
    assert d.m.live_count == 3


def test_randomized_round_robin_probes_every_member_once_per_round() -> None:
    """Each round of probes visits every other member exactly once, in a shuffled order."""
    d = Driver(responsive=False)
    rounds: list[list[str]] = []
    for _ in range(3):
        targets = []
        for _ in range(4):
            target, ping, _ = d.until_probe()
            d.receive(target, Ack(ping.seq))
            targets.append(target)
        rounds.append(targets)
    for targets in rounds:
        assert sorted(targets) == ["b", "c", "d", "e"]
    assert len({tuple(r) for r in rounds}) > 1


def test_acked_probe_raises_no_suspicion_and_improves_health() -> None:
    """A direct ack within the timeout ends the probe: no indirect round, no suspicion."""
    d = Driver(responsive=False)
    d.m._awareness.apply(3)
    target, ping, _ = d.until_probe()
    d.receive(target, Ack(ping.seq))
    out = d.advance(S.probe_interval_s * 0.9)
    assert not [m for _, m in sent(out) if isinstance(m, IndirectPing | Suspect)]
    assert d.m.health_score == 2


def test_missing_ack_goes_indirect_then_suspects_and_tells_the_suspect() -> None:
    """No ack: ping-req through k peers plus a second direct ping; then suspect, buddy-style."""
    d = Driver(responsive=False)
    target, ping, _ = d.until_probe()
    start = d.now
    out = d.advance(S.probe_timeout_s + 0.001)
    requests = [(to, m) for to, m in sent(out) if isinstance(m, IndirectPing)]
    assert len(requests) == S.indirect_checks
    assert all(m.seq == ping.seq and m.target == target and m.nack for _, m in requests)
    assert ADDR[target] not in [to for to, _ in requests]
    assert (ADDR[target], ping) in sent(out)
    out = d.advance(start + S.probe_interval_s - d.now)
    assert [(c.member.name, c.new) for c in changes(out)] == [(target, State.SUSPECT)]
    assert (ADDR[target], Suspect(target, 0, "a")) in sent(out)


def test_relayed_ack_saves_the_probe() -> None:
    """An ack relayed by a peer for our sequence number counts as the target's ack."""
    d = Driver(responsive=False)
    target, ping, _ = d.until_probe()
    d.advance(S.probe_timeout_s + 0.001)
    d.receive("b" if target != "b" else "c", Ack(ping.seq))
    out = d.advance(S.probe_interval_s)
    assert not [c for c in changes(out) if c.new is State.SUSPECT]


def test_missing_nacks_lower_local_health_but_received_nacks_do_not() -> None:
    """Lifeguard: peers that nack show we can hear; peers that stay silent count against us."""
    for nacks, expected_score in ((S.indirect_checks, 0), (0, S.indirect_checks)):
        d = Driver(responsive=False)
        _, ping, _ = d.until_probe()
        out = d.advance(S.probe_timeout_s + 0.001)
        relays = [NAME_OF[to] for to, m in sent(out) if isinstance(m, IndirectPing)]
        for relay in relays[:nacks]:
            d.receive(relay, Nack(ping.seq))
        d.advance(S.probe_interval_s - S.probe_timeout_s)
        assert d.m.health_score == expected_score


def test_poor_health_stretches_the_probe_interval() -> None:
    """With health score h the next probe comes (h + 1) probe intervals later."""
    d = Driver()
    d.until_probe()
    d.m._awareness.apply(2)
    first = d.now
    d.until_probe()
    # That probe's successor was timed before the score changed.
    assert d.now - first == pytest.approx(S.probe_interval_s)
    second = d.now
    d.until_probe()
    # Timed at score 2 (the ack that lowered it to 1 came just after).
    assert d.now - second == pytest.approx(3 * S.probe_interval_s)


def test_relaying_an_indirect_ping_forwards_the_ack_or_nacks_in_time() -> None:
    """As a relay we ping the target; its ack goes back under the requester's sequence number."""
    d = Driver(responsive=False)
    out = d.receive("b", IndirectPing(77, "c", ADDR["c"], nack=True))
    (relay_ping,) = [m for to, m in sent(out) if to == ADDR["c"] and isinstance(m, Ping)]
    out = d.receive("c", Ack(relay_ping.seq))
    assert (ADDR["b"], Ack(77)) in sent(out)
    out = d.receive("b", IndirectPing(78, "d", ADDR["d"], nack=True))
    out = d.advance(S.probe_timeout_s + 0.001)
    assert (ADDR["b"], Nack(78)) in sent(out)


def test_pings_for_another_name_are_not_answered() -> None:
    """A ping meant for a different node (an old occupant of our address) gets no ack."""
    d = Driver()
    assert not [m for _, m in sent(d.receive("b", Ping(5, "zz"))) if isinstance(m, Ack)]
    assert (ADDR["b"], Ack(6)) in sent(d.receive("b", Ping(6, "a")))


def test_suspicion_times_out_to_dead_after_max_without_confirmations() -> None:
    """A lone suspicion lasts the long timeout, then the member is declared dead."""
    d = Driver()
    timeouts = S.suspicion_timeouts(d.m.live_count)
    d.receive("b", Suspect("c", 0, "b"))
    assert d.m.state_of("c") is State.SUSPECT
    d.advance(timeouts.max_s - 0.01)
    assert d.m.state_of("c") is State.SUSPECT
    out = d.advance(0.02)
    assert [(c.member.name, c.old, c.new) for c in changes(out)] == [
        ("c", State.SUSPECT, State.DEAD)
    ]
    assert Dead("c", 0, "a") in [m for _, m in sent(d.advance(1.0))]


def test_independent_confirmations_shrink_the_suspicion_timeout_to_min() -> None:
    """Each new accuser shortens the timeout (log formula); k of them bring it to min."""
    d = Driver()
    timeouts = S.suspicion_timeouts(d.m.live_count)
    assert timeouts.confirmations == 2
    d.receive("b", Suspect("c", 0, "b"))
    d.receive("b", Suspect("c", 0, "b"))  # the same accuser again confirms nothing
    d.receive("d", Suspect("c", 0, "d"))
    d.advance(timeouts.min_s + 0.01)
    assert d.m.state_of("c") is State.SUSPECT
    d.receive("e", Suspect("c", 0, "e"))
    d.advance(0.0)
    assert d.m.state_of("c") is State.DEAD


def test_suspect_refutes_with_a_higher_incarnation_sent_to_the_accuser() -> None:
    """Hearing it is suspected, a node bumps its incarnation and answers with alive at once."""
    d = Driver()
    out = d.receive("b", Suspect("a", 0, "b"))
    assert d.m.incarnation == 1
    assert d.m.health_score == 1
    assert (ADDR["b"], alive("a", inc=1)) in sent(out)
    out = d.receive("c", Dead("a", 4, "c"))
    assert d.m.incarnation == 5
    assert d.m.state_of("a") is State.ALIVE


def test_stale_accusations_are_answered_with_the_current_alive() -> None:
    """An accusation older than our refutation is answered directly, without a new bump."""
    d = Driver()
    d.receive("b", Suspect("a", 0, "b"))
    out = d.receive("c", Suspect("a", 0, "c"))
    assert d.m.incarnation == 1
    assert (ADDR["c"], alive("a", inc=1)) in sent(out)


def test_alive_with_higher_incarnation_clears_suspicion_but_equal_does_not() -> None:
    """SWIM ordering: alive(i) overrides suspect(j) only when i > j."""
    d = Driver()
    d.receive("b", Suspect("c", 2, "b"))
    d.receive("c", alive("c", inc=2))
    assert d.m.state_of("c") is State.SUSPECT
    out = d.receive("c", alive("c", inc=3))
    assert d.m.state_of("c") is State.ALIVE
    assert [(c.old, c.new) for c in changes(out)] == [(State.SUSPECT, State.ALIVE)]
    d.advance(S.suspicion_timeouts(5).max_s + 1)
    assert d.m.state_of("c") is State.ALIVE


def test_stale_messages_are_ignored() -> None:
    """Suspect, dead and alive messages with an older incarnation change nothing."""
    d = Driver()
    d.receive("c", alive("c", inc=5))
    assert not changes(d.receive("b", Suspect("c", 4, "b"), Dead("c", 3, "b"), alive("c", 4)))
    assert d.m.member("c") is not None
    assert d.m.state_of("c") is State.ALIVE


def test_dead_from_the_member_itself_means_left() -> None:
    """A member that announces its own death left gracefully: state left, not dead."""
    d = Driver()
    out = d.receive("c", Dead("c", 0, "c"), Dead("d", 0, "b"))
    assert [(c.member.name, c.new) for c in changes(out)] == [
        ("c", State.LEFT),
        ("d", State.DEAD),
    ]


def test_dead_or_left_member_returns_with_a_higher_incarnation() -> None:
    """After dead or left, an alive with a higher incarnation brings the member back."""
    d = Driver()
    d.receive("b", Dead("c", 2, "b"))
    d.receive("b", alive("c", inc=2))
    assert d.m.state_of("c") is State.DEAD
    out = d.receive("c", alive("c", inc=3))
    assert [(c.old, c.new) for c in changes(out)] == [(State.DEAD, State.ALIVE)]


def test_restarted_node_outbids_the_incarnation_it_was_declared_dead_at() -> None:
    """A fresh process (incarnation 0) hearing of its old death refutes above that incarnation."""
    d = Driver(peers=())
    record = MemberRecord("a", ADDR["a"], 7, State.DEAD, 3, NodeMeta())
    d.feed(SyncReceived(ADDR["b"], PushPull("b", ADDR["b"], False, True, (record,))))
    assert d.m.incarnation == 8
    assert d.m.state_of("a") is State.ALIVE
    d.receive("b", alive("a", inc=9, version=0))  # an earlier life's alive is outbid too
    assert d.m.incarnation == 10


def test_metadata_newest_version_wins() -> None:
    """Metadata with a higher version (same incarnation) replaces the old; older is ignored."""
    d = Driver()
    old, new = NodeMeta(role="middle"), NodeMeta(role="middle", draining=True)
    d.receive("c", alive("c", version=2, meta=new))
    out = d.receive("c", alive("c", version=1, meta=old))
    assert not changes(out)
    member = d.m.member("c")
    assert member is not None
    assert member.meta == new
    assert member.meta_version == 2


def test_local_metadata_change_is_versioned_and_gossiped() -> None:
    """Changing our metadata bumps its version and queues an alive message carrying it."""
    d = Driver()
    meta = NodeMeta(role="middle", tier="t", services=(ServiceHealth("db", 1, 2, ("b2",)),))
    d.feed(LocalMetaChanged(meta))
    _, _, commands = d.until_probe()
    assert alive("a", version=1, meta=meta) in [m for _, m in sent(commands)]
    huge = NodeMeta(services=tuple(ServiceHealth(f"s{i:02d}" * 10, 1, 1) for i in range(30)))
    with pytest.raises(GossipError):
        d.feed(LocalMetaChanged(huge))


def test_broadcasts_are_piggybacked_at_most_the_retransmit_limit() -> None:
    """A queued message rides on exactly mult * ceil(log10(n + 1)) packets, then stops."""
    d = Driver()
    limit = S.retransmit_limit(d.m.live_count)
    assert limit == 4
    d.receive("b", Suspect("c", 0, "b"))
    d.advance(5.0)
    copies = [m for _, m in sent(d.log) if m == Suspect("c", 0, "b")]
    assert len(copies) == limit


def test_packets_stay_within_the_budget_under_a_flood_of_broadcasts() -> None:
    """With hundreds of queued messages, every packet's messages still fit the 1400-byte budget."""
    d = Driver()
    meta = NodeMeta(role="middle", tier="x" * 40, active_connections=2**40)
    d.receive(
        "b", *(Alive(f"node-{i:03d}", i, ("10.9.9.9", 1000 + i), 1, meta) for i in range(300))
    )
    packets = [c for c in d.advance(2.0) if isinstance(c, SendPacket)]
    assert packets
    for packet in packets:
        assert sum(wire.message_size(m) for m in packet.messages) <= wire.MESSAGE_BUDGET
    assert max(len(p.messages) for p in packets) > 5


def test_push_pull_request_is_answered_and_merged() -> None:
    """A push-pull request gets our full state back; its alive members are learned."""
    d = Driver()
    record = MemberRecord("f", ADDR["f"], 2, State.ALIVE, 0, NodeMeta())
    out = d.feed(SyncReceived(ADDR["f"], PushPull("f", ADDR["f"], True, False, (record,))))
    (reply,) = [c for c in out if isinstance(c, SendSync)]
    assert reply.to == ADDR["f"]
    assert reply.message.reply
    assert {r.name for r in reply.message.members} == {"a", "b", "c", "d", "e"}
    assert d.m.state_of("f") is State.ALIVE


def test_push_pull_verdict_of_dead_is_only_a_suspicion_here() -> None:
    """A peer's full state saying a member is dead makes it suspect here, not dead at once."""
    d = Driver()
    record = MemberRecord("c", ADDR["c"], 0, State.DEAD, 0, NodeMeta())
    d.feed(SyncReceived(ADDR["b"], PushPull("b", ADDR["b"], False, True, (record,))))
    assert d.m.state_of("c") is State.SUSPECT


def test_join_pushes_state_to_seeds_and_retries_while_alone() -> None:
    """Join syncs with every seed; while no peer answers, the seeds are retried every second."""
    m = Membership("a", ADDR["a"], S, random.Random(1))
    out = m.handle(Join((ADDR["b"], ADDR["c"], ADDR["a"])), 0.0)
    assert sorted(c.to for c in out if isinstance(c, SendSync)) == [ADDR["b"], ADDR["c"]]
    retries: list[Command] = []
    now = 0.0
    while (deadline := m.next_deadline()) is not None and deadline <= 2.05:
        now = deadline
        retries += m.handle(Tick(), now)
    assert len([c for c in retries if isinstance(c, SendSync)]) == 4


def test_rejoin_targets_seeds_not_alive_and_one_dead_member() -> None:
    """Once in a cluster, seeds missing from it and a random dead member get a push-pull."""
    d = Driver(peers=("b", "c"))
    d.feed(Join((ADDR["b"], ADDR["f"])))
    d.receive("b", Dead("c", 0, "b"))
    out = d.advance(S.rejoin_interval_s * 1.3)
    targets = {c.to for c in out if isinstance(c, SendSync) and c.message.join}
    assert targets == {ADDR["f"], ADDR["c"]}


def test_graceful_leave_announces_left_and_completes() -> None:
    """Leave gossips our own death-as-left to peers at once and completes once it has spread."""
    d = Driver()
    out = d.feed(Leave())
    goodbye = Dead("a", 0, "a")
    assert len({to for to, m in sent(out) if m == goodbye}) == S.gossip_fanout
    out = d.advance(S.leave_timeout_s + 0.1)
    assert any(isinstance(c, LeaveComplete) for c in out)
    assert d.m.next_deadline() is None
    assert d.m.handle(PacketReceived(ADDR["b"], (Ping(1, "a"),)), d.now) == []


def test_a_stall_postpones_suspicions_and_abandons_the_probe_in_flight() -> None:
    """After a long gap (SIGSTOP), overdue suspicion timers get the lost time back."""
    d = Driver()
    d.receive("b", Suspect("c", 0, "b"))
    deadline = S.suspicion_timeouts(5).max_s
    d.now += deadline + 5.0  # paused: no events at all
    d.feed(Tick())
    assert d.m.state_of("c") is State.SUSPECT
    assert d.m.stats["stalls"] == 1
    d.advance(deadline)
    assert d.m.state_of("c") is State.DEAD


def test_members_reaped_long_after_death() -> None:
    """Dead and left members are forgotten after reap_after_s, and that is reported."""
    d = Driver()
    d.receive("b", Dead("c", 0, "b"))
    d.advance(S.reap_after_s + 1.5)
    assert d.m.member("c") is None
    assert [(c.member.name, c.old, c.new) for c in changes(d.log) if c.new is None] == [
        ("c", State.DEAD, None)
    ]


def test_same_inputs_give_the_same_outputs() -> None:
    """The core is deterministic given its seed: two runs produce identical commands."""
    logs = []
    for _ in range(2):
        d = Driver(seed=42)
        d.advance(3.0)
        d.receive("b", Suspect("c", 0, "b"))
        d.advance(3.0)
        logs.append(d.log)
    assert logs[0] == logs[1]
