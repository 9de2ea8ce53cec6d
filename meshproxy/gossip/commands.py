"""Commands ``Membership.handle`` returns for its shell to carry out, and the member view."""

from __future__ import annotations

from dataclasses import dataclass

from meshproxy.gossip.messages import Addr, Message, NodeMeta, PushPull, State


@dataclass(frozen=True, slots=True)
class Member:
    """One member as this node sees it, frozen at the moment it was taken."""

    name: str
    addr: Addr
    state: State
    incarnation: int
    meta_version: int
    meta: NodeMeta
    since: float  # monotonic time of the last state change seen here


@dataclass(frozen=True, slots=True)
class SendPacket:
    """Send one UDP packet: membership messages first, then piggybacked gossip.

    The core keeps the encoded size within the codec's budget, so this always fits in one
    packet.
    """

    to: Addr
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class SendSync:
    """Deliver a full-state push-pull to ``to`` reliably (TCP, or chunked UDP).

    Each direction is a one-way message: a request is answered by a separate ``SendSync``
    from the peer to ``message.sender_addr``, which arrives here as ``SyncReceived``.
    """

    to: Addr
    message: PushPull


@dataclass(frozen=True, slots=True)
class MemberChanged:
    """A member's state, incarnation, address or metadata changed in this node's view.

    ``old is None``: newly learned. ``new is None``: forgotten (reaped long after it died or
    left). ``old == new``: same state, new metadata or incarnation.
    """

    member: Member
    old: State | None
    new: State | None
    reason: str


@dataclass(frozen=True, slots=True)
class LeaveComplete:
    """The graceful leave has been gossiped enough: the shell may shut down now."""


Command = SendPacket | SendSync | MemberChanged | LeaveComplete
