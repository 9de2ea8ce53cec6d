"""The gossip wire format: framed, versioned, authenticated msgpack; decoding never raises.

A UDP packet is at most 1400 bytes::

    magic "MG" | version 1 | flags | nonce (12) | AES-GCM( msgpack [ts_ms, [msg, ...]] ) | tag

The 4-byte header is authenticated as associated data. A sync (push-pull) frame for a
stream transport adds a 4-byte big-endian body length after the header (also authenticated)
and may be much larger than a packet.

Keys come from a keyring: the first key encrypts, every key is tried to decrypt, so keys
rotate by adding the new key everywhere, then making it first everywhere, then removing the
old one. The sender's wall-clock timestamp inside the ciphertext bounds replays to a window,
and nonces seen within that window are remembered, so an exact replay inside the window is
dropped too (which also drops duplicated packets: harmless, SWIM messages are idempotent).

Nonces are 96 random bits, as in memberlist; AES-GCM's guidance for random nonces is at most
2^32 messages per key, which an idle 200-node cluster (10 packets per node per second)
reaches in about 25 days: rotate keys on that order of time.

Without a keyring the same layout is sent with no nonce and no tag; that mode exists only
when asked for explicitly (``allow_plaintext=True``) and offers no protection at all.

``decode_*`` return a value or a ``Rejected(reason)`` for the caller to count; they raise
on nothing the network can send.
"""

from __future__ import annotations

import enum
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meshproxy.gossip import wire
from meshproxy.gossip.errors import GossipError
from meshproxy.gossip.messages import Message, PushPull

MAGIC = b"MG"
FLAG_ENCRYPTED = 0x01
FLAG_SYNC = 0x02
_KNOWN_FLAGS = FLAG_ENCRYPTED | FLAG_SYNC
SYNC_PREFIX_BYTES = wire.HEADER_BYTES + 4
MAX_SYNC_BYTES = 8 * 1024 * 1024
MAX_MESSAGES_PER_PACKET = 256
DEFAULT_REPLAY_WINDOW_S = 30.0
# What msgpack raises on malformed input (OutOfData and friends are not ValueErrors).
_UNPACK_ERRORS = (ValueError, TypeError, msgpack.UnpackException)
_ENVELOPE_HEADER = wire.array_header(2)


class RejectReason(enum.StrEnum):
    TOO_SHORT = "too_short"
    TOO_LARGE = "too_large"
    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    BAD_FLAGS = "bad_flags"
    WRONG_FRAME = "wrong_frame"  # a sync frame where a packet was expected, or the reverse
    UNENCRYPTED = "unencrypted"  # plaintext while we hold keys
    UNEXPECTED_KEY = "unexpected_key"  # encrypted while we run without keys
    AUTH_FAILED = "auth_failed"  # no key in the ring authenticates it: wrong key or tampered
    MALFORMED = "malformed"
    STALE = "stale"  # timestamp older than the replay window
    FUTURE = "future"  # timestamp further ahead than the window: clock skew or forgery
    REPLAY = "replay"  # nonce already seen within the window
    DECODER_ERROR = "decoder_error"  # a bug in this module; tests assert it never happens


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: RejectReason
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DecodedPacket:
    messages: tuple[Message, ...]
    unknown: int  # well-formed messages of types this version does not know, skipped
    sent_at: float  # sender's wall clock, seconds


@dataclass(frozen=True, slots=True)
class DecodedSync:
    message: PushPull
    sent_at: float


