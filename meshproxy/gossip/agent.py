"""The gossip agent: the asyncio shell around one ``Membership``.

It feeds the core what the network delivers (``PacketReceived``, ``SyncReceived``) and
timer ticks at ``next_deadline()``, always with ``loop.time()`` as ``now``, and carries out
the commands that come back: packets and syncs go out through ``GossipTransport``,
``MemberChanged`` goes to the owner's callback, ``LeaveComplete`` ends a graceful leave.

Hostile input never raises out of here: the codec returns rejections (counted by reason
in the node's ``Counters`` as ``gossip_rejected{reason}``), and an exception out of the
core or the owner's callback is logged and counted (``gossip_errors``) instead of killing
the receive path. The timer loop runs under a ``Supervisor``, so even a bug there is a
logged restart, not a silent end of failure detection.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence

from meshproxy import log
from meshproxy.counters import Counters
from meshproxy.gossip.codec import Codec, Keyring, Rejected
from meshproxy.gossip.commands import (
    Command,
    LeaveComplete,
    Member,
    MemberChanged,
    SendPacket,
    SendSync,
)
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
from meshproxy.gossip.messages import Addr, NodeMeta
from meshproxy.gossip.settings import GossipSettings
from meshproxy.gossip.transport import GossipTransport
from meshproxy.supervise import Supervisor

OnChange = Callable[[MemberChanged], None]


class Agent:
    """One node's gossip: a membership core, its sockets and its timer."""

    def __init__(
        self,
        name: str,
        bind: Addr,
        advertise: Addr,
        settings: GossipSettings,
        keys: Sequence[bytes],
        *,
        allow_plaintext: bool = False,
        meta: NodeMeta | None = None,
        counters: Counters | None = None,
        on_change: OnChange | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.counters = counters if counters is not None else Counters()
        self.codec = Codec(Keyring(keys) if keys else None, allow_plaintext=allow_plaintext)
        self.membership = Membership(
            name, advertise, settings, rng or random.Random(), meta=meta or NodeMeta()
        )
        self.transport = GossipTransport(
            bind[0],
            bind[1],
            self._packet_in,
            self._frame_in,
            self.codec.sync_frame_length,
            self._count,
        )
        self.on_change = on_change
        # Traffic this agent sent and received, for rates at rest (also in ``counters``).
        self.stats: Counter[str] = Counter()
        self.tasks = Supervisor()
        self._wake: asyncio.Event | None = None
        self._waiting_until: float | None = None
        self._left: asyncio.Event | None = None
        self._started = False

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self, seeds: Sequence[Addr] = ()) -> None:
        """Bind the gossip port (raises OSError) and join through ``seeds``."""
        self._wake = asyncio.Event()
        self._left = asyncio.Event()
        await self.transport.start()
        self._started = True
        self.tasks.spawn("gossip timers", self._timer_loop)
        self.handle(Join(tuple(seeds)))
        log.event(
            "gossip_started",
            bind=f"{self.transport.host}:{self.transport.port}",
            advertise=f"{self.membership.addr[0]}:{self.membership.addr[1]}",
            seeds=",".join(f"{h}:{p}" for h, p in seeds) or "none",
            encrypted=self.codec.keyring is not None,
        )

    def join(self, seeds: Sequence[Addr]) -> None:
        """Push-pull with more seeds (discovery found some); harmless if already members."""
        self.handle(Join(tuple(seeds)))

    async def leave(self, timeout_s: float | None = None) -> bool:
        """Leave gracefully; True once the leave has been gossiped enough, False on timeout."""
        if not self._started or self._left is None:
            return True
        self.handle(Leave())
        limit = self.settings.leave_timeout_s + 1.0 if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(limit):
                await self._left.wait()
        except TimeoutError:
            log.warning("gossip_leave_timeout", after_s=limit)
            return False
        return True

    async def stop(self) -> None:
        """Close the sockets and the timer (call ``leave`` first for a graceful exit)."""
        self._started = False
        await self.tasks.stop()
        await self.transport.close()

    # ---- the owner's side ---------------------------------------------------------------

    def set_meta(self, meta: NodeMeta) -> None:
        if meta != self.membership.local_meta:
            self.handle(LocalMetaChanged(meta))

    def members(self) -> list[Member]:
        return self.membership.members()

    def wall_time(self, monotonic: float) -> float:
        """The wall-clock time of a ``loop.time()`` instant (for 'last change' displays)."""
        return time.time() - (asyncio.get_running_loop().time() - monotonic)

    # ---- the core ----------------------------------------------------------------------

    def handle(self, event: Event) -> None:
        """Run one event through the core and carry out its commands; never raises."""
        loop = asyncio.get_running_loop()
        try:
            commands = self.membership.handle(event, loop.time())
        except Exception as exc:  # a core bug must not take the node's gossip down
            self.counters.inc("gossip_errors", where="core")
            log.warning("gossip_error", where="core", event=type(event).__name__, error=repr(exc))
            return
        for command in commands:
            try:
                self._execute(command)
            except Exception as exc:
                self.counters.inc("gossip_errors", where=type(command).__name__)
                log.warning("gossip_error", where=type(command).__name__, error=repr(exc))
        deadline = self.membership.next_deadline()
        wake = self._wake
        if wake is not None and deadline is not None:
            waiting = self._waiting_until
            if waiting is None or deadline < waiting:
                wake.set()

    def _execute(self, command: Command) -> None:
        match command:
            case SendPacket(to, messages):
                data = self.codec.encode_packet(messages, time.time())
                self.transport.send_packet(data, to)
                self._traffic("packets_sent", "bytes_sent", len(data), len(messages))
            case SendSync(to, message):
                frame = self.codec.encode_sync(message, time.time())
                if self.transport.send_sync(frame, to):
                    self._traffic("syncs_sent", "sync_bytes_sent", len(frame))
            case MemberChanged():
                if self.on_change is not None:
                    self.on_change(command)
            case LeaveComplete():
                if self._left is not None:
                    self._left.set()

    async def _timer_loop(self) -> None:
        loop = asyncio.get_running_loop()
        wake = self._wake
        assert wake is not None
        while True:
            deadline = self.membership.next_deadline()
            self._waiting_until = deadline
            wake.clear()
            delay = None if deadline is None else deadline - loop.time()
            if delay is not None and delay <= 0:
                self.handle(Tick())
                continue
            try:
                async with asyncio.timeout(delay):
                    await wake.wait()  # an event moved the deadline earlier: recompute
            except TimeoutError:
                self.handle(Tick())

    # ---- the network's side ------------------------------------------------------------

    def _packet_in(self, data: bytes, addr: Addr) -> None:
        self._traffic("packets_received", "bytes_received", len(data))
        packet = self.codec.decode_packet(data, time.time())
        if isinstance(packet, Rejected):
            self._count("rejected", str(packet.reason))
            return
        if packet.unknown:
            self.counters.inc("gossip_unknown_messages", packet.unknown)
        self.handle(PacketReceived(addr, packet.messages))

    def _frame_in(self, frame: bytes, addr: Addr) -> None:
        self._traffic("syncs_received", "sync_bytes_received", len(frame))
        sync = self.codec.decode_sync(frame, time.time())
        if isinstance(sync, Rejected):
            self._count("rejected", str(sync.reason))
            return
        self.handle(SyncReceived(addr, sync.message))

    def _traffic(self, what: str, size_name: str, size: int, messages: int = 0) -> None:
        stats = self.stats
        stats[what] += 1
        stats[size_name] += size
        self.counters.inc(f"gossip_{what}")
        self.counters.inc(f"gossip_{size_name}", size)
        if messages:
            stats["messages_sent"] += messages
            self.counters.inc("gossip_messages_sent", messages)

    def _count(self, event: str, reason: str) -> None:
        self.stats[event] += 1
        if reason:
            self.counters.inc(f"gossip_{event}", reason=reason)
        else:
            self.counters.inc(f"gossip_{event}")
