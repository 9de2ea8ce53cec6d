"""Packet framing and the small packets every exchange uses (OK, ERR, EOF).

A packet is a 3-byte little-endian payload length, a sequence id and the payload; a payload
of 2**24-1 bytes or more is split into full packets followed by a shorter one (maybe
empty). Decoders here never raise on hostile bytes: they return ``None`` or a
``Malformed`` value, and callers decide what the peer is told.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from meshproxy.mysql.constants import MAX_PAYLOAD


def u16(data: bytes, pos: int) -> int:
    """The little-endian 2-byte int at ``pos`` (byte arithmetic: mypyc compiles it to C,
    where ``struct.unpack_from`` is a module lookup and a call per field)."""
    return data[pos] | data[pos + 1] << 8


def u32(data: bytes, pos: int) -> int:
    """The little-endian 4-byte int at ``pos`` (see ``u16``)."""
    return data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16 | data[pos + 3] << 24


# A packet header as one little-endian int: the length below, the sequence id on top. (One
# pack, where to_bytes and bytes((seq,)) are a call and an object each.)
_HEADER: Final = struct.Struct("<I")


def frame(seq: int, payload: bytes) -> bytes:
    """``payload`` as one or more packets starting at sequence id ``seq``."""
    if len(payload) < MAX_PAYLOAD:
        return _HEADER.pack(len(payload) | (seq & 0xFF) << 24) + payload
    parts = []
    view = memoryview(payload)
    while True:
        chunk = view[:MAX_PAYLOAD]
        parts.append(len(chunk).to_bytes(3, "little") + bytes((seq & 0xFF,)))
        parts.append(bytes(chunk))
        seq += 1
        view = view[MAX_PAYLOAD:]
        if len(chunk) < MAX_PAYLOAD:
            return b"".join(parts)


class Packet:
    """One logical packet: the sequence id of its first part and the joined payload.

    A plain class, and never changed once made: one is made per packet, and mypyc builds
    this one in C, where a frozen dataclass or a NamedTuple runs Python code to build it.
    """

    def __init__(self, seq: int, payload: bytes, last_seq: int) -> None:
        self.seq = seq
        self.payload = payload
        self.last_seq = last_seq  # of its last part (the exchange's next packet is +1)

    def _fields(self) -> tuple[int, bytes, int]:
        return self.seq, self.payload, self.last_seq

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Packet) and self._fields() == other._fields()

    def __repr__(self) -> str:
        return f"Packet{self._fields()}"


class PacketTooLarge(Exception):
    """A peer's logical packet exceeds the limit this reader was given."""


class Framer:
    """Splits a byte stream into logical packets, joining the parts of long payloads.

    ``max_payload`` bounds what one packet may make us hold; ``feed`` raises
    PacketTooLarge past it (the caller answers with an ERR and closes that session).
    """

    __slots__ = ("_buf", "_first_seq", "_parts", "_parts_len", "max_payload")

    def __init__(self, max_payload: int) -> None:
        self._buf = bytearray()
        self._parts: list[bytes] = []
        self._parts_len = 0
        self._first_seq = 0
        self.max_payload = max_payload

    def pending(self) -> int:
        """Bytes held for packets not complete yet."""
        return len(self._buf) + self._parts_len

    def take_unread(self) -> bytes:
        """The bytes held past the last whole packet, handed back (the stream changes hands:
        after an SSLRequest they are the start of the client's TLS handshake)."""
        unread = bytes(self._buf) + b"".join(self._parts)
        self._buf.clear()
        self._parts.clear()
        self._parts_len = 0
        return unread

    def feed(self, data: bytes) -> list[Packet]:
        buf = self._buf
        if not buf and not self._parts and len(data) >= 4:
            # The common case, one whole command in one read: no buffer copies.
            length = data[0] | data[1] << 8 | data[2] << 16
            if length + 4 == len(data) and length < MAX_PAYLOAD:
                if length > self.max_payload:
                    raise PacketTooLarge(length)
                return [Packet(data[3], data[4:], data[3])]
        buf += data
        out: list[Packet] = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            length = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
            seq = buf[pos + 3]
            if self._parts_len + length > self.max_payload:
                raise PacketTooLarge(self._parts_len + length)
            if end - pos - 4 < length:
                break
            payload = bytes(buf[pos + 4 : pos + 4 + length])
            pos += 4 + length
            if length == MAX_PAYLOAD:
                if not self._parts:
                    self._first_seq = seq
                self._parts.append(payload)
                self._parts_len += length
                continue
            if self._parts:
                self._parts.append(payload)
                payload = b"".join(self._parts)
                out.append(Packet(self._first_seq, payload, seq))
                self._parts.clear()
                self._parts_len = 0
            else:
                out.append(Packet(seq, payload, seq))
        del buf[:pos]
        return out


