"""MySQL packet framing, length-encoded values, and the OK, ERR and EOF packets."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.mysql.constants import MAX_PAYLOAD, Status
from meshproxy.mysql.packets import (
    Err,
    Framer,
    Ok,
    Packet,
    PacketTooLarge,
    eof_payload,
    err_payload,
    error_packet,
    frame,
    lenenc,
    lenenc_bytes,
    ok_payload,
    parse_eof_status,
    parse_err,
    parse_ok,
    read_lenenc,
    read_lenenc_bytes,
    read_nul,
)

BIG = 1 << 26  # a Framer limit no test payload reaches


def headers(wire: bytes) -> list[tuple[int, int]]:
    """The (length, sequence id) of every packet on ``wire``, walking the headers."""
    out = []
    pos = 0
    while pos < len(wire):
        length = int.from_bytes(wire[pos : pos + 3], "little")
        out.append((length, wire[pos + 3]))
        pos += 4 + length
    assert pos == len(wire)
    return out


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the (sorted, deduplicated) offsets ``cuts``."""
    points = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


# ----------------------------------------------------------------- frame and Framer


@pytest.mark.parametrize(
    ("size", "parts"),
    [
        (0, [0]),
        (1, [1]),
        (MAX_PAYLOAD - 1, [MAX_PAYLOAD - 1]),
        (MAX_PAYLOAD, [MAX_PAYLOAD, 0]),
        (MAX_PAYLOAD + 5, [MAX_PAYLOAD, 5]),
    ],
)
def test_frame_round_trips_through_the_framer(size: int, parts: list[int]) -> None:
    """A payload of any size frames into the right parts and the Framer joins them back."""
    payload = bytes(i & 0xFF for i in range(256)) * (size // 256) + b"\x5a" * (size % 256)
    wire = frame(7, payload)
    assert headers(wire) == [(n, 7 + i) for i, n in enumerate(parts)]
    framer = Framer(BIG)
    assert framer.feed(wire) == [Packet(7, payload, 7 + len(parts) - 1)]
    assert framer.pending() == 0


def test_frame_wraps_the_sequence_id() -> None:
    """Sequence ids are one byte: a long payload framed from 255 continues at 0."""
    wire = frame(255, b"x" * (MAX_PAYLOAD + 1))
    assert headers(wire) == [(MAX_PAYLOAD, 255), (1, 0)]
    assert frame(256, b"")[3] == 0
    [packet] = Framer(BIG).feed(wire)
    assert (packet.seq, packet.last_seq) == (255, 0)


def test_framer_joins_a_long_payload_fed_in_pieces() -> None:
    """A continued payload cut inside headers and payloads still comes out whole, once."""
    payload = b"\xfe" + b"r" * (MAX_PAYLOAD + 9)
    wire = frame(3, payload) + frame(5, b"next")
    cuts = [2, 4, 100, MAX_PAYLOAD + 3, MAX_PAYLOAD + 5, MAX_PAYLOAD + 4 + 2, len(wire) - 3]
    framer = Framer(BIG)
    out: list[Packet] = []
    for piece in chunked(wire, cuts):
        out += framer.feed(piece)
    assert out == [Packet(3, payload, 4), Packet(5, b"next", 5)]
    assert framer.pending() == 0


def test_framer_holds_partial_packets() -> None:
    """Bytes of an incomplete packet are kept (and counted) until the rest arrives."""
    framer = Framer(BIG)
    assert framer.feed(b"\x05\x00") == []
    assert framer.pending() == 2
    assert framer.feed(b"\x00\x09abc") == []
    assert framer.pending() == 7
    assert framer.feed(b"de\x00\x00\x00\x0a") == [Packet(9, b"abcde", 9), Packet(10, b"", 10)]
    assert framer.pending() == 0


def test_framer_refuses_a_packet_over_its_limit_before_it_arrives() -> None:
    """A declared length past max_payload raises as soon as the header is in."""
    framer = Framer(100)
    assert framer.feed(frame(0, b"x" * 100)) == [Packet(0, b"x" * 100, 0)]
    with pytest.raises(PacketTooLarge):
        framer.feed(b"\x65\x00\x00\x01")  # 101 bytes declared, none sent


def test_framer_counts_continuations_against_its_limit() -> None:
    """The parts of a long payload add up toward the limit."""
    framer = Framer(MAX_PAYLOAD + 4)
    wire = frame(0, b"y" * (MAX_PAYLOAD + 5))
    with pytest.raises(PacketTooLarge):
        framer.feed(wire)
    assert Framer(MAX_PAYLOAD + 5).feed(wire) == [Packet(0, b"y" * (MAX_PAYLOAD + 5), 1)]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), limit=st.integers(min_value=0, max_value=300))
