"""Shadow traffic: a query rule's ``mirror`` runs a statement on another pool as well, in
the session's schema and variables, and drops the answer as it streams in (a mirrored
50 MiB result costs no memory). The client never waits for it and never hears of it.
"""

from __future__ import annotations

import asyncio

from meshproxy.dataplane.backend import BackendConnection, LoginKey, Sink
from meshproxy.dataplane.backendpool import ServerPool
from meshproxy.mysql.constants import Command
from meshproxy.mysql.packets import frame
from meshproxy.mysql.response import Response
from meshproxy.mysql.state import Values, restore_sql


class _Discard(Sink):
    """Keeps nothing of an answer but how it ended."""

    def __init__(self) -> None:
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def write(self, data: bytes) -> None:
        pass

    def answered(self, response: Response) -> None:
        if not self.done.done():
            self.done.set_result("error" if response.error is not None else "ok")

    def infile_requested(self) -> None:
        if not self.done.done():  # never mirrored: no client file to send
            self.done.set_result("lost")

    def backend_lost(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_result("lost")


async def mirror(
    server: ServerPool,
    key: LoginKey,
    schema: str,
    values: Values | None,
    payload: bytes,
    timeout_s: float,
) -> str:
    """Run a COM_QUERY's ``payload`` on ``server``; its outcome: ok, error or lost."""
    conn: BackendConnection = await server.acquire(key, timeout_s)
    reusable = False
    try:
        if schema and conn.state.schema != schema:
            reply = await conn.exchange(Command.INIT_DB, schema.encode(), timeout_s)
            if reply.response.error is not None:
                reusable = True
                return "error"
            conn.state.schema = schema
        if values is not None and conn.state.values is not values:
            sql = restore_sql(conn.state.values, values, conn.flavor)
            if sql is not None:
                await conn.query(sql, timeout_s)
            conn.state.values = values
        sink = _Discard()
        conn.forward(frame(0, payload), Command.QUERY, sink)
        async with asyncio.timeout(timeout_s):
            outcome = await sink.done
        reusable = outcome != "lost"
        return outcome
    finally:
        if reusable:
            server.release(conn)
        else:
            server.discard(conn, "mirrored statement did not finish")
