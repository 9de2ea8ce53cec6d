"""How a client session carries on when the middle (or interchangeable server) running it
fails: the rules of "No client sees a middle die".

A session that may move gets a ``Mover``. The mover keeps the open transaction's journal
(``continuity.Journal``), decides per situation whether the statement in flight runs again
elsewhere, whether the transaction is replayed, or whether the client gets an ERR that says
why, and ends the server connection that a failed path may still hold the transaction's
locks on. The session keeps running statements; the mover only steps in when its
connection breaks or its middle answers with its own failure.
"""

from __future__ import annotations

import asyncio
import typing

from meshproxy import log
from meshproxy.config import Address
from meshproxy.dataplane.backend import BackendConnection
from meshproxy.dataplane.backendpool import PoolTimeout
from meshproxy.dataplane.continuity import MAX_MOVES, Journal, NotReplayed, replay, replay_hash
from meshproxy.dataplane.router import Role
from meshproxy.dataplane.routing import Plan
from meshproxy.errors import ConnectFailed, ProtocolError, Refusal, SessionClosed
from meshproxy.mysql.constants import (
    ER_PROXY_BACKEND_LOST,
    ER_PROXY_NO_UPSTREAM,
    ER_PROXY_NOT_REPLAYED,
    ER_PROXY_OUTCOME_UNKNOWN,
    Command,
)
from meshproxy.mysql.packets import err_payload
from meshproxy.mysql.response import Response
from meshproxy.mysql.statements import Effects

if typing.TYPE_CHECKING:
    from meshproxy.dataplane.session import ClientSession, Flight

# The server connection a transaction runs on (learned before its first write).
HOLDER_SQL: typing.Final = b"SELECT CONCAT(@@hostname, ':', @@port), CONNECTION_ID()"
# Commands that change no data: run again elsewhere like a read.
HARMLESS: typing.Final = frozenset(
    (
        Command.INIT_DB,
        Command.FIELD_LIST,
        Command.STATISTICS,
        Command.STMT_PREPARE,
        Command.STMT_RESET,
    )
)
# Statements that cannot commit a transaction on their own.
_REPEATABLE: typing.Final = frozenset(
    (b"SELECT", b"INSERT", b"UPDATE", b"DELETE", b"REPLACE", b"WITH")
)
_MIDDLE_FAILURES: typing.Final = (ER_PROXY_NO_UPSTREAM, ER_PROXY_BACKEND_LOST)
_NO_EFFECTS: typing.Final = Effects()
NO_ADDRESSES: frozenset[Address] = frozenset()


def may_write(plan: Plan | None, effects: Effects) -> bool:
    """Whether a statement may change data (BEGIN, COMMIT and ROLLBACK themselves do not)."""
    return not (plan is not None and plan.reads) and not effects.transaction


def may_run_again(flight: Flight, in_transaction: bool) -> bool:
    """Whether the command in flight may run again on another path.

    Outside a transaction: only what reads, so that running it twice is harmless (so are
    BEGIN, COMMIT and ROLLBACK with no transaction open). After its transaction was
    replayed: a read, a write that cannot commit on its own, or a command that changes no
    data; COMMIT, DDL, ``SET autocommit`` and the like may have committed the transaction
    on the failed path, and never run twice.
    """
    if in_transaction and flight.effects.transaction:
        return False
    if flight.command in HARMLESS:
        return True
    if not in_transaction:
        return not may_write(flight.plan, flight.effects)
    if flight.command == Command.QUERY:
        text = flight.payload[1:64]
    elif flight.command == Command.STMT_EXECUTE and flight.statement is not None:
        text = flight.statement.sql[:64]
    else:
        return False
    words = text.lstrip(b" \t\r\n(").split(None, 1)
    return bool(words) and words[0].upper() in _REPEATABLE


def middle_failed(data: bytes) -> bool:
    """Whether an answer's first chunk is a whole ERR packet with which a middle says it
    failed itself (codes of ours: no MySQL server sends them)."""
    if len(data) < 7 or data[4] != 0xFF:
        return False
    whole = len(data) == 4 + int.from_bytes(data[:3], "little")
    return whole and int.from_bytes(data[5:7], "little") in _MIDDLE_FAILURES


