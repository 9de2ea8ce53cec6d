"""What an edge keeps of a session so that it can move it to another middle.

An edge in session mode owns its clients' sessions and runs their statements on logged-in
connections to the middles of a tier. Between statements a session holds no connection,
so a middle that dies costs it nothing. A statement in flight and an open transaction are
another matter, and this module holds what they need:

* the **journal** of the open transaction: every statement sent in it (as the bytes that
  went to the middle) with a checksum of the answer the client received. When the middle
  fails, the transaction runs again through another one, and it continues there only if
  every answer is the same as before (MaxScale's transaction replay, across a mesh);
* the **replay**: one journal entry run on a connection, its answer checksummed and never
  shown to the client.

What may be run again and what must fail is decided by the session (``session.py``): a
read may; a write or a ``COMMIT`` whose fate is unknown may not.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

from meshproxy.dataplane.backend import BackendConnection
from meshproxy.errors import MeshproxyError
from meshproxy.mysql.constants import Command
from meshproxy.mysql.response import Response
from meshproxy.mysql.state import Values

# A transaction longer than this is not kept: it could not be moved, only rolled back.
MAX_ENTRIES = 1000
MAX_BYTES = 4 * 1024 * 1024  # of statements kept
MAX_MOVES = 3  # a statement is sent again at most this often (each time to another middle)


class NotReplayed(MeshproxyError):
    """The transaction could not be brought back on another middle (the reason says why)."""


@dataclass(frozen=True, slots=True)
class Entry:
    data: bytes  # the framed command, as sent (statement ids and all)
    checksum: bytes  # of the whole answer, as the client received it


class Journal:
    """The statements of a session's open transaction and the checksums of their answers.

    ``sending`` is told of every command before it goes out, ``chunk`` of every answer byte
    the client is sent, ``answered`` whether a transaction is open once the answer ended.
    A transaction begins with the statement whose answer first says one is open (``BEGIN``,
    or a read with autocommit off); the session state before it is what a replay restores.
    """

    __slots__ = (
        "_bytes",
        "_data",
        "_hash",
        "entries",
        "replayable",
        "start_schema",
        "start_values",
        "why_not",
    )

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.replayable = True
        self.why_not = ""
        self.start_values: Values | None = None
        self.start_schema = ""
        self._bytes = 0
        self._data = b""
        self._hash: hashlib._Hash | None = None

    def sending(
        self, command: int, data: bytes, in_transaction: bool, values: Values | None, schema: str
    ) -> None:
        if not in_transaction:
            self.clear()
            self.start_values, self.start_schema = values, schema
        self._data = data
        self._hash = hashlib.sha1(usedforsecurity=False)
        if command != Command.QUERY and self.replayable:
            # A prepared statement's bytes name it by the id of one middle's connection.
            self._refuse(f"command 0x{command:02x} in the transaction")

    def chunk(self, data: bytes) -> None:
        if self._hash is not None:
            self._hash.update(data)

    def answered(self, in_transaction: bool) -> None:
        digest, self._hash = self._hash, None
        if not in_transaction:
            self.clear()
            return
        if not self.replayable or digest is None:
            return
        self._bytes += len(self._data)
        if len(self.entries) >= MAX_ENTRIES or self._bytes > MAX_BYTES:
            self._refuse("the transaction is too long to keep")
            return
        self.entries.append(Entry(self._data, digest.digest()))

    def clear(self) -> None:
        self.entries.clear()
        self.replayable = True
        self.why_not = ""
        self._bytes = 0

    def _refuse(self, why: str) -> None:
        self.replayable = False
        self.why_not = why
        self.entries.clear()


class _Checksum:
    """The sink of a replayed statement: its answer is checksummed, never shown."""

    def __init__(self) -> None:
        self.hash = hashlib.sha1(usedforsecurity=False)
        self.done: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

    def write(self, data: bytes) -> None:
        self.hash.update(data)

    def answered(self, response: Response) -> None:
        if not self.done.done():
            self.done.set_result(response)

    def infile_requested(self) -> None:
        if not self.done.done():
            self.done.set_exception(NotReplayed("a replayed statement asked for a local file"))

    def backend_lost(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_exception(NotReplayed(f"the new path failed too ({reason})"))


async def replay(conn: BackendConnection, entries: list[Entry], timeout_s: float) -> None:
    """Run ``entries`` again on ``conn``; raises NotReplayed at the first answer that is not
    the one the client received (the caller drops the connection: nothing is committed)."""
    for number, entry in enumerate(entries, 1):
        sink = _Checksum()
        conn.forward(entry.data, entry.data[4], sink)
        try:
            async with asyncio.timeout(timeout_s):
                await sink.done
        except TimeoutError:
            conn.abort("a replayed statement did not answer in time")
            raise NotReplayed(
                f"statement {number} of the transaction did not answer within {timeout_s:g} s"
            ) from None
        if sink.hash.digest() != entry.checksum:
            raise NotReplayed(f"statement {number} of the transaction gave another result")
