"""What members tell each other: the SWIM messages, node metadata and full-state records.

Plain frozen values with no behaviour; ``wire`` maps them to msgpack and back, ``core``
interprets them. Members are identified by name; an address is where their UDP (and TCP,
same port) gossip endpoint listens.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

Addr = tuple[str, int]


class State(enum.IntEnum):
    """A member's state as one node sees it; the integer is its wire code."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2  # declared failed: suspicion timed out without a refutation
    LEFT = 3  # said goodbye (a graceful leave): never a failure

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class ServiceHealth:
    """What a node can currently reach for one service."""

    name: str
    healthy: int
    total: int
    # Backends this node currently sees down, so that the other middles of its tier can
    # re-check exactly those at once instead of waiting for their next interval.
    down: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeMeta:
    """Node metadata carried in alive messages; the version travels beside it."""

    role: str = ""
    tier: str = ""
    services: tuple[ServiceHealth, ...] = ()
    active_connections: int = 0
    draining: bool = False
    # Where the node accepts hops from other mesh nodes ("host:port"); "" when it has none.
    mesh: str = ""
    # The servers of its replication pools it sends writes to: a middle that sees another
    # writer re-checks both at once, so a promotion moves every middle's writes together.
    writers: tuple[str, ...] = ()


# ---- messages carried in UDP packets ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    target: str  # the name meant to answer: a different node now at that address does not


@dataclass(frozen=True, slots=True)
class IndirectPing:
    """Ask the receiver to ping ``target`` for us and relay the ack (or a nack)."""

    seq: int
    target: str
    target_addr: Addr
    nack: bool  # Lifeguard: answer with a nack if the target does not ack in time


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int


@dataclass(frozen=True, slots=True)
class Nack:
    seq: int


@dataclass(frozen=True, slots=True)
class Alive:
    name: str
    incarnation: int
    addr: Addr
    meta_version: int
    meta: NodeMeta


@dataclass(frozen=True, slots=True)
class Suspect:
    name: str
    incarnation: int
    sender: str  # who suspects: distinct senders are the independent confirmations


@dataclass(frozen=True, slots=True)
class Dead:
    """``name`` failed; when ``sender == name`` the member left gracefully instead."""

    name: str
    incarnation: int
    sender: str


Message = Ping | IndirectPing | Ack | Nack | Alive | Suspect | Dead


# ---- full-state anti-entropy, sent over a stream (TCP) or chunked UDP ------------------


@dataclass(frozen=True, slots=True)
class MemberRecord:
    name: str
    addr: Addr
    incarnation: int
    state: State
    meta_version: int
    meta: NodeMeta


@dataclass(frozen=True, slots=True)
class PushPull:
    """One side's whole membership; a request (``reply=False``) is answered in kind."""

    sender: str
    sender_addr: Addr
    join: bool
    reply: bool
    members: tuple[MemberRecord, ...]
