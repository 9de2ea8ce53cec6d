"""The mesh TLS layer over real loopback sockets and a real mesh PKI, under uvloop:
bytes arrive whole and in order, flow control holds, closes flush, refusals are counted."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from meshproxy.dataplane import tlslayer
from meshproxy.security import pki
from meshproxy.security.meshtls import MeshTls, Peer, peer_of


class Recorder(asyncio.Protocol):
    """Keeps what arrives and when the connection ends; echoes when asked to."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.paused = 0
        self.resumed = asyncio.Event()
        self.arrived = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += data
        self.arrived.set()
        if self.echo:
            assert self.transport is not None
            self.transport.write(data)

    def eof_received(self) -> bool:
        self.eof.set()
        return False

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()

    async def until(self, size: int) -> None:
        while len(self.received) < size:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 10)


class Served(list[Recorder]):
    """The protocols a mesh port started, in order; ``started`` is set at each."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()

    async def first(self) -> Recorder:
        await asyncio.wait_for(self.started.wait(), 10)
        return self[0]


class Mesh:
    """A CA, a middle's and an edge's contexts, and the refusals the middle counted."""

    def __init__(self, root: Path) -> None:
        pki.init_ca(root)
        self.root = root
        self.refused: list[str] = []
        self.refusal = asyncio.Event()
        self.middle = self.node("m1", "middle")
        self.edge = self.node("e1", "edge")

    def node(self, name: str, role: str) -> MeshTls:
        files = pki.issue(self.root, name, role)
        return MeshTls(
            str(self.root / pki.CA_CERT),
            str(files.cert),
            str(files.key),
            self._refused,
        )

    def _refused(self, reason: str, _detail: str) -> None:
        self.refused.append(reason)
        self.refusal.set()


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    return Mesh(tmp_path / "ca")


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return uvloop.run(asyncio.wait_for(scenario(), 30))


async def serve(
    mesh: Mesh, protocols: Served, echo: bool = False, timeout_s: float = 5.0
) -> tuple[asyncio.Server, int]:
    """A middle's mesh port: each connection that passes the handshake gets a Recorder."""

    def factory() -> Recorder:
        protocols.append(Recorder(echo))
        protocols.started.set()
        return protocols[-1]

    server = await asyncio.get_running_loop().create_server(
        tlslayer.accepting(factory, mesh.middle, timeout_s), "127.0.0.1", 0
    )
    return server, server.sockets[0].getsockname()[1]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_messages_round_trip_and_each_side_knows_the_other(mesh: Mesh) -> None:
    """Small writes come back whole and in order, and each side names its verified peer."""

    async def scenario() -> tuple[bool, Peer | None, Peer | None]:
        served = Served()
        server, port = await serve(mesh, served, echo=True)
        transport, client = await tlslayer.connect(Recorder, "127.0.0.1", port, mesh.edge.client)
        sent = b"".join(f"packet {i};".encode() for i in range(500))
        for i in range(500):
            transport.write(f"packet {i};".encode())
        await client.until(len(sent))
        peers = peer_of(transport), peer_of(served[0].transport)
        transport.close()
        await served[0].lost.wait()
        server.close()
        await server.wait_closed()
        return bytes(client.received) == sent, *peers

    same, middle, edge = run(scenario)
    assert same
    assert middle == Peer("m1", "middle")
    assert edge == Peer("e1", "edge")


def test_a_bulk_transfer_to_a_slow_reader_pauses_the_writer_and_arrives_intact(
    mesh: Mesh,
) -> None:
    """A writer far ahead of its reader is paused, resumed, and every byte arrives in order."""
    payload = os.urandom(8 * 1024 * 1024)

    async def scenario() -> tuple[int, bool, bytes]:
        served = Served()
        server, port = await serve(mesh, served)
        transport, client = await tlslayer.connect(Recorder, "127.0.0.1", port, mesh.edge.client)
        await served.first()
        served[0].transport.pause_reading()  # type: ignore[union-attr]
        for offset in range(0, len(payload), 256 * 1024):
            transport.write(payload[offset : offset + 256 * 1024])
        buffered = transport.get_write_buffer_size()
        served[0].transport.resume_reading()  # type: ignore[union-attr]
        await served[0].until(len(payload))
        await asyncio.wait_for(client.resumed.wait(), 10)
        transport.close()
        server.close()
        return client.paused, buffered > 0, hashlib.sha256(served[0].received).digest()

    paused, buffered, digest = run(scenario)
    assert paused == 1
    assert buffered
    assert digest == hashlib.sha256(payload).digest()


