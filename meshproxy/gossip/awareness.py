"""Lifeguard's local health multiplier: a node that misses acks and nacks slows itself down.

Failures to hear back are as likely to be this node's fault (a starved event loop, a full
socket buffer) as its peers'; so a node that keeps missing answers it should have got
stretches its own probe interval and timeout instead of accusing others faster.
"""

from __future__ import annotations


class Awareness:
    """A score in [0, max-1]; timeouts are multiplied by score + 1."""

    __slots__ = ("_max", "score")

    def __init__(self, max_multiplier: int) -> None:
        self._max = max_multiplier
        self.score = 0

    def apply(self, delta: int) -> None:
        self.score = min(max(self.score + delta, 0), self._max - 1)

    @property
    def multiplier(self) -> int:
        return self.score + 1

    def scale(self, timeout_s: float) -> float:
        return timeout_s * (self.score + 1)
