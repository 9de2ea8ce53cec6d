"""Upstream choice: a pure policy over an immutable snapshot of a group's members.

Power of two choices on active connections, weighted: pick two distinct eligible members at
random in proportion to their weights, send the connection to the one with fewer active
connections per unit of weight. It balances nearly as well as least-connections without
every edge herding onto the same momentarily-idle member.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final

from meshproxy.config import Address
from meshproxy.health.state import ServerState


class Role:
    """A server's side of a replication pool, as its last check saw it."""

    ANY: Final = ""  # not a replication pool, or not checked yet: either side may try it
    WRITER: Final = "writer"  # read_only is off
    READER: Final = "reader"  # read_only is on


@dataclass(frozen=True, slots=True)
class Member:
    address: Address
    weight: int
    state: ServerState
    role: str = Role.ANY


def choose(
    members: tuple[Member, ...],
    active: Mapping[Address, int],
    exclude: Collection[Address],
    rng: random.Random,
) -> Member | None:
    """The member a new connection should go to, or None when none is eligible."""
    eligible = [
        m
        for m in members
        if m.state is ServerState.ONLINE and m.weight > 0 and m.address not in exclude
    ]
    if len(eligible) <= 1:
        return eligible[0] if eligible else None
    weights = [m.weight for m in eligible]
    first = rng.choices(range(len(eligible)), weights)[0]
    weights[first] = 0
    second = rng.choices(range(len(eligible)), weights)[0]
    a, b = eligible[first], eligible[second]
    load_a = active.get(a.address, 0) / a.weight
    load_b = active.get(b.address, 0) / b.weight
    return a if load_a <= load_b else b