# ----------------------------------------------------------------- length-encoded values


def read_lenenc(data: bytes, pos: int) -> tuple[int | None, int]:
    """A length-encoded integer at ``pos``: (value, next position); value None for NULL
    (0xfb) or when the bytes run out (next position is then past the end)."""
    if pos >= len(data):
        return None, len(data) + 1
    first = data[pos]
    if first < 0xFB:
        return first, pos + 1
    if first == 0xFB:
        return None, pos + 1
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first)
    if size is None or pos + 1 + size > len(data):
        return None, len(data) + 1
    return int.from_bytes(data[pos + 1 : pos + 1 + size], "little"), pos + 1 + size


def lenenc(value: int) -> bytes:
    if value < 0xFB:
        return bytes((value,))
    if value < 1 << 16:
        return b"\xfc" + value.to_bytes(2, "little")
    if value < 1 << 24:
        return b"\xfd" + value.to_bytes(3, "little")
    return b"\xfe" + value.to_bytes(8, "little")


def lenenc_bytes(value: bytes) -> bytes:
    return lenenc(len(value)) + value


def read_lenenc_bytes(data: bytes, pos: int) -> tuple[bytes | None, int]:
    length, pos = read_lenenc(data, pos)
    if length is None or pos + length > len(data):
        return None, pos if length is None else len(data) + 1
    return data[pos : pos + length], pos + length


def read_nul(data: bytes, pos: int) -> tuple[bytes | None, int]:
    """A NUL-terminated string at ``pos`` (None when there is no NUL)."""
    end = data.find(b"\x00", pos)
    if end < 0:
        return None, len(data) + 1
    return data[pos:end], end + 1


# ----------------------------------------------------------------- OK, ERR, EOF


class Ok:
    """An OK packet's numbers (a plain class, as ``Packet``: one is read per statement)."""

    def __init__(self, affected_rows: int, last_insert_id: int, status: int, warnings: int) -> None:
        self.affected_rows = affected_rows
        self.last_insert_id = last_insert_id
        self.status = status
        self.warnings = warnings

    def _fields(self) -> tuple[int, int, int, int]:
        return self.affected_rows, self.last_insert_id, self.status, self.warnings

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ok) and self._fields() == other._fields()

    def __repr__(self) -> str:
        return f"Ok{self._fields()}"


@dataclass(frozen=True, slots=True)
class Err:
    code: int
    sql_state: str
    message: str


def parse_ok(payload: bytes) -> Ok | None:
    """An OK packet (0x00, or 0xfe ending a result set with DEPRECATE_EOF), or None."""
    if not payload or payload[0] not in (0x00, 0xFE):
        return None
    affected, pos = read_lenenc(payload, 1)
    insert_id, pos = read_lenenc(payload, pos)
    if affected is None or insert_id is None or pos + 4 > len(payload):
        return None
    return Ok(affected, insert_id, u16(payload, pos), u16(payload, pos + 2))


def parse_eof_status(payload: bytes) -> int | None:
    """The status flags of an EOF packet, or None if it is not one."""
    if len(payload) == 5 and payload[0] == 0xFE:
        return u16(payload, 3)
    return None


def parse_err(payload: bytes) -> Err | None:
    if len(payload) < 3 or payload[0] != 0xFF:
        return None
    code = int(struct.unpack_from("<H", payload, 1)[0])
    if len(payload) >= 9 and payload[3:4] == b"#":
        state, message = payload[4:9], payload[9:]
    else:
        state, message = b"HY000", payload[3:]
    return Err(code, state.decode("ascii", "replace"), message.decode("utf-8", "replace"))


def ok_payload(status: int, affected_rows: int = 0, last_insert_id: int = 0) -> bytes:
    return b"\x00" + lenenc(affected_rows) + lenenc(last_insert_id) + struct.pack("<HH", status, 0)


def err_payload(code: int, message: str, sql_state: str = "HY000") -> bytes:
    text = message.encode("utf-8", "replace")[:1024]
    return b"\xff" + struct.pack("<H", code) + b"#" + sql_state.encode("ascii")[:5] + text


def eof_payload(status: int) -> bytes:
    return b"\xfe\x00\x00" + struct.pack("<H", status)


def error_packet(code: int, message: str, seq: int = 0, sql_state: str | None = None) -> bytes:
    """An ERR packet; without ``sql_state`` in the pre-handshake form (no SQL state marker),
    which is how a server refuses a client before its greeting."""
    if sql_state is None:
        text = message.encode("utf-8", "replace")[:1024]
        return frame(seq, b"\xff" + struct.pack("<H", code) + text)
    return frame(seq, err_payload(code, message, sql_state))
