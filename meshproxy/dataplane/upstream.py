"""Connecting to an upstream: candidate choice, retries within a budget, warm sockets.

For MySQL the server speaks first, so until the upstream's greeting arrives nothing has
reached the client and the client has sent nothing we could not replay. We therefore treat
"connected, but closed before the greeting" exactly like a refused connect and retry the
next candidate: a middle that accepted a hop but could not reach any backend, or a warm
socket that died unnoticed, costs the client a little latency instead of an error.
"""

from __future__ import annotations

import asyncio
import random
import time
import typing
from collections import deque
from collections.abc import Callable, Mapping

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_delay

from meshproxy.config import Address, UpstreamKind, UpstreamRef
from meshproxy.counters import Counters
from meshproxy.dataplane import tlslayer
from meshproxy.dataplane.callbacks import StreamProtocol, factory_for_loop, for_loop
from meshproxy.dataplane.hop import HopHeader
from meshproxy.dataplane.pump import Half, Session
from meshproxy.dataplane.router import Member, choose
from meshproxy.dataplane.sockmap import Sockmap
from meshproxy.errors import ConnectFailed, NoUpstream, UpstreamError, describe
from meshproxy.security.meshtls import MeshTls, peer_of

# Called with (group, member, error detail) on failure and (group, member, None) on success.
ConnectReport = Callable[[UpstreamRef, Address, str | None], None]


class Dialing:
    """An upstream connection that is not linked yet: waits for the server's first bytes.
    (An asyncio protocol without the base class: see dataplane/callbacks.py.)"""

    def __init__(self, ready: asyncio.Future[None], address: Address) -> None:
        self.ready = ready
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.first = b""
        self.lost = False
        self.abandoned = False
        # The TCP connect's timeout while it runs: abandoning ends it now (a SYN to a host
        # that vanished would otherwise hang for the whole connect timeout).
        self.connecting: asyncio.Timeout | None = None

    def abandon(self, reason: str) -> None:
        """Give up waiting for this member (the control plane ruled it out): retry another."""
        self.abandoned = True
        if self.connecting is not None:
            self.connecting.reschedule(asyncio.get_running_loop().time())
        self._fail(reason)

    async def greeted(self) -> None:
        """Wait for the server's first bytes; a server gone right after them failed too
        (the client has seen nothing yet, so another member can still be tried)."""
        await self.ready
        if self.lost:
            raise ConnectFailed(str(self.address), "closed right after its greeting")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.first += data
        assert self.transport is not None
        self.transport.pause_reading()
        if not self.ready.done():
            self.ready.set_result(None)

    def eof_received(self) -> bool:
        self._fail("closed before the server greeting")
        return False

    def pause_writing(self) -> None:
        pass  # it writes only a hop header

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(f"connection lost: {exc}" if exc else "connection closed")

    def expire(self) -> None:
        """The budget ran out before the greeting came."""
        if not self.ready.done():
            self.ready.set_exception(TimeoutError())

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectFailed(str(self.address), reason))


class _Idle:
    """A warm socket waiting in the pool; any event on it means it is no longer usable.
    (An asyncio protocol without the base class: see dataplane/callbacks.py.)"""

    def __init__(self, pool: WarmPool, address: Address) -> None:
        self.pool = pool
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.born = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.discard()

    def eof_received(self) -> bool:
        self.discard()
        return False

    def pause_writing(self) -> None:
        pass  # it writes nothing

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)

    def discard(self) -> None:
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.close()


