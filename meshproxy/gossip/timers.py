"""A heap of named deadlines with O(log n) set, lazy cancel, and ``next_deadline``."""

from __future__ import annotations

import heapq
from typing import Final


class TimerKind:
    """Timer kinds; plain ints, because keys are hashed on every set and pop."""

    PROBE: Final = 0  # judge the current probe, start the next
    PROBE_TIMEOUT: Final = 1  # direct ack overdue: go indirect
    RELAY: Final = 2  # an indirect ping we relay got no ack: nack the requester
    SUSPICION: Final = 3  # a suspect did not refute in time: declare it dead
    GOSSIP: Final = 4
    PUSH_PULL: Final = 5
    REJOIN: Final = 6
    REAP: Final = 7
    LEAVE: Final = 8
    RECHECK: Final = 9  # halfway into a suspicion: ask the suspect once more


TimerKey = tuple[int, str | int]


class Timers:
    __slots__ = ("_deadlines", "_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerKey]] = []
        self._deadlines: dict[TimerKey, tuple[float, int]] = {}
        self._seq = 0

    def set(self, key: TimerKey, deadline: float) -> None:
        """Arm (or re-arm) ``key``; a timer has one deadline at a time."""
        self._seq += 1
        self._deadlines[key] = (deadline, self._seq)
        heapq.heappush(self._heap, (deadline, self._seq, key))

    def cancel(self, key: TimerKey) -> None:
        self._deadlines.pop(key, None)

    def clear(self) -> None:
        self._heap.clear()
        self._deadlines.clear()

    def deadline(self, key: TimerKey) -> float | None:
        entry = self._deadlines.get(key)
        return entry[0] if entry else None

    def keys(self) -> list[TimerKey]:
        return list(self._deadlines)

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap and self._deadlines.get(heap[0][2]) != (heap[0][0], heap[0][1]):
            heapq.heappop(heap)

    def next_deadline(self) -> float | None:
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> TimerKey | None:
        """The earliest timer due at ``now``, disarmed; None when nothing is due."""
        self._drop_stale()
        if not self._heap or self._heap[0][0] > now:
            return None
        _, _, key = heapq.heappop(self._heap)
        del self._deadlines[key]
        return key
