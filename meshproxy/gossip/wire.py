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
    return [meta.role, meta.tier, services, meta.active_connections, meta.draining]


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
                [m.name, list(m.addr), m.incarnation, int(m.state), m.meta_version]
                + [_meta_out(m.meta)]
                for m in members
            ]
            return [Kind.PUSH_PULL, sender, list(addr), join, reply, records]
    raise TypeError(f"not a gossip message: {msg!r}")  # pragma: no cover - exhaustive


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def message_size(msg: Message) -> int:
    """Bytes ``msg`` adds to a packet's plaintext (the envelope is counted separately)."""
    return len(pack(to_wire(msg)))


# ---- decoding --------------------------------------------------------------------------


def _int(value: Any, what: str, lo: int = 0, hi: int = MAX_INT) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise WireError(f"bad {what}")
    return value


def _bool(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise WireError(f"bad {what}")
    return value


def _str(value: Any, what: str, max_chars: int = MAX_NAME_CHARS, empty: bool = False) -> str:
    if type(value) is not str or len(value) > max_chars or (not value and not empty):
        raise WireError(f"bad {what}")
    return value


def _list(value: Any, what: str, length: int | None = None, max_len: int = 1 << 16) -> list[Any]:
    if type(value) is not list or len(value) > max_len:
        raise WireError(f"bad {what}")
    if length is not None and len(value) != length:
        raise WireError(f"bad {what}")
    return value


def _addr(value: Any) -> Addr:
    host, port = _list(value, "address", 2)
    return (_str(host, "host", MAX_HOST_CHARS), _int(port, "port", 1, 65535))


def _meta_in(value: Any) -> NodeMeta:
    role, tier, services, active, draining = _list(value, "meta", 5)
    parsed = []
    for item in _list(services, "services", max_len=MAX_SERVICES):
        name, healthy, total, down = _list(item, "service", 4)
        down_names = tuple(
            _str(b, "backend") for b in _list(down, "down backends", max_len=MAX_DOWN_BACKENDS)
        )
        parsed.append(
            ServiceHealth(
                _str(name, "service name"),
                _int(healthy, "healthy count"),
                _int(total, "total count"),
                down_names,
            )
        )
    return NodeMeta(
        role=_str(role, "role", empty=True),
        tier=_str(tier, "tier", empty=True),
        services=tuple(parsed),
        active_connections=_int(active, "active connections"),
        draining=_bool(draining, "draining"),
    )


def from_wire(value: Any) -> Message | None:
    """One packet message; None for a well-formed message of a type this version lacks."""
    items = _list(value, "message")
    if not items:
        raise WireError("empty message")
    kind = _int(items[0], "message type", 0, 255)
    fields = items[1:]
    if kind == Kind.PING:
        seq, target = _list(fields, "ping", 2)
        return Ping(_int(seq, "seq"), _str(target, "target"))
    if kind == Kind.INDIRECT_PING:
        seq, target, addr, nack = _list(fields, "indirect ping", 4)
        return IndirectPing(
            _int(seq, "seq"), _str(target, "target"), _addr(addr), _bool(nack, "nack")
        )
    if kind == Kind.ACK:
        (seq,) = _list(fields, "ack", 1)
        return Ack(_int(seq, "seq"))
    if kind == Kind.NACK:
        (seq,) = _list(fields, "nack", 1)
        return Nack(_int(seq, "seq"))
    if kind == Kind.ALIVE:
        name, inc, addr, version, meta = _list(fields, "alive", 5)
        return Alive(
            _str(name, "name"),
            _int(inc, "incarnation"),
            _addr(addr),
            _int(version, "meta version"),
            _meta_in(meta),
        )
    if kind in (Kind.SUSPECT, Kind.DEAD):
        name, inc, sender = _list(fields, "suspect/dead", 3)
        cls = Suspect if kind == Kind.SUSPECT else Dead
        return cls(_str(name, "name"), _int(inc, "incarnation"), _str(sender, "sender"))
    if kind == Kind.PUSH_PULL:
        raise WireError("push-pull inside a packet")
    return None


def _state(value: Any) -> State:
    return State(_int(value, "state", 0, max(State)))


def push_pull_from_wire(value: Any) -> PushPull:
    items = _list(value, "push-pull", 6)
    kind, sender, addr, join, reply, records = items
    if kind != Kind.PUSH_PULL:
        raise WireError("not a push-pull")
    members = []
    for record in _list(records, "members"):
        name, raddr, inc, state, version, meta = _list(record, "member", 6)
        members.append(
            MemberRecord(
                _str(name, "name"),
                _addr(raddr),
                _int(inc, "incarnation"),
                _state(state),
                _int(version, "meta version"),
                _meta_in(meta),
            )
        )
    return PushPull(
        _str(sender, "sender"),
        _addr(addr),
        _bool(join, "join"),
        _bool(reply, "reply"),
        tuple(members),
    )
