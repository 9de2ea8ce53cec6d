"""The floor of a Python hop: a bare uvloop TCP relay, nothing but bytes copied both ways.

    python -m bench.relay LISTEN_PORT UPSTREAM_PORT

Two asyncio Protocols per connection, ``data_received`` writing to the other transport,
backpressure by pausing the other side; no parsing, no routing, no checks, no counters.
What a Python proxy costs per query beyond this is its own doing.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

UPSTREAM = ("127.0.0.1", 0)


class Half(asyncio.Protocol):
    """One side of a relayed connection; ``client`` is None on the client's own side."""

    def __init__(self, client: Half | None = None) -> None:
        self.peer = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.peer is None:  # a client: hold its bytes until its upstream is connected
            self.transport.pause_reading()  # type: ignore[union-attr]
            asyncio.get_running_loop().create_task(self.connect())
        elif self.peer.transport is None or self.peer.transport.is_closing():
            transport.close()  # the client left while we connected
        else:
            self.peer.peer = self
            self.peer.transport.resume_reading()

    async def connect(self) -> None:
        try:
            await asyncio.get_running_loop().create_connection(lambda: Half(self), *UPSTREAM)
        except OSError:
            assert self.transport is not None
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)  # type: ignore[union-attr]

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Half, "127.0.0.1", port)
    await server.serve_forever()


if __name__ == "__main__":
    UPSTREAM = ("127.0.0.1", int(sys.argv[2]))
    uvloop.run(serve(int(sys.argv[1])))