class Mover:
    """What a session on a tier of middles (or an interchangeable pool) needs to move."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session
        self.journal = Journal(session.mode.answer_budget)
        self.moves = 0  # how often the statement in flight has moved
        self.failed: set[Address] = set()  # the middles (or servers) it moved away from

    def statement_done(self) -> None:
        """The next statement starts afresh: every middle may serve it again."""
        self.moves = 0
        self.failed = set()

    # ----------------------------------------------------------------- the journal

    def sending(self, flight: Flight) -> None:
        session = self.session
        effects = flight.effects
        opens = effects.transaction == "start" or not session.autocommit()
        self.journal.sending(
            flight.command,
            flight.payload,
            flight.statement,
            may_write(flight.plan, effects),
            session.pins.transaction,
            opens,
            session.values,
            session.schema,
        )
        flight.sent = not flight.conn.closed

    def answered(self) -> bool:
        """The answer has reached the client. True: learn the transaction's server
        connection now (it has just begun to write)."""
        self.journal.answered(self.session.pins.transaction)
        return self.journal.needs_holder()

    def holder_first(self, effects: Effects) -> bool:
        """Whether the statement about to run is its open transaction's first that may
        write: the server connection running it is learned before it takes a lock, so a
        replay or a give-up can end that connection even if its answer never arrives."""
        session = self.session
        return (
            session.pins.transaction
            and self.journal.holder is None
            and may_write(session.plan, effects)
        )

    async def learn_holder(self, conn: BackendConnection) -> None:
        try:
            rows = (await conn.query(HOLDER_SQL, self.session.mode.exchange_timeout_s)).rows()
        except (ConnectFailed, ProtocolError) as exc:
            # Its connection broke: the next statement moves the session (without a kill).
            log.debug("session_holder_unknown", client=self.session.client, error=str(exc))
            return
        if rows and rows[0][0] is not None and rows[0][1] is not None:
            self.journal.holder = (rows[0][0], int(rows[0][1]))

    # ----------------------------------------------------------------- moving

    def held_error_moves(self, flight: Flight, response: Response) -> bool:
        """A middle answered with its own failure: no server available (9001: nothing
        ran) or its server connection lost (9003: it may have run). The session moves as
        if that middle had failed; when it cannot, the client gets the middle's ERR."""
        session = self.session
        held, flight.held = flight.held, None
        assert held is not None
        code, message = response.error or (0, "")
        if self.moves < MAX_MOVES and not (session.pins.reasons or session.pins.lock):
            session.flight = None
            if code == ER_PROXY_NO_UPSTREAM and session.server is not None:
                session.server.report(session.server.address, message)  # passive ejection
            flight.sent = code == ER_PROXY_BACKEND_LOST
            self.move(flight, f"its middle answered {code}: {message}")
            return True
        flight.answered = True
        session.write(held)
        return False

    def move(self, flight: Flight, reason: str) -> None:
        """The middle running the statement in flight failed before a byte of its answer
        reached the client: carry the session on through another middle where that is
        provably safe, else give the statement an ERR that says why; the session stays."""
        session = self.session
        journal, pins = self.journal, session.pins
        if pins.reasons or pins.lock or session.infile or self.moves >= MAX_MOVES:
            session.backend_failed(reason, answered=False, seq=1)  # state only it had
            return
        conn, session.conn = session.conn, None
        if conn is not None and session.server is not None:
            session.server.discard(conn, reason)
            self.failed.add(conn.address)  # left out until the statement has its answer
        session.server = None
        self.moves += 1
        if pins.transaction:
            if not journal.replayable:
                self._roll_back(f"it cannot be replayed ({journal.why_not})", reason)
            elif flight.sent and journal.wrote and not may_run_again(flight, True):
                # COMMIT (or a statement that commits) may have run: never apply it twice.
                # (A transaction that wrote nothing may commit again: it changes nothing.)
                self._outcome_unknown(flight, reason)
            else:
                loop = asyncio.get_running_loop()
                session.task = loop.create_task(self._replay(flight, reason))
            return
        if flight.sent and not may_run_again(flight, False):
            self._outcome_unknown(flight, reason)
            return
        outcome = "read again" if flight.sent else "sent elsewhere"
        self._moved(outcome, reason)
        self._run_again(flight)

    def _run_again(self, flight: Flight) -> None:
        self.session.plan = flight.plan
        self.session.run(
            flight.command, flight.payload, flight.effects, flight.statement, flight.client_stmt_id
        )

    def _moved(self, outcome: str, reason: str, counted: str = "") -> None:
        self.session.mode.counters.inc("session_moves", outcome=counted or outcome)
        log.event("session_moved", client=self.session.client, outcome=outcome, reason=reason)

    async def _replay(self, flight: Flight, reason: str) -> None:
        """Run the open transaction again through another middle, then the statement that
        was in flight; if any answer differs, roll back and tell the client."""
        session, journal = self.session, self.journal
        values, schema = session.values, session.schema
        try:
            conn = session.conn = await session.checkout()
            if journal.holder is not None:
                await self._kill_holder(conn, journal.holder)
            # The state the transaction began in, then its statements bring it to now.
            session.values, session.schema = journal.start_values, journal.start_schema
            conn = await session.bring_in_step(conn, _NO_EFFECTS, None)
            await self._run_journal(conn)
        except SessionClosed:
            return
        except (Refusal, ConnectFailed, ProtocolError, PoolTimeout, NotReplayed) as exc:
            session.task = None
            session.values, session.schema = values, schema
            self._roll_back(str(exc), reason)
            return
        except Exception as exc:  # a bug: this client hears why; everyone else carries on
            session.internal_error(exc)
            return
        session.task = None
        session.values, session.schema = values, schema
        assert values is not None  # a transaction began after the first connection
        conn.state.values, conn.state.schema = values, schema
        outcome = "transaction replayed"
        self._moved(outcome, f"{reason}; {len(journal.entries)} statements replayed")
        self._run_again(flight)

    async def _run_journal(self, conn: BackendConnection) -> None:
        """Run the transaction's statements on ``conn``; raises NotReplayed at the first
        answer whose length is not the one the client received, or after the last when the
        answers' checksum differs (nothing of the replay commits before it is compared)."""
        session = self.session
        timeout_s = session.mode.exchange_timeout_s
        answers, length = replay_hash(), 0
        for number, entry in enumerate(self.journal.entries, 1):
            statement = entry.statement
            if statement is not None and (statement.schema, statement.sql) not in conn.statements:
                await session.prepare_on(conn, statement)
            data = session.bytes_for(conn, entry.command, entry.payload, statement)
            length += await replay(conn, data, answers, timeout_s)
            if length != entry.answered_to:
                raise NotReplayed(f"statement {number} of the transaction gave another result")
        if answers.digest() != self.journal.checksum():
            raise NotReplayed("a statement of the transaction gave another result")

    # ----------------------------------------------------------------- giving up

    def _roll_back(self, why: str, reason: str) -> None:
        """The transaction is gone (its connection's server rolls it back): say so."""
        session = self.session
        conn, session.conn = session.conn, None
        if conn is not None and session.server is not None:
            session.server.discard(conn, "transaction not replayed")
        session.pins.transaction = False
        self._release_holder()
        self.journal.clear()
        self._moved("rolled back", f"{reason}; {why}", counted="transaction rolled back")
        message = (
            f"meshproxy: the transaction was rolled back: its middle failed ({reason}) and {why}"
        )
        session.send(1, err_payload(ER_PROXY_NOT_REPLAYED, message, "40001"))
        session.drain()

    def _outcome_unknown(self, flight: Flight, reason: str) -> None:
        """A write (or COMMIT) reached a middle that then failed: it may have run."""
        session = self.session
        in_transaction = session.pins.transaction
        session.pins.transaction = False
        self._release_holder()
        self.journal.clear()
        self._moved("outcome unknown", reason)
        what = "the transaction" if in_transaction else "the statement"
        message = (
            f"meshproxy: outcome unknown: the middle running {what} failed ({reason}) before"
            f" it answered; {what} may or may not have been applied"
        )
        session.send(1, err_payload(ER_PROXY_OUTCOME_UNKNOWN, message, "08S01"))
        session.drain()

    # ----------------------------------------------------------------- the lock holder

    async def _kill_holder(self, conn: BackendConnection, holder: tuple[bytes, int]) -> None:
        """End the failed path's server connection, which a hung middle keeps open with the
        transaction's locks, when ``conn`` reaches that server. (A pooled session on the
        middle passes the KILL to its server, which allows it for connections of the same
        user only.)"""
        timeout_s = self.session.mode.exchange_timeout_s
        server, thread_id = holder
        rows = (await conn.query(HOLDER_SQL, timeout_s)).rows()
        if not rows or rows[0][0] != server:
            return  # another server: it holds no lock of that transaction
        reply = await conn.exchange(Command.QUERY, b"KILL %d" % thread_id, timeout_s)
        outcome = "killed" if reply.error() is None else "gone"
        self.session.mode.counters.inc("transaction_holders_killed", outcome=outcome)

    def _release_holder(self) -> None:
        """A transaction given up (rolled back, or its outcome unknown) may live on where
        its middle hangs or is cut off from its server, holding its locks, and even commit
        late once that middle is back: end its server connection now, through another
        middle, so that neither can happen (what the server has done by then stands)."""
        session, holder = self.session, self.journal.holder
        if holder is None or session.key is None:
            return
        server = session.mode.choose_server(session.target_pool, self.failed, Role.ANY)
        if server is not None:
            timeout_s = session.mode.exchange_timeout_s
            job = server.on_helper(session.key, timeout_s, lambda c: self._kill_holder(c, holder))
            session.mode.spawn("end a given-up transaction", job)