class WarmPool:
    """Pre-connected idle sockets to each member of a tier, so clients skip the handshake."""

    def __init__(self) -> None:
        self.idle: dict[Address, deque[_Idle]] = {}
        self.wanted = asyncio.Event()

    def take(self, address: Address) -> asyncio.Transport | None:
        sockets = self.idle.get(address)
        while sockets:
            idle = sockets.popleft()
            self.wanted.set()
            transport = idle.transport
            if transport is not None and not transport.is_closing():
                return transport
        return None

    def forget(self, idle: _Idle) -> None:
        sockets = self.idle.get(idle.address)
        if sockets is not None and idle in sockets:
            sockets.remove(idle)
            self.wanted.set()

    def count(self, address: Address) -> int:
        return len(self.idle.get(address, ()))

    async def fill(self, address: Address, timeout_s: float, tls: MeshTls | None) -> None:
        """Open one idle socket (with ``tls``, its handshake done: a client then skips it
        too); raises OSError or TimeoutError."""
        async with asyncio.timeout(timeout_s):
            transport = await dial(lambda: _Idle(self, address), address, tls)
        idle = typing.cast(_Idle, transport.get_protocol())
        self.idle.setdefault(address, deque()).append(idle)

    def recycle(self, max_idle_s: float, keep: set[Address]) -> None:
        """Close sockets older than max_idle_s and those to members no longer eligible."""
        cutoff = time.monotonic() - max_idle_s
        for address, sockets in list(self.idle.items()):
            for idle in list(sockets):
                if address not in keep or idle.born < cutoff:
                    idle.discard()

    def close(self) -> None:
        for sockets in list(self.idle.values()):
            for idle in list(sockets):
                idle.discard()


async def dial(
    factory: Callable[[], StreamProtocol],
    address: Address,
    tls: MeshTls | None,
    local: tuple[str, int] | None = None,
) -> asyncio.Transport:
    """Connect to ``address``; with ``tls``, over mutual TLS to a peer proven a middle."""
    if tls is None:
        transport, _ = await asyncio.get_running_loop().create_connection(
            factory_for_loop(factory), address.host, address.port, local_addr=local
        )
        return transport
    transport, _ = await tlslayer.connect(factory, address.host, address.port, tls.client, local)
    check_middle(transport)
    return transport


def check_middle(transport: asyncio.Transport) -> None:
    """A tier member must prove it is a middle of this mesh (raises ConnectFailed)."""
    peer = peer_of(transport)
    if peer is None or peer.role != "middle":
        transport.abort()
        role = "none" if peer is None else repr(peer.role)
        raise ConnectFailed("", f"peer certificate role {role}, not 'middle'")


class UpstreamView(typing.Protocol):
    """What the connector reads of a pool or tier: the latest members and where to dial from."""

    @property
    def members(self) -> tuple[Member, ...]: ...

    @property
    def source_ip(self) -> str: ...


