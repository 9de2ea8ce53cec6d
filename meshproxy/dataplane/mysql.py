"""The one piece of the MySQL protocol a proxy that never parses traffic still needs.

When no upstream can be reached, or a listener is full, the client has not received a
server greeting yet. MySQL servers answer such a client with an ERR packet in place of the
greeting (that is how "Too many connections" arrives), and every client library shows its
message. We do the same, so an application sees why instead of a bare "Lost connection".
"""

from __future__ import annotations

import struct

ER_CON_COUNT_ERROR = 1040  # "Too many connections", as a MySQL server says it
ER_PROXY_NO_UPSTREAM = 9001  # the code ProxySQL uses when no backend could be reached


def error_packet(code: int, message: str) -> bytes:
    """An ERR packet with sequence id 0, in the pre-handshake form (no SQL state)."""
    payload = b"\xff" + struct.pack("<H", code) + message.encode("utf-8", "replace")[:1024]
    return struct.pack("<I", len(payload))[:3] + b"\x00" + payload
