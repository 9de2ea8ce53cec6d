"""A deterministic simulator: many ``Membership`` cores on a fake network in virtual time.

In the spirit of trio's ``testing/_fake_net.py``: no sockets, no clocks, no threads. One
event heap orders packet deliveries and node wake-ups; every packet goes through each
node's real ``Codec`` (encrypted unless told otherwise), so sizes, authentication and
replay rules are exercised exactly as on the wire. The network can lose, delay, jitter and
duplicate packets (seeded), cut links one way or both (partitions), and nodes can be
killed, restarted, paused (no timers fire; packets wait in a bounded socket buffer) and
resumed. The same seed replays the same run, event for event.

Sync (push-pull) frames stand for TCP: never lost or duplicated, a little slower, but cut
by partitions like everything else.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from meshproxy.gossip.codec import Codec, Keyring, Rejected
from meshproxy.gossip.commands import Command, LeaveComplete, MemberChanged, SendPacket, SendSync
from meshproxy.gossip.core import Membership
from meshproxy.gossip.events import (
    Event,
    Join,
    Leave,
    LocalMetaChanged,
    PacketReceived,
    SyncReceived,
    Tick,
)
from meshproxy.gossip.messages import Addr, NodeMeta, State
from meshproxy.gossip.settings import GossipSettings

SIM_KEY = bytes(range(32))
_WALL_EPOCH = 1_700_000_000.0
_GOSSIP_PORT = 7946

_WAKE, _PACKET, _SYNC = 0, 1, 2


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """What the network does to every packet (sync frames are only delayed)."""

    loss: float = 0.0
    delay_s: float = 0.0002
    jitter_s: float = 0.0
    duplicate: float = 0.0


@dataclass(frozen=True, slots=True)
class Change:
    """A ``MemberChanged`` command, as observed by one node at one virtual time."""

    at: float
    observer: str
    member: str
    old: State | None
    new: State | None
    incarnation: int
    reason: str


@dataclass(slots=True)
class SimNode:
    name: str
    addr: Addr
    membership: Membership
    codec: Codec
    seeds: tuple[str, ...]
    keys: tuple[bytes, ...] | None
    lives: int = 1
    running: bool = True
    paused: bool = False
    left: bool = False
    inbox: list[tuple[int, Addr, bytes]] = field(default_factory=list)
    wake_at: float | None = None
    wake_gen: int = 0
    stats: Counter[str] = field(default_factory=Counter)


class Simulation:
    """A fake network of gossiping nodes; drive it with ``run_for`` and the fault methods."""

    def __init__(
        self,
        *,
        seed: int = 0,
        settings: GossipSettings | None = None,
        link: LinkProfile | None = None,
        keys: Sequence[bytes] | None = (SIM_KEY,),
        inbox_packets: int = 256,
    ) -> None:
        self.seed = seed
        self.settings = settings or GossipSettings()
        self.link = link or LinkProfile()
        self.keys = tuple(keys) if keys is not None else None
        self.inbox_packets = inbox_packets
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.changes: list[Change] = []
        self._changes_by: dict[tuple[str, str], list[Change]] = {}
        self.blocked: set[tuple[str, str]] = set()
        self.stats: Counter[str] = Counter()
        self._rng = random.Random(f"net:{seed}")
        self._heap: list[tuple[float, int, int, str, object, object]] = []
        self._seq = 0
        self._by_addr: dict[Addr, str] = {}
        self.on_change: Callable[[Change], None] | None = None
        # Sees every packet put on the wire: (sender, receiver, bytes), for replay tests.
        self.tap: Callable[[str, str, bytes], None] | None = None

    # ---- building ----------------------------------------------------------------------

    def _make(self, name: str, addr: Addr, lives: int, meta: NodeMeta | None) -> Membership:
        rng = random.Random(f"node:{self.seed}:{name}:{lives}")
        return Membership(name, addr, self.settings, rng, meta=meta)

    def _codec(self, name: str, lives: int, keys: tuple[bytes, ...] | None) -> Codec:
        rng = random.Random(f"nonce:{self.seed}:{name}:{lives}")
        keyring = Keyring(keys) if keys is not None else None
        return Codec(keyring, allow_plaintext=keyring is None, random_bytes=rng.randbytes)

    def add(
        self,
        name: str,
        seeds: Sequence[str] = (),
        *,
        meta: NodeMeta | None = None,
        keys: Sequence[bytes] | None = None,
    ) -> SimNode:
        """Create a node and join it through ``seeds`` (names of nodes added before).

        ``keys`` gives it a keyring of its own instead of the simulation's.
        """
        index = len(self._by_addr)
        addr = (f"10.{index // 250 // 250}.{index // 250 % 250}.{index % 250 + 1}", _GOSSIP_PORT)
        own_keys = tuple(keys) if keys is not None else self.keys
        membership = self._make(name, addr, 1, meta)
        node = SimNode(name, addr, membership, self._codec(name, 1, own_keys), (), own_keys)
        self.nodes[name] = node
        self._by_addr[addr] = name
        self.join(name, seeds)
        return node

    def add_cluster(
        self, n: int, prefix: str = "n", seeds_per_node: int = 1, stagger_s: float = 0.0
    ) -> list[str]:
        """``n`` nodes, each joining through up to ``seeds_per_node`` earlier ones.

        ``stagger_s`` apart in virtual time: a whole cluster starting in the same instant
        is a join storm that only anti-entropy fully settles, as on a real network.
        """
        names = [f"{prefix}{i:03d}" for i in range(n)]
        for i, name in enumerate(names):
            earlier = names[:i]
            seeds = self._rng.sample(earlier, min(seeds_per_node, len(earlier)))
            if i and stagger_s:
                self.run_for(stagger_s)
            self.add(name, seeds)
        return names

    def join(self, name: str, seeds: Sequence[str]) -> None:
        node = self.nodes[name]
        node.seeds = tuple(seeds)
        self._handle(node, Join(tuple(self.nodes[s].addr for s in seeds)))

    # ---- faults ------------------------------------------------------------------------

    def kill(self, name: str) -> None:
        """kill -9: the node stops at once; its packets in flight still arrive."""
        node = self.nodes[name]
        node.running = False
        node.inbox.clear()
        node.wake_gen += 1
        node.wake_at = None

    def restart(self, name: str, seeds: Sequence[str] | None = None) -> None:
        """Start a killed node again with empty state (incarnation 0), same name and address."""
        node = self.nodes[name]
        node.lives += 1
        node.membership = self._make(name, node.addr, node.lives, node.membership.local_meta)
        node.codec = self._codec(name, node.lives, node.keys)
        node.running, node.paused, node.left = True, False, False
        self.join(name, node.seeds if seeds is None else seeds)

    def pause(self, name: str) -> None:
        """SIGSTOP: no timers fire; arriving packets wait in a bounded buffer."""
        self.nodes[name].paused = True

    def resume(self, name: str) -> None:
        """SIGCONT: buffered packets are read first, then the overdue timers fire."""
        node = self.nodes[name]
        node.paused = False
        inbox, node.inbox = node.inbox, []
        for kind, src, data in inbox:
            self._receive(node, kind, src, data)
        self._handle(node, Tick())

    def leave(self, name: str) -> None:
        self._handle(self.nodes[name], Leave())

    def set_meta(self, name: str, meta: NodeMeta) -> None:
        self._handle(self.nodes[name], LocalMetaChanged(meta))

    def block(self, src: str, dst: str) -> None:
        """Drop everything ``src`` sends to ``dst`` (one way)."""
        self.blocked.add((src, dst))

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut every link between nodes of different groups, both ways."""
        sets = [set(g) for g in groups]
        for i, a in enumerate(sets):
            for b in sets[i + 1 :]:
                for x in a:
                    for y in b:
                        self.blocked.add((x, y))
                        self.blocked.add((y, x))

    def heal(self) -> None:
        self.blocked.clear()

    def inject(self, src: Addr, dst: str, data: bytes) -> None:
        """Deliver raw bytes to ``dst`` now, as an attacker on the network would."""
        self._receive(self.nodes[dst], _PACKET, src, data)

    # ---- running -----------------------------------------------------------------------

    def run_until(self, t: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= t:
            at, _, kind, name, a, b = heapq.heappop(heap)
            self.now = at
            node = self.nodes[name]
            if kind == _WAKE:
                if a != node.wake_gen or not node.running or node.paused:
                    continue
                node.wake_at = None
                self._handle(node, Tick())
            else:
                assert isinstance(a, tuple)
                assert isinstance(b, bytes)
                self._receive(node, kind, a, b)
        self.now = max(self.now, t)

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def run_until_true(
        self, predicate: Callable[[], bool], timeout: float, step: float = 0.05
    ) -> bool:
        """Run until ``predicate()`` holds (checked every ``step``), at most ``timeout``."""
        end = self.now + timeout
        while not predicate():
            if self.now >= end:
                return False
            self.run_until(min(self.now + step, end))
        return True

    # ---- observing ---------------------------------------------------------------------

    def running(self) -> list[str]:
        """Nodes that are up and not paused (the ones whose view should be right)."""
        return [n.name for n in self.nodes.values() if n.running and not n.paused]

    def view(self, observer: str) -> dict[str, State]:
        return {m.name: m.state for m in self.nodes[observer].membership.members()}

    def state_of(self, observer: str, member: str) -> State | None:
        return self.nodes[observer].membership.state_of(member)

    def all_see(
        self, member: str, states: Iterable[State], observers: Iterable[str] | None = None
    ) -> bool:
        wanted = set(states)
        names = self.running() if observers is None else observers
        return all(self.state_of(o, member) in wanted for o in names if o != member)

    def converged(self, names: Iterable[str] | None = None) -> bool:
        """Every named (default: running) node sees every other one alive."""
        group = list(self.running() if names is None else names)
        for observer in group:
            state_of = self.nodes[observer].membership.state_of
            if any(state_of(other) is not State.ALIVE for other in group):
                return False
        return True

    def first_change(
        self, observer: str, member: str, new: State, after: float = 0.0
    ) -> float | None:
        for c in self._changes_by.get((observer, member), ()):
            if c.at >= after and c.new is new:
                return c.at
        return None

    # ---- internals ---------------------------------------------------------------------

    def _push(self, at: float, kind: int, name: str, a: object, b: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, name, a, b))

    def _wall(self) -> float:
        return _WALL_EPOCH + self.now

    def _receive(self, node: SimNode, kind: int, src: Addr, data: bytes) -> None:
        if not node.running:
            return
        if node.paused:
            if len(node.inbox) < self.inbox_packets:
                node.inbox.append((kind, src, data))
            else:
                self.stats["dropped_buffer_full"] += 1
            return
        event: Event
        if kind == _PACKET:
            packet = node.codec.decode_packet(data, self._wall())
            if isinstance(packet, Rejected):
                node.stats[f"rejected_{packet.reason}"] += 1
                return
            event = PacketReceived(src, packet.messages)
        else:
            sync = node.codec.decode_sync(data, self._wall())
            if isinstance(sync, Rejected):
                node.stats[f"rejected_{sync.reason}"] += 1
                return
            event = SyncReceived(src, sync.message)
        self._handle(node, event)

    def _handle(self, node: SimNode, event: Event) -> None:
        for command in node.membership.handle(event, self.now):
            self._execute(node, command)
        if not node.running:
            return
        deadline = node.membership.next_deadline()
        if deadline is None:
            return
        deadline = max(deadline, self.now)
        if node.wake_at is not None and node.wake_at <= deadline:
            return
        node.wake_gen += 1
        node.wake_at = deadline
        self._push(deadline, _WAKE, node.name, node.wake_gen, None)

    def _execute(self, node: SimNode, command: Command) -> None:
        match command:
            case SendPacket(to, messages):
                data = node.codec.encode_packet(messages, self._wall())
                node.stats["packets_sent"] += 1
                node.stats["messages_sent"] += len(messages)
                node.stats["bytes_sent"] += len(data)
                self._transmit(node, to, _PACKET, data)
            case SendSync(to, message):
                data = node.codec.encode_sync(message, self._wall())
                node.stats["syncs_sent"] += 1
                node.stats["sync_bytes_sent"] += len(data)
                self._transmit(node, to, _SYNC, data)
            case MemberChanged(member, old, new, reason):
                change = Change(
                    self.now, node.name, member.name, old, new, member.incarnation, reason
                )
                self.changes.append(change)
                self._changes_by.setdefault((node.name, member.name), []).append(change)
                if self.on_change is not None:
                    self.on_change(change)
            case LeaveComplete():
                node.left = True
                node.running = False

    def _transmit(self, node: SimNode, to: Addr, kind: int, data: bytes) -> None:
        dst = self._by_addr.get(to)
        if dst is None or (node.name, dst) in self.blocked:
            self.stats["dropped_unreachable"] += 1
            return
        link, rng = self.link, self._rng
        if self.tap is not None and kind == _PACKET:
            self.tap(node.name, dst, data)
        if kind == _SYNC:
            # TCP: no loss, but a handshake and a round trip more.
            self._push(self.now + 3 * link.delay_s, kind, dst, node.addr, data)
            return
        if link.loss and rng.random() < link.loss:
            self.stats["dropped_loss"] += 1
            return
        copies = 2 if link.duplicate and rng.random() < link.duplicate else 1
        for _ in range(copies):
            delay = link.delay_s + (rng.uniform(0, link.jitter_s) if link.jitter_s else 0.0)
            self._push(self.now + delay, kind, dst, node.addr, data)