def test_framer_never_raises_on_arbitrary_bytes(data: bytes, limit: int) -> None:
    """Hostile bytes make the Framer return packets or raise PacketTooLarge, nothing else."""
    framer = Framer(limit)
    try:
        packets = framer.feed(data)
    except PacketTooLarge:
        return
    assert all(len(p.payload) <= limit for p in packets)
    assert sum(4 + len(p.payload) for p in packets) + framer.pending() == len(data)


@settings(max_examples=150, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=12),
)
def test_framer_output_does_not_depend_on_chunking(payloads: list[bytes], cuts: list[int]) -> None:
    """However the stream is cut, the Framer yields the same packets in order."""
    wire = b"".join(frame(i, p) for i, p in enumerate(payloads))
    framer = Framer(BIG)
    out: list[Packet] = []
    for piece in chunked(wire, cuts):
        out += framer.feed(piece)
    assert out == [Packet(i & 0xFF, p, i & 0xFF) for i, p in enumerate(payloads)]
    assert framer.pending() == 0


# ----------------------------------------------------------------- length-encoded values


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 1),
        (250, 1),
        (251, 3),
        (0xFFFF, 3),
        (0x10000, 4),
        (0xFFFFFF, 4),
        (0x1000000, 9),
        (2**64 - 1, 9),
    ],
)
def test_lenenc_boundaries(value: int, size: int) -> None:
    """Each width is used from its first value on, and reads back with the next position."""
    encoded = lenenc(value)
    assert len(encoded) == size
    assert read_lenenc(b"\x01" + encoded + b"\x02", 1) == (value, 1 + size)


@given(value=st.integers(min_value=0, max_value=2**64 - 1))
def test_lenenc_round_trip(value: int) -> None:
    """Any unsigned 64-bit integer survives a length-encoded round trip."""
    encoded = lenenc(value)
    assert read_lenenc(encoded, 0) == (value, len(encoded))


def test_read_lenenc_null_truncated_and_invalid() -> None:
    """0xfb is NULL; a missing or short value and the 0xff prefix give None past the end."""
    assert read_lenenc(b"\xfb\x07", 0) == (None, 1)
    assert read_lenenc(b"", 0) == (None, 1)
    assert read_lenenc(b"\x01", 1) == (None, 2)
    assert read_lenenc(b"\xfc\x01", 0) == (None, 3)
    assert read_lenenc(b"\xfe" + b"\x00" * 7, 0) == (None, 9)
    assert read_lenenc(b"\xff\x00\x00", 0) == (None, 4)


def test_lenenc_bytes_round_trip_and_truncation() -> None:
    """A length-prefixed string reads back; a short one or NULL reads as None."""
    value = b"v" * 300
    wire = lenenc_bytes(value) + b"tail"
    assert read_lenenc_bytes(wire, 0) == (value, 303)
    assert read_lenenc_bytes(wire[:100], 0)[0] is None
    assert read_lenenc_bytes(b"\xfb", 0) == (None, 1)
    assert read_lenenc_bytes(b"\x00", 0) == (b"", 1)