class Keyring:
    """AES-GCM keys (16, 24 or 32 bytes); the first one encrypts."""

    __slots__ = ("_aeads", "keys")

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise GossipError("a gossip keyring needs at least one key")
        for i, key in enumerate(keys):
            if len(key) not in (16, 24, 32):
                raise GossipError(f"gossip key {i} is {len(key)} bytes; use 16, 24 or 32")
        self.keys = tuple(keys)
        self._aeads = tuple(AESGCM(key) for key in keys)

    def seal(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._aeads[0].encrypt(nonce, plaintext, aad)

    def open(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes | None:
        for aead in self._aeads:
            try:
                return aead.decrypt(nonce, ciphertext, aad)
            except InvalidTag:
                continue
        return None


class _ReplayCache:
    """Nonces of authenticated frames seen within the window, oldest first, bounded."""

    __slots__ = ("_max", "_seen")

    def __init__(self, max_entries: int) -> None:
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._max = max_entries

    def check_and_add(self, nonce: bytes, expires: float, now: float) -> bool:
        """True if ``nonce`` is new (and now remembered); False for a replay."""
        seen = self._seen
        while seen:
            oldest, exp = next(iter(seen.items()))
            if exp > now and len(seen) < self._max:
                break
            del seen[oldest]
        if nonce in seen:
            return False
        seen[nonce] = expires
        return True


class Codec:
    """Encodes and decodes one node's packets and sync frames; holds its replay memory."""

    def __init__(
        self,
        keyring: Keyring | None,
        *,
        allow_plaintext: bool = False,
        replay_window_s: float = DEFAULT_REPLAY_WINDOW_S,
        replay_cache_entries: int = 1 << 16,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if keyring is None and not allow_plaintext:
            raise GossipError("gossip without a key must be enabled explicitly")
        self.keyring = keyring
        self._packet_header = self._header(sync=False)
        self.replay_window_s = replay_window_s
        self._random_bytes = random_bytes
        self._replays = _ReplayCache(replay_cache_entries)

    # ---- encoding ----------------------------------------------------------------------

    def _header(self, sync: bool) -> bytes:
        flags = (FLAG_ENCRYPTED if self.keyring else 0) | (FLAG_SYNC if sync else 0)
        return MAGIC + bytes((wire.WIRE_VERSION, flags))

    def _seal(self, aad: bytes, plaintext: bytes) -> bytes:
        if self.keyring is None:
            return plaintext
        nonce = self._random_bytes(wire.NONCE_BYTES)
        return nonce + self.keyring.seal(nonce, plaintext, aad)

    def encode_packet(self, messages: Sequence[Message], now_wall: float) -> bytes:
        """One UDP packet; raises GossipError if the messages do not fit (a local bug)."""
        header = self._packet_header
        # Concatenated by hand so that each message's cached packing is reused.
        parts = [
            _ENVELOPE_HEADER,
            wire.pack(int(now_wall * 1000)),
            wire.array_header(len(messages)),
        ]
        parts.extend(map(wire.packed, messages))
        data = header + self._seal(header, b"".join(parts))
        if len(data) > wire.MAX_PACKET_BYTES:
            raise GossipError(f"gossip packet of {len(data)} bytes exceeds the budget")
        return data

    def encode_sync(self, message: PushPull, now_wall: float) -> bytes:
        """One length-prefixed sync frame for a stream transport."""
        header = self._header(sync=True)
        body = wire.pack([int(now_wall * 1000), wire.to_wire(message)])
        overhead = wire.NONCE_BYTES + wire.TAG_BYTES if self.keyring else 0
        prefix = header + struct.pack(">I", len(body) + overhead)
        frame = prefix + self._seal(prefix, body)
        if len(frame) > MAX_SYNC_BYTES:
            raise GossipError(f"gossip sync frame of {len(frame)} bytes exceeds the limit")
        return frame

    # ---- decoding ----------------------------------------------------------------------

    def _check_header(self, data: bytes, sync: bool) -> Rejected | None:
        if len(data) < wire.HEADER_BYTES:
            return Rejected(RejectReason.TOO_SHORT)
        if data[:2] != MAGIC:
            return Rejected(RejectReason.BAD_MAGIC)
        if data[2] != wire.WIRE_VERSION:
            return Rejected(RejectReason.BAD_VERSION, str(data[2]))
        flags = data[3]
        if flags & ~_KNOWN_FLAGS:
            return Rejected(RejectReason.BAD_FLAGS)
        if bool(flags & FLAG_SYNC) != sync:
            return Rejected(RejectReason.WRONG_FRAME)
        encrypted = bool(flags & FLAG_ENCRYPTED)
        if self.keyring is not None and not encrypted:
            return Rejected(RejectReason.UNENCRYPTED)
        if self.keyring is None and encrypted:
            return Rejected(RejectReason.UNEXPECTED_KEY)
        return None

    def _open(self, aad: bytes, body: bytes, now_wall: float) -> tuple[Any, float] | Rejected:
        """Decrypt, unpack, and check the envelope's timestamp and nonce.

        Returns the envelope's payload (still to be validated) and the send time.
        """
        nonce = b""
        if self.keyring is not None:
            if len(body) < wire.NONCE_BYTES + wire.TAG_BYTES:
                return Rejected(RejectReason.TOO_SHORT)
            nonce = body[: wire.NONCE_BYTES]
            plaintext = self.keyring.open(nonce, body[wire.NONCE_BYTES :], aad)
            if plaintext is None:
                return Rejected(RejectReason.AUTH_FAILED)
            body = plaintext
        try:
            envelope = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=False)
        except _UNPACK_ERRORS as exc:
            return Rejected(RejectReason.MALFORMED, type(exc).__name__)
        if type(envelope) is not tuple or len(envelope) != 2 or type(envelope[0]) is not int:
            return Rejected(RejectReason.MALFORMED, "envelope")
        sent_at = envelope[0] / 1000.0
        if sent_at < now_wall - self.replay_window_s:
            return Rejected(RejectReason.STALE)
        if sent_at > now_wall + self.replay_window_s:
            return Rejected(RejectReason.FUTURE)
        if nonce and not self._replays.check_and_add(
            nonce, now_wall + 2 * self.replay_window_s, now_wall
        ):
            return Rejected(RejectReason.REPLAY)
        return envelope[1], sent_at

    def decode_packet(self, data: bytes, now_wall: float) -> DecodedPacket | Rejected:
        """A UDP packet's messages, or why it was dropped. Never raises."""
        try:
            return self._decode_packet(data, now_wall)
        except Exception as exc:  # a decoder bug must not kill the receive loop
            return Rejected(RejectReason.DECODER_ERROR, repr(exc))

    def _decode_packet(self, data: bytes, now_wall: float) -> DecodedPacket | Rejected:
        if len(data) > wire.MAX_PACKET_BYTES:
            return Rejected(RejectReason.TOO_LARGE)
        bad = self._check_header(data, sync=False)
        if bad is not None:
            return bad
        opened = self._open(data[: wire.HEADER_BYTES], data[wire.HEADER_BYTES :], now_wall)
        if isinstance(opened, Rejected):
            return opened
        payload, sent_at = opened
        if type(payload) is not tuple or len(payload) > MAX_MESSAGES_PER_PACKET:
            return Rejected(RejectReason.MALFORMED, "message list")
        messages: list[Message] = []
        unknown = 0
        try:
            for item in payload:
                msg = wire.decode_message(item)
                if msg is None:
                    unknown += 1
                else:
                    messages.append(msg)
        except wire.WireError as exc:
            return Rejected(RejectReason.MALFORMED, str(exc))
        return DecodedPacket(tuple(messages), unknown, sent_at)

    def sync_frame_length(self, prefix: bytes) -> int | Rejected:
        """Total length of the sync frame that starts with these SYNC_PREFIX_BYTES bytes."""
        if len(prefix) < SYNC_PREFIX_BYTES:
            return Rejected(RejectReason.TOO_SHORT)
        bad = self._check_header(prefix, sync=True)
        if bad is not None:
            return bad
        (body_len,) = struct.unpack(">I", prefix[wire.HEADER_BYTES : SYNC_PREFIX_BYTES])
        total = SYNC_PREFIX_BYTES + int(body_len)
        if total > MAX_SYNC_BYTES:
            return Rejected(RejectReason.TOO_LARGE)
        return total

    def decode_sync(self, frame: bytes, now_wall: float) -> DecodedSync | Rejected:
        """A whole sync frame's push-pull, or why it was dropped. Never raises."""
        try:
            return self._decode_sync(frame, now_wall)
        except Exception as exc:  # a decoder bug must not kill the receive loop
            return Rejected(RejectReason.DECODER_ERROR, repr(exc))

    def _decode_sync(self, frame: bytes, now_wall: float) -> DecodedSync | Rejected:
        total = self.sync_frame_length(frame[:SYNC_PREFIX_BYTES])
        if isinstance(total, Rejected):
            return total
        if len(frame) != total:
            return Rejected(RejectReason.MALFORMED, "frame length")
        opened = self._open(frame[:SYNC_PREFIX_BYTES], frame[SYNC_PREFIX_BYTES:], now_wall)
        if isinstance(opened, Rejected):
            return opened
        payload, sent_at = opened
        try:
            message = wire.push_pull_from_wire(payload)
        except wire.WireError as exc:
            return Rejected(RejectReason.MALFORMED, str(exc))
        return DecodedSync(message, sent_at)
