"""Events a shell feeds into ``Membership.handle(event, now)``.

``now`` is monotonic seconds supplied by the caller; events themselves carry no time.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshproxy.gossip.messages import Addr, Message, NodeMeta, PushPull


@dataclass(frozen=True, slots=True)
class Join:
    """Start (or restart) gossiping; push-pull with each seed. No seeds: start a new cluster."""

    seeds: tuple[Addr, ...] = ()


@dataclass(frozen=True, slots=True)
class Leave:
    """Leave gracefully: others will see this node as left, not dead."""


@dataclass(frozen=True, slots=True)
class LocalMetaChanged:
    """This node's metadata changed; it gets a new version and is gossiped."""

    meta: NodeMeta


@dataclass(frozen=True, slots=True)
class PacketReceived:
    """A UDP packet the codec accepted, its messages in wire order."""

    from_addr: Addr
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class SyncReceived:
    """A full-state push-pull message arrived over the sync transport (TCP or chunked UDP)."""

    from_addr: Addr
    message: PushPull


@dataclass(frozen=True, slots=True)
class Tick:
    """Fire every timer due at ``now``; deliver it at ``Membership.next_deadline()``.

    A Tick arriving more than ``stall_threshold_s`` after that deadline tells the core its
    process was stalled (see ``Membership._on_stall``).
    """


Event = Join | Leave | LocalMetaChanged | PacketReceived | SyncReceived | Tick
