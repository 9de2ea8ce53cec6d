"""The angel's socket keeper and a worker's side of it, over a real socket pair."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator

import msgpack
import pytest

from meshproxy.config import Address
from meshproxy.runtime import handoff


@pytest.fixture
def keeper() -> Iterator[handoff.SocketKeeper]:
    kept = handoff.SocketKeeper()
    yield kept
    kept.close()


def ask(
    keeper: handoff.SocketKeeper, child: str, address: Address, backlog: int = 16
) -> list[socket.socket]:
    """A worker's ``listening`` call answered by ``keeper`` in the same process."""
    ours, theirs = handoff.pair()
    worker = handoff.AngelSockets(os.dup(theirs.fileno()))
    theirs.close()

    async def call() -> list[socket.socket]:
        asking = asyncio.ensure_future(worker.listening(address, backlog))
        await asyncio.sleep(0)  # the request is written before the keeper reads it
        assert keeper.answer(child, ours)
        return await asking

    try:
        return asyncio.run(call())
    finally:
        worker.close()
        ours.close()


def same_socket(a: socket.socket, b: socket.socket) -> bool:
    return os.fstat(a.fileno()).st_ino == os.fstat(b.fileno()).st_ino


def test_every_worker_gets_the_same_listening_socket(keeper: handoff.SocketKeeper) -> None:
    """Two workers asking for one address get duplicates of one socket, bound there, that
    the keeper still holds."""
    (first,) = ask(keeper, "worker-0", Address("127.0.0.1", 0))
    port = first.getsockname()[1]
    # Port 0 is a new port each time: the second worker asks for the one bound.
    (held,) = keeper.held[Address("127.0.0.1", 0)]
    (second,) = ask(keeper, "worker-1", Address("127.0.0.1", 0))
    assert same_socket(first, second)
    assert same_socket(first, held)
    assert second.getsockname() == ("127.0.0.1", port)
    assert not second.getblocking()
    first.close()
    second.close()


def test_socket_is_closed_once_no_worker_keeps_it(keeper: handoff.SocketKeeper) -> None:
    """A socket stays held while any worker's last ``keep`` (or ``get``) names its address,
    and is closed when none does, so the port refuses connections again."""
    address = Address("127.0.0.1", 0)
    for worker in ("worker-0", "worker-1"):
        for sock in ask(keeper, worker, address):
            sock.close()
    (held,) = keeper.held[address]
    port = held.getsockname()[1]
    ours, theirs = handoff.pair()
    try:
        theirs.send(msgpack.packb({"keep": []}))
        assert keeper.answer("worker-0", ours)
        assert address in keeper.held  # worker-1 still serves it
        theirs.send(msgpack.packb({"keep": []}))
        assert keeper.answer("worker-1", ours)
    finally:
        ours.close()
        theirs.close()
    assert address not in keeper.held
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_bind_error_reaches_the_worker_with_its_errno(keeper: handoff.SocketKeeper) -> None:
    """A port the keeper cannot bind is answered with the bind's error, raised in the
    worker as the same OSError, and nothing is held for it."""
    busy = socket.create_server(("127.0.0.1", 0))
    address = Address("127.0.0.1", busy.getsockname()[1])
    try:
        with pytest.raises(OSError, match="in use") as raised:
            ask(keeper, "worker-0", address)
    finally:
        busy.close()
    assert raised.value.errno == 98  # EADDRINUSE
    assert address not in keeper.held


def test_adopted_socket_is_handed_out_instead_of_binding() -> None:
    """A socket passed in (by systemd or an older angel) is what a worker gets for the
    address it is bound to; no second socket is bound."""
    passed = socket.create_server(("127.0.0.1", 0))
    address = Address("127.0.0.1", passed.getsockname()[1])
    keeper = handoff.SocketKeeper([passed])
    try:
        (got,) = ask(keeper, "worker-0", address)
        assert same_socket(got, passed)
        assert not keeper.adopted
        got.close()
    finally:
        keeper.close()


def test_malformed_request_is_ignored_and_the_channel_lives(
    keeper: handoff.SocketKeeper,
) -> None:
    """Garbage, an unknown request and a request with bad fields are each dropped with a
    log line; the keeper holds nothing new and keeps answering."""
    ours, theirs = handoff.pair()
    try:
        for junk in (b"\xc1", msgpack.packb({"what": 1}), msgpack.packb({"get": ["x"]})):
            theirs.send(junk)
            assert keeper.answer("worker-0", ours)
        assert not keeper.held
        theirs.close()
        assert not keeper.answer("worker-0", ours)  # the worker's end closed
    finally:
        ours.close()


def test_a_late_answer_is_dropped_not_taken_for_the_next(
    keeper: handoff.SocketKeeper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the angel answers a question only after the worker gave up on it, the worker
    takes the next answer for its next question, never the stale one (whose sockets it
    closes)."""
    monkeypatch.setattr(handoff, "ANSWER_S", 0.05)
    ours, theirs = handoff.pair()
    worker = handoff.AngelSockets(os.dup(theirs.fileno()))
    theirs.close()
    first, second = Address("127.0.0.1", 0), Address("127.0.0.2", 0)

    async def scenario() -> list[socket.socket]:
        with pytest.raises(OSError, match="did not hand over"):
            await worker.listening(first, 8)  # unanswered in time
        asking = asyncio.ensure_future(worker.listening(second, 8))
        await asyncio.sleep(0)
        assert keeper.answer("worker-0", ours)  # the late answer, about ``first``
        assert keeper.answer("worker-0", ours)  # the answer about ``second``
        return await asking

    try:
        (got,) = asyncio.run(scenario())
    finally:
        worker.close()
        ours.close()
    assert got.getsockname()[0] == "127.0.0.2"
    got.close()
