"""Our stream protocols, as the event loop sees them.

The data plane's protocols (client sessions, backend connections, the pump's halves, the
listener's first reader) do not inherit ``asyncio.Protocol``: mypyc makes a class native
(attributes in a C struct, methods called directly) only when every base is native, and
``asyncio.Protocol`` is not. The loop needs no base class; it calls the methods below by
name. These casts say so to the type checker where our protocols meet asyncio's API. This
module stays interpreted: a cast in compiled code would be checked at run time.
"""

from __future__ import annotations

import asyncio
import typing
from collections.abc import Callable


class StreamProtocol(typing.Protocol):
    """What the loop calls on a stream's protocol."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...

    def data_received(self, data: bytes) -> None: ...

    def eof_received(self) -> bool | None: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...


def for_loop(protocol: StreamProtocol) -> asyncio.Protocol:
    """``protocol`` typed as asyncio's API wants it."""
    return typing.cast("asyncio.Protocol", protocol)


def factory_for_loop(factory: Callable[[], StreamProtocol]) -> Callable[[], asyncio.Protocol]:
    """A protocol factory typed as ``create_server`` and ``create_connection`` want it.
    (The type is a string: subscribing ``Callable`` builds an object on every call, and
    this runs for every connection made.)"""
    return typing.cast("Callable[[], asyncio.Protocol]", factory)
