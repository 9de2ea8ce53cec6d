"""Session mode's client side: meshproxy is the MySQL server a client logs in to.

A ``ClientSession`` owns one client connection: it runs the login (``mysql.login``), then
takes the client's commands one at a time and runs each on a backend connection borrowed
from the pool, forwarding the answer as it arrives. Between statements the connection goes
back to the pool unless something pins it (an open transaction, a lock, a user variable,
...: see ``mysql.statements``); before a statement runs on a connection, the session's
state (schema, tracked variables) is made to match what the client set.
"""

from __future__ import annotations

import asyncio
import struct
import sys
import time
import typing
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from meshproxy import log
from meshproxy.config import Address
from meshproxy.dataplane.backend import BackendConnection, LoginKey, Prepared, Sink
from meshproxy.dataplane.backendpool import PoolTimeout, ServerPool, Waiter
from meshproxy.dataplane.callbacks import for_loop
from meshproxy.dataplane.moving import NO_ADDRESSES, Mover, middle_failed
from meshproxy.dataplane.router import Role
from meshproxy.dataplane.routing import Plan, SessionRouter
from meshproxy.errors import ConnectFailed, ProtocolError, Refusal, SessionClosed
from meshproxy.mysql import login as logins
from meshproxy.mysql.constants import (
    ER_MALFORMED_PACKET,
    ER_NET_PACKET_TOO_LARGE,
    ER_PROXY_BACKEND_LOST,
    ER_PROXY_NO_UPSTREAM,
    ER_PROXY_POOL_TIMEOUT,
    ER_UNKNOWN_COM_ERROR,
    ER_UNKNOWN_STMT_HANDLER,
    WIRE_CAPS,
    Command,
    Status,
)
from meshproxy.mysql.digest import digest
from meshproxy.mysql.packets import (
    Framer,
    Packet,
    PacketTooLarge,
    err_payload,
    frame,
    ok_payload,
    u32,
)
from meshproxy.mysql.response import NO_RESPONSE, Response
from meshproxy.mysql.state import Values, restore_sql
from meshproxy.mysql.statements import Effects, classify_bytes
from meshproxy.routing.rules import NO_DECISION, Decision

if typing.TYPE_CHECKING:
    from meshproxy.dataplane.sessionmode import SessionMode

# A login is small, but this bound must also hold the start of a TLS hello read together
# with its SSLRequest: read as a packet header, a hello claims 66 KiB to 263 KiB.
_LOGIN_MAX: typing.Final = 1024 * 1024
_QUEUE_MAX: typing.Final = 64  # client packets held while a command runs (clients rarely pipeline)
_NO_EFFECTS: typing.Final = Effects()
_MAX_PREPARED_PER_CONNECTION: typing.Final = 256
ER_UNKNOWN_THREAD: typing.Final = 1094
ER_KILL_DENIED: typing.Final = 1095


@dataclass
class ClientStatement:
    """A statement the client prepared, by the id meshproxy gave it."""

    sql: bytes
    schema: str
    params: int
    columns: int
    types: bytes = b""  # the parameter types of the last execute that sent them
    reads: bool = False  # only reads: a replica may run it
    decision: Decision = NO_DECISION  # what the query rules said of its text
    digest_text: str = ""
    digest_id: str = ""  # of digest_text, worked out once
    # BEGIN, COMMIT, ROLLBACK prepared (sysbench prepares them): their executes start or
    # end a transaction as the text would.
    control: Effects = field(default_factory=lambda: _NO_EFFECTS)


class Flight:
    """The command on its way: what it was, and what it does to the session when it ends.
    (A plain class, not a dataclass: mypyc compiles its ``__init__``; one runs per
    statement.)"""

    def __init__(
        self,
        command: int,
        effects: Effects,
        conn: BackendConnection,
        payload: bytes,  # as the client sent it: what runs again if the flight moves
        statement: ClientStatement | None = None,
        client_stmt_id: int = 0,
        plan: Plan | None = None,  # how routing sent it (digest, cache, timeout)
    ) -> None:
        self.command = command
        self.effects = effects
        self.conn = conn
        self.payload = payload
        self.statement = statement
        self.client_stmt_id = client_stmt_id
        self.plan = plan
        self.argument = b""  # COM_INIT_DB's schema, COM_STMT_PREPARE's text
        self.answered = False  # a byte of the answer has reached the client
        self.sent = True  # False: its connection had broken already; it never left us
        self.answer: bytearray | None = None  # the answer so far, for the query cache
        self.timer: asyncio.TimerHandle | None = None  # a query rule's statement timeout
        # A middle's own failure (ERR 9001, 9003), not yet passed on.
        self.held: bytes | None = None


class Pins:
    """Why the session keeps its backend connection between statements."""

    def __init__(self) -> None:
        self.reasons: set[str] = set()
        self.lock = False  # LOCK TABLES / FLUSH TABLES WITH READ LOCK, until UNLOCK TABLES
        self.transaction = False

    def holding(self) -> bool:
        return bool(self.reasons) or self.lock or self.transaction