class Connector:
    """Opens the upstream side of a session, retrying other candidates within a budget."""

    def __init__(
        self,
        groups: Mapping[UpstreamRef, UpstreamView],
        active: dict[Address, int],
        report: ConnectReport,
        warm: dict[str, WarmPool],
        connect_s: float,
        budget_s: float,
        counters: Counters,
        rng: random.Random | None = None,
    ) -> None:
        self._groups = groups
        self._active = active
        self._report = report
        self._warm = warm
        self.connect_s = connect_s
        self.budget_s = budget_s
        self._rng = rng or random.Random()
        self.counters = counters
        # Attempts still waiting for a connect or a greeting, by member.
        self._dialing: dict[Address, set[Dialing]] = {}
        self.tls: MeshTls | None = None  # mutual TLS to tier members, with [mesh_tls]
        self.sockmap: Sockmap | None = None  # the kernel fast path, with dataplane.accel

    def abandon(self, address: Address, reason: str) -> int:
        """Fail the attempts to ``address`` that have not seen a greeting yet, so that they
        move on to another member at once (a SIGSTOPped middle accepts, then never greets:
        without this they would wait out the whole connect budget)."""
        dialings = list(self._dialing.get(address, ()))
        for dialing in dialings:
            dialing.abandon(reason)
        return len(dialings)

    async def open(
        self,
        ref: UpstreamRef,
        session: Session,
        client: asyncio.Transport,
        header: HopHeader | None,
        await_greeting: bool,
    ) -> None:
        """Connect ``session.upstream`` to a member of ``ref``, or raise UpstreamError."""
        tried: set[Address] = set()
        deadline = time.monotonic() + self.budget_s

        async def attempt_one() -> None:
            members = self._groups[ref].members
            member = choose(members, self._active, tried, self._rng)
            if member is None and tried:
                tried.clear()  # every candidate failed once: start another round
                member = choose(members, self._active, tried, self._rng)
            if member is None:
                raise NoUpstream(f"no eligible member in {ref}")
            tried.add(member.address)
            remaining = deadline - time.monotonic()
            await self._attempt(
                ref, member.address, session, client, header, await_greeting, remaining
            )

        # The first attempt goes without the retry machinery: it is the common case, and a
        # connection storm pays for every allocation on this path.
        try:
            await attempt_one()
        except UpstreamError:
            if time.monotonic() >= deadline:
                raise
        else:
            return

        def wait(state: RetryCallState) -> float:
            # Straight on to an untried member; back off only between whole rounds.
            return 0.0 if tried else min(0.02 * 2 ** (state.attempt_number // 4), 0.25)

        retrying = AsyncRetrying(
            stop=stop_after_delay(max(deadline - time.monotonic(), 0.0)),
            wait=wait,
            retry=retry_if_exception_type(UpstreamError),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                self.counters.inc("connect_retries", upstream=str(ref))
                await attempt_one()

    async def _attempt(
        self,
        ref: UpstreamRef,
        address: Address,
        session: Session,
        client: asyncio.Transport,
        header: HopHeader | None,
        await_greeting: bool,
        remaining_s: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        dialing = Dialing(ready, address)
        transport: asyncio.Transport | None = None
        pool = self._warm.get(ref.name) if ref.kind is UpstreamKind.TIER else None
        waiting = self._dialing.setdefault(address, set())
        waiting.add(dialing)
        try:
            transport = pool.take(address) if pool is not None else None
            if transport is not None:
                dialing.transport = transport
                transport.set_protocol(for_loop(dialing))
            else:
                connect_s = max(min(self.connect_s, remaining_s), 0.001)
                tls = self.tls if ref.kind is UpstreamKind.TIER else None
                async with asyncio.timeout(connect_s) as dialing.connecting:
                    source = self._groups[ref].source_ip
                    local = (source, 0) if source else None
                    transport = await dial(lambda: dialing, address, tls, local)
                dialing.connecting = None
            if header is not None:
                transport.write(header.encode())
            if await_greeting:
                # A timer on the future, not asyncio.timeout: no cancellation of this task
                # to arrange and undo on every new session.
                timer = loop.call_later(max(remaining_s, 0.001), dialing.expire)
                try:
                    await dialing.greeted()
                finally:
                    timer.cancel()
        except (OSError, TimeoutError, ConnectFailed) as exc:
            if transport is not None:
                transport.abort()
            detail = exc.reason if isinstance(exc, ConnectFailed) else describe(exc)
            if not dialing.abandoned:  # the control plane's verdict is no connect failure
                self._report(ref, address, detail)
            raise ConnectFailed(str(address), detail) from None
        except BaseException:
            if transport is not None:
                transport.abort()
            raise
        finally:
            waiting.discard(dialing)
            if not waiting:
                self._dialing.pop(address, None)
            if ready.done() and not ready.cancelled():
                ready.exception()  # retrieved: a failure after another failure is no news
        upstream = Half(session, client)
        upstream.transport = transport
        session.upstream = upstream
        session.member = address
        transport.set_protocol(for_loop(upstream))
        if await_greeting and self.sockmap is not None:
            # The quiet point: the greeting is here and not passed on, so neither side
            # sends until the client has it.
            self._splice(session, client, transport)
        if dialing.first:
            upstream.nbytes += len(dialing.first)
            client.write(dialing.first)
        transport.resume_reading()
        self._report(ref, address, None)

    def _splice(
        self, session: Session, client: asyncio.Transport, upstream: asyncio.Transport
    ) -> None:
        """Hand a linked session's bytes to the kernel, unless TLS keeps them in user space."""
        assert self.sockmap is not None
        if client.get_extra_info("sslcontext") or upstream.get_extra_info("sslcontext"):
            return
        session.spliced = self.sockmap.splice(client, upstream)
        self.counters.inc("accel_sessions" if session.spliced else "accel_fallbacks")
