"""The mesh hop header: round trips, incremental decoding, and refusal of hostile input."""

from __future__ import annotations

import itertools
import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshproxy.dataplane.hop import (
    MAGIC,
    MAX_BODY,
    PREFIX_LEN,
    VERSION,
    Decoded,
    HopDecoder,
    HopHeader,
    Rejected,
)

HEADER = HopHeader(service="mysql", client="10.1.2.3:51234", hops=1)


def frame(body: bytes, *, magic: bytes = MAGIC, version: int = VERSION) -> bytes:
    """A hop header on the wire with an arbitrary body."""
    return struct.pack("!4sBH", magic, version, len(body)) + body


def packed(value: object) -> bytes:
    body: bytes = msgpack.packb(value)
    return body


def feed_all(data: bytes) -> Decoded | Rejected | None:
    return HopDecoder().feed(data)


def rejection(data: bytes) -> str:
    result = feed_all(data)
    assert isinstance(result, Rejected), result
    return result.reason


def test_round_trip() -> None:
    """An encoded header decodes to an equal header with nothing left over."""
    assert feed_all(HEADER.encode()) == Decoded(HEADER, b"")


@given(
    service=st.text(min_size=1, max_size=40),
    client=st.text(max_size=60),
    hops=st.integers(min_value=1, max_value=2**32),
)
def test_round_trip_any_fields(service: str, client: str, hops: int) -> None:
    """Any header with a non-empty service and a positive hop count survives a round trip."""
    header = HopHeader(service, client, hops)
    assert feed_all(header.encode()) == Decoded(header, b"")


def test_a_pooled_connection_says_so_and_plain_headers_stay_as_they_were() -> None:
    """A session-mode edge's pooled connection carries ``"p": true``; a header without it
    encodes exactly as before (older readers ignore the key) and decodes as not pooled."""
    pooled = HopHeader("mysql", "p1", 1, pooled=True)
    assert feed_all(pooled.encode()) == Decoded(pooled, b"")
    plain = HopHeader("mysql", "p1", 1)
    assert b"p" not in plain.encode()[7:].replace(b"p1", b"")
    assert feed_all(plain.encode()) == Decoded(plain, b"")


def test_next_hop_increments_only_the_count() -> None:
    """next_hop keeps the service and client and adds one to the hop count."""
    assert HEADER.next_hop() == HopHeader("mysql", "10.1.2.3:51234", 2)


def test_encode_refuses_an_oversized_body() -> None:
    """The sender refuses to write a header the receiver would reject as oversized."""
    with pytest.raises(ValueError, match="exceeds"):
        HopHeader("s" * (MAX_BODY + 1), "", 1).encode()


def test_decoding_byte_by_byte() -> None:
    """Fed one byte at a time, the decoder asks for more until the last byte, then decodes."""
    decoder = HopDecoder()
    wire = HEADER.encode()
    for i in range(len(wire) - 1):
        assert decoder.feed(wire[i : i + 1]) is None
    assert decoder.feed(wire[-1:]) == Decoded(HEADER, b"")
    assert decoder.empty


def test_bytes_after_the_header_are_returned_in_rest() -> None:
    """Bytes that follow the header in the same read are handed back untouched."""
    payload = b"\x0a\x00\x00\x00\x0amysql handshake"
    assert feed_all(HEADER.encode() + payload) == Decoded(HEADER, payload)


def test_rest_when_payload_arrives_with_the_last_header_byte() -> None:
    """Payload in the chunk that completes a split header is returned in rest."""
    decoder = HopDecoder()
    wire = HEADER.encode()
    assert decoder.feed(wire[:3]) is None
    assert decoder.feed(wire[3:10]) is None
    assert decoder.feed(wire[10:] + b"payload") == Decoded(HEADER, b"payload")


def test_decoder_reads_a_second_header_after_the_first() -> None:
    """After a header is decoded the decoder starts afresh for the next one."""
    decoder = HopDecoder()
    assert decoder.feed(HEADER.encode()) == Decoded(HEADER, b"")
    second = HopHeader("other", "", 3)
    assert decoder.feed(second.encode()) == Decoded(second, b"")


@pytest.mark.parametrize("first", [b"G", b"\x00", b"\x16", b"M\x00", b"MSH\x00"])
def test_bad_magic_is_rejected_before_the_full_prefix(first: bytes) -> None:
    """A stray client (HTTP, a MySQL packet, TLS) is refused as soon as the magic cannot match."""
    assert len(first) < PREFIX_LEN
    result = HopDecoder().feed(first)
    assert isinstance(result, Rejected)
    assert "magic" in result.reason


def test_bad_magic_with_full_prefix_is_rejected() -> None:
    """A full prefix with the wrong magic is refused."""
    assert "magic" in rejection(frame(packed({"s": "x", "c": "", "h": 1}), magic=b"MSHQ"))


@pytest.mark.parametrize(
    "prefix", [b"", b"M", b"MS", b"MSH", b"MSHP", b"MSHP\x01", MAGIC + b"\x01\x00"]
)
def test_partial_prefix_needs_more(prefix: bytes) -> None:
    """A prefix that could still become a valid header asks for more bytes."""
    assert HopDecoder().feed(prefix) is None


@pytest.mark.parametrize("version", [0, VERSION + 1, 255])
def test_unknown_version_is_rejected(version: int) -> None:
    """A header of another version is refused with the version in the reason."""
    body = packed({"s": "mysql", "c": "", "h": 1})
    assert rejection(frame(body, version=version)) == f"unknown hop header version {version}"


