"""The byte pump: two asyncio Protocols that copy bytes between a client and an upstream.

This is the per-packet path, so it does as little as possible: ``data_received`` adds a
length and calls ``write`` on the other transport. Backpressure rides on the transports'
flow control (a side whose write buffer is over its high-water mark pauses reading on the
other side), half-close is forwarded with ``write_eof``, and everything else (idle time,
byte counters) is sampled by a sweeper instead of being paid for per packet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshproxy.config import Address
from meshproxy.dataplane.callbacks import for_loop

if TYPE_CHECKING:
    from meshproxy.dataplane.sockmap import Spliced


class Half:
    """One direction's reader: what arrives on our transport is written to ``peer``. (An
    asyncio protocol without the base class: see dataplane/callbacks.py.)"""

    def __init__(self, session: Session, peer: asyncio.Transport | None) -> None:
        self.session = session
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.nbytes = 0
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        self.peer.write(data)  # type: ignore[union-attr]

    def pause_writing(self) -> None:
        # Our transport cannot take more: stop reading what would be written to it.
        self.peer.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.is_closing():
            peer.resume_reading()

    def eof_received(self) -> bool:
        self.eof = True
        # TLS has no half-close: a TLS transport closes on EOF whatever we answer.
        tls = self.transport is not None and self.transport.get_extra_info("sslcontext")
        return self.session.half_closed() and not tls

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.close()


class Session:
    """A linked client and upstream connection, and what the node tracks about it."""

    __slots__ = (
        "_on_close",
        "client",
        "closed",
        "closing",
        "idle_since",
        "last_nbytes",
        "member",
        "spliced",
        "swept_nbytes",
        "upstream",
    )

    def __init__(self, on_close: Callable[[Session], None]) -> None:
        self._on_close = on_close
        self.client: Half | None = None
        self.upstream: Half | None = None
        self.member: Address | None = None
        self.closed = False
        self.closing = False  # a spliced session waits for the kernel to pass bytes on
        self.last_nbytes = -1  # total at the last idle sweep
        self.idle_since = 0.0
        self.swept_nbytes = (0, 0)  # bytes already added to the counters, per direction
        self.spliced: Spliced | None = None  # its bytes go through the kernel fast path

    def nbytes(self) -> tuple[int, int]:
        """Bytes received from the client and from the upstream so far."""
        c, u = self._from_client(), self._from_upstream()
        if self.spliced is not None:
            kernel_c, kernel_u = self.spliced.nbytes()
            return c + kernel_c, u + kernel_u
        return c, u

    def half_closed(self) -> bool:
        """Forward an EOF to the other side; close once both directions have ended."""
        client, upstream = self.client, self.upstream
        if client is None or upstream is None:
            return False
        if client.eof and upstream.eof:
            self.close()
            return False
        for reader in (client, upstream):
            peer = reader.peer
            if reader.eof and peer is not None and not peer.is_closing():
                if not peer.can_write_eof():
                    return False
                if self.spliced is None:
                    peer.write_eof()
                elif reader is client:
                    self.spliced.write_eof(True, self._from_client)
                else:
                    self.spliced.write_eof(False, self._from_upstream)
        return True

    def close(self, abort: bool = False) -> None:
        if self.closed or (self.closing and not abort):
            return
        spliced = self.spliced
        if spliced is not None and not abort:
            # What the kernel still carries reaches each side before the close.
            self.closing = True
            spliced.after_flush(
                True,
                self._from_client,
                lambda: spliced.after_flush(False, self._from_upstream, self._close_now),
            )
            return
        self._close_now(abort)

    def _from_client(self) -> int:
        return self.client.nbytes if self.client else 0

    def _from_upstream(self) -> int:
        return self.upstream.nbytes if self.upstream else 0

    def _close_now(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        for half in (self.client, self.upstream):
            if half is not None and half.transport is not None:
                if abort:
                    half.transport.abort()
                else:
                    half.transport.close()
        self._on_close(self)


def link(session: Session, client: asyncio.Transport, pending: bytes, eof: bool) -> None:
    """Hand the client transport to the pump once its upstream is connected.

    ``pending`` is what the client sent while we were connecting; ``eof`` says whether it
    already half-closed.
    """
    upstream = session.upstream
    assert upstream is not None
    assert upstream.transport is not None
    half = Half(session, upstream.transport)
    session.client = half
    half.transport = client
    client.set_protocol(for_loop(half))
    if pending:
        half.nbytes += len(pending)
        upstream.transport.write(pending)
    if eof:
        half.eof = True
        session.half_closed()
    else:
        client.resume_reading()
