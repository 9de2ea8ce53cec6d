"""What an edge keeps of a session so that it can move it to another middle.

An edge in session mode owns its clients' sessions and runs their statements on logged-in
connections to the middles of a tier. Between statements a session holds no connection,
so a middle that dies costs it nothing. A statement in flight and an open transaction are
another matter, and this module holds what they need:

* the **journal** of the open transaction: every statement sent in it (a query's text, or
  a prepared statement's execute), the length of the answer the client received, and one
  running checksum of all those answers. When the middle fails, the transaction runs again
  through another one, and it continues there only if every answer is the same as before
  (MaxScale's transaction replay, across a mesh);
* the **replay** of one statement on a connection: its answer goes into the replay's own
  running checksum, never to the client.

What may be run again and what must fail is decided by the session (``session.py``): a
read may; a write or a ``COMMIT`` whose fate is unknown may not.
"""

from __future__ import annotations

import asyncio
import hashlib
import typing

from meshproxy.dataplane.backend import BackendConnection, Sink
from meshproxy.errors import MeshproxyError
from meshproxy.mysql.constants import Command
from meshproxy.mysql.response import Response
from meshproxy.mysql.state import Values

if typing.TYPE_CHECKING:
    from meshproxy.dataplane.session import ClientStatement

# A transaction longer than this is not kept: it could not be moved, only rolled back.
MAX_ENTRIES: typing.Final = 1000
MAX_BYTES: typing.Final = 4 * 1024 * 1024  # of statements kept
# A statement is sent again at most this often (each time to another middle).
MAX_MOVES: typing.Final = 3


class NotReplayed(MeshproxyError):
    """The transaction could not be brought back on another middle (the reason says why)."""


# The commands a transaction may hold and still be replayed: the others leave state on
# their connection (a cursor, long data) that pins it anyway. A prepare is not kept: a
# replayed execute prepares its statement on the new connection first.
_REPLAYABLE: typing.Final = frozenset((Command.QUERY, Command.STMT_EXECUTE, Command.STMT_RESET))

# Copied for each transaction: hashlib.sha1() would look the algorithm up in OpenSSL each
# time. One running hash per transaction, not one per answer: with OpenSSL 3 the copy,
# final and free of a hash cost more than hashing a short answer.
_SHA1: typing.Final = hashlib.sha1(usedforsecurity=False)

# A transaction's answers are kept as they were sent (references to the bytes already
# read, no copy) up to this much, and hashed only beyond: most transactions end before,
# and a replay, which is rare, hashes what was kept. (64 KiB: sysbench's oltp_read_only
# answers 54 KiB per transaction.)
KEEP_PER_TRANSACTION: typing.Final = 64 * 1024
KEEP_PER_PROCESS: typing.Final = 16 * 1024 * 1024


