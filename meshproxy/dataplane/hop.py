"""The mesh hop header: the first bytes of every connection between two mesh nodes.

Wire format::

    b"MSHP"  version:u8  length:u16be  msgpack map {"s": service, "c": client, "h": hops}

and ``"p": true`` on a connection a session-mode edge keeps in its pool (it carries the
statements of many clients, logged in as their backend users; older readers ignore it).

The fixed prefix lets a receiver refuse a stray client (or a port scanner) after seven
bytes instead of waiting for a length it will never get; the length bounds what we read
before deciding. ``HopDecoder.feed`` never raises: hostile input becomes a ``Rejected``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgpack

MAGIC = b"MSHP"
VERSION = 1
MAX_BODY = 512
_PREFIX = struct.Struct("!4sBH")
PREFIX_LEN = _PREFIX.size


@dataclass(frozen=True, slots=True)
class HopHeader:
    service: str
    client: str
    hops: int
    pooled: bool = False

    def encode(self) -> bytes:
        fields: dict[str, object] = {"s": self.service, "c": self.client, "h": self.hops}
        if self.pooled:
            fields["p"] = True
        body: bytes = msgpack.packb(fields)
        if len(body) > MAX_BODY:
            raise ValueError(f"hop header body of {len(body)} bytes exceeds {MAX_BODY}")
        return _PREFIX.pack(MAGIC, VERSION, len(body)) + body

    def next_hop(self) -> HopHeader:
        return HopHeader(self.service, self.client, self.hops + 1)


@dataclass(frozen=True, slots=True)
class Decoded:
    header: HopHeader
    rest: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str


class HopDecoder:
    """Accumulates bytes until a whole header is read or the input is refused."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    @property
    def empty(self) -> bool:
        return not self._buffer

    def feed(self, data: bytes) -> Decoded | Rejected | None:
        """Return the header and any bytes after it, a rejection, or None for 'need more'."""
        buffer = self._buffer + data
        self._buffer = buffer
        if len(buffer) < PREFIX_LEN:
            if not MAGIC.startswith(buffer[: len(MAGIC)]):
                return Rejected("bad magic: not a meshproxy hop")
            return None
        magic, version, length = _PREFIX.unpack_from(buffer)
        if magic != MAGIC:
            return Rejected("bad magic: not a meshproxy hop")
        if version != VERSION:
            return Rejected(f"unknown hop header version {version}")
        if length > MAX_BODY:
            return Rejected(f"hop header of {length} bytes exceeds {MAX_BODY}")
        end = PREFIX_LEN + length
        if len(buffer) < end:
            return None
        self._buffer = b""
        return _decode_body(buffer[PREFIX_LEN:end], buffer[end:])


def _decode_body(body: bytes, rest: bytes) -> Decoded | Rejected:
    try:
        fields = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:
        return Rejected(f"hop header body is not msgpack: {type(exc).__name__}")
    if not isinstance(fields, dict):
        return Rejected("hop header body is not a map")
    service, client, hops = fields.get("s"), fields.get("c"), fields.get("h")
    if not isinstance(service, str) or not service:
        return Rejected("hop header has no service")
    if not isinstance(client, str):
        return Rejected("hop header has no client address")
    if not isinstance(hops, int) or isinstance(hops, bool) or hops < 1:
        return Rejected("hop header has no valid hop count")
    return Decoded(HopHeader(service, client, hops, fields.get("p") is True), rest)
