"""Gossip I/O: one UDP socket for packets, and TCP on the same port number for push-pull.

Packets are sent from the socket bound to the gossip port, so a peer that answers the
source address of a ping reaches our advertised port. A sync (full-state push-pull) goes
over a short-lived TCP connection: connect, write one length-prefixed frame, close; the
listener reads one frame per connection, with a deadline and a size bound.

Nothing here interprets bytes beyond the sync frame's length prefix: the callbacks get raw
packets and frames, and everything the network can do wrong (refused, reset, slow,
oversized, truncated) ends as a counted drop, never as an exception out of this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from meshproxy.gossip.codec import SYNC_PREFIX_BYTES, Rejected
from meshproxy.gossip.messages import Addr

# Bounds against a flood of sync connections (hostile or a join storm): beyond them new
# ones are closed or skipped and counted; the periodic anti-entropy makes up for it.
MAX_INBOUND_SYNCS = 32
MAX_OUTBOUND_SYNCS = 32
SYNC_CONNECT_S = 1.0
SYNC_IO_S = 5.0
# Socket buffers: a join storm sends bursts; the kernel default (~200 KB) is enough for a
# few hundred packets of 1400 bytes, which we raise to ride out a short stall.
UDP_BUFFER_BYTES = 1 << 20

PacketHandler = Callable[[bytes, Addr], None]
FrameLength = Callable[[bytes], "int | Rejected"]
Count = Callable[[str, str], None]  # (event, reason): what went wrong, counted by the owner


def _addr(raw: object) -> Addr:
    """A peer address as the core names it: (host, port), IPv6 flow and scope dropped."""
    assert isinstance(raw, tuple)
    return (str(raw[0]), int(raw[1]))


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, owner: GossipTransport) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.owner.packet_in(data, _addr(addr))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a dead peer, and the like: expected, counted.
        self.owner.count("udp_errors", "")


class GossipTransport:
    """The UDP endpoint and the TCP sync listener of one node, on one address."""

    def __init__(
        self,
        host: str,
        port: int,
        on_packet: PacketHandler,
        on_frame: PacketHandler,
        frame_length: FrameLength,
        count: Count,
    ) -> None:
        self.host = host
        self.port = port
        self._on_packet = on_packet
        self._on_frame = on_frame
        self._frame_length = frame_length
        self.count = count
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._inbound = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind UDP, then TCP on the same port number; raises OSError if either fails."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER_BYTES)
            sock.bind((self.host, self.port))
            sock.setblocking(False)
            self.port = sock.getsockname()[1]
            udp, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._udp = udp
        try:
            self._server = await asyncio.start_server(
                self._serve_sync, self.host, self.port, reuse_address=True
            )
        except BaseException:
            udp.close()
            self._udp = None
            raise

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._server is not None:
            self._server.close()
            self._server = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)

    # ---- packets -----------------------------------------------------------------------

    def packet_in(self, data: bytes, addr: Addr) -> None:
        self._on_packet(data, addr)

    def send_packet(self, data: bytes, to: Addr) -> None:
        if self._udp is None:
            return
        try:
            self._udp.sendto(data, to)
        except OSError:  # no route, a name that does not resolve: the peer is unreachable
            self.count("udp_errors", "")

    # ---- syncs -------------------------------------------------------------------------

    def send_sync(self, frame: bytes, to: Addr) -> bool:
        """Deliver one frame in the background; False if too many are in flight already."""
        if len(self._tasks) >= MAX_OUTBOUND_SYNCS or self._server is None:
            self.count("sync_skipped", "")
            return False
        task = asyncio.get_running_loop().create_task(self._send_sync(frame, to))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _send_sync(self, frame: bytes, to: Addr) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(SYNC_CONNECT_S):
                _, writer = await asyncio.open_connection(to[0], to[1])
            async with asyncio.timeout(SYNC_IO_S):
                writer.write(frame)
                await writer.drain()
        except (OSError, TimeoutError):
            self.count("sync_send_failed", "")
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError, TimeoutError):
                    async with asyncio.timeout(1.0):
                        await writer.wait_closed()

    async def _serve_sync(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._inbound >= MAX_INBOUND_SYNCS or not isinstance(peer, tuple):
            self.count("sync_refused", "")
            writer.transport.abort()
            return
        self._inbound += 1
        try:
            async with asyncio.timeout(SYNC_IO_S):
                prefix = await reader.readexactly(SYNC_PREFIX_BYTES)
                total = self._frame_length(prefix)
                if isinstance(total, Rejected):
                    self.count("rejected", str(total.reason))
                    return
                rest = await reader.readexactly(total - SYNC_PREFIX_BYTES)
            self._on_frame(prefix + rest, _addr(peer))
        except (asyncio.IncompleteReadError, OSError, TimeoutError):
            self.count("sync_receive_failed", "")
        finally:
            self._inbound -= 1
            writer.transport.abort()
