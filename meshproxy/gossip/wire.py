"""Messages to msgpack-ready lists and back, with strict validation of what comes back.

Every message is an array whose first element is its type code; fields follow in a fixed
order. Decoding checks each field's type and range and raises ``WireError`` (never anything
else, for input that came out of ``msgpack.unpackb``); the codec turns it into a rejection.
A packet may carry message types this version does not know: they are skipped, so a newer
peer can add types without breaking older ones.
"""

from __future__ import annotations

import enum
from typing import Any

import msgpack

from meshproxy.gossip.messages import (
    Ack,
    Addr,
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

WIRE_VERSION = 1
MAX_PACKET_BYTES = 1400
# Packet layout: header (magic 2, version 1, flags 1), nonce 12, then the AES-GCM
# ciphertext of msgpack [timestamp_ms, [message, ...]] and its 16-byte tag.
HEADER_BYTES = 4
NONCE_BYTES = 12
TAG_BYTES = 16
# msgpack envelope: outer fixarray (1) + uint64 timestamp (9) + array16 header (3).
ENVELOPE_BYTES = 1 + 9 + 3
MESSAGE_BUDGET = MAX_PACKET_BYTES - HEADER_BYTES - NONCE_BYTES - TAG_BYTES - ENVELOPE_BYTES

MAX_NAME_CHARS = 128
MAX_HOST_CHARS = 253
MAX_INT = 2**63 - 1
MAX_SERVICES = 32
MAX_DOWN_BACKENDS = 32
MAX_META_FIELDS = 16
# An alive message must leave room for a ping and a little gossip in its packet.
MAX_ALIVE_BYTES = 600


class WireError(ValueError):
    """A decoded structure is not a valid message; ``reason`` names what is wrong."""


class Kind(enum.IntEnum):
    PING = 1
    INDIRECT_PING = 2
    ACK = 3
    NACK = 4
    ALIVE = 5
    SUSPECT = 6
    DEAD = 7
    PUSH_PULL = 8


# ---- encoding --------------------------------------------------------------------------


def _meta_out(meta: NodeMeta) -> list[Any]:
    services = [[s.name, s.healthy, s.total, list(s.down)] for s in meta.services]
    return [
        meta.role,
        meta.tier,
        services,
        meta.active_connections,
        meta.draining,
        meta.mesh,
        list(meta.writers),
    ]


def to_wire(msg: Message | PushPull) -> list[Any]:
    match msg:
        case Ping(seq, target):
            return [Kind.PING, seq, target]
        case IndirectPing(seq, target, addr, nack):
            return [Kind.INDIRECT_PING, seq, target, list(addr), nack]
        case Ack(seq):
            return [Kind.ACK, seq]
        case Nack(seq):
            return [Kind.NACK, seq]
        case Alive(name, inc, addr, version, meta):
            return [Kind.ALIVE, name, inc, list(addr), version, _meta_out(meta)]
        case Suspect(name, inc, sender):
            return [Kind.SUSPECT, name, inc, sender]
        case Dead(name, inc, sender):
            return [Kind.DEAD, name, inc, sender]
        case PushPull(sender, addr, join, reply, members):
            records = [
                [
                    m.name,
                    list(m.addr),
                    m.incarnation,
                    int(m.state),
                    m.meta_version,
                    _meta_out(m.meta),
                ]
                for m in members
            ]
            return [Kind.PUSH_PULL, sender, list(addr), join, reply, records]
    raise TypeError(f"not a gossip message: {msg!r}")  # pragma: no cover - exhaustive


# One reusable packer: msgpack.packb builds a new one on every call.
_PACKER = msgpack.Packer(use_bin_type=True, autoreset=True)


def pack(obj: Any) -> bytes:
    data: bytes = _PACKER.pack(obj)
    return data


# Packed bytes of recent broadcasts, by identity: a queued broadcast is sized once and
# then sent up to its retransmit limit, so it is packed once. The entry holds the message
# itself, so its id cannot be reused while cached. Pings and acks are unique: not cached.
_PACKED: dict[int, tuple[Message, bytes]] = {}
# Broadcasts decoded before, by unpacked value: a node hears the same broadcast many times.
_DECODED: dict[Any, Message] = {}
# A broadcast is sent and heard only for its retransmit limit (a few gossip rounds, well
# under a second to a few seconds), while metadata refreshes make new ones all the time
# (each node's active connection count, every meta_refresh_s): a hundred nodes make about
# 50 a second, so 256 entries hold the last five seconds of them, more than a broadcast
# lives. Every entry holds a whole message with its metadata, and a larger bound only kept
# dead ones until the cache filled: 16384 grew a control process by 9 MiB in a 30-minute
# soak, 1024 by 1 MiB (a 4-node mesh fills them in about 20 minutes), read as a leak.
_CACHE_ENTRIES = 256


def _remember(msg: Message, data: bytes) -> None:
    if len(_PACKED) >= _CACHE_ENTRIES:
        _PACKED.clear()
    _PACKED[id(msg)] = (msg, data)


def packed(msg: Message) -> bytes:
    """``msg`` as msgpack bytes, ready to be concatenated into a packet's message array."""
    entry = _PACKED.get(id(msg))
    if entry is not None and entry[0] is msg:
        return entry[1]
    data = pack(to_wire(msg))
    if isinstance(msg, Alive | Suspect | Dead):
        _remember(msg, data)
    return data


def message_size(msg: Message) -> int:
    """Bytes ``msg`` adds to a packet's plaintext (the envelope is counted separately)."""
    return len(packed(msg))


def array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` elements."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


# ---- decoding --------------------------------------------------------------------------
#
# Input comes from ``msgpack.unpackb(..., use_list=False)``: arrays are tuples. The checks
# are written out inline because a join storm decodes hundreds of thousands of alive
# messages; ``type(x) is int`` (not isinstance) keeps booleans out of integer fields.


def _bad(what: str) -> WireError:
    return WireError(f"bad {what}")


def _name(value: Any, what: str) -> str:
    if type(value) is not str or not 0 < len(value) <= MAX_NAME_CHARS:
        raise _bad(what)
    return value


def _uint(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_INT:
        raise _bad(what)
    return value


def _fields(value: Any, what: str, length: int) -> tuple[Any, ...]:
    if type(value) is not tuple or len(value) != length:
        raise _bad(what)
    return value


def _addr(value: Any) -> Addr:
    if type(value) is not tuple or len(value) != 2:
        raise _bad("address")
    host, port = value
    if type(host) is not str or not 0 < len(host) <= MAX_HOST_CHARS:
        raise _bad("host")
    if type(port) is not int or not 0 < port <= 65535:
        raise _bad("port")
    return (host, port)


def _meta_in(value: Any) -> NodeMeta:
    # Five fields in the first version, the mesh address since; fields a newer peer appends
    # are ignored, so metadata can grow without a new wire version.
    if type(value) is not tuple or not 5 <= len(value) <= MAX_META_FIELDS:
        raise _bad("meta")
    role, tier, services, active, draining = value[:5]
    mesh = value[5] if len(value) > 5 else ""
    if type(mesh) is not str or len(mesh) > MAX_HOST_CHARS + 8:
        raise _bad("mesh address")
    writers = value[6] if len(value) > 6 else ()
    if type(writers) is not tuple or len(writers) > MAX_DOWN_BACKENDS:
        raise _bad("writers")
    for writer in writers:
        _name(writer, "writer")
    if type(role) is not str or len(role) > MAX_NAME_CHARS:
        raise _bad("role")
    if type(tier) is not str or len(tier) > MAX_NAME_CHARS:
        raise _bad("tier")
    if type(services) is not tuple or len(services) > MAX_SERVICES:
        raise _bad("services")
    parsed = []
    for item in services:
        name, healthy, total, down = _fields(item, "service", 4)
        if type(down) is not tuple or len(down) > MAX_DOWN_BACKENDS:
            raise _bad("down backends")
        for backend in down:
            _name(backend, "backend")
        parsed.append(
            ServiceHealth(
                _name(name, "service name"),
                _uint(healthy, "healthy count"),
                _uint(total, "total count"),
                down,
            )
        )
    if type(draining) is not bool:
        raise _bad("draining")
    active_connections = _uint(active, "active connections")
    return NodeMeta(role, tier, tuple(parsed), active_connections, draining, mesh, writers)


def from_wire(value: Any) -> Message | None:
    """One packet message; None for a well-formed message of a type this version lacks."""
    if type(value) is not tuple or not value:
        raise _bad("message")
    kind = value[0]
    if type(kind) is not int:
        raise _bad("message type")
    if kind == Kind.PING:
        _, seq, target = _fields(value, "ping", 3)
        return Ping(_uint(seq, "seq"), _name(target, "target"))
    if kind == Kind.ACK:
        _, seq = _fields(value, "ack", 2)
        return Ack(_uint(seq, "seq"))
    if kind == Kind.ALIVE:
        _, name, inc, addr, version, meta = _fields(value, "alive", 6)
        return Alive(
            _name(name, "name"),
            _uint(inc, "incarnation"),
            _addr(addr),
            _uint(version, "meta version"),
            _meta_in(meta),
        )
    if kind == Kind.SUSPECT or kind == Kind.DEAD:
        _, name, inc, sender = _fields(value, "suspect/dead", 4)
        cls = Suspect if kind == Kind.SUSPECT else Dead
        return cls(_name(name, "name"), _uint(inc, "incarnation"), _name(sender, "sender"))
    if kind == Kind.INDIRECT_PING:
        _, seq, target, addr, nack = _fields(value, "indirect ping", 5)
        if type(nack) is not bool:
            raise _bad("nack flag")
        return IndirectPing(_uint(seq, "seq"), _name(target, "target"), _addr(addr), nack)
    if kind == Kind.NACK:
        _, seq = _fields(value, "nack", 2)
        return Nack(_uint(seq, "seq"))
    if kind == Kind.PUSH_PULL:
        raise WireError("push-pull inside a packet")
    if not 0 <= kind <= 255:
        raise _bad("message type")
    return None


_BROADCAST_KINDS = (Kind.ALIVE, Kind.SUSPECT, Kind.DEAD)


def decode_message(value: Any) -> Message | None:
    """``from_wire`` with a cache for broadcasts, which a node hears many times over.

    The cache is keyed by the unpacked value; a hit means an equal value was validated
    before. (Equality lets 1 stand for True or 1.0 for 1 on a hit, which yields the very
    message a valid encoding would: harmless, and only a key holder can send either.)
    """
    if type(value) is tuple and value and value[0] in _BROADCAST_KINDS:
        try:
            cached = _DECODED.get(value)
        except TypeError:  # unhashable (a map inside): not a valid message anyway
            cached = None
        if cached is not None:
            return cached
        msg = from_wire(value)
        if msg is not None:
            if len(_DECODED) >= _CACHE_ENTRIES:
                _DECODED.clear()
            _DECODED[value] = msg
        return msg
    return from_wire(value)


def push_pull_from_wire(value: Any) -> PushPull:
    kind, sender, addr, join, reply, records = _fields(value, "push-pull", 6)
    if kind != Kind.PUSH_PULL or type(kind) is not int:
        raise WireError("not a push-pull")
    if type(join) is not bool or type(reply) is not bool:
        raise _bad("push-pull flags")
    if type(records) is not tuple:
        raise _bad("members")
    members = []
    for record in records:
        name, raddr, inc, state, version, meta = _fields(record, "member", 6)
        if type(state) is not int or not 0 <= state <= max(State):
            raise _bad("state")
        members.append(
            MemberRecord(
                _name(name, "name"),
                _addr(raddr),
                _uint(inc, "incarnation"),
                State(state),
                _uint(version, "meta version"),
                _meta_in(meta),
            )
        )
    return PushPull(_name(sender, "sender"), _addr(addr), join, reply, tuple(members))