def test_read_nul() -> None:
    """A NUL-terminated string reads up to its NUL; without one it is None."""
    assert read_nul(b"ab\x00cd\x00", 0) == (b"ab", 3)
    assert read_nul(b"ab\x00cd\x00", 3) == (b"cd", 6)
    assert read_nul(b"abc", 0) == (None, 4)


@given(data=st.binary(max_size=40), pos=st.integers(min_value=0, max_value=45))
def test_readers_never_raise(data: bytes, pos: int) -> None:
    """The value readers return None for anything they cannot read, never an exception."""
    read_lenenc(data, pos)
    read_lenenc_bytes(data, pos)
    read_nul(data, pos)


# ----------------------------------------------------------------- OK, ERR, EOF


@given(
    status=st.integers(min_value=0, max_value=0xFFFF),
    affected=st.integers(min_value=0, max_value=2**64 - 1),
    insert_id=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_ok_round_trip(status: int, affected: int, insert_id: int) -> None:
    """An OK payload parses back to its values, also in its 0xfe form."""
    payload = ok_payload(status, affected, insert_id)
    assert parse_ok(payload) == Ok(affected, insert_id, status, 0)
    assert parse_ok(b"\xfe" + payload[1:] + b"info") == Ok(affected, insert_id, status, 0)


def test_parse_ok_reads_warnings_and_refuses_others() -> None:
    """Warnings are read; truncated, NULL-valued or non-OK payloads are None."""
    assert parse_ok(b"\x00\x01\x02\x02\x00\x03\x00") == Ok(1, 2, 2, 3)
    assert parse_ok(b"\x00\x01\x02\x02\x00\x03") is None
    assert parse_ok(b"\x00\xfb\x00\x02\x00\x00\x00") is None
    assert parse_ok(b"\xff\x00\x00\x02\x00\x00\x00") is None
    assert parse_ok(b"") is None


def test_eof_round_trip() -> None:
    """An EOF payload gives back its status; anything but a 5-byte 0xfe packet is None."""
    status = Status.AUTOCOMMIT | Status.MORE_RESULTS_EXISTS
    assert parse_eof_status(eof_payload(status)) == status
    assert parse_eof_status(eof_payload(status) + b"\x00") is None
    assert parse_eof_status(b"\x00" + eof_payload(status)[1:]) is None


def test_err_round_trip() -> None:
    """An ERR payload gives back its code, SQL state and message."""
    payload = err_payload(1146, "Table 'x.y' doesn't exist", "42S02")
    assert parse_err(payload) == Err(1146, "42S02", "Table 'x.y' doesn't exist")


def test_err_without_sql_state() -> None:
    """An ERR without the '#' marker (as before the handshake) gets state HY000."""
    assert parse_err(b"\xff\x10\x04Too many connections") == Err(
        1040, "HY000", "Too many connections"
    )
    assert parse_err(b"\xff\x10\x04") == Err(1040, "HY000", "")
    assert parse_err(b"\xff\x10") is None
    assert parse_err(b"\x00\x10\x04") is None


def test_err_payload_bounds_the_message() -> None:
    """A huge message is cut to 1024 bytes."""
    payload = err_payload(1064, "m" * 5000)
    assert len(payload) == 9 + 1024


def test_error_packet_pre_handshake_and_regular() -> None:
    """Without a SQL state the ERR has no '#' marker; with one it is the regular form."""
    early = error_packet(1040, "Too many connections")
    assert early == frame(0, b"\xff\x10\x04Too many connections")
    late = error_packet(1045, "Access denied", seq=2, sql_state="28000")
    assert late[3] == 2
    assert parse_err(late[4:]) == Err(1045, "28000", "Access denied")


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=64))
def test_small_packet_parsers_never_raise(payload: bytes) -> None:
    """parse_ok, parse_err and parse_eof_status accept any bytes without raising."""
    ok = parse_ok(payload)
    err = parse_err(payload)
    eof = parse_eof_status(payload)
    assert ok is None or payload[0] in (0x00, 0xFE)
    assert err is None or payload[0] == 0xFF
    assert eof is None or len(payload) == 5
