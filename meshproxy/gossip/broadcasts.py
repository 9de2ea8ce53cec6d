"""The piggyback queue: each message is sent a limited number of times, fewest-sent first.

memberlist's ``TransmitLimitedQueue``: one entry per member name (a newer message about a
member replaces the older one, which would only be overridden on arrival anyway); every
packet takes the least-transmitted entries that fit, and an entry is dropped once sent
``limit`` times, ``limit = mult * ceil(log10(n + 1))``. Among never-sent entries the newest
goes first (fresh news first, as memberlist); among entries sent equally often, the one that
has waited longest goes first, so retransmissions take turns.
"""

from __future__ import annotations

from meshproxy.gossip.messages import Message

# No message is smaller than this, so a packet with less room left is full.
_MIN_MESSAGE_BYTES = 4
# Give up filling a packet after this many entries did not fit: the rest are mostly the
# same kind of message and would not fit either, and scanning them all costs O(queue).
_MAX_MISFITS = 8


class _Entry:
    __slots__ = ("key", "message", "order", "size", "transmits")

    def __init__(self, key: str, message: Message, size: int, order: int) -> None:
        self.key = key
        self.message = message
        self.size = size
        self.order = order
        self.transmits = 0


class BroadcastQueue:
    """Entries bucketed by transmit count, so taking is proportional to what is taken."""

    __slots__ = ("_by_key", "_order", "_tiers")

    def __init__(self) -> None:
        self._by_key: dict[str, _Entry] = {}
        # _tiers[t] holds entries sent t times, in insertion order (newest last).
        self._tiers: list[dict[str, _Entry]] = [{}]
        self._order = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def put(self, key: str, message: Message, size: int) -> None:
        """Queue ``message`` about ``key``, replacing any older one about the same key."""
        old = self._by_key.pop(key, None)
        if old is not None:
            del self._tiers[old.transmits][key]
        self._order += 1
        entry = _Entry(key, message, size, self._order)
        self._by_key[key] = entry
        self._tiers[0][key] = entry

    def take(self, budget: int, limit: int) -> tuple[list[Message], int]:
        """Messages that fit in ``budget`` bytes, and the bytes they use; counts a transmit."""
        taken: list[_Entry] = []
        free = budget
        misfits = 0
        for transmits, tier in enumerate(self._tiers):
            if free < _MIN_MESSAGE_BYTES or misfits >= _MAX_MISFITS:
                break
            for entry in reversed(tier.values()) if transmits == 0 else iter(tier.values()):
                if entry.size <= free:
                    taken.append(entry)
                    free -= entry.size
                    if free < _MIN_MESSAGE_BYTES:
                        break
                else:
                    misfits += 1
                    if misfits >= _MAX_MISFITS:
                        break
        for entry in taken:
            del self._tiers[entry.transmits][entry.key]
            entry.transmits += 1
            if entry.transmits >= limit:
                del self._by_key[entry.key]
                continue
            while len(self._tiers) <= entry.transmits:
                self._tiers.append({})
            self._tiers[entry.transmits][entry.key] = entry
        # Entries above a lowered limit (the cluster shrank) are dropped lazily here.
        for tier_index in range(max(limit, 1), len(self._tiers)):
            for key in list(self._tiers[tier_index]):
                del self._by_key[key]
            self._tiers[tier_index].clear()
        return [entry.message for entry in taken], budget - free

    def clear(self) -> None:
        self._by_key.clear()
        self._tiers = [{}]