class ClientSession(Sink):  # and an asyncio protocol (dataplane/callbacks.py)
    def __init__(
        self,
        mode: SessionMode,
        pool: str,
        peer: str,
        client: str,
        entrance: str,
        on_close: Callable[[ClientSession], None],
    ) -> None:
        self.mode = mode
        self._on_close = on_close
        self.entrance = entrance
        self.counted = False  # counted in its user's open sessions
        self.pool_name = pool
        self.peer = peer  # the TCP peer: a client, or the edge that forwarded it
        self.client = client  # the original client address (from the hop header)
        self.connection_id = mode.new_connection_id(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._framer = Framer(_LOGIN_MAX)
        self._login: logins.ServerLogin | None = None  # while a login runs
        self._authenticated: logins.ServerLogin | None = None  # for COM_CHANGE_USER
        self._queue: deque[Packet] = deque()
        self._reading_paused = False
        self._before_tls: bytearray | None = None  # while start_tls runs
        self._tls_early = b""  # TLS bytes read in clear with the SSLRequest
        self.user = ""
        self.account: logins.Account | None = None
        self.key: LoginKey | None = None
        self.schema = ""
        self.values: Values | None = None  # None until the first backend connection
        self._autocommit_of: Values | None = None  # the values _autocommit was read from
        self._autocommit = True
        self.last_insert_id = 0
        self.server: ServerPool | None = None
        self.conn: BackendConnection | None = None  # held: in flight or pinned
        self.pins = Pins()
        self.flight: Flight | None = None
        self.infile = False  # the client is sending a LOCAL INFILE's contents
        self.statements: dict[int, ClientStatement] = {}
        self._next_stmt_id = 1
        self.task: asyncio.Task[None] | None = None
        self.queued: _Queued | None = None  # a statement waiting for a free connection
        self.started = time.monotonic()
        self.statement_count = 0  # added to the user's counters when the session ends
        self.statement_time_s = 0.0
        self._sent_at = 0.0
        self.router = SessionRouter(mode)
        self.target_pool = pool  # where the statement being started goes
        self.side = Role.ANY
        self.plan: Plan | None = None  # the plan of the statement being started
        # On a tier of middles (an edge that owns its sessions): what moving needs.
        self.mover: Mover | None = None
        # A connection from a session-mode edge's pool: its KILLs name server connections
        # (the edge cleaning up after a failed middle), not sessions of ours.
        self.pooled = False

    # ----------------------------------------------------------------- client transport

    def start(self, transport: asyncio.Transport, pending: bytes) -> None:
        """Take over an accepted client connection: greet it and read its login."""
        self.transport = transport
        transport.set_protocol(for_loop(self))
        self._login = self.mode.new_login(self)
        transport.write(frame(0, self._login.greeting()))
        if pending:
            self.data_received(pending)
        if not self.closed and self._before_tls is None:  # (TLS keeps it paused till ready)
            transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._before_tls is not None:
            # Decrypted before start_tls has handed us the TLS transport: an answer now
            # would go out in clear. Held until then (a login: small).
            self._before_tls += data
            return
        try:
            packets = self._framer.feed(data)
        except PacketTooLarge:
            self.mode.counters.inc("session_protocol_errors", reason="packet too large")
            limit = self._framer.max_payload
            self._fail(ER_NET_PACKET_TOO_LARGE, f"Got a packet bigger than {limit} bytes", 1)
            return
        if self._login is not None:
            self._login_packets(packets)
            return
        self._queue.extend(packets)
        if len(self._queue) > _QUEUE_MAX and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self.drain()

    def _login_packets(self, packets: list[Packet]) -> None:
        for i, packet in enumerate(packets):
            if self._before_tls is not None:
                # After an SSLRequest every byte is TLS: give back what was framed.
                rest = b"".join(frame(p.seq, p.payload) for p in packets[i:])
                self._tls_early = rest + self._tls_early
                break
            if self._login is None:
                self._queue.append(packet)  # sent right behind its login: a command
            else:
                self._login_step(packet)
        if self._login is None and not self.closed:
            self.drain()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # start() took the transport; start_tls's TLS transport is its result

    def eof_received(self) -> bool:
        self.close("client closed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.close("client connection lost")

    def pause_writing(self) -> None:
        # The client reads slower than the server answers: stop reading the server.
        conn = self.conn
        if conn is not None and conn.transport is not None:
            conn.transport.pause_reading()

    def resume_writing(self) -> None:
        conn = self.conn
        if conn is not None and conn.transport is not None and not conn.closed:
            conn.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            flight = self.flight
            if flight is not None:
                mover = self.mover
                if mover is not None:
                    if not flight.answered and middle_failed(data):
                        flight.held = data  # moved, unless it cannot be: see answered()
                        return
                    mover.journal.chunk(data)
                flight.answered = True
                if flight.answer is not None:
                    flight.answer += data
                    if len(flight.answer) > self.mode.cache.max_entry_bytes:
                        flight.answer = None  # too large to keep: passed on only
            self.transport.write(data)

    def send(self, seq: int, payload: bytes) -> None:
        if self.transport is not None:
            self.transport.write(frame(seq, payload))

    def _fail(self, code: int, message: str, seq: int, sql_state: str = "08S01") -> None:
        """Tell the client why and end the session (its stream is beyond repair)."""
        self.send(seq, err_payload(code, message, sql_state))
        self.close(message)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        busy = self.flight is not None or self.infile
        if self.task is not None and not self.task.done():
            busy = True  # an exchange of ours may be running on the connection
            self.task.cancel()
        queued, self.queued = self.queued, None
        if queued is not None:
            queued.server.abandon(queued)
        conn, self.conn = self.conn, None
        if conn is not None and self.server is not None:
            if busy or self.pins.holding():
                # Mid-statement or holding session state: it cannot go back as it is.
                self.server.discard(conn, f"its client session ended ({reason})")
            else:
                self.server.release(conn)
        self.flight = None
        if self.mover is not None:
            self.mover.journal.clear()  # what it kept of an open transaction goes back
        self.mover = None  # it refers back to us: part now, so both go with the last reference
        if self.transport is not None:
            self.transport.close()
        self.mode.session_closed(self)
        self._on_close(self)

    def last_active(self) -> float:
        """When the session last sent a statement (or logged in)."""
        return max(self.started, self._sent_at)

    # ----------------------------------------------------------------- login

    def _login_step(self, packet: Packet) -> None:
        login = self._login
        assert login is not None
        step = login.receive(packet)
        seq = packet.last_seq + 1
        if isinstance(step, logins.Send):
            self.send(seq, step.payload)
        elif isinstance(step, logins.StartTls):
            # Nothing more may be read in clear: the client's next bytes are its TLS hello.
            assert self.transport is not None
            self.transport.pause_reading()
            self._tls_early = self._framer.take_unread()
            self._before_tls = bytearray()
            self.task = asyncio.get_running_loop().create_task(self._start_tls())
        else:
            self._login_result(step, seq)

    async def _start_tls(self) -> None:
        transport = self.transport
        context = self.mode.tls_context(self.entrance)
        assert transport is not None
        assert context is not None
        loop = asyncio.get_running_loop()
        early, self._tls_early = self._tls_early, b""
        if early:
            # The client's hello came in the same read as its SSLRequest: hand it to the
            # TLS layer once start_tls has put that layer in place.
            loop.call_soon(_hand_over, transport, self, early)
        try:
            async with asyncio.timeout(10):
                tls = await loop.start_tls(transport, for_loop(self), context, server_side=True)
        except (OSError, TimeoutError) as exc:
            self.mode.counters.inc("session_tls_failures")
            log.warning("session_tls_failed", peer=self.peer, error=str(exc))
            self.close("TLS handshake failed")
            return
        self.task = None
        if tls is None:
            self.close("TLS handshake failed")
            return
        self.transport = tls
        held, self._before_tls = self._before_tls, None
        if held:
            self.data_received(bytes(held))

    def _change_user(self, packet: Packet) -> None:
        """COM_CHANGE_USER: log in again as another user, with a session reset."""
        self._reset_session()
        self._login = self._authenticated
        assert self._login is not None
        step = self._login.change_user(packet.payload)
        if isinstance(step, logins.Accepted | logins.Refused):
            self._login_result(step, packet.last_seq + 1)
        elif isinstance(step, logins.Send):
            self.send(packet.last_seq + 1, step.payload)
        else:
            self._fail(ER_MALFORMED_PACKET, "Malformed communication packet", 1)

    def _login_result(self, step: logins.Accepted | logins.Refused, seq: int) -> None:
        login = self._login
        assert login is not None
        if isinstance(step, logins.Refused):
            self.mode.login_refused(self, login, step.reason)
            self.send(seq, step.err)
            self.close(f"login refused: {step.reason}")
            return
        for i, payload in enumerate(step.payloads):
            self.send(seq + i, payload)
        self._logged_in(step)

    def _logged_in(self, step: logins.Accepted) -> None:
        self._authenticated, self._login = self._login, None
        if self.counted:  # COM_CHANGE_USER: the session now counts for its new user
            self.mode.per_user[self.user] -= 1
            self.counted = False
        self.server = None
        self.values = None
        account, login = step.account, step.login
        self.user = account.name
        self.account = account
        backend_user = self.mode.backend_user_of(account.name, step.sha1_password)
        key = LoginKey(backend_user, login.capabilities & WIRE_CAPS, login.collation)
        self.key = self.mode.login_key(key)
        # Interned, as INIT_DB's: compared with a connection's schema at every statement.
        self.schema = sys.intern(login.database or self.mode.default_schema(account.name))
        self._framer.max_payload = self.mode.max_packet(self.pool_name)
        self.mode.login_accepted(self)
        self.target_pool = self.pool_name

    # ----------------------------------------------------------------- commands

    def drain(self) -> None:
        while self._queue and not self.closed:
            if self.infile:
                self._infile_packet(self._queue.popleft())
                continue
            if (
                self.flight is not None
                or self.queued is not None
                or (self.task is not None and not self.task.done())
            ):
                return
            self._command(self._queue.popleft())
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def _command(self, packet: Packet) -> None:
        payload = packet.payload
        if not payload:
            self.mode.counters.inc("session_protocol_errors", reason="empty packet")
            self._fail(ER_MALFORMED_PACKET, "Malformed communication packet", 1)
            return
        command = payload[0]
        self.mode.statements += 1
        mover = self.mover
        if mover is not None and mover.moves:  # the last statement moved
            mover.statement_done()
        if command == Command.QUERY:  # by far the most common: first
            self._query(payload)
        elif command == Command.QUIT:
            self.close("client quit")
        elif command == Command.PING:
            self.send(1, ok_payload(self._status()))
        elif command == Command.STMT_PREPARE:
            if self._plan_for(payload, classify_bytes(payload[1:]).read) is not None:
                assert self.plan is not None
                self.run(command, self.plan.payload, _NO_EFFECTS)
        elif command == Command.INIT_DB:
            self._run_anywhere(command, payload)
        elif command in (
            Command.STMT_EXECUTE,
            Command.STMT_SEND_LONG_DATA,
            Command.STMT_FETCH,
            Command.STMT_RESET,
        ):
            self._statement_command(command, payload)
        elif command == Command.STMT_CLOSE:
            if len(payload) >= 5:
                self.statements.pop(u32(payload, 1), None)
        elif command == Command.CHANGE_USER:
            self._change_user(packet)
        elif command == Command.RESET_CONNECTION:
            self._reset_session()
            self.send(1, ok_payload(self._status()))
        elif command == Command.SET_OPTION:
            self._run_anywhere(command, payload, Effects(pins={"set option"}).settle())
        elif command in (Command.FIELD_LIST, Command.STATISTICS, Command.DEBUG):
            self._run_anywhere(command, payload)
        else:
            self.mode.counters.inc("session_commands_refused", command=f"0x{command:02x}")
            self.send(1, err_payload(ER_UNKNOWN_COM_ERROR, "Unknown command", "08S01"))

    def _status(self) -> int:
        status = Status.AUTOCOMMIT if self.autocommit() else 0
        if self.pins.transaction:
            status |= Status.IN_TRANS
        return int(status)

    def autocommit(self) -> bool:
        values = self.values
        if values is None:
            return True
        if values is not self._autocommit_of:  # values are interned: mostly the same dict
            self._autocommit_of = values
            self._autocommit = values.get("autocommit", b"1") not in (b"0", b"OFF")
        return self._autocommit

    def _query(self, payload: bytes) -> None:
        effects = classify_bytes(payload[1:])
        if effects.kill is not None and not self.pooled:
            self._kill(*effects.kill)
            return
        plan = self._plan_for(payload, effects.read, effects)
        if plan is not None:
            self.run(Command.QUERY, plan.payload, plan.effects)

    def _free_to_move(self) -> bool:
        """Whether a read may go to another server than the last statement's."""
        return self.conn is None and not self.pins.transaction and self.autocommit()

    def _left_out(self) -> Collection[Address]:
        """The middles (or servers) the statement in flight has moved away from."""
        return self.mover.failed if self.mover is not None else NO_ADDRESSES

    def _plan_for(self, payload: bytes, reads: bool, effects: Effects = _NO_EFFECTS) -> Plan | None:
        """Route a statement's text: None when it is answered here (refused by a rule, or
        from the query cache); otherwise its plan, kept for the flight it starts."""
        router = self.router
        rules = router.rules(self.user, self.client, self.entrance)
        free = self._free_to_move()
        plan = router.plan(
            payload, effects, reads, self.pool_name, self.schema, rules, free, self._answer_state
        )
        if plan.refusal is not None:
            self.mode.counters.inc("query_rule_refusals", user=self.user)
            self.send(1, plan.refusal)
            return None
        if plan.cache_key is not None and free:
            answer = self.mode.cache.get(plan.cache_key, time.monotonic())
            if answer is not None:
                assert self.transport is not None
                self.transport.write(answer)
                self.mode.record_digest(self, plan, 0.0, None)
                return None
        if plan.decision.mirror:
            self.mode.mirror(self, plan)
        self.target_pool, self.side = plan.pool, plan.side
        self.plan = plan
        return plan

    def _answer_state(self) -> tuple[object, ...]:
        """What a statement's answer depends on besides its text: the query cache's key."""
        values = tuple(self.values.items()) if self.values else ()
        return (self.key, self.schema, values)

    def _run_anywhere(self, command: int, payload: bytes, effects: Effects = _NO_EFFECTS) -> None:
        """A command that is no statement: on the session's server, whichever side."""
        self.target_pool, self.side, self.plan = self.pool_name, Role.ANY, None
        self.run(command, payload, effects)

    def _statement_command(self, command: int, payload: bytes) -> None:
        if len(payload) < 5:
            self.mode.counters.inc("session_protocol_errors", reason="short statement command")
            self._fail(ER_MALFORMED_PACKET, "Malformed communication packet", 1)
            return
        stmt_id = u32(payload, 1)
        statement = self.statements.get(stmt_id)
        if statement is None:
            if command == Command.STMT_SEND_LONG_DATA:
                return  # it has no answer, not even an error
            name = {
                Command.STMT_EXECUTE: "mysqld_stmt_execute",
                Command.STMT_FETCH: "mysqld_stmt_fetch",
                Command.STMT_RESET: "mysqld_stmt_reset",
            }[command]
            message = f"Unknown prepared statement handler ({stmt_id}) given to {name}"
            self.send(1, err_payload(ER_UNKNOWN_STMT_HANDLER, message))
            return
        effects = statement.control if command == Command.STMT_EXECUTE else _NO_EFFECTS
        if command == Command.STMT_SEND_LONG_DATA:
            effects = Effects(pins={"long data"}).settle()
        elif command == Command.STMT_RESET and self.conn is None:
            self.send(1, ok_payload(self._status()))  # nothing of it lives on a backend
            return
        elif command == Command.STMT_EXECUTE and len(payload) > 5 and payload[5] & 0x07:
            effects = Effects(pins={"cursor"}).settle()
        pool = self.target_pool = statement.decision.pool or self.pool_name
        if command == Command.STMT_EXECUTE:
            if not statement.decision.multiplex:
                effects = Effects(pins={"query rule"}).settle()
            reads = statement.reads and effects.inert
            self.side = self.router.side_of(pool, reads, statement.decision, self._free_to_move())
            plan = self.plan = Plan(
                payload, effects, pool, self.side, reads, statement.digest_text, statement.decision
            )
            plan.digest_id = statement.digest_id
        else:
            self.side, self.plan = Role.ANY, None
        self.run(command, payload, effects, statement, stmt_id)

    # ----------------------------------------------------------------- running one

    def run(
        self,
        command: int,
        payload: bytes,
        effects: Effects,
        statement: ClientStatement | None = None,
        stmt_id: int = 0,
    ) -> None:
        """Run a command on a backend connection: at once when one is ready in the right
        state, otherwise in a task that checks one out and brings it into that state."""
        conn = self.conn
        if conn is None:
            server = self.server
            if (
                server is None  # the first statement: choose the session's server now
                or server.pool != self.target_pool
                or (self.side and server.role != self.side)
            ):
                server = self.mode.choose_server(self.target_pool, self._left_out(), self.side)
                self.server = server
            if server is not None:
                key = self.key
                assert key is not None
                if self.values is None:
                    self.values = server.baseline.get(key)
                if self.values is not None:
                    conn = self.conn = server.take_idle(key, time.monotonic())
                    if conn is None and server.must_wait(key):
                        # 1000 clients on 32 connections: the statement waits in the
                        # server's queue and runs from the call that frees a connection.
                        self.queued = _Queued(
                            self, server, key, command, payload, effects, statement, stmt_id
                        )
                        server.wait(self.queued)
                        return
        self.run_on(conn, command, payload, effects, statement, stmt_id)

    def run_on(
        self,
        conn: BackendConnection | None,
        command: int,
        payload: bytes,
        effects: Effects,
        statement: ClientStatement | None,
        stmt_id: int,
    ) -> None:
        """Send the command now when ``conn`` is in the right state; otherwise start a
        task that checks one out (when None) and brings it into that state."""
        if (
            conn is not None
            and self._in_step(conn, effects, statement)
            and not self._must_wait()
            and not (self.mover is not None and self.mover.holder_first(effects))
        ):
            data = self.bytes_for(conn, command, payload, statement)
            self._send_command(conn, command, payload, data, effects, statement, stmt_id)
            return
        self.task = asyncio.get_running_loop().create_task(
            self._run_slowly(command, payload, effects, statement, stmt_id)
        )

    def _in_step(
        self, conn: BackendConnection, effects: Effects, statement: ClientStatement | None
    ) -> bool:
        state = conn.state
        if state.values is not self.values:
            if state.values != self.values:
                return False
            state.values = self.values  # equal: make the next check an identity check
        if state.schema != self.schema:
            return False
        if not effects.inert:
            if effects.last_insert_id and conn.insert_owner is not self:
                return False
            if effects.last_state and conn.last_owner is not self:
                return False
        return statement is None or (statement.schema, statement.sql) in conn.statements

    async def _run_slowly(
        self,
        command: int,
        payload: bytes,
        effects: Effects,
        statement: ClientStatement | None,
        stmt_id: int,
    ) -> None:
        try:
            conn = self.conn or await self.checkout()
            self.conn = conn
            if self._must_wait() and not await self._caught_up(conn):
                conn = self.conn = await self.checkout()  # now on the writer
            conn = await self.bring_in_step(conn, effects, statement)
            if self.mover is not None and self.mover.holder_first(effects):
                await self.mover.learn_holder(conn)
        except SessionClosed:
            return
        except Refusal as refusal:
            self.task = None
            self.refuse(refusal)
            return
        except (ConnectFailed, ProtocolError) as exc:
            self.task = None
            self.backend_failed(str(exc), answered=False, seq=1)
            return
        except Exception as exc:  # a bug: this client hears why; everyone else carries on
            self.internal_error(exc)
            return
        self.task = None
        if self.closed:
            return
        data = self.bytes_for(conn, command, payload, statement)
        self._send_command(conn, command, payload, data, effects, statement, stmt_id)

    def refuse(self, refusal: Refusal) -> None:
        """The statement cannot run: the client hears why, and the session goes on."""
        self.plan = None
        self.send(1, err_payload(refusal.code, refusal.message, refusal.sql_state))
        self._release_if_free()
        self.drain()

    async def checkout(self) -> BackendConnection:
        """A connection from this session's server (chosen at its first statement). A
        server that cannot be reached is left for another of the pool: between statements
        the session holds nothing that ties it to one."""
        key = self.key
        assert key is not None
        tried: set[Address] = set(self._left_out())
        pool, side = self.target_pool, self.side
        settings = self.mode.settings.get(pool)
        wait_s = settings.checkout_timeout_ms / 1000 if settings is not None else 3.0
        deadline = time.monotonic() + wait_s
        while True:
            server = self.server
            if (
                server is None
                or not server.accepting
                or server.address in tried
                or server.pool != pool
                or (side and server.role != side)
            ):
                server = self.mode.choose_server(pool, tried, side)
                left = deadline - time.monotonic()
                # None right now (a promotion between two checks, a restart): wait for the
                # pool's next states, as ProxySQL waits for a server to come back.
                if (
                    server is None
                    and not tried
                    and left > 0
                    and await self.mode.members_change(pool, left)
                ):
                    continue
                if server is None:
                    which = f" {side}" if side else ""
                    raise Refusal(
                        ER_PROXY_NO_UPSTREAM,
                        f"meshproxy {self.mode.node_name}: no{which} server of pool"
                        f" {pool!r} is available",
                    )
                self.server = server
            timeout_s = server.settings.checkout_timeout_ms / 1000
            try:
                conn = await server.acquire(key, timeout_s)
            except PoolTimeout as exc:
                raise Refusal(ER_PROXY_POOL_TIMEOUT, f"meshproxy: {exc}") from None
            except ConnectFailed:
                tried.add(server.address)
                if self.mode.choose_server(pool, tried, side) is None:
                    raise
                continue
            if self.closed:
                server.release(conn)
                raise SessionClosed()
            if self.values is None:
                self.values = server.baseline.get(key, conn.state.values)
            return conn

    def _must_wait(self) -> bool:
        """Whether this read must first wait for its reader to apply the session's last
        write (read-your-writes by GTID); a reader seen to have applied it does not."""
        gtid = self.router.gtid
        if gtid is None or self.side != Role.READER:
            return False
        server = self.server
        return (
            server is not None
            and server.role == Role.READER
            and server.applied.get(gtid.domain, -1) < gtid.sequence
        )

    async def _caught_up(self, conn: BackendConnection) -> bool:
        """Wait (``gtid_wait_ms`` at most) for the reader to apply the session's last write.
        False: it did not; the connection went back and the statement goes to the writer."""
        gtid, server = self.router.gtid, self.server
        assert gtid is not None
        assert server is not None
        replication = self.mode.replication.get(server.pool)
        wait_s = replication.gtid_wait_ms / 1000 if replication is not None else 0.0
        sql = f"SELECT MASTER_GTID_WAIT('{gtid.text}', {wait_s:.3f})"  # digits and dashes
        rows = (await conn.query(sql.encode(), wait_s + self.mode.exchange_timeout_s)).rows()
        if rows and rows[0] and rows[0][0] == b"0":
            server.applied[gtid.domain] = max(server.applied.get(gtid.domain, -1), gtid.sequence)
            self.mode.counters.inc("read_your_writes", outcome="reader waited")
            return True
        self.mode.counters.inc("read_your_writes", outcome="writer")
        server.release(conn)
        self.conn, self.server, self.side = None, None, Role.WRITER
        return False

    async def bring_in_step(
        self, conn: BackendConnection, effects: Effects, statement: ClientStatement | None
    ) -> BackendConnection:
        """Make the connection's state the session's (raises Refusal with the server's
        own error when it refuses, e.g. a schema that no longer exists). Returns the
        connection to use: a session without a schema may need a fresh one instead."""
        timeout_s = self.mode.exchange_timeout_s
        if conn.state.schema != self.schema:
            if not self.schema:
                # A connection cannot leave its schema: take a fresh one instead.
                assert self.server is not None
                self.server.discard(conn, "session without a schema")
                self.conn = None
                conn = await self.server.fresh(self.key)  # type: ignore[arg-type]
                self.conn = conn
            else:
                reply = await conn.exchange(Command.INIT_DB, self.schema.encode(), timeout_s)
                if reply.response.error is not None:
                    raise Refusal(*reply.response.error, "42000")
                conn.state.schema = self.schema
        assert self.values is not None
        if conn.state.values is not self.values:
            sql = restore_sql(conn.state.values, self.values, conn.flavor)
            if sql is not None:
                self.mode.counters.inc("session_state_restores")
                await conn.query(sql, timeout_s)
            conn.state.values = self.values
        if effects.last_insert_id and conn.insert_owner is not self:
            await conn.query(f"DO LAST_INSERT_ID({self.last_insert_id})".encode(), timeout_s)
            conn.insert_owner = self
        if effects.last_state and conn.last_owner is not self:
            # FOUND_ROWS() and ROW_COUNT() must not tell another client's counts.
            await conn.query(b"SELECT 1 FROM DUAL WHERE 0", timeout_s)
        if statement is not None and (statement.schema, statement.sql) not in conn.statements:
            await self.prepare_on(conn, statement)
        return conn

    async def prepare_on(self, conn: BackendConnection, statement: ClientStatement) -> None:
        reply = await conn.exchange(
            Command.STMT_PREPARE, statement.sql, self.mode.exchange_timeout_s
        )
        if reply.response.error is not None or reply.response.prepared is None:
            code, message = reply.response.error or (0, "prepare failed")
            raise Refusal(code, message)
        backend_id, columns, params = reply.response.prepared
        if len(conn.statements) >= _MAX_PREPARED_PER_CONNECTION:
            oldest = next(iter(conn.statements))
            old = conn.statements.pop(oldest)
            conn.send_more(
                frame(0, bytes((Command.STMT_CLOSE,)) + struct.pack("<I", old.backend_id))
            )
        conn.statements[statement.schema, statement.sql] = Prepared(backend_id, params, columns)

    def bytes_for(
        self,
        conn: BackendConnection,
        command: int,
        payload: bytes,
        statement: ClientStatement | None,
    ) -> bytes:
        """The command as this backend connection must see it (statement ids mapped)."""
        if statement is None:
            return frame(0, payload)
        prepared = conn.statements[statement.schema, statement.sql]
        body = payload[5:]
        if command == Command.STMT_EXECUTE:
            if statement.params:
                body = self._bind_types(body, statement, prepared)
            return frame(0, prepared.execute_head + body)
        return frame(0, bytes((command,)) + prepared.backend_id.to_bytes(4, "little") + body)

    @staticmethod
    def _bind_types(body: bytes, statement: ClientStatement, prepared: Prepared) -> bytes:
        """A client sends parameter types with its first execute only; a backend
        connection that has not seen them yet needs them again."""
        bitmap = (statement.params + 7) // 8
        flag_at = 5 + bitmap  # flags (1) + iteration count (4) + NULL bitmap
        if len(body) <= flag_at:
            return body
        types_len = 2 * statement.params
        if body[flag_at] == 1:
            statement.types = body[flag_at + 1 : flag_at + 1 + types_len]
            prepared.types_sent = True
            return body
        if prepared.types_sent or not statement.types:
            return body
        prepared.types_sent = True
        return body[:flag_at] + b"\x01" + statement.types + body[flag_at + 1 :]

    def _send_command(
        self,
        conn: BackendConnection,
        command: int,
        payload: bytes,
        data: bytes,
        effects: Effects,
        statement: ClientStatement | None,
        stmt_id: int,
    ) -> None:
        conn.last_owner = self
        plan, self.plan = self.plan, None
        if command in NO_RESPONSE:
            conn.send_more(data)
            self._apply_effects(effects)
            self._release_if_free()
            return
        flight = Flight(
            command, effects, conn, payload, statement, client_stmt_id=stmt_id, plan=plan
        )
        if self.mover is not None:
            self.mover.sending(flight)
        if plan is not None:
            if plan.cache_key is not None:
                flight.answer = bytearray()
            if plan.decision.timeout_s:
                loop = asyncio.get_running_loop()
                flight.timer = loop.call_later(plan.decision.timeout_s, self._timed_out, flight)
        if command in (Command.INIT_DB, Command.STMT_PREPARE):
            flight.argument = data[5:]
        self.flight = flight
        self._sent_at = time.monotonic()
        if command == Command.STMT_PREPARE:
            conn.forward(data, command, _Renumbering(self))
        else:
            conn.forward(data, command, self)

    # ----------------------------------------------------------------- answers (Sink)

    def answered(self, response: Response) -> None:
        flight = self.flight
        assert flight is not None
        mover = self.mover
        # A middle's own failure, held back: the statement moves instead, when it may.
        if (
            flight.held is not None
            and mover is not None
            and mover.held_error_moves(flight, response)
        ):
            return
        self.flight = None
        self.statement_count += 1
        elapsed_s = time.monotonic() - self._sent_at
        self.statement_time_s += elapsed_s
        conn = flight.conn
        effects = flight.effects
        learn = flight.plan is not None and self._routed_answer(
            flight, flight.plan, response, elapsed_s
        )
        if not effects.inert:
            # Pins hold even when the statement failed: part of a multi-statement may have run.
            self._apply_effects(effects)
            self.mode.count_pins(effects)
        if response.error is None:
            if flight.command not in _NO_STATUS:
                self.pins.transaction = bool(response.status & Status.IN_TRANS)
            if response.status & Status.CURSOR_EXISTS:
                self.pins.reasons.add("cursor")
                self.mode.counters.inc("session_pins", reason="cursor")
            if response.last_insert_id:
                self.last_insert_id = response.last_insert_id
                conn.insert_owner = self
            if flight.command == Command.INIT_DB:
                schema = sys.intern(flight.argument.decode("utf-8", "replace"))
                self.schema = conn.state.schema = schema
            elif flight.command == Command.STMT_PREPARE and response.prepared is not None:
                self._prepared(flight, response)
        holder = mover is not None and mover.answered()
        if effects.read_back or learn or holder:
            self.task = asyncio.get_running_loop().create_task(
                self._follow_up(conn, effects.read_back, learn, holder)
            )
            return
        self._release_if_free()
        self.drain()

    def _routed_answer(
        self, flight: Flight, plan: Plan, response: Response, elapsed_s: float
    ) -> bool:
        """Account for a planned statement's answer: digest, cache, timeout, the session's
        writes. True: the writer's GTID of this write must be learned before release."""
        mode = self.mode
        if flight.timer is not None:
            flight.timer.cancel()
        if flight.command != Command.STMT_PREPARE:  # its executes count, not the prepare
            mode.record_digest(self, plan, elapsed_s, response)
        ok = response.error is None
        if flight.answer is not None and ok and plan.cache_key is not None:
            mode.cache.put(
                plan.cache_key,
                bytes(flight.answer),
                plan.decision.cache_ttl_s,
                time.monotonic(),
                len(plan.payload),
            )
        server = self.server
        replication = mode.replication.get(server.pool) if server is not None else None
        if replication is None or not ok or flight.command == Command.STMT_PREPARE:
            return False
        router, effects = self.router, plan.effects
        if effects.transaction == "rollback":
            router.gtid_pending = False
            return False
        if not (plan.reads or effects.read_back or effects.transaction):  # SET, USE, BEGIN
            router.wrote()
        if (
            not router.gtid_pending
            or replication.read_your_writes != "gtid"
            or response.status & Status.IN_TRANS  # not committed yet: no GTID
        ):
            return False
        router.gtid_pending = False
        if not flight.conn.flavor.mariadb:  # no @@last_gtid: reads take the writer a while
            router.without_gtid()
            return False
        return server is not None and server.role != Role.READER

    def _prepared(self, flight: Flight, response: Response) -> None:
        assert response.prepared is not None
        backend_id, columns, params = response.prepared
        sql = self.mode.statement_text(flight.argument)
        flight.conn.statements[self.schema, sql] = Prepared(backend_id, params, columns)
        statement = ClientStatement(sql, self.schema, params, columns)
        transaction = classify_bytes(sql).transaction
        if transaction:
            statement.control = Effects(transaction=transaction).settle()
        if flight.plan is not None:
            statement.reads = flight.plan.reads
            statement.decision = flight.plan.decision
            statement.digest_text = text = flight.plan.digest_text
            statement.digest_id = digest(text) if text else ""
        self.statements[flight.client_stmt_id] = statement

    async def _follow_up(
        self, conn: BackendConnection, read_back: bool, learn: bool, holder: bool = False
    ) -> None:
        """After a statement: read back the session state it may have changed, learn the
        GTID of the write it committed (for read-your-writes), and learn which server
        connection holds the transaction's locks (for a replay elsewhere)."""
        timeout_s = self.mode.exchange_timeout_s
        if holder and self.mover is not None:
            await self.mover.learn_holder(conn)
        try:
            if learn:
                rows = (await conn.query(b"SELECT @@last_gtid", timeout_s)).rows()
                if rows and rows[0] and rows[0][0]:
                    self.router.learned(rows[0][0].decode("ascii", "replace"))
            if read_back:
                state = await conn.read_back(timeout_s)
                self.schema = state.schema
                self.values = self.mode.intern(state.values)
                conn.state.values = self.values
        except (ConnectFailed, ProtocolError) as exc:
            self.task = None
            log.warning("session_follow_up_failed", server=str(conn.address), error=str(exc))
            self.close("state read-back failed")
            return
        self.task = None
        self._release_if_free()
        self.drain()

    def backend_lost(self, reason: str) -> None:
        flight = self.flight
        self.flight = None
        if flight is not None and flight.timer is not None:
            flight.timer.cancel()
        answered = flight is not None and flight.answered
        if flight is not None and not answered and self.mover is not None:
            self.mover.move(flight, reason)
            return
        seq = 1
        if flight is not None and answered:
            seq = -1  # mid-answer: no ERR can follow in good order
        self.backend_failed(reason, answered=answered, seq=seq)

    def internal_error(self, exc: Exception) -> None:
        self.task = None
        self.mode.counters.inc("session_internal_errors")
        log.warning("session_internal_error", client=self.client, error=repr(exc))
        self._fail(ER_PROXY_BACKEND_LOST, f"meshproxy: internal error ({exc!r})", 1)

    def backend_failed(self, reason: str, answered: bool, seq: int) -> None:
        """The backend connection broke: the statement errs; the session carries on
        unless it had state only that connection held (a transaction, a pin)."""
        conn, self.conn = self.conn, None
        if conn is not None and self.server is not None:
            self.server.discard(conn, reason)
        self.mode.counters.inc("session_backend_failures")
        message = f"meshproxy: lost the backend connection during the statement ({reason})"
        if seq < 0 or self.pins.holding() or self.infile:
            if seq > 0:
                self.send(seq, err_payload(ER_PROXY_BACKEND_LOST, message, "08S01"))
            self.close(f"backend lost: {reason}")
            return
        self.send(seq, err_payload(ER_PROXY_BACKEND_LOST, message, "08S01"))
        self.drain()

    def _apply_effects(self, effects: Effects) -> None:
        pins = self.pins
        if effects.pins:
            pins.reasons |= effects.pins
        if effects.lock:
            pins.lock = True
        elif effects.unlock:
            pins.lock = False

    def _release_if_free(self) -> None:
        conn = self.conn
        if conn is None or self.pins.holding() or self.infile or self.flight is not None:
            return
        self.conn = None
        assert self.server is not None
        self.server.release(conn)

    # ----------------------------------------------------------------- LOCAL INFILE

    def _infile_packet(self, packet: Packet) -> None:
        conn = self.conn
        assert conn is not None
        conn.send_more(frame(packet.seq, packet.payload))
        if not packet.payload:
            self.infile = False
            conn.infile_sent()

    def infile_requested(self) -> None:
        self.infile = True
        self.drain()  # the file's first packets may be queued already

    # ----------------------------------------------------------------- resets and KILL

    def _reset_session(self) -> None:
        """COM_RESET_CONNECTION: the session starts over as it was right after login."""
        conn, self.conn = self.conn, None
        if conn is not None and self.server is not None:
            if self.pins.holding():
                self.server.discard(conn, "client reset its session")
            else:
                self.server.release(conn)
        self.pins = Pins()
        self.statements.clear()
        if self.server is not None and self.key is not None:
            self.values = self.server.baseline.get(self.key)
        self.last_insert_id = 0
        self.mode.counters.inc("session_resets")

    def _kill(self, query_only: bool, connection_id: int) -> None:
        target = self.mode.session_by_id(connection_id)
        if target is None:
            self.send(1, err_payload(ER_UNKNOWN_THREAD, f"Unknown thread id: {connection_id}"))
            return
        if target is not self and target.user != self.user:
            message = f"You are not owner of thread {connection_id}"
            self.send(1, err_payload(ER_KILL_DENIED, message))
            return
        self.task = asyncio.get_running_loop().create_task(self._kill_on_server(target, query_only))

    async def _kill_on_server(self, target: ClientSession, query_only: bool) -> None:
        conn, server = target.conn, target.server
        try:
            if conn is not None and server is not None and target.flight is not None:
                assert self.key is not None
                await kill_on(server, self.key, conn.thread_id, query_only)
        except (ConnectFailed, ProtocolError, PoolTimeout) as exc:
            self.task = None
            self.send(1, err_payload(ER_PROXY_BACKEND_LOST, f"meshproxy: KILL failed: {exc}"))
            self.drain()
            return
        self.task = None
        if not query_only and target is not self:
            target.close("killed")
        self.send(1, ok_payload(self._status()))
        if not query_only and target is self:
            self.close("killed itself")
            return
        self.drain()

    def _timed_out(self, flight: Flight) -> None:
        """A query rule's statement timeout: the server interrupts the statement, and the
        client hears the server's own error (1317) as the statement's answer."""
        server = self.server
        if self.flight is not flight or self.closed or server is None or self.key is None:
            return
        self.mode.counters.inc("statement_timeouts", user=self.user)
        self.mode.spawn("statement timeout", kill_on(server, self.key, flight.conn.thread_id))


async def kill_on(
    server: ServerPool, key: LoginKey, thread_id: int, query_only: bool = True
) -> None:
    """KILL [QUERY] a backend connection's thread, through another connection of its server."""
    sql = f"KILL {'QUERY ' if query_only else ''}{thread_id}".encode()
    await server.on_helper(key, 2.0, lambda helper: helper.query(sql, 2.0))


class _Queued(Waiter):
    """A statement waiting for its server's next free connection. It runs from the call
    that frees one: no task and no future per waiting statement."""

    def __init__(
        self,
        session: ClientSession,
        server: ServerPool,
        key: LoginKey,
        command: int,
        payload: bytes,
        effects: Effects,
        statement: ClientStatement | None,
        stmt_id: int,
    ) -> None:
        super().__init__(key, time.monotonic() + server.settings.checkout_timeout_ms / 1000)
        self.session = session
        self.server = server
        self.command = command
        self.payload = payload
        self.effects = effects
        self.statement = statement
        self.stmt_id = stmt_id

    def hand(self, conn: BackendConnection | None) -> None:
        session = self.session
        session.queued = None
        if conn is not None:
            self.server.stats.in_use += 1
            self.server.stats.reused += 1
            session.conn = conn
        # None: room to open one, or the server went away; the slow path sorts it out.
        session.run_on(conn, self.command, self.payload, self.effects, self.statement, self.stmt_id)

    def expire(self, error: PoolTimeout) -> None:
        self.session.queued = None
        self.session.refuse(Refusal(ER_PROXY_POOL_TIMEOUT, f"meshproxy: {error}"))


class _Renumbering(Sink):
    """Forwards a prepare's answer, with the backend's statement id replaced by the one the
    client is given (the id is in the first packet, at the start of the first chunk)."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session
        self.first = True

    def write(self, data: bytes) -> None:
        session = self.session
        if self.first and len(data) >= 9 and data[4] == 0:
            self.first = False
            flight = session.flight
            assert flight is not None
            flight.client_stmt_id = session._next_stmt_id
            session._next_stmt_id += 1
            data = data[:5] + struct.pack("<I", flight.client_stmt_id) + data[9:]
        self.first = False
        session.write(data)

    def answered(self, response: Response) -> None:
        self.session.answered(response)

    def infile_requested(self) -> None:
        self.session.infile_requested()

    def backend_lost(self, reason: str) -> None:
        self.session.backend_lost(reason)


# Answers that carry no server status: they say nothing of an open transaction.
_NO_STATUS: typing.Final = frozenset((Command.STMT_PREPARE, Command.STATISTICS))


def _hand_over(transport: asyncio.Transport, session: ClientSession, data: bytes) -> None:
    """Feed bytes read before TLS started to the TLS protocol that start_tls installs.

    start_tls swaps the transport's protocol and queues the new protocol's connection_made
    in one step; feeding from a callback queued after we see the swap runs after it, and
    before the transport (paused until then) reads anything new.
    """
    protocol: object = transport.get_protocol()
    loop = asyncio.get_running_loop()
    if protocol is session:
        loop.call_soon(_hand_over, transport, session, data)
        return
    loop.call_soon(_feed, typing.cast(asyncio.BufferedProtocol, protocol), data)


def _feed(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    view = memoryview(data)
    while view:
        buffer = memoryview(protocol.get_buffer(len(view)))
        n = min(len(buffer), len(view))
        buffer[:n] = view[:n]
        protocol.buffer_updated(n)
        view = view[n:]
