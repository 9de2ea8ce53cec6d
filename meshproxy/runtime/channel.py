"""The control channel between the control process and its workers: msgpack over a Unix
socket.

Control -> worker: ``config`` (the running config as plain data), ``members`` (one group's
snapshot), ``close`` (close the sessions to a server). Worker -> control: ``hello``,
``report`` (one connect outcome, for passive ejection) and ``stats`` (counters and gauges,
once a second). Either side may go away; the worker keeps serving with what it last knew
and reconnects, and the control process sends everything again on ``hello``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

from meshproxy import log
from meshproxy.config import Address, Config, UpstreamRef, to_dict
from meshproxy.counters import Counters
from meshproxy.dataplane.router import Member
from meshproxy.health.state import ServerState


def new_name() -> str:
    """A fresh channel name: ``@`` and random hex, an abstract Unix socket (Linux). It has no
    file, so a node killed with SIGKILL leaves nothing behind, and no directory is needed."""
    return "@meshproxy-" + secrets.token_hex(8)


def _address(name: str) -> str:
    return "\0" + name[1:] if name.startswith("@") else name


async def serve(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], name: str
) -> asyncio.Server:
    """Listen on channel ``name``. The socket is made here, not by the event loop: libuv
    takes socket paths as C strings, which end at an abstract name's leading NUL."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(_address(name))
        sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return await asyncio.start_unix_server(handler, sock=sock)


async def connect(name: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to channel ``name`` (see :func:`serve`)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, _address(name))
    except OSError:
        sock.close()
        raise
    return await asyncio.open_unix_connection(sock=sock)


# A peer whose unread messages pass this many bytes is cut off: it is stuck, and it gets
# the whole state again when it comes back.
MAX_BUFFERED = 4 << 20
MAX_MESSAGE = 4 << 20

Message = dict[str, Any]


def encode(message: Message) -> bytes:
    data: bytes = msgpack.packb(message)
    return len(data).to_bytes(4, "big") + data


async def read_messages(
    reader: asyncio.StreamReader, handle: Callable[[Message], Awaitable[None] | None]
) -> None:
    """Call ``handle`` with each message until the peer closes or breaks the framing."""
    while True:
        try:
            size = int.from_bytes(await reader.readexactly(4), "big")
            if size > MAX_MESSAGE:
                log.warning("channel_rejected", reason=f"message of {size} bytes")
                return
            message = msgpack.unpackb(await reader.readexactly(size), raw=False)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        except (ValueError, msgpack.UnpackException) as exc:
            log.warning("channel_rejected", reason=f"undecodable message: {exc!r}")
            return
        if not isinstance(message, dict):
            log.warning("channel_rejected", reason="message is not a map")
            return
        result = handle(message)
        if result is not None:
            await result


class Peer:
    """One end of a channel connection, with bounded buffering."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def send(self, message: Message) -> bool:
        transport = self.writer.transport
        if transport.is_closing():
            return False
        if transport.get_write_buffer_size() > MAX_BUFFERED:
            log.warning("channel_overflow", action="closing the channel")
            transport.abort()
            return False
        self.writer.write(encode(message))
        return True

    def close(self) -> None:
        self.writer.close()


def members_message(ref: UpstreamRef, members: tuple[Member, ...]) -> Message:
    rows = [[str(m.address), m.weight, m.state.value, m.role] for m in members]
    return {"t": "members", "ref": str(ref), "m": rows}


def parse_members(message: Message) -> tuple[UpstreamRef, tuple[Member, ...]]:
    members = tuple(
        Member(Address.parse(address), int(weight), ServerState(state), str(role))
        for address, weight, state, role in message["m"]
    )
    return UpstreamRef.parse(message["ref"]), members


def config_message(config: Config) -> Message:
    return {"t": "config", "doc": to_dict(config), "source": config.source}


def counters_rows(counters: Counters) -> list[list[Any]]:
    return [[name, labels, value] for name, labels, value in counters.items()]


def counters_from_rows(rows: list[list[Any]]) -> Counters:
    counters = Counters()
    for name, labels, value in rows:
        counters.inc(str(name), int(value), **{str(k): str(v) for k, v in labels.items()})
    return counters


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, TimeoutError):
        async with asyncio.timeout(1.0):
            await writer.wait_closed()
