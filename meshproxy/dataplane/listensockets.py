"""Where a data plane's listening sockets come from.

A process alone (``--no-angel``) binds its own. A worker asks its angel, which binds each
address once and hands every worker a duplicate of the same socket, so that all of them
accept from one kernel queue (:mod:`meshproxy.runtime.handoff`). Either way the data plane
gets ready, listening sockets and serves them; it never binds a client port itself.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable
from typing import Protocol

from meshproxy.config import Address

SockAddr = tuple[str, int]


class ListenSource(Protocol):
    async def listening(self, address: Address, backlog: int) -> list[socket.socket]:
        """Listening sockets for ``address`` (one per address it resolves to); OSError if not."""

    def keep(self, addresses: Iterable[Address]) -> None:
        """Say which addresses this process serves now; the others may be closed."""


class OwnSockets:
    """A process that binds for itself: it is the only one accepting there."""

    async def listening(self, address: Address, backlog: int) -> list[socket.socket]:
        return bind_listening(address, backlog)

    def keep(self, addresses: Iterable[Address]) -> None:
        pass  # a socket it no longer serves is closed with the server that served it


def resolve(address: Address) -> list[tuple[socket.AddressFamily, SockAddr]]:
    """The addresses to listen on for ``address``: each family's, once (as asyncio's
    ``create_server`` would, so that ``localhost`` serves IPv4 and IPv6 clients)."""
    infos = socket.getaddrinfo(
        address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    found: dict[SockAddr, socket.AddressFamily] = {}
    for family, _, _, _, sockaddr in infos:
        found.setdefault(key_of(sockaddr), family)
    return [(family, sockaddr) for sockaddr, family in found.items()]


def key_of(sockaddr: tuple[object, ...]) -> SockAddr:
    """An IPv4 or IPv6 socket address without IPv6's flow and scope fields."""
    return str(sockaddr[0]), int(sockaddr[1])  # type: ignore[call-overload]


def open_listening(family: socket.AddressFamily, sockaddr: SockAddr, backlog: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # A restarted node rebinds at once despite connections of its last life in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # IPv4 is its own
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bind_listening(
    address: Address, backlog: int, adopted: dict[SockAddr, socket.socket] | None = None
) -> list[socket.socket]:
    """Listen on every address ``address`` resolves to; all of them or none.

    A socket in ``adopted`` (passed by systemd, or by the angel this one took over from)
    that is bound where one is wanted is taken from there instead of binding anew.
    """
    adopted = {} if adopted is None else adopted
    sockets: dict[SockAddr, socket.socket] = {}
    taken: dict[SockAddr, socket.socket] = {}
    try:
        for family, sockaddr in resolve(address):
            sock = adopted.pop(sockaddr, None)
            if sock is None:
                sock = open_listening(family, sockaddr, backlog)
            else:
                taken[sockaddr] = sock
                sock.listen(backlog)
            sockets[sockaddr] = sock
    except OSError:
        adopted.update(taken)  # still someone else's to claim
        for sockaddr, sock in sockets.items():
            if sockaddr not in taken:
                with contextlib.suppress(OSError):
                    sock.close()
        raise
    return list(sockets.values())