def test_close_sends_what_is_buffered_then_the_peer_sees_eof(mesh: Mesh) -> None:
    """close() right after a large write still delivers all of it, then the peer's EOF."""
    payload = os.urandom(4 * 1024 * 1024)

    async def scenario() -> tuple[bool, bool]:
        served = Served()
        server, port = await serve(mesh, served)
        transport, client = await tlslayer.connect(Recorder, "127.0.0.1", port, mesh.edge.client)
        transport.write(payload)
        transport.close()
        transport.write(b"after close: dropped")
        await asyncio.wait_for((await served.first()).lost.wait(), 10)
        await client.lost.wait()
        server.close()
        return bytes(served[0].received) == payload, served[0].eof.is_set()

    whole, eof = run(scenario)
    assert whole
    assert eof


def test_abort_ends_both_sides_and_leaves_no_descriptor(mesh: Mesh) -> None:
    """An aborted connection is lost on both sides and every descriptor is closed."""

    async def scenario() -> tuple[int, int]:
        served = Served()
        server, port = await serve(mesh, served, echo=True)
        before = -1
        for i in range(21):
            if i == 1:  # the loop's own descriptors exist from the first connection on
                before = open_fds()
            transport, client = await tlslayer.connect(
                Recorder, "127.0.0.1", port, mesh.edge.client
            )
            transport.write(b"ping")
            await client.until(4)
            transport.abort()
            await client.lost.wait()
            await served[-1].lost.wait()
        after = open_fds()
        server.close()
        return before, after

    before, after = run(scenario)
    assert after == before


@pytest.mark.parametrize(
    ("peer", "reason"),
    [
        ("foreign CA", "certificate not trusted"),
        ("no certificate", "no certificate"),
        ("plaintext", "not tls"),
        ("silent", "handshake timeout"),
        ("gone", None),
    ],
)
def test_a_failed_handshake_is_counted_by_reason_and_the_port_serves_on(
    mesh: Mesh, tmp_path: Path, peer: str, reason: str | None
) -> None:
    """Each kind of bad peer is refused with its reason (a peer that only went away is not
    counted), and a good peer is served right after."""
    pki.init_ca(tmp_path / "foreign", "some other CA")
    foreign = pki.issue(tmp_path / "foreign", "e9", "edge")

    async def bad_peer(port: int) -> None:
        loop = asyncio.get_running_loop()
        if peer in ("foreign CA", "no certificate"):
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            if peer == "foreign CA":
                context.load_cert_chain(foreign.cert, foreign.key)
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
            await reader.read()  # TLS 1.3: the refusal arrives after our Finished
            writer.close()
            return
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        if peer == "plaintext":
            await loop.sock_sendall(sock, b"GET / HTTP/1.0\r\n\r\n" + b"x" * 200)
        if peer != "gone":
            await loop.sock_recv(sock, 100)  # until the middle gives up on us
        sock.close()

    async def scenario() -> tuple[list[str], bool]:
        served = Served()
        server, port = await serve(mesh, served, echo=True, timeout_s=0.3)
        with contextlib.suppress(OSError):  # ssl.SSLError is one
            await bad_peer(port)
        if reason is not None:
            await asyncio.wait_for(mesh.refusal.wait(), 10)
        transport, client = await tlslayer.connect(Recorder, "127.0.0.1", port, mesh.edge.client)
        transport.write(b"still here")
        await client.until(10)
        transport.close()
        server.close()
        await server.wait_closed()
        return mesh.refused, len(served) == 1

    refused, served_one = run(scenario)
    assert refused == ([reason] if reason else [])
    assert served_one


def test_a_closed_connection_holds_no_openssl_state_until_a_collection(mesh: Mesh) -> None:
    """OpenSSL's objects go when a connection is lost, even while the protocol on it and
    the transport still reference each other (as a pump's halves do) and no collection
    runs."""

    class Cyclic(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.lost = asyncio.Event()

        def connection_lost(self, exc: Exception | None) -> None:
            self.lost.set()

    async def scenario() -> int:
        served = Served()
        server, port = await serve(mesh, served)
        for _ in range(50):
            transport, protocol = await tlslayer.connect(
                Cyclic, "127.0.0.1", port, mesh.edge.client
            )
            transport.close()
            await protocol.lost.wait()
            await served[-1].lost.wait()
        server.close()
        return sum(isinstance(o, ssl.SSLObject) for o in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        alive = run(scenario)
    finally:
        gc.enable()
    assert alive == 0
