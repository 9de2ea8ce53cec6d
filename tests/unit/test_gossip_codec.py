"""Gossip wire format: round trips, the 1400-byte budget, authentication, replay, fuzzing."""

from __future__ import annotations

import os

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.gossip import wire
from meshproxy.gossip.codec import (
    FLAG_ENCRYPTED,
    MAGIC,
    SYNC_PREFIX_BYTES,
    Codec,
    DecodedPacket,
    DecodedSync,
    Keyring,
    Rejected,
    RejectReason,
)
from meshproxy.gossip.errors import GossipError
from meshproxy.gossip.messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    MemberRecord,
    Message,
    Nack,
    NodeMeta,
    Ping,
    PushPull,
    ServiceHealth,
    State,
    Suspect,
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
NOW = 1_700_000_000.0
META = NodeMeta(
    role="middle",
    tier="mid",
    services=(ServiceHealth("orders", 2, 3, ("b3",)), ServiceHealth("users", 1, 1)),
    active_connections=17,
    draining=True,
)
ALL_MESSAGES: list[Message] = [
    Ping(1, "node-b"),
    IndirectPing(2, "node-c", ("10.0.0.3", 7946), nack=True),
    Ack(3),
    Nack(4),
    Alive("node-a", 5, ("10.0.0.1", 7946), 6, META),
    Suspect("node-c", 7, "node-a"),
    Dead("node-d", 8, "node-d"),
]


def codec(*keys: bytes, window: float = 30.0) -> Codec:
    return Codec(Keyring(keys), replay_window_s=window)


def accepted(result: DecodedPacket | Rejected) -> DecodedPacket:
    assert isinstance(result, DecodedPacket), result
    return result


def rejected(result: object) -> RejectReason:
    assert isinstance(result, Rejected), result
    return result.reason


def test_every_message_type_round_trips_in_one_compound_packet() -> None:
    """All message kinds survive encode/decode in one packet, in order."""
    data = codec(KEY_A).encode_packet(ALL_MESSAGES, NOW)
    result = accepted(codec(KEY_A).decode_packet(data, NOW))
    assert list(result.messages) == ALL_MESSAGES
    assert result.sent_at == pytest.approx(NOW)


def test_push_pull_round_trips_as_a_large_sync_frame() -> None:
    """A push-pull with hundreds of members is one frame, well beyond the UDP packet size."""
    members = tuple(
        MemberRecord(f"node-{i}", ("10.0.0.1", 7000 + i), i, State(i % 4), i, META)
        for i in range(300)
    )
    message = PushPull("node-a", ("10.0.0.1", 7946), join=True, reply=False, members=members)
    frame = codec(KEY_A).encode_sync(message, NOW)
    assert len(frame) > wire.MAX_PACKET_BYTES
    receiver = codec(KEY_A)
    assert receiver.sync_frame_length(frame[:SYNC_PREFIX_BYTES]) == len(frame)
    result = receiver.decode_sync(frame, NOW)
    assert isinstance(result, DecodedSync)
    assert result.message == message


def test_plaintext_mode_round_trips_only_when_allowed() -> None:
    """Without a key, gossip works only with explicit consent, and meets no keyed peer."""
    with pytest.raises(GossipError):
        Codec(None)
    plain = Codec(None, allow_plaintext=True)
    data = plain.encode_packet(ALL_MESSAGES, NOW)
    assert list(accepted(plain.decode_packet(data, NOW)).messages) == ALL_MESSAGES
    assert rejected(codec(KEY_A).decode_packet(data, NOW)) is RejectReason.UNENCRYPTED
    keyed = codec(KEY_A).encode_packet(ALL_MESSAGES, NOW)
    assert rejected(plain.decode_packet(keyed, NOW)) is RejectReason.UNEXPECTED_KEY


def test_message_budget_fills_a_packet_to_at_most_1400_bytes() -> None:
    """Messages whose sizes add up to the budget encode to a packet of at most 1400 bytes."""
    messages: list[Message] = []
    used = 0
    i = 0
    while True:
        msg = Alive(f"node-{i:04d}", 2**40 + i, ("10.0.0.1", 65000), 2**33, META)
        if used + wire.message_size(msg) > wire.MESSAGE_BUDGET:
            break
        messages.append(msg)
        used += wire.message_size(msg)
        i += 1
    data = codec(KEY_A).encode_packet(messages, NOW)
    assert wire.MAX_PACKET_BYTES - 100 < len(data) <= wire.MAX_PACKET_BYTES
    with pytest.raises(GossipError):
        codec(KEY_A).encode_packet([*messages, *messages], NOW)