@pytest.mark.parametrize("length", [MAX_BODY + 1, 0xFFFF])
def test_oversized_length_is_rejected_without_waiting_for_the_body(length: int) -> None:
    """A declared body longer than the limit is refused from the prefix alone."""
    prefix = struct.pack("!4sBH", MAGIC, VERSION, length)
    assert "exceeds" in rejection(prefix)


def test_body_at_the_size_limit_is_accepted() -> None:
    """A body of exactly the maximum size is still a valid header."""
    fixed = len(packed({"s": "", "c": "", "h": 1}))
    # A str of 256 bytes or more costs three bytes of msgpack framing, two more than ``""``.
    service = "s" * (MAX_BODY - fixed - 2)
    wire = HopHeader(service, "", 1).encode()
    assert len(wire) == PREFIX_LEN + MAX_BODY
    assert feed_all(wire) == Decoded(HopHeader(service, "", 1), b"")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(b"\x92\x01", id="truncated-array"),
        pytest.param(b"\xa5ab", id="truncated-str"),
        pytest.param(packed({"s": "x", "c": "", "h": 1}) + b"\x00", id="extra-data"),
        pytest.param(b"\xdd\xff\xff\xff\xff", id="huge-array-length"),
        pytest.param(b"\x81\x01\x02", id="int-map-key"),
        pytest.param(b"\xd6\xff\x00", id="truncated-timestamp-ext"),
        pytest.param(b"", id="empty"),
    ],
)
def test_body_that_is_not_msgpack_is_rejected(body: bytes) -> None:
    """A body that does not decode as msgpack is refused, never raised."""
    assert "not msgpack" in rejection(frame(body))


@pytest.mark.parametrize("value", [[1, 2, 3], "mysql", 1, None, True])
def test_body_that_is_not_a_map_is_rejected(value: object) -> None:
    """A msgpack body that is not a map is refused."""
    assert rejection(frame(packed(value))) == "hop header body is not a map"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        pytest.param({"c": "", "h": 1}, "no service", id="missing-service"),
        pytest.param({"s": "", "c": "", "h": 1}, "no service", id="empty-service"),
        pytest.param({"s": 5, "c": "", "h": 1}, "no service", id="int-service"),
        pytest.param({"s": b"mysql", "c": "", "h": 1}, "no service", id="bytes-service"),
        pytest.param({"s": "mysql", "h": 1}, "no client", id="missing-client"),
        pytest.param({"s": "mysql", "c": None, "h": 1}, "no client", id="nil-client"),
        pytest.param({"s": "mysql", "c": ""}, "no valid hop count", id="missing-hops"),
        pytest.param({"s": "mysql", "c": "", "h": 0}, "no valid hop count", id="zero-hops"),
        pytest.param({"s": "mysql", "c": "", "h": -1}, "no valid hop count", id="negative-hops"),
        pytest.param({"s": "mysql", "c": "", "h": 1.0}, "no valid hop count", id="float-hops"),
        pytest.param({"s": "mysql", "c": "", "h": "1"}, "no valid hop count", id="str-hops"),
        pytest.param({"s": "mysql", "c": "", "h": True}, "no valid hop count", id="bool-hops"),
    ],
)
def test_missing_or_invalid_field_is_rejected(fields: dict[str, object], reason: str) -> None:
    """A map body with a missing or ill-typed field is refused with a reason naming the field."""
    assert reason in rejection(frame(packed(fields)))


def test_unknown_extra_fields_are_ignored() -> None:
    """Keys a newer sender adds to the map do not break an older receiver."""
    body = packed({"s": "mysql", "c": "c", "h": 2, "x": [1, 2], b"k": None})
    assert feed_all(frame(body)) == Decoded(HopHeader("mysql", "c", 2), b"")


@given(chunks=st.lists(st.binary(max_size=64), max_size=20))
def test_feed_never_raises_on_arbitrary_chunks(chunks: list[bytes]) -> None:
    """Arbitrary bytes in arbitrary chunks only ever yield None, Decoded or Rejected."""
    decoder = HopDecoder()
    for chunk in chunks:
        result = decoder.feed(chunk)
        assert result is None or isinstance(result, Decoded | Rejected)


@given(body=st.binary(max_size=MAX_BODY), cuts=st.lists(st.integers(0, MAX_BODY + 16)))
def test_feed_never_raises_on_arbitrary_bodies_behind_a_valid_prefix(
    body: bytes, cuts: list[int]
) -> None:
    """Random bodies behind a valid prefix, cut anywhere, only yield None, Decoded or Rejected."""
    wire = frame(body) + b"tail"
    bounds = sorted({0, len(wire), *(c for c in cuts if c < len(wire))})
    decoder = HopDecoder()
    results = [decoder.feed(wire[a:b]) for a, b in itertools.pairwise(bounds)]
    assert all(r is None or isinstance(r, Decoded | Rejected) for r in results)
    assert results[-1] is not None, "a complete frame must be decided"


@given(
    service=st.text(min_size=1, max_size=20),
    hops=st.integers(1, 100),
    rest=st.binary(max_size=32),
    cuts=st.lists(st.integers(0, 80)),
)
def test_any_chunking_of_a_valid_header_decodes_the_same(
    service: str, hops: int, rest: bytes, cuts: list[int]
) -> None:
    """However a valid header and its payload are split, the decoded result is the same."""
    header = HopHeader(service, "127.0.0.1:4000", hops)
    wire = header.encode() + rest
    end = len(header.encode())
    bounds = sorted({0, len(wire), *(c for c in cuts if c < end)})
    decoder = HopDecoder()
    results = [decoder.feed(wire[a:b]) for a, b in itertools.pairwise(bounds)]
    assert results[:-1] == [None] * (len(results) - 1)
    assert results[-1] == Decoded(header, rest)
