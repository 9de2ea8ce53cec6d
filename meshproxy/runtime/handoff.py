"""Listening sockets held by the angel and handed to its workers.

The angel binds each client-facing address once and keeps the socket for as long as some
worker's config wants it. A worker asks for it over a socket pair and receives a duplicate
through SCM_RIGHTS, so every worker accepts from the same kernel queue: a worker that is
stopped, dying or restarting strands no queued connection, because the others, or its
replacement, accept them. (With SO_REUSEPORT each worker had a queue of its own, and what
waited in a dead worker's queue was refused.)

The exchange is one datagram each way on a SOCK_SEQPACKET pair: ``get`` asks for the
sockets of one address and is answered with them, or with the error of the bind (the
answer repeats the question's number, so a late answer to a question given up on is
recognised and dropped); ``keep`` says which addresses the worker serves now and is not
answered. A socket no worker keeps
is closed, which is how a listener removed at run time stops accepting.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Iterable
from typing import Any

import msgpack

from meshproxy import log
from meshproxy.config import Address
from meshproxy.dataplane.listensockets import SockAddr, bind_listening, key_of

MAX_MESSAGE = 64 * 1024
MAX_FDS = 16  # sockets of one address: one per family it resolves to, in practice two
ANSWER_S = 5.0  # the angel answers at once unless it is stopped itself


def pair() -> tuple[socket.socket, socket.socket]:
    """The angel's end and the child's end (inheritable) of a new socket pair."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    theirs.set_inheritable(True)
    return ours, theirs


class SocketKeeper:
    """The angel's side: the sockets it holds, and who wants them."""

    def __init__(self, adopted: Iterable[socket.socket] = ()) -> None:
        # Sockets passed in by systemd or by the angel this one took over from, each
        # waiting for the first worker that asks for its address.
        self.adopted: dict[SockAddr, socket.socket] = {key_of(s.getsockname()): s for s in adopted}
        self.held: dict[Address, list[socket.socket]] = {}
        self.wants: dict[str, set[Address]] = {}  # per child, kept across its restarts

    def answer(self, child: str, conn: socket.socket) -> bool:
        """Serve one message from ``child`` on ``conn``; False once the child's end closed."""
        try:
            data = conn.recv(MAX_MESSAGE)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        try:
            message = msgpack.unpackb(data)
            if "get" in message:
                host, port, backlog = message["get"]
                address = Address(str(host), int(port))
                self._get(child, conn, address, int(backlog), int(message.get("q", 0)))
            elif "keep" in message:
                self.wants[child] = {Address(str(h), int(p)) for h, p in message["keep"]}
                self._release_unwanted()
            else:
                log.warning("angel_bad_socket_request", child=child, error="unknown request")
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            log.warning("angel_bad_socket_request", child=child, error=str(exc))
        return True

    def _get(
        self, child: str, conn: socket.socket, address: Address, backlog: int, question: int
    ) -> None:
        sockets = self.held.get(address)
        try:
            if sockets is None:
                sockets = self.held[address] = bind_listening(address, backlog, self.adopted)
                log.event("angel_listening", bind=str(address), sockets=len(sockets))
            else:
                for sock in sockets:
                    sock.listen(backlog)  # a config may change the backlog
        except (OSError, ValueError, OverflowError) as exc:  # the angel must not fall over
            number = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._send(conn, {"q": question, "err": text, "errno": number}, [])
            return
        self.wants.setdefault(child, set()).add(address)
        self._send(conn, {"q": question, "n": len(sockets)}, [s.fileno() for s in sockets])

    @staticmethod
    def _send(conn: socket.socket, reply: dict[str, object], fds: list[int]) -> None:
        with contextlib.suppress(OSError):  # a child that died meanwhile asks again later
            socket.send_fds(conn, [msgpack.packb(reply)], fds)

    def _release_unwanted(self) -> None:
        wanted = set().union(*self.wants.values())
        for address in set(self.held) - wanted:
            for sock in self.held.pop(address):
                sock.close()
            log.event("angel_listener_closed", bind=str(address))

    def all_sockets(self) -> list[socket.socket]:
        """Every socket held or adopted and unclaimed: what a new angel takes over."""
        return [s for group in self.held.values() for s in group] + list(self.adopted.values())

    def close(self) -> None:
        for sock in self.all_sockets():
            sock.close()
        self.held.clear()
        self.adopted.clear()


class AngelSockets:
    """A worker's side: listening sockets come from its angel."""

    def __init__(self, fd: int) -> None:
        self._conn = socket.socket(fileno=fd)
        self._conn.setblocking(False)
        self._lock = asyncio.Lock()  # one question at a time
        self._asked = 0

    async def listening(self, address: Address, backlog: int) -> list[socket.socket]:
        async with self._lock:
            self._asked += 1
            question = {"q": self._asked, "get": [address.host, address.port, backlog]}
            self._conn.send(msgpack.packb(question))
            try:
                async with asyncio.timeout(ANSWER_S):
                    reply, sockets = await self._answer(self._asked)
            except TimeoutError:
                raise OSError(errno.ETIMEDOUT, "the angel did not hand over the socket") from None
        if "err" in reply:
            for sock in sockets:
                sock.close()
            raise OSError(int(reply["errno"]), str(reply["err"]))
        for sock in sockets:
            sock.setblocking(False)
        return sockets

    async def _answer(self, question: int) -> tuple[dict[str, Any], list[socket.socket]]:
        """The answer to ``question``; answers to earlier ones, given up on, are dropped
        with the sockets they carry."""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self._conn, MAX_MESSAGE, MAX_FDS)
            except BlockingIOError:
                await _readable(self._conn)
                continue
            if not data:
                raise OSError(errno.EPIPE, "the angel closed the socket channel")
            sockets = [socket.socket(fileno=fd) for fd in fds]
            reply = msgpack.unpackb(data)
            if isinstance(reply, dict) and reply.get("q") == question:
                return reply, sockets
            for sock in sockets:
                sock.close()

    def keep(self, addresses: Iterable[Address]) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pair: the next keep says it all
            self._conn.send(msgpack.packb({"keep": [[a.host, a.port] for a in addresses]}))

    def close(self) -> None:
        self._conn.close()


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():  # the loop may call a reader again before we remove it
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())
