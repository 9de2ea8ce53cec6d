"""Upstream choice: eligibility, weighted power-of-two-choices on active connections."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshproxy.config import Address
from meshproxy.dataplane.router import Member, choose
from meshproxy.health.state import ServerState

A = Address("10.0.0.1", 3306)
B = Address("10.0.0.2", 3306)
C = Address("10.0.0.3", 3306)
D = Address("10.0.0.4", 3306)


def member(address: Address, weight: int = 1, state: ServerState = ServerState.ONLINE) -> Member:
    return Member(address, weight, state)


@pytest.mark.parametrize(
    "state", [ServerState.SHUNNED, ServerState.OFFLINE_SOFT, ServerState.OFFLINE_HARD]
)
def test_only_online_members_are_chosen(state: ServerState) -> None:
    """A member that is shunned or offline is never chosen while an ONLINE one exists."""
    members = (member(A, state=state), member(B), member(C, state=state))
    rng = random.Random(1)
    picks = {choose(members, {}, (), rng) for _ in range(200)}
    assert picks == {members[1]}


def test_excluded_members_are_never_chosen() -> None:
    """Members already tried for this connection are never chosen again."""
    members = (member(A), member(B), member(C), member(D))
    rng = random.Random(2)
    picks = {choose(members, {}, {A, C}, rng) for _ in range(500)}
    assert picks == {members[1], members[3]}


def test_none_when_no_member_is_eligible() -> None:
    """With every member down, excluded or absent, there is no choice."""
    rng = random.Random(3)
    down = (
        member(A, state=ServerState.SHUNNED),
        member(B, state=ServerState.OFFLINE_SOFT),
        member(C),
    )
    assert choose(down, {}, [C], rng) is None
    assert choose((), {}, (), rng) is None


def test_single_eligible_member_is_returned() -> None:
    """The only eligible member is returned, however loaded it is."""
    members = (member(A, state=ServerState.SHUNNED), member(B))
    assert choose(members, {B: 10_000}, (), random.Random(4)) == members[1]


@pytest.mark.parametrize(
    ("weights", "shares"),
    [
        pytest.param((3, 1), (0.75, 0.25), id="3:1"),
        pytest.param((3, 1, 1), (0.6, 0.2, 0.2), id="3:1:1"),
        pytest.param((1, 1, 1, 1), (0.25, 0.25, 0.25, 0.25), id="equal"),
    ],
)
def test_idle_members_are_chosen_in_proportion_to_weight(
    weights: tuple[int, ...], shares: tuple[float, ...]
) -> None:
    """With equal (zero) active counts, choices follow the weights."""
    addresses = (A, B, C, D)[: len(weights)]
    members = tuple(member(a, w) for a, w in zip(addresses, weights, strict=True))
    rng = random.Random(5)
    draws = 10_000
    counts = Counter(choose(members, {}, (), rng) for _ in range(draws))
    for m, share in zip(members, shares, strict=True):
        assert counts[m] / draws == pytest.approx(share, abs=0.02)


def test_long_lived_connections_spread_in_proportion_to_weight() -> None:
    """When every choice becomes a connection that stays open, connections split by weight."""
    members = (member(A, 3), member(B, 1))
    active: Counter[Address] = Counter()
    rng = random.Random(6)
    for _ in range(4_000):
        chosen = choose(members, active, (), rng)
        assert chosen is not None
        active[chosen.address] += 1
    assert active[A] / active.total() == pytest.approx(0.75, abs=0.01)


@pytest.mark.parametrize(
    ("weights", "active", "winner"),
    [
        pytest.param((1, 1), {A: 5, B: 2}, B, id="fewer-active"),
        pytest.param((1, 1), {A: 1}, B, id="missing-counts-as-zero"),
        pytest.param((3, 1), {A: 6, B: 3}, A, id="fewer-per-weight-despite-more-active"),
        pytest.param((3, 1), {A: 6, B: 6}, A, id="equal-active-heavier-wins"),
        pytest.param((1, 4), {A: 1, B: 3}, B, id="light-member-loaded-per-weight"),
    ],
)
def test_of_two_members_the_less_loaded_per_weight_always_wins(
    weights: tuple[int, int], active: dict[Address, int], winner: Address
) -> None:
    """With two eligible members, the one with fewer active connections per weight always wins."""
    members = (member(A, weights[0]), member(B, weights[1]))
    for seed in range(300):
        chosen = choose(members, active, (), random.Random(seed))
        assert chosen is not None
        assert chosen.address == winner


def test_most_loaded_member_is_never_chosen() -> None:
    """Comparing two distinct candidates, the uniquely most loaded member never wins."""
    members = (member(A), member(B), member(C), member(D))
    active = {A: 1, B: 2, C: 3, D: 50}
    rng = random.Random(7)
    counts = Counter(choose(members, active, (), rng) for _ in range(2_000))
    assert members[3] not in counts
    assert counts[members[0]] > counts[members[1]] > counts[members[2]] > 0


_STATES = st.sampled_from(list(ServerState))


@given(
    specs=st.lists(
        st.tuples(st.integers(1, 10), _STATES, st.integers(0, 100), st.booleans()),
        min_size=0,
        max_size=6,
    ),
    seed=st.integers(0, 2**32),
)
def test_choice_is_always_an_eligible_member_and_never_the_unique_max(
    specs: list[tuple[int, ServerState, int, bool]], seed: int
) -> None:
    """Any choice is ONLINE and not excluded, and with two or more eligible never the worst."""
    members = tuple(
        Member(Address(f"10.0.0.{i}", 3306), weight, state)
        for i, (weight, state, _, _) in enumerate(specs)
    )
    active = {m.address: spec[2] for m, spec in zip(members, specs, strict=True)}
    exclude = {m.address for m, spec in zip(members, specs, strict=True) if spec[3]}
    eligible = [m for m in members if m.state is ServerState.ONLINE and m.address not in exclude]
    chosen = choose(members, active, exclude, random.Random(seed))
    if not eligible:
        assert chosen is None
        return
    assert chosen in eligible
    loads = sorted(active[m.address] / m.weight for m in eligible)
    if len(loads) >= 2 and loads[-1] > loads[-2]:
        assert active[chosen.address] / chosen.weight < loads[-1]


def test_weight_zero_members_take_no_new_connections() -> None:
    """A member of weight 0 is drained: never chosen, and choosing among only such is None."""
    rng = random.Random(3)
    picks = {choose((member(A, weight=0), member(B)), {}, (), rng) for _ in range(100)}
    assert picks == {member(B)}
    assert choose((member(A, weight=0), member(C, weight=0)), {}, (), rng) is None
