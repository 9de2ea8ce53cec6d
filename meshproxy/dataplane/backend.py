"""One authenticated connection to a MySQL server, as the pool of session mode holds it.

A connection is either idle in its pool, running an exchange of meshproxy's own (the
login, a read-back of session state, a restore, a ping, a reset, a lazy prepare), or
forwarding the answer to one client command to that client, chunk by chunk as it arrives.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import typing
from dataclasses import dataclass

from meshproxy.config import Address
from meshproxy.dataplane.callbacks import for_loop
from meshproxy.errors import ConnectFailed, ProtocolError, describe
from meshproxy.mysql import auth
from meshproxy.mysql.constants import BACKEND_CAPS, Cap, Command
from meshproxy.mysql.handshake import (
    login_payload,
    parse_auth_switch,
    parse_greeting,
    ssl_request_payload,
)
from meshproxy.mysql.packets import Framer, Packet, frame, parse_err, read_lenenc_bytes
from meshproxy.mysql.response import Response
from meshproxy.mysql.state import Flavor, SessionState, from_row, read_back_sql

# Answers to meshproxy's own commands are small; anything bigger is a broken server.
_INTERNAL_MAX: typing.Final = 4 * 1024 * 1024


class LoginKey(typing.NamedTuple):
    """Which backend connections may serve a client: same server login, same wire flags.
    (A tuple: it is hashed at every checkout, and a tuple's hash is computed in C.)"""

    user: str
    caps: int  # the client's WIRE_CAPS
    collation: int


class Prepared:
    """A statement prepared on one backend connection."""

    def __init__(self, backend_id: int, params: int, columns: int) -> None:
        self.backend_id = backend_id
        self.params = params
        self.columns = columns
        self.types_sent = False  # an execute has bound parameter types on this connection
        # COM_STMT_EXECUTE and this connection's statement id: the head of every execute.
        self.execute_head = bytes((Command.STMT_EXECUTE,)) + backend_id.to_bytes(4, "little")


class Sink:
    """Where a forwarded answer goes: the client session that sent the command. (A base
    class, not a Protocol: compiled, its methods are called through a table, where a
    Protocol's would be looked up by name for every chunk of every answer.)"""

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def answered(self, response: Response) -> None:
        raise NotImplementedError

    def infile_requested(self) -> None:
        raise NotImplementedError

    def backend_lost(self, reason: str) -> None:
        raise NotImplementedError


@dataclass
class Reply:
    """The whole answer to one of meshproxy's own commands."""

    packets: list[Packet]
    response: Response

    def error(self) -> str | None:
        if self.response.error is None:
            return None
        code, message = self.response.error
        return f"{code}: {message}"

    def rows(self) -> list[list[bytes | None]]:
        """The rows of a text result set (column count, definitions, [EOF], rows, end)."""
        if not self.packets:
            return []
        count = self.packets[0].payload[0] if self.packets[0].payload else 0
        body = self.packets[1 + count :]
        out = []
        for packet in body:
            payload = packet.payload
            if payload and payload[0] == 0xFE and len(payload) < 0xFFFFFF:
                continue  # the EOF after definitions, or the terminator
            row: list[bytes | None] = []
            pos = 0
            for _ in range(count):
                if pos < len(payload) and payload[pos] == 0xFB:
                    row.append(None)
                    pos += 1
                    continue
                value, pos = read_lenenc_bytes(payload, pos)
                row.append(value)
            out.append(row)
        return out


class BackendConnection:  # an asyncio protocol; see dataplane/callbacks.py
    def __init__(self, address: Address, key: LoginKey) -> None:
        self.address = address
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.thread_id = 0
        self.server_version = ""
        self.flavor = Flavor.of("")
        self.deprecate_eof = bool(key.caps & Cap.DEPRECATE_EOF)
        self.state = SessionState()
        self.statements: dict[tuple[str, bytes], Prepared] = {}
        self.born = time.monotonic()
        self.last_used = self.born
        self.closed = False
        self.on_lost: typing.Callable[[BackendConnection], None] | None = None
        # The sessions that ran the last statement and the last insert here: LAST_INSERT_ID(),
        # FOUND_ROWS() and ROW_COUNT() belong to them.
        self.last_owner: object = None
        self.insert_owner: object = None
        # While an exchange of our own runs; the login's starts now: the greeting may come
        # before the code that opened the connection has run again.
        self._framer: Framer | None = Framer(_INTERNAL_MAX)
        self._packets: list[Packet] = []
        self._response: Response | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Sink | None = None
        self.broken = ""  # why it broke, once it has

    # ----------------------------------------------------------------- protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def pause_writing(self) -> None:
        pass  # our commands are small: the server's buffer is never the bound

    def resume_writing(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None:
            response = self._response
            assert response is not None
            end = response.feed(data)
            if end < 0:
                sink.write(data)
                return
            sink.write(data if end == len(data) else data[:end])
            if end != len(data) and not response.infile:
                self._broken("sent bytes past the end of its answer")
                return
            if response.infile:
                sink.infile_requested()  # the client sends its file, then the answer ends
                return
            self._sink = None
            self._response = None
            self.last_used = time.monotonic()
            sink.answered(response)
            return
        if self._framer is not None:
            self._collect(data)
            return
        self._broken("sent bytes while idle")

    def _collect(self, data: bytes) -> None:
        assert self._framer is not None
        try:
            packets = self._framer.feed(data)
        except Exception:  # PacketTooLarge: nothing of ours answers with that much
            self._broken("answered with an oversized packet")
            return
        self._packets += packets
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        response = self._response
        if response is None:  # the login: every packet wakes it
            if packets:
                waiter.set_result(None)
            return
        if response.feed(data) >= 0:
            waiter.set_result(None)

    def eof_received(self) -> bool:
        self._broken("closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._broken(f"connection lost: {exc}" if exc else "connection closed")

    def abort(self, reason: str) -> None:
        """Drop the connection now (its peer is known to be gone or hung): a command in
        flight hears ``backend_lost``."""
        self._broken(reason)

    def _broken(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.broken = reason
        if self.transport is not None:
            self.transport.abort()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectFailed(str(self.address), reason))
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.backend_lost(reason)
        if self.on_lost is not None:
            self.on_lost(self)

    def close(self) -> None:
        """Say goodbye (COM_QUIT) and close; the pool has already forgotten it."""
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            self.transport.write(frame(0, bytes((Command.QUIT,))))
            self.transport.close()

    # ----------------------------------------------------------------- forwarding

    def forward(self, data: bytes, command: int, sink: Sink) -> None:
        """Send a client's command bytes; its answer goes to ``sink`` as it arrives."""
        assert self.transport is not None
        if self.closed:  # broke while a pinned session held it between statements
            reason = self.broken or "connection closed"
            asyncio.get_running_loop().call_soon(sink.backend_lost, reason)
            return
        self._response = Response(command, self.deprecate_eof)
        self._sink = sink
        self.transport.write(data)

    def send_more(self, data: bytes) -> None:
        """More client bytes for the command in flight (a LOCAL INFILE's file)."""
        assert self.transport is not None
        self.transport.write(data)

    def infile_sent(self) -> None:
        assert self._response is not None
        self._response.expect_infile_result()

    # ----------------------------------------------------------------- our own commands

    async def exchange(self, command: int, payload: bytes, timeout_s: float) -> Reply:
        """Run one command of meshproxy's own and collect its whole answer."""
        assert self.transport is not None
        assert self._sink is None
        if self.closed:
            raise ConnectFailed(str(self.address), "connection closed")
        response = Response(command, self.deprecate_eof)
        self._framer = Framer(_INTERNAL_MAX)
        self._packets = []
        self._response = response
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(frame(0, bytes((command,)) + payload))
        try:
            async with asyncio.timeout(timeout_s):
                await self._waiter
        except TimeoutError:
            self._broken("did not answer in time")
            raise ConnectFailed(str(self.address), "did not answer in time") from None
        finally:
            self._framer = None
            self._response = None
            self._waiter = None
        self.last_used = time.monotonic()
        return Reply(self._packets, response)

    async def query(self, sql: bytes, timeout_s: float) -> Reply:
        reply = await self.exchange(Command.QUERY, sql, timeout_s)
        error = reply.error()
        if error is not None:
            raise ProtocolError(f"{sql[:60]!r} failed on {self.address}: {error}")
        return reply

    async def _start_tls(self, context: ssl.SSLContext, offered: int, caps: int) -> None:
        """SSLRequest, then the TLS handshake on this connection (the login follows)."""
        if not offered & Cap.SSL:
            raise ConnectFailed(str(self.address), "the server offers no TLS (connections.tls)")
        assert self.transport is not None
        self.transport.write(frame(1, ssl_request_payload(caps, self.key.collation)))
        loop = asyncio.get_running_loop()
        hostname = self.address.host if context.check_hostname else None
        try:
            transport = await loop.start_tls(
                self.transport, for_loop(self), context, server_hostname=hostname
            )
        except (ssl.SSLError, ConnectionError) as exc:
            raise ConnectFailed(str(self.address), f"TLS failed: {describe(exc)}") from None
        if transport is None:
            raise ConnectFailed(str(self.address), "TLS failed: connection closed")
        self.transport = transport

    async def read_back(self, timeout_s: float) -> SessionState:
        """Read the schema and the tracked variables as the server has them now."""
        rows = (await self.query(read_back_sql(self.flavor), timeout_s)).rows()
        if len(rows) != 1:
            raise ProtocolError(f"read-back of session state on {self.address} got no row")
        state = from_row(rows[0])
        state.last_insert_id = self.state.last_insert_id
        self.state = state
        return state

    # ----------------------------------------------------------------- login

    async def login(
        self,
        user: str,
        sha1_password: bytes | None,
        timeout_s: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """Log in as ``user`` (mysql_native_password; SHA1(password) is all it needs), over
        TLS when ``tls`` is given, then read the session state the server starts us with.
        Raises ConnectFailed."""
        try:
            async with asyncio.timeout(timeout_s):
                greeting = parse_greeting((await self._packet()).payload)
                if greeting is None:
                    raise ConnectFailed(str(self.address), "no MySQL greeting")
                self.thread_id = greeting.connection_id
                self.server_version = greeting.server_version
                self.flavor = Flavor.of(greeting.server_version)
                caps = (BACKEND_CAPS | self.key.caps) & greeting.capabilities
                self.deprecate_eof = bool(caps & Cap.DEPRECATE_EOF)
                seq = 1
                if tls is not None:
                    await self._start_tls(tls, greeting.capabilities, caps)
                    caps |= Cap.SSL
                    seq = 2
                token = (
                    auth.native_token(sha1_password, greeting.scramble)
                    if sha1_password is not None
                    else b""
                )
                self.transport.write(  # type: ignore[union-attr]
                    frame(
                        seq,
                        login_payload(caps, self.key.collation, user, token, "", auth.NATIVE),
                    )
                )
                reply = await self._packet()
                switch = parse_auth_switch(reply.payload)
                if switch is not None:
                    plugin, nonce = switch
                    if plugin != auth.NATIVE or sha1_password is None:
                        raise ConnectFailed(
                            str(self.address), f"the server wants auth plugin {plugin!r}"
                        )
                    answer = auth.native_token(sha1_password, nonce)
                    self.transport.write(frame(reply.last_seq + 1, answer))  # type: ignore[union-attr]
                    reply = await self._packet()
                err = parse_err(reply.payload)
                if err is not None:
                    raise ConnectFailed(
                        str(self.address), f"login as {user!r} refused: {err.code} {err.message}"
                    )
                if not reply.payload or reply.payload[0] != 0:
                    raise ConnectFailed(str(self.address), "unexpected answer to the login")
        except TimeoutError:
            self._broken("login timed out")
            raise ConnectFailed(str(self.address), "login timed out") from None
        finally:
            self._framer = None
            self._waiter = None
        if self._packets:
            self._broken("sent bytes after the login")
            raise ConnectFailed(str(self.address), "sent bytes after the login")
        await self.read_back(timeout_s)

    async def _packet(self) -> Packet:
        while not self._packets:
            if self.closed:
                raise ConnectFailed(str(self.address), "closed during the login")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._packets.pop(0)