class AnswerBudget:
    """The answer bytes all journals of a process may keep instead of hashing: memory
    stays bounded however many sessions are in a transaction."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class Entry:
    """One statement of the transaction (a plain class: mypyc builds it in C; one is
    kept per statement)."""

    def __init__(
        self, command: int, payload: bytes, statement: ClientStatement | None, answered_to: int
    ) -> None:
        self.command = command
        self.payload = payload  # as the client sent it
        self.statement = statement  # what an execute runs (prepared anew elsewhere)
        self.answered_to = answered_to  # answer bytes of the transaction up to this one's end


class Journal:
    """The statements of a session's open transaction and a checksum of their answers.

    ``sending`` is told of every command before it goes out, ``chunk`` of every answer byte
    the client is sent, ``answered`` whether a transaction is open once the answer ended.
    A transaction begins with the statement whose answer first says one is open (``BEGIN``,
    or a read with autocommit off); the session state before it is what a replay restores.
    """

    __slots__ = (
        "_answered",
        "_budget",
        "_bytes",
        "_hash",
        "_kept",
        "_kept_bytes",
        "_sending",
        "_taking",
        "entries",
        "holder",
        "replayable",
        "start_schema",
        "start_values",
        "why_not",
        "wrote",
    )

    def __init__(self, budget: AnswerBudget) -> None:
        self.entries: list[Entry] = []
        self.replayable = True
        self.why_not = ""
        self.wrote = False  # a statement of the transaction may have written
        # The server connection running the transaction once it wrote (server, thread id):
        # it holds the transaction's locks, so a replay elsewhere kills it first (the
        # failed middle may only hang, and keep it open).
        self.holder: tuple[bytes, int] | None = None
        self.start_values: Values | None = None
        self.start_schema = ""
        self._bytes = 0
        self._sending: tuple[int, bytes, ClientStatement | None] = (0, b"", None)
        # The transaction's answers so far: kept while they fit, else hashed.
        self._budget = budget
        self._kept: list[bytes] = []
        self._kept_bytes = 0
        self._hash: hashlib._Hash | None = None
        self._answered = 0  # their bytes
        self._taking = False  # the answer on its way is the transaction's

    def sending(
        self,
        command: int,
        payload: bytes,
        statement: ClientStatement | None,
        writes: bool,
        in_transaction: bool,
        may_open: bool,
        values: Values | None,
        schema: str,
    ) -> None:
        """A command goes out. ``writes``: it may change data (not a read, not BEGIN);
        ``may_open``: outside a transaction, its answer may open one (BEGIN, anything with
        autocommit off). Only then is its answer checksummed: the hot path of a session
        in autocommit mode pays for no checksum."""
        if not in_transaction:
            self.clear()
            self.start_values, self.start_schema = values, schema
        self.wrote = self.wrote or writes
        self._sending = (command, payload, statement)
        journaled = command != Command.STMT_PREPARE and (in_transaction or may_open)
        if journaled and command not in _REPLAYABLE and self.replayable:
            self._refuse(f"command 0x{command:02x} in the transaction")
        self._taking = journaled and self.replayable

    def chunk(self, data: bytes) -> None:
        if not self._taking:
            return
        size = len(data)
        self._answered += size
        if self._hash is None:
            budget = self._budget
            if (
                self._kept_bytes + size <= KEEP_PER_TRANSACTION
                and budget.used + size <= budget.limit
            ):
                self._kept.append(data)
                self._kept_bytes += size
                budget.used += size
                return
            self._hash = self._hash_of_kept()  # they go on in the hash from now on
            self._release()
        self._hash.update(data)

    def _hash_of_kept(self) -> hashlib._Hash:
        digest = _SHA1.copy()
        for data in self._kept:
            digest.update(data)
        return digest

    def _release(self) -> None:
        if self._kept:  # (cleared before every statement outside a transaction: no list then)
            self._budget.used -= self._kept_bytes
            self._kept = []
            self._kept_bytes = 0

    def answered(self, in_transaction: bool) -> None:
        hashed, self._taking = self._taking, False
        if not in_transaction:
            self.clear()
            return
        command, payload, statement = self._sending
        if not self.replayable or command == Command.STMT_PREPARE:
            return
        if not hashed:  # opened a transaction where none was expected: not kept
            self._refuse("it began where no transaction was expected")
            return
        self._bytes += len(payload)
        if len(self.entries) >= MAX_ENTRIES or self._bytes > MAX_BYTES:
            self._refuse("the transaction is too long to keep")
            return
        self.entries.append(Entry(command, payload, statement, self._answered))

    def checksum(self) -> bytes:
        """Of every answer the transaction's statements got, in order, as the client
        received them."""
        running = self._hash.copy() if self._hash is not None else self._hash_of_kept()
        return running.digest()

    def needs_holder(self) -> bool:
        """Whether the transaction has written (so it may hold locks) and its server
        connection is not known yet."""
        return self.wrote and self.holder is None and bool(self.entries)

    def clear(self) -> None:
        if self.entries:
            self.entries.clear()
        self.replayable = True
        self.why_not = ""
        self.wrote = False
        self.holder = None
        self._bytes = 0
        self._release()
        self._hash = None
        self._answered = 0
        self._taking = False

    def _refuse(self, why: str) -> None:
        self.replayable = False
        self.why_not = why
        self.entries.clear()
        self._release()
        self._hash = None


class _Replayed(Sink):
    """The sink of a replayed statement: its answer goes into the replay's running hash,
    never to the client."""

    def __init__(self, into: hashlib._Hash) -> None:
        self.hash = into
        self.length = 0
        self.done: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        self.length += len(data)

    def answered(self, response: Response) -> None:
        if not self.done.done():
            self.done.set_result(response)

    def infile_requested(self) -> None:
        if not self.done.done():
            self.done.set_exception(NotReplayed("a replayed statement asked for a local file"))

    def backend_lost(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_exception(NotReplayed(f"the new path failed too ({reason})"))


def replay_hash() -> hashlib._Hash:
    """A running hash for the answers of a replay, to end equal to ``Journal.checksum``."""
    return _SHA1.copy()


async def replay(
    conn: BackendConnection, data: bytes, into: hashlib._Hash, timeout_s: float
) -> int:
    """Run a framed command on ``conn``, its answer hashed ``into`` the replay's hash as a
    client would have received it; returns the answer's length (raises NotReplayed when it
    cannot be run)."""
    sink = _Replayed(into)
    conn.forward(data, data[4], sink)
    try:
        async with asyncio.timeout(timeout_s):
            await sink.done
    except TimeoutError:
        conn.abort("a replayed statement did not answer in time")
        raise NotReplayed(f"a replayed statement did not answer within {timeout_s:g} s") from None
    return sink.length
