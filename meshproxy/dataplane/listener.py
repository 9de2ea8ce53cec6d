"""Accepting clients: the protocol that owns a client connection until it is linked.

It enforces the per-listener connection limit, reads the hop header on mesh ports, and
buffers (boundedly) whatever the client sends while its upstream is being connected.
"""

from __future__ import annotations

import asyncio
import typing
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from meshproxy import log
from meshproxy.counters import Counters, Key, key
from meshproxy.dataplane.hop import Decoded, HopDecoder, HopHeader, Rejected
from meshproxy.dataplane.mysql import ER_CON_COUNT_ERROR, error_packet
from meshproxy.security.meshtls import MESH_ROLES, MeshTls, peer_of

# Stop reading from a client whose upstream is not connected yet past this many bytes.
PENDING_LIMIT = 256 * 1024


@dataclass
class Entrance:
    """Where clients come in: a listener, or the mesh port (which reads a hop header)."""

    name: str
    mesh: bool
    max_connections: int
    header_timeout_s: float
    speaks_mysql: bool = False  # may answer a client with a MySQL ERR packet
    tls: MeshTls | None = None  # the mesh port with [mesh_tls]: mutual TLS before the header
    active: int = 0
    # One per address the bind resolves to (``localhost``: IPv4 and IPv6).
    servers: list[asyncio.Server] = field(default_factory=list, repr=False)
    # Counted for every connection: their keys made once.
    accepted: Key = field(init=False, repr=False)
    closed: Key = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.accepted = key("connections_accepted", entrance=self.name)
        self.closed = key("connections_closed", entrance=self.name)


# Takes a new client: at once, or by returning the job that connects it (run as a task).
Serve = Callable[["Inbound", HopHeader | None], Coroutine[Any, Any, None] | None]


class Inbound:
    """A client connection from accept until the pump takes it over. (An asyncio protocol
    without the base class: see dataplane/callbacks.py.)"""

    def __init__(self, entrance: Entrance, serve: Serve, counters: Counters) -> None:
        self.entrance = entrance
        self._serve = serve
        self._counters = counters
        self.transport: asyncio.Transport | None = None
        self.pending = bytearray()
        self.eof = False
        self.linked = False
        self.lost = False
        self.peer = ""
        self._task: asyncio.Task[None] | None = None
        self._decoder: HopDecoder | None = HopDecoder() if entrance.mesh else None
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance here.
        self.transport = typing.cast(asyncio.Transport, transport)
        entrance = self.entrance
        if entrance.active >= entrance.max_connections:
            self._counters.inc("connections_refused", entrance=entrance.name, reason="limit")
            self.lost = True  # never counted as active
            if entrance.speaks_mysql:
                message = f"Too many connections (listener {entrance.name!r})"
                self.transport.write(error_packet(ER_CON_COUNT_ERROR, message))
                self.transport.close()
            else:
                self.transport.abort()
            return
        entrance.active += 1
        self._counters.add(entrance.accepted)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if self._decoder is None:
            self._start(None)
            return
        loop = asyncio.get_running_loop()
        self._header_timer = loop.call_later(
            entrance.header_timeout_s, self._reject, "no hop header in time"
        )
        if entrance.tls is not None:
            # The handshake is done (the TLS layer runs it first): the peer's
            # certificate is from the mesh CA; it must also name a mesh role.
            peer = peer_of(transport)
            if peer is None or peer.role not in MESH_ROLES:
                role = "none" if peer is None else repr(peer.role)
                self._refuse_tls("not a mesh role", f"certificate role {role}")

    def _refuse_tls(self, reason: str, detail: str) -> None:
        self._counters.inc("mesh_tls_refused", entrance=self.entrance.name, reason=reason)
        log.warning("mesh_tls_refused", peer=self.peer, reason=reason, detail=detail)
        if self._header_timer is not None:
            self._header_timer.cancel()
        if self.transport is not None:
            self.transport.abort()

    def _start(self, header: HopHeader | None) -> None:
        job = self._serve(self, header)
        if job is not None:
            self._task = asyncio.get_running_loop().create_task(job)

    def data_received(self, data: bytes) -> None:
        if self._decoder is not None:
            result = self._decoder.feed(data)
            if result is None:
                return
            if isinstance(result, Rejected):
                self._reject(result.reason)
                return
            assert isinstance(result, Decoded)
            self._decoder = None
            if self._header_timer is not None:
                self._header_timer.cancel()
            data = result.rest
            self._start(result.header)
        self.pending += data
        if len(self.pending) > PENDING_LIMIT and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self._decoder is not None:
            if self._decoder.empty:
                # An edge recycling a warm socket it never used: routine, not an attack.
                self._counters.inc("warm_connections_closed", entrance=self.entrance.name)
            else:
                self._reject("closed in the middle of a hop header")
            return False
        # Keep the transport open: the upstream's answer may still come (TLS, which has no
        # half-close, closes whatever we answer).
        return self.entrance.tls is None

    def pause_writing(self) -> None:
        pass  # it writes only an error packet

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        if self._header_timer is not None:
            self._header_timer.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if not self.linked:
            self.entrance.active -= 1

    def _reject(self, reason: str) -> None:
        self._counters.inc("hop_headers_rejected", entrance=self.entrance.name)
        log.warning("hop_rejected", peer=self.peer, reason=reason)
        if self.transport is not None:
            self.transport.abort()