def test_broadcast_caches_stay_bounded_while_metadata_keeps_changing() -> None:
    """A long run of distinct broadcasts (a node's metadata refreshed again and again)
    neither grows the packing cache nor the decoding cache past their bound, and a
    broadcast heard again right away still decodes to the same message."""
    sender, receiver = codec(KEY_A), codec(KEY_A)
    for i in range(4 * wire._CACHE_ENTRIES):
        meta = NodeMeta(role="middle", tier="t", active_connections=i)
        msg = Alive("node-a", 7, ("10.0.0.1", 7946), i, meta)
        data = sender.encode_packet([msg], 1000.0 + i / 1000)
        assert accepted(receiver.decode_packet(data, 1000.0 + i / 1000)).messages == (msg,)
        assert len(wire._PACKED) <= wire._CACHE_ENTRIES
        assert len(wire._DECODED) <= wire._CACHE_ENTRIES
    again = sender.encode_packet([msg], 1001.0)
    assert accepted(receiver.decode_packet(again, 1001.0)).messages == (msg,)


def test_wrong_key_and_tampered_packets_are_rejected() -> None:
    """A packet sealed with another key, or with any byte changed, does not authenticate."""
    data = codec(KEY_A).encode_packet([Ping(1, "b")], NOW)
    assert rejected(codec(KEY_B).decode_packet(data, NOW)) is RejectReason.AUTH_FAILED
    for position in range(len(data)):
        tampered = bytearray(data)
        tampered[position] ^= 0x01
        reason = rejected(codec(KEY_A).decode_packet(bytes(tampered), NOW))
        if position >= wire.HEADER_BYTES:
            assert reason is RejectReason.AUTH_FAILED


def test_keyring_rotation_accepts_any_known_key_and_seals_with_the_first() -> None:
    """During rotation a node decrypts with every key in its ring but encrypts with the first."""
    old, rotating, new = codec(KEY_A), codec(KEY_B, KEY_A), codec(KEY_B)
    assert accepted(rotating.decode_packet(old.encode_packet([Ack(1)], NOW), NOW))
    assert accepted(new.decode_packet(rotating.encode_packet([Ack(2)], NOW), NOW))
    assert rejected(old.decode_packet(new.encode_packet([Ack(3)], NOW), NOW)) is (
        RejectReason.AUTH_FAILED
    )


def test_keyring_refuses_keys_of_the_wrong_size() -> None:
    """AES keys are 16, 24 or 32 bytes; anything else is a configuration error."""
    with pytest.raises(GossipError):
        Keyring([b"short"])
    with pytest.raises(GossipError):
        Keyring([])


def test_replays_are_rejected_inside_and_after_the_window() -> None:
    """The same packet twice is a replay; an old one is stale; one from the future is refused."""
    receiver = codec(KEY_A, window=30.0)
    data = codec(KEY_A).encode_packet([Ping(1, "b")], NOW)
    accepted(receiver.decode_packet(data, NOW + 1))
    assert rejected(receiver.decode_packet(data, NOW + 2)) is RejectReason.REPLAY
    assert rejected(codec(KEY_A).decode_packet(data, NOW + 31)) is RejectReason.STALE
    assert rejected(codec(KEY_A).decode_packet(data, NOW - 31)) is RejectReason.FUTURE
    frame = codec(KEY_A).encode_sync(PushPull("a", ("h", 1), False, False, ()), NOW)
    accepted_sync = receiver.decode_sync(frame, NOW)
    assert isinstance(accepted_sync, DecodedSync)
    assert rejected(receiver.decode_sync(frame, NOW)) is RejectReason.REPLAY


def test_sync_frames_and_packets_are_not_interchangeable() -> None:
    """A sync frame is not accepted as a packet, nor a packet as a sync frame."""
    c = codec(KEY_A)
    frame = c.encode_sync(PushPull("a", ("h", 1), False, False, ()), NOW)
    packet = c.encode_packet([Ack(1)], NOW)
    assert rejected(c.decode_packet(frame[: wire.MAX_PACKET_BYTES], NOW)) is (
        RejectReason.WRONG_FRAME
    )
    assert rejected(c.decode_sync(packet, NOW)) in (
        RejectReason.WRONG_FRAME,
        RejectReason.TOO_SHORT,
    )


def test_oversized_short_and_foreign_packets_are_rejected() -> None:
    """Too large, too short, wrong magic and unknown versions are each named as such."""
    c = codec(KEY_A)
    assert rejected(c.decode_packet(b"x" * 1401, NOW)) is RejectReason.TOO_LARGE
    assert rejected(c.decode_packet(b"MG", NOW)) is RejectReason.TOO_SHORT
    assert rejected(c.decode_packet(b"XX\x01\x01" + bytes(40), NOW)) is RejectReason.BAD_MAGIC
    assert rejected(c.decode_packet(MAGIC + b"\x09\x01" + bytes(40), NOW)) is (
        RejectReason.BAD_VERSION
    )
    big = MAGIC + bytes((wire.WIRE_VERSION, 0x03)) + (10**9).to_bytes(4, "big")
    assert rejected(c.sync_frame_length(big)) is RejectReason.TOO_LARGE


