"""What meshproxy relies on its event loops for, rather than doing it again per connection."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

pytestmark = pytest.mark.integration


async def _nodelay_of_both_ends() -> tuple[int, int]:
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    dialed = writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    answer = await asyncio.wait_for(accepted, 5)
    writer.close()
    server.close()
    await server.wait_closed()
    return dialed, answer


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_event_loops_turn_nagle_off_on_every_tcp_connection(
    run: Callable[[Coroutine[Any, Any, tuple[int, int]]], tuple[int, int]],
) -> None:
    """Both loops set TCP_NODELAY on accepted and dialed sockets, so small MySQL packets
    never wait for Nagle although meshproxy makes no setsockopt call of its own."""
    dialed, accepted = run(_nodelay_of_both_ends())
    assert (bool(dialed), bool(accepted)) == (True, True)
