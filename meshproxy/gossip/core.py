"""The SWIM membership state machine with Lifeguard's refinements, sans I/O.

``Membership.handle(event, now) -> list[Command]`` is the whole interface: the shell feeds
decoded packets, sync messages, local changes and timer ticks in, and carries out the
commands that come back (send a packet, send a sync, report a membership change). Time is
an argument, randomness an injected ``random.Random``: the same inputs give the same outputs,
which is what lets the simulator replay a failure exactly.

The protocol follows hashicorp/memberlist closely (so that our figures compare with Serf's),
in these parts:

* Probing: one member per interval, randomized round-robin; a direct ping, then after the
  probe timeout ``indirect_checks`` ping-reqs through random alive peers (which answer with a
  nack if the target stays silent) plus a second direct ping; the probe is judged at the end
  of the interval.
* Suspicion: a failed probe makes the target suspect; the suspect refutes by gossiping an
  alive message with a higher incarnation; otherwise it is declared dead when its suspicion
  times out. The timeout starts long and shrinks as other members independently confirm.
* Dissemination: every packet piggybacks queued membership messages, each sent at most
  ``retransmit_mult * ceil(log10(n + 1))`` times; a gossip tick sends them to a few random
  members (including the recently dead, so that a paused node learns it was declared dead).
* Anti-entropy: a periodic full-state push-pull with a random member, and re-joins of seeds
  (and of one dead member) that are not alive in our view, which heal partitions.
* Lifeguard: a local health score that stretches our own probe interval and timeout when we
  miss acks and nacks or have to refute; the dynamic suspicion timeout; the buddy system (a
  suspect learns of its suspicion at once from whoever probes it).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from meshproxy.gossip import wire
from meshproxy.gossip.awareness import Awareness
from meshproxy.gossip.broadcasts import BroadcastQueue
from meshproxy.gossip.commands import (
    Command,
    LeaveComplete,
    Member,
    MemberChanged,
    SendPacket,
    SendSync,
)
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
    State,
    Suspect,
)
from meshproxy.gossip.settings import GossipSettings
from meshproxy.gossip.suspicion import Suspicion
from meshproxy.gossip.timers import TimerKind, Timers

_LIVE = (State.ALIVE, State.SUSPECT)
_GONE = (State.DEAD, State.LEFT)
_REAP_PERIOD_S = 1.0


class _Node:
    """A member's record in this node's view (this node included)."""

    __slots__ = (
        "addr",
        "incarnation",
        "meta",
        "meta_version",
        "name",
        "since",
        "state",
        "suspicion",
    )

    def __init__(
        self,
        name: str,
        addr: Addr,
        incarnation: int,
        meta_version: int,
        meta: NodeMeta,
        since: float,
    ) -> None:
        self.name = name
        self.addr = addr
        self.state = State.ALIVE
        self.incarnation = incarnation
        self.meta_version = meta_version
        self.meta = meta
        self.since = since
        self.suspicion: Suspicion | None = None

    def snapshot(self) -> Member:
        return Member(
            self.name,
            self.addr,
            self.state,
            self.incarnation,
            self.meta_version,
            self.meta,
            self.since,
        )


@dataclass(slots=True)
class _Probe:
    seq: int
    target: str
    acked: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(frozen=True, slots=True)
class _Relay:
    """An indirect ping we forward: who asked, under which sequence number."""

    requester: Addr
    seq: int
    nack: bool


class Membership:
    """One node's view of the cluster and the protocol that keeps it current."""

    def __init__(
        self,
        name: str,
        addr: Addr,
        settings: GossipSettings,
        rng: random.Random,
        *,
        meta: NodeMeta | None = None,
        incarnation: int = 0,
        message_budget: int = wire.MESSAGE_BUDGET,
        sizer: Callable[[Message], int] = wire.message_size,
    ) -> None:
        self.name = name
        self.addr = addr
        self.settings = settings
        self._rng = rng
        self._budget = message_budget
        self._sizer = sizer
        self._me = _Node(name, addr, incarnation, 0, meta or NodeMeta(), 0.0)
        self._nodes: dict[str, _Node] = {name: self._me}
        self._live_count = 1
        self._probe_order: list[str] = []
        self._probe_index = 0
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._seq = 0
        self._seeds: tuple[Addr, ...] = ()
        self._timers = Timers()
        self._broadcasts = BroadcastQueue()
        self._awareness = Awareness(settings.awareness_max)
        self._started = False
        self._leaving = False
        self._stopped = False
        self._wake_at: float | None = None  # the deadline we last asked the shell to Tick at
        self._now = 0.0
        self._out: list[Command] = []
        self.stats: Counter[str] = Counter()
        self._check_meta_size(self._me.meta)

    # ---- public interface --------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Command]:
        """Apply one event at monotonic time ``now``; return what the shell must do."""
        out: list[Command] = []
        self._out = out
        self._now = now
        if self._stopped and not isinstance(event, Join):
            return out
        # Woken much later than asked: this process was stopped or starved meanwhile.
        if self._wake_at is not None and now - self._wake_at > self.settings.stall_threshold_s:
            self._on_stall(now - self._wake_at)
        if not self._started:
            self._start()
        match event:
            case PacketReceived(from_addr, messages):
                for message in messages:
                    self._on_message(from_addr, message)
            case SyncReceived(from_addr, message):
                self._on_sync(from_addr, message)
            case Tick():
                self._fire_due_timers()
            case Join(seeds):
                self._on_join(seeds)
            case Leave():
                self._on_leave()
            case LocalMetaChanged(meta):
                self._on_local_meta(meta)
        self._wake_at = self._timers.next_deadline()
        return out

    def next_deadline(self) -> float | None:
        """When the shell must next deliver ``Tick``; None when there is nothing to time.

        Re-read it after every ``handle``: any event can move it earlier.
        """
        return self._timers.next_deadline()

    def members(self) -> list[Member]:
        """Every member this node knows, itself included, sorted by name."""
        return [self._nodes[name].snapshot() for name in sorted(self._nodes)]

    def member(self, name: str) -> Member | None:
        node = self._nodes.get(name)
        return node.snapshot() if node else None

    def state_of(self, name: str) -> State | None:
        """A member's state in this view, without building a snapshot."""
        node = self._nodes.get(name)
        return node.state if node else None

    @property
    def incarnation(self) -> int:
        return self._me.incarnation

    @property
    def local_meta(self) -> NodeMeta:
        return self._me.meta

    @property
    def health_score(self) -> int:
        """Lifeguard's local health score: 0 is healthy; timeouts scale by score + 1."""
        return self._awareness.score

    @property
    def live_count(self) -> int:
        """Members alive or suspect in this view, this node included."""
        return self._live_count

    # ---- plumbing ----------------------------------------------------------------------

    def _start(self) -> None:
        self._started = True
        now, s, rng = self._now, self.settings, self._rng
        self._me.since = now
        # Random phases, so that nodes started together do not probe and gossip in lockstep.
        self._timers.set((TimerKind.PROBE, 0), now + rng.uniform(0, s.probe_interval_s))
        self._timers.set(
            (TimerKind.PUSH_PULL, 0), now + rng.uniform(0.5, 1.5) * s.push_pull_interval_s
        )
        self._timers.set((TimerKind.REJOIN, 0), now + s.join_retry_s)
        self._timers.set((TimerKind.REAP, 0), now + _REAP_PERIOD_S)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _retransmit_limit(self) -> int:
        return self.settings.retransmit_limit(self._live_count)

    def _send(self, to: Addr, primary: list[Message]) -> None:
        """One packet: ``primary`` first, then as much queued gossip as fits."""
        if self._broadcasts:
            room = self._budget - sum(self._sizer(m) for m in primary)
            piggyback, _ = self._broadcasts.take(room, self._retransmit_limit())
            self._out.append(SendPacket(to, (*primary, *piggyback)))
        else:
            self._out.append(SendPacket(to, tuple(primary)))
        self.stats["packets_sent"] += 1

    def _broadcast(self, about: str, message: Message) -> None:
        self._broadcasts.put(about, message, self._sizer(message))
        # The gossip timer runs only while there is something to gossip: an idle node wakes
        # for its probes alone.
        if self._timers.deadline((TimerKind.GOSSIP, 0)) is None:
            self._timers.set((TimerKind.GOSSIP, 0), self._now + self.settings.gossip_interval_s)

    def _emit(self, node: _Node, old: State | None, new: State | None, reason: str) -> None:
        self._out.append(MemberChanged(node.snapshot(), old, new, reason))

    def _set_state(self, node: _Node, new: State, reason: str) -> None:
        old = node.state
        node.state = new
        node.since = self._now
        self._live_count += (new in _LIVE) - (old in _LIVE)
        self._emit(node, old, new, reason)

    def _alive_message(self) -> Alive:
        me = self._me
        return Alive(me.name, me.incarnation, me.addr, me.meta_version, me.meta)

    def _check_meta_size(self, meta: NodeMeta) -> None:
        me = self._me
        size = self._sizer(Alive(me.name, me.incarnation, me.addr, me.meta_version, meta))
        if size > wire.MAX_ALIVE_BYTES:
            raise GossipError(
                f"node metadata encodes to {size} bytes in an alive message; "
                f"the limit is {wire.MAX_ALIVE_BYTES}"
            )

    def _random_nodes(self, k: int, keep: Callable[[_Node], bool]) -> list[_Node]:
        candidates = [n for n in self._nodes.values() if n is not self._me and keep(n)]
        if len(candidates) <= k:
            self._rng.shuffle(candidates)
            return candidates
        return self._rng.sample(candidates, k)

    def _local_state(self, *, join: bool, reply: bool) -> PushPull:
        records = tuple(
            MemberRecord(n.name, n.addr, n.incarnation, n.state, n.meta_version, n.meta)
            for n in self._nodes.values()
        )
        return PushPull(self.name, self.addr, join, reply, records)

    def _sync_to(self, to: Addr, *, join: bool) -> None:
        self._out.append(SendSync(to, self._local_state(join=join, reply=False)))
        self.stats["syncs_sent"] += 1

    # ---- timers ------------------------------------------------------------------------

    def _fire_due_timers(self) -> None:
        K = TimerKind
        while not self._stopped and (key := self._timers.pop_due(self._now)) is not None:
            kind, arg = key
            if kind == K.PROBE:
                self._on_probe_timer()
            elif kind == K.PROBE_TIMEOUT:
                self._on_probe_timeout(int(arg))
            elif kind == K.RELAY:
                self._on_relay_timeout(int(arg))
            elif kind == K.SUSPICION:
                self._on_suspicion_timeout(str(arg))
            elif kind == K.GOSSIP:
                self._on_gossip_timer()
            elif kind == K.PUSH_PULL:
                self._on_push_pull_timer()
            elif kind == K.REJOIN:
                self._on_rejoin_timer()
            elif kind == K.REAP:
                self._on_reap_timer()
            elif kind == K.LEAVE:
                self._complete_leave()
            elif kind == K.RECHECK:
                self._on_recheck(str(arg))

    def _on_stall(self, gap: float) -> None:
        """This node was stalled for ``gap`` seconds (paused, starved): distrust its timers.

        Whatever it was waiting for may have arrived and be sitting unread in its socket
        buffer, and whoever it suspected had no way to reach it: so the probe in flight is
        dropped unjudged and every running suspicion gets the lost time back.
        """
        self.stats["stalls"] += 1
        self._awareness.apply(1)
        if self._probe is not None:
            self._timers.cancel((TimerKind.PROBE_TIMEOUT, self._probe.seq))
            self._probe = None
        for node in self._nodes.values():
            if node.suspicion is not None:
                node.suspicion.start += gap
                self._timers.set((TimerKind.SUSPICION, node.name), node.suspicion.deadline)

    # ---- probing -----------------------------------------------------------------------

    def _next_probe_target(self) -> _Node | None:
        """Randomized round-robin: every member once per round, in a fresh order each round."""
        for _ in range(len(self._nodes) + 1):
            if self._probe_index >= len(self._probe_order):
                self._probe_order = [name for name in self._nodes if name != self.name]
                self._rng.shuffle(self._probe_order)
                self._probe_index = 0
                if not self._probe_order:
                    return None
            name = self._probe_order[self._probe_index]
            self._probe_index += 1
            node = self._nodes.get(name)
            if node is not None and node is not self._me and node.state in _LIVE:
                return node
        return None

    def _add_to_probe_order(self, name: str) -> None:
        # Somewhere in the rest of this round, so a newcomer is probed within one round.
        at = self._rng.randint(self._probe_index, len(self._probe_order))
        self._probe_order.insert(at, name)

    def _ping_messages(self, node: _Node, seq: int) -> list[Message]:
        messages: list[Message] = [Ping(seq, node.name)]
        if node.state is State.SUSPECT:
            # Lifeguard's buddy system: whoever probes a suspect tells it so, at once.
            messages.append(Suspect(node.name, node.incarnation, self.name))
        return messages

    def _on_probe_timer(self) -> None:
        self._finish_probe()
        s = self.settings
        self._timers.set(
            (TimerKind.PROBE, 0), self._now + self._awareness.scale(s.probe_interval_s)
        )
        if self._leaving:
            return
        node = self._next_probe_target()
        if node is None:
            return
        seq = self._next_seq()
        self._probe = _Probe(seq, node.name)
        self.stats["probes"] += 1
        self._send(node.addr, self._ping_messages(node, seq))
        self._timers.set(
            (TimerKind.PROBE_TIMEOUT, seq), self._now + self._awareness.scale(s.probe_timeout_s)
        )

    def _on_probe_timeout(self, seq: int) -> None:
        probe = self._probe
        if probe is None or probe.seq != seq or probe.acked:
            return
        node = self._nodes.get(probe.target)
        if node is None or node.state in _GONE:
            return
        self.stats["probes_indirect"] += 1
        peers = self._random_nodes(
            self.settings.indirect_checks,
            lambda n: n.state is State.ALIVE and n is not node,
        )
        for peer in peers:
            self._send(peer.addr, [IndirectPing(seq, node.name, node.addr, nack=True)])
        probe.expected_nacks = len(peers)
        # A second direct ping in the indirect round, where memberlist opens a TCP fallback:
        # it costs one packet and saves the probe when only the first ping or ack was lost.
        self._send(node.addr, self._ping_messages(node, seq))

    def _finish_probe(self) -> None:
        """Judge the probe of the ending interval."""
        probe, self._probe = self._probe, None
        if probe is None or probe.acked:
            return
        self._timers.cancel((TimerKind.PROBE_TIMEOUT, probe.seq))
        # Lifeguard: peers that should have nacked but did not point at our own health; with
        # no peers to ask, any failed probe counts against us.
        missed = probe.expected_nacks - probe.nacks if probe.expected_nacks else 1
        self._awareness.apply(max(missed, 0))
        node = self._nodes.get(probe.target)
        if node is None or node.state in _GONE:
            return
        self.stats["probes_failed"] += 1
        self._on_suspect(Suspect(node.name, node.incarnation, self.name), None)

    def _on_ack(self, seq: int) -> None:
        relay = self._relays.pop(seq, None)
        if relay is not None:
            self._timers.cancel((TimerKind.RELAY, seq))
            self._send(relay.requester, [Ack(relay.seq)])
            return
        probe = self._probe
        if probe is not None and probe.seq == seq and not probe.acked:
            probe.acked = True
            self._awareness.apply(-1)
            self._timers.cancel((TimerKind.PROBE_TIMEOUT, seq))
            return
        self.stats["acks_unexpected"] += 1

    def _on_nack(self, seq: int) -> None:
        probe = self._probe
        if probe is not None and probe.seq == seq:
            probe.nacks += 1

    def _on_indirect_ping(self, src: Addr, msg: IndirectPing) -> None:
        seq = self._next_seq()
        self._relays[seq] = _Relay(src, msg.seq, msg.nack)
        self._send(msg.target_addr, [Ping(seq, msg.target)])
        # Unscaled by our own health: the requester times its round on the nominal value.
        self._timers.set((TimerKind.RELAY, seq), self._now + self.settings.probe_timeout_s)

    def _on_relay_timeout(self, seq: int) -> None:
        relay = self._relays.pop(seq, None)
        if relay is not None and relay.nack:
            self._send(relay.requester, [Nack(relay.seq)])

    # ---- membership messages -----------------------------------------------------------

    def _on_message(self, src: Addr, msg: Message) -> None:
        match msg:
            case Ping(seq, target):
                if target != self.name:
                    self.stats["pings_misaddressed"] += 1
                    return
                self._send(src, [Ack(seq)])
            case IndirectPing():
                self._on_indirect_ping(src, msg)
            case Ack(seq):
                self._on_ack(seq)
            case Nack(seq):
                self._on_nack(seq)
            case Alive():
                self._on_alive(msg, src)
            case Suspect():
                self._on_suspect(msg, src)
            case Dead():
                self._on_dead(msg, src)

    def _refute(self, accused_incarnation: int, src: Addr | None, reason: str) -> None:
        """Someone believes we are suspect, dead or an older self: outbid them."""
        me = self._me
        me.incarnation = max(me.incarnation, accused_incarnation) + 1
        # Lifeguard: being accused is a hint that we are the slow one.
        self._awareness.apply(1)
        alive = self._alive_message()
        self._broadcast(self.name, alive)
        if src is not None:
            # Straight back to whoever told us, most often the accuser probing us (buddy).
            self._send(src, [alive])
        self.stats["refutations"] += 1
        self._emit(me, me.state, me.state, f"refuted: {reason}")

    def _on_alive(self, msg: Alive, src: Addr | None) -> None:
        if msg.name == self.name:
            me = self._me
            if self._leaving:
                return
            theirs, mine = (msg.incarnation, msg.meta_version), (me.incarnation, me.meta_version)
            if theirs < mine or (theirs == mine and msg.meta == me.meta and msg.addr == me.addr):
                return
            self._refute(msg.incarnation, src, "an earlier life of this node is gossiped")
            return
        node = self._nodes.get(msg.name)
        if node is None:
            node = _Node(msg.name, msg.addr, msg.incarnation, msg.meta_version, msg.meta, self._now)
            self._nodes[msg.name] = node
            self._live_count += 1
            self._add_to_probe_order(msg.name)
            self._broadcast(msg.name, msg)
            self._emit(node, None, State.ALIVE, "joined")
            return
        if msg.incarnation > node.incarnation:
            old = node.state
            node.addr = msg.addr
            node.incarnation = msg.incarnation
            node.meta_version = msg.meta_version
            node.meta = msg.meta
            self._clear_suspicion(node)
            self._broadcast(msg.name, msg)
            if old is State.ALIVE:
                self._emit(node, old, old, f"incarnation {msg.incarnation}")
                return
            reason = "refuted suspicion" if old is State.SUSPECT else "came back"
            self._set_state(node, State.ALIVE, reason)
            if old in _GONE:
                self._add_to_probe_order(msg.name)
            return
        if (
            msg.incarnation == node.incarnation
            and msg.meta_version > node.meta_version
            and node.state in _LIVE
        ):
            node.meta_version = msg.meta_version
            node.meta = msg.meta
            self._broadcast(msg.name, msg)
            self._emit(node, node.state, node.state, f"metadata v{msg.meta_version}")

    def _clear_suspicion(self, node: _Node) -> None:
        if node.suspicion is not None:
            node.suspicion = None
            self._timers.cancel((TimerKind.SUSPICION, node.name))
            self._timers.cancel((TimerKind.RECHECK, node.name))

    def _answer_stale_accusation(self, src: Addr | None) -> None:
        """An accusation older than our refutation reached us: its sender may have missed the
        refutation (gossip is probabilistic), so it gets our alive message directly."""
        if src is not None and not self._leaving:
            self.stats["stale_accusations_answered"] += 1
            self._send(src, [self._alive_message()])

    def _on_suspect(self, msg: Suspect, src: Addr | None) -> None:
        node = self._nodes.get(msg.name)
        if node is None:
            return
        if msg.incarnation < node.incarnation:
            if node is self._me:
                self._answer_stale_accusation(src)
            return
        if node is self._me:
            if not self._leaving:
                self._refute(msg.incarnation, src, f"suspected by {msg.sender}")
            return
        if node.state is State.SUSPECT:
            node.incarnation = msg.incarnation
            if node.suspicion is not None and node.suspicion.confirm(msg.sender):
                self.stats["suspicion_confirmations"] += 1
                self._timers.set((TimerKind.SUSPICION, node.name), node.suspicion.deadline)
                self._broadcast(msg.name, msg)
            return
        if node.state is not State.ALIVE:
            return
        node.incarnation = msg.incarnation
        timeouts = self.settings.suspicion_timeouts(self._live_count)
        node.suspicion = Suspicion(
            msg.sender, timeouts.confirmations, timeouts.min_s, timeouts.max_s, self._now
        )
        self._timers.set((TimerKind.SUSPICION, node.name), node.suspicion.deadline)
        self._timers.set((TimerKind.RECHECK, node.name), self._now + timeouts.min_s / 2)
        self._broadcast(msg.name, msg)
        self._set_state(node, State.SUSPECT, f"suspected by {msg.sender}")
        if msg.sender == self.name:
            # Buddy system, at once: a suspect that is merely behind a lossy link gets the
            # whole suspicion timeout to refute instead of waiting to be probed again.
            self._send(node.addr, [msg])

    def _on_recheck(self, name: str) -> None:
        """Halfway into a suspicion, tell the suspect once more, straight from here.

        The refutation reaches us by gossip, which every so often misses a node; a suspect
        that already refuted answers this stale accusation with its alive message directly
        (``_answer_stale_accusation``). One packet per suspicion, and no effect on how fast a
        really dead member is declared.
        """
        node = self._nodes.get(name)
        if node is not None and node.state is State.SUSPECT and not self._leaving:
            self.stats["suspicion_rechecks"] += 1
            self._send(node.addr, [Suspect(name, node.incarnation, self.name)])

    def _on_suspicion_timeout(self, name: str) -> None:
        node = self._nodes.get(name)
        if node is None or node.state is not State.SUSPECT:
            return
        self.stats["declared_dead"] += 1
        self._on_dead(Dead(name, node.incarnation, self.name), None)

    def _on_dead(self, msg: Dead, src: Addr | None) -> None:
        node = self._nodes.get(msg.name)
        if node is None:
            return
        if msg.incarnation < node.incarnation:
            if node is self._me:
                self._answer_stale_accusation(src)
            return
        if node.state in _GONE:
            return
        if node is self._me:
            if not self._leaving:
                self._refute(msg.incarnation, src, f"declared dead by {msg.sender}")
            return
        left = msg.sender == msg.name
        node.incarnation = msg.incarnation
        self._clear_suspicion(node)
        self._broadcast(msg.name, msg)
        reason = "left" if left else f"declared dead by {msg.sender}"
        self._set_state(node, State.LEFT if left else State.DEAD, reason)

    # ---- anti-entropy ------------------------------------------------------------------

    def _on_sync(self, src: Addr, msg: PushPull) -> None:
        self.stats["syncs_received"] += 1
        if not msg.reply:
            self._out.append(SendSync(msg.sender_addr, self._local_state(join=False, reply=True)))
        self._merge(msg.members)

    def _merge(self, records: Iterable[MemberRecord]) -> None:
        for r in records:
            if r.state is State.ALIVE:
                self._on_alive(Alive(r.name, r.incarnation, r.addr, r.meta_version, r.meta), None)
            elif r.state is State.LEFT:
                self._on_dead(Dead(r.name, r.incarnation, r.name), None)
            else:
                # Someone else's verdict of dead is only a suspicion here (memberlist): the
                # member gets its chance to refute to us before we call it dead ourselves.
                self._on_suspect(Suspect(r.name, r.incarnation, self.name), None)

    def _on_push_pull_timer(self) -> None:
        interval = self.settings.push_pull_interval(self._live_count)
        self._timers.set((TimerKind.PUSH_PULL, 0), self._now + interval)
        peers = self._random_nodes(1, lambda n: n.state is State.ALIVE)
        if peers and not self._leaving:
            self._sync_to(peers[0].addr, join=False)

    def _on_rejoin_timer(self) -> None:
        s = self.settings
        if self._live_count <= 1:
            # Alone: knock often, on every seed.
            next_s = s.join_retry_s
        else:
            next_s = self._rng.uniform(0.8, 1.2) * s.rejoin_interval_s
        self._timers.set((TimerKind.REJOIN, 0), self._now + next_s)
        if self._leaving:
            return
        live_addrs = {n.addr for n in self._nodes.values() if n.state in _LIVE}
        targets = [seed for seed in self._seeds if seed not in live_addrs and seed != self.addr]
        # A dead member may only be on the far side of a partition, or paused for longer than
        # we gossip to the dead: ask it too (Serf's reconnect), as gossip no longer goes there.
        dead = [n.addr for n in self._nodes.values() if n.state is State.DEAD]
        if dead:
            targets.append(self._rng.choice(dead))
        for target in dict.fromkeys(targets):
            self._sync_to(target, join=True)

    # ---- dissemination -----------------------------------------------------------------

    def _on_gossip_timer(self) -> None:
        s = self.settings
        if self._leaving and self.name not in self._broadcasts:
            self._complete_leave()
            return
        if not self._broadcasts:
            return
        self._timers.set((TimerKind.GOSSIP, 0), self._now + s.gossip_interval_s)
        horizon = self._now - s.gossip_to_dead_s
        targets = self._random_nodes(
            s.gossip_fanout,
            lambda n: n.state in _LIVE or (n.state is State.DEAD and n.since >= horizon),
        )
        limit = self._retransmit_limit()
        for node in targets:
            messages, _ = self._broadcasts.take(self._budget, limit)
            if not messages:
                break
            self._out.append(SendPacket(node.addr, tuple(messages)))
            self.stats["packets_sent"] += 1

    def _on_reap_timer(self) -> None:
        self._timers.set((TimerKind.REAP, 0), self._now + _REAP_PERIOD_S)
        horizon = self._now - self.settings.reap_after_s
        for node in list(self._nodes.values()):
            if node.state in _GONE and node.since <= horizon and node is not self._me:
                del self._nodes[node.name]
                self._emit(node, node.state, None, "forgotten")

    # ---- local changes -----------------------------------------------------------------

    def _on_join(self, seeds: tuple[Addr, ...]) -> None:
        if self._leaving:
            # Back after a leave, in the same process: a fresh incarnation outbids the leave.
            self._leaving = self._stopped = False
            self._me.incarnation += 1
            self._set_state(self._me, State.ALIVE, "rejoined")
            self._timers.clear()
            self._start()
        self._seeds = tuple(seeds)
        self._broadcast(self.name, self._alive_message())
        for seed in self._seeds:
            if seed != self.addr:
                self._sync_to(seed, join=True)

    def _on_local_meta(self, meta: NodeMeta) -> None:
        self._check_meta_size(meta)
        me = self._me
        me.meta = meta
        me.meta_version += 1
        self._broadcast(self.name, self._alive_message())
        self._emit(me, me.state, me.state, f"local metadata v{me.meta_version}")

    def _on_leave(self) -> None:
        if self._leaving:
            return
        self._leaving = True
        me = self._me
        goodbye = Dead(self.name, me.incarnation, self.name)
        self._broadcast(self.name, goodbye)
        self._set_state(me, State.LEFT, "leaving")
        if self._probe is not None:
            self._timers.cancel((TimerKind.PROBE_TIMEOUT, self._probe.seq))
            self._probe = None
        peers = self._random_nodes(self.settings.gossip_fanout, lambda n: n.state in _LIVE)
        if not peers:
            self._complete_leave()
            return
        # Straight to a few peers now; gossip carries it on until it has been sent enough.
        for peer in peers:
            self._send(peer.addr, [])
        self._timers.set((TimerKind.LEAVE, 0), self._now + self.settings.leave_timeout_s)

    def _complete_leave(self) -> None:
        self._timers.clear()
        self._stopped = True
        self._out.append(LeaveComplete())
