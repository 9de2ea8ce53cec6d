"""Reading a mesh hop's peer certificate over real loopback TLS, as both ends of a hop do:
what it leaves behind in the interpreter.

No certificate key is spelled out in this module: a string constant here would itself keep
that key interned, and the test would pass without the fix.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import uvloop

from meshproxy.dataplane import tlslayer
from meshproxy.security import pki
from meshproxy.security.meshtls import MeshTls, Peer, peer_of


class Held(asyncio.Protocol):
    """Keeps the connection a mesh port started, and says when it was started."""

    def __init__(self, started: asyncio.Future[asyncio.Transport]) -> None:
        self.started = started

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.started.set_result(transport)  # type: ignore[arg-type]


def node(root: Path, name: str, role: str) -> MeshTls:
    files = pki.issue(root, name, role)
    return MeshTls(str(root / pki.CA_CERT), str(files.cert), str(files.key), lambda *_: None)


def test_reading_a_peer_leaves_its_certificate_keys_interned(tmp_path: Path) -> None:
    """Once a hop's peer is read and its decoded certificate is gone, every key of that
    certificate is still interned, so no hop adds strings to the interned table or removes
    them again."""
    root = tmp_path / "ca"
    pki.init_ca(root)
    middle, edge = node(root, "m1", "middle"), node(root, "e1", "edge")

    async def scenario() -> tuple[Peer | None, Peer | None, list[str]]:
        loop = asyncio.get_running_loop()
        started: asyncio.Future[asyncio.Transport] = loop.create_future()
        server = await loop.create_server(
            tlslayer.accepting(lambda: Held(started), middle, 5.0), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        transport, _ = await tlslayer.connect(asyncio.Protocol, "127.0.0.1", port, edge.client)
        accepted = await started
        peers = peer_of(transport), peer_of(accepted)
        # Copies of the key names: nothing in this test holds the interned keys themselves.
        names = ["".join(list(key)) for key in accepted.get_extra_info("peercert")]
        transport.close()
        accepted.close()
        server.close()
        await server.wait_closed()
        return *peers, names

    as_edge, as_middle, names = uvloop.run(asyncio.wait_for(scenario(), 30))
    assert as_edge == Peer("m1", "middle")
    assert as_middle == Peer("e1", "edge")
    assert len(names) >= 6
    # The decoded dicts are gone: a key held by nothing would have left the table with them,
    # and interning a copy of its name would then return that very copy.
    dropped = [name for name in names if sys.intern(name) is name]
    assert dropped == []