def _seal_plaintext(plaintext: bytes, key: bytes = KEY_A) -> bytes:
    """A correctly authenticated packet around arbitrary plaintext, as an insider could send."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    header = MAGIC + bytes((wire.WIRE_VERSION, FLAG_ENCRYPTED))
    nonce = os.urandom(wire.NONCE_BYTES)
    return header + nonce + AESGCM(key).encrypt(nonce, plaintext, header)


def test_authenticated_but_malformed_messages_are_rejected() -> None:
    """Correctly sealed garbage is still refused: wrong field types, ranges and shapes."""
    ts = int(NOW * 1000)
    bad_payloads = [
        [ts, [[wire.Kind.PING, -1, "b"]]],  # negative sequence number
        [ts, [[wire.Kind.PING, 1, ""]]],  # empty name
        [ts, [[wire.Kind.ACK, True]]],  # a bool is not an int
        [ts, [[wire.Kind.ALIVE, "a", 1, ["h", 70000], 0, ["", "", [], 0, False]]]],
        [ts, [[wire.Kind.SUSPECT, "a", 1]]],  # missing field
        [ts, [[wire.Kind.PUSH_PULL, "a", ["h", 1], False, False, []]]],  # sync in a packet
        [ts, {"not": "a list"}],
        [str(ts), []],
        [ts],
    ]
    for payload in bad_payloads:
        data = _seal_plaintext(msgpack.packb(payload))
        assert rejected(codec(KEY_A).decode_packet(data, NOW)) is RejectReason.MALFORMED, payload
    trailing = _seal_plaintext(msgpack.packb([ts, []]) + b"\x00")
    assert rejected(codec(KEY_A).decode_packet(trailing, NOW)) is RejectReason.MALFORMED


def test_unknown_message_types_are_skipped_not_fatal() -> None:
    """A newer peer's unknown message kind is counted and skipped; the rest is delivered."""
    ts = int(NOW * 1000)
    payload = [ts, [[200, "future", 1], wire.to_wire(Ack(9))]]
    result = accepted(codec(KEY_A).decode_packet(_seal_plaintext(msgpack.packb(payload)), NOW))
    assert result.messages == (Ack(9),)
    assert result.unknown == 1


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=1600))
def test_fuzz_arbitrary_bytes_never_raise(data: bytes) -> None:
    """Any bytes at all decode to a rejection (or a packet), never an exception or a bug."""
    c = codec(KEY_A)
    for result in (c.decode_packet(data, NOW), c.decode_sync(data, NOW)):
        if isinstance(result, Rejected):
            assert result.reason is not RejectReason.DECODER_ERROR, result.detail
    plain = Codec(None, allow_plaintext=True)
    for header in (MAGIC + bytes((wire.WIRE_VERSION, 0)), MAGIC + bytes((wire.WIRE_VERSION, 2))):
        framed = header + (len(data).to_bytes(4, "big") if header[3] else b"") + data
        for result in (plain.decode_packet(framed, NOW), plain.decode_sync(framed, NOW)):
            if isinstance(result, Rejected):
                assert result.reason is not RejectReason.DECODER_ERROR, result.detail


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=8,
)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.one_of(
            _msgpack_values,
            st.builds(
                lambda kind, rest: [kind, *rest],
                st.integers(min_value=0, max_value=9),
                st.lists(_msgpack_values, max_size=6),
            ),
        ),
        max_size=8,
    )
)
def test_fuzz_authenticated_structures_never_raise(messages: list[object]) -> None:
    """Well-sealed packets with arbitrary msgpack structures inside never raise either."""
    plaintext = msgpack.packb([int(NOW * 1000), messages])
    result = codec(KEY_A).decode_packet(_seal_plaintext(plaintext), NOW)
    if isinstance(result, Rejected):
        assert result.reason is not RejectReason.DECODER_ERROR, result.detail


_PLAIN_PACKET = Codec(None, allow_plaintext=True).encode_packet(ALL_MESSAGES, NOW)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(_PLAIN_PACKET) - 1), st.integers(0, 255)), max_size=6),
    st.integers(0, len(_PLAIN_PACKET)),
)
def test_fuzz_mutated_valid_packets_never_raise(edits: list[tuple[int, int]], cut: int) -> None:
    """A valid plaintext packet with bytes changed and a tail cut off never raises."""
    data = bytearray(_PLAIN_PACKET)
    for position, value in edits:
        data[position] = value
    result = Codec(None, allow_plaintext=True).decode_packet(bytes(data[:cut]), NOW)
    if isinstance(result, Rejected):
        assert result.reason is not RejectReason.DECODER_ERROR, result.detail
