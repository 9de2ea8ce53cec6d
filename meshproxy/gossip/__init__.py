"""Gossip: SWIM membership with Lifeguard, as a pure core, a wire codec and a simulator.

The shell (UDP/TCP transport, node wiring) drives ``Membership`` with events and carries
out its commands; ``Codec`` turns messages into authenticated packets and sync frames.
"""

from meshproxy.gossip.codec import (
    Codec,
    DecodedPacket,
    DecodedSync,
    Keyring,
    Rejected,
    RejectReason,
)
from meshproxy.gossip.commands import (
    Command,
    LeaveComplete,
    Member,
    MemberChanged,
    SendPacket,
    SendSync,
)
from meshproxy.gossip.core import Membership
from meshproxy.gossip.errors import GossipError
from meshproxy.gossip.events import (
    Event,
    Join,
    Leave,
    LocalMetaChanged,
    PacketReceived,
    SyncReceived,
    Tick,
)
from meshproxy.gossip.messages import Addr, NodeMeta, ServiceHealth, State
from meshproxy.gossip.settings import GossipSettings

__all__ = [
    "Addr",
    "Codec",
    "Command",
    "DecodedPacket",
    "DecodedSync",
    "Event",
    "GossipError",
    "GossipSettings",
    "Join",
    "Keyring",
    "Leave",
    "LeaveComplete",
    "LocalMetaChanged",
    "Member",
    "MemberChanged",
    "Membership",
    "NodeMeta",
    "PacketReceived",
    "RejectReason",
    "Rejected",
    "SendPacket",
    "SendSync",
    "ServiceHealth",
    "State",
    "SyncReceived",
    "Tick",
]
