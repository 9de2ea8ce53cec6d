"""Lifeguard's dynamic suspicion timeout (memberlist ``suspicion.go``).

A suspicion starts with the long timeout; each independent confirmation (a different
member also failing to reach the suspect) shrinks it logarithmically towards the short one:

    timeout(c) = max(min, max - (max - min) * log(c + 1) / log(k + 1))

so c = k confirmations reach min. With no confirmations expected (k = 0) it is min at once.
"""

from __future__ import annotations

import math


def suspicion_timeout(confirmations: int, k: int, min_s: float, max_s: float) -> float:
    """The total timeout (from the start of the suspicion) after ``confirmations``."""
    if k < 1:
        return min_s
    frac = math.log(confirmations + 1.0) / math.log(k + 1.0)
    return max(min_s, max_s - frac * (max_s - min_s))


class Suspicion:
    """One suspicion of one member, with the senders that accused it so far."""

    __slots__ = ("_accusers", "confirmations", "k", "max_s", "min_s", "start")

    def __init__(self, accuser: str, k: int, min_s: float, max_s: float, start: float) -> None:
        self.k = k
        self.min_s = min_s
        self.max_s = max_s
        self.start = start
        self.confirmations = 0
        # The first accuser does not count as a confirmation of its own accusation.
        self._accusers = {accuser}

    @property
    def deadline(self) -> float:
        return self.start + suspicion_timeout(self.confirmations, self.k, self.min_s, self.max_s)

    def confirm(self, accuser: str) -> bool:
        """Count an accusation from a new member; False if it adds nothing (repeat, or k met)."""
        if self.confirmations >= self.k or accuser in self._accusers:
            return False
        self._accusers.add(accuser)
        self.confirmations += 1
        return True
