"""DNS seed discovery without a network: answers to seeds, and what one round logs and joins."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import dns.exception
import dns.resolver
import pytest

from meshproxy import log
from meshproxy.counters import Counters
from meshproxy.gossip.dnsdiscovery import (
    DnsDiscovery,
    Failed,
    Found,
    Lookup,
    failure_of,
    merge,
    normalize,
    plan_round,
    seeds_of,
    status_of,
)
from meshproxy.gossip.messages import Addr

PORT = 7946
ME: Addr = ("10.0.0.1", PORT)
TIMEOUT = Failed("timeout", "LifetimeTimeout: ...")


def test_seeds_are_the_addresses_on_our_port_deduplicated_sorted_without_us() -> None:
    """Every address becomes one seed on our own gossip port, sorted by address (IPv4
    first), duplicates and this node's own address dropped."""
    answers = ["10.0.0.10", "10.0.0.2", "10.0.0.1", "10.0.0.2", "fd00::1", "10.0.0.9"]
    assert seeds_of(answers, PORT, ME) == (
        ("10.0.0.2", PORT),
        ("10.0.0.9", PORT),
        ("10.0.0.10", PORT),
        ("fd00::1", PORT),
    )


def test_ipv6_spellings_are_one_address_and_ours_is_dropped_in_any_spelling() -> None:
    """Two spellings of one IPv6 address are one seed; our own, spelled otherwise, is none."""
    me: Addr = ("fd00:0:0:0:0:0:0:1", PORT)
    assert normalize("FD00:0::1") == "fd00::1"
    assert normalize("not-an-ip") == "not-an-ip"
    assert seeds_of(["fd00::1", "fd00::2", "FD00:0:0::2"], PORT, me) == (("fd00::2", PORT),)


def test_an_address_of_ours_on_another_port_is_not_us() -> None:
    """Only our advertised address and port is dropped: the seeds use our port, so a node
    advertising another port sees its own host as a seed (that is where the peers are)."""
    assert seeds_of(["10.0.0.1"], PORT, ("10.0.0.1", PORT + 1)) == (("10.0.0.1", PORT),)


def test_the_first_round_joins_every_seed() -> None:
    """With no previous answer every seed is new: all are added and joined."""
    plan = plan_round(
        {}, {"svc": Found(("10.0.0.2", "10.0.0.3", "10.0.0.1"))}, PORT, ME, alone=False
    )
    expected = (("10.0.0.2", PORT), ("10.0.0.3", PORT))
    assert plan.seeds == plan.added == plan.join == expected
    assert plan.removed == ()
    assert plan.answers == {"svc": ("10.0.0.2", "10.0.0.3", "10.0.0.1")}


def test_later_rounds_join_only_what_is_new_and_report_what_went() -> None:
    """A round joins the seeds not in the previous one; those that went are reported."""
    previous = {"svc": ("10.0.0.2", "10.0.0.3")}
    plan = plan_round(previous, {"svc": Found(("10.0.0.3", "10.0.0.4"))}, PORT, ME, alone=False)
    assert plan.seeds == (("10.0.0.3", PORT), ("10.0.0.4", PORT))
    assert plan.added == plan.join == (("10.0.0.4", PORT),)
    assert plan.removed == (("10.0.0.2", PORT),)


def test_an_unchanged_answer_joins_nobody_unless_we_are_alone() -> None:
    """The same answer again joins nobody, but every seed while this node knows no peer."""
    previous = {"svc": ("10.0.0.2", "10.0.0.3")}
    same = {"svc": Found(("10.0.0.3", "10.0.0.2"))}
    assert plan_round(previous, same, PORT, ME, alone=False).join == ()
    alone = plan_round(previous, same, PORT, ME, alone=True)
    assert alone.join == (("10.0.0.2", PORT), ("10.0.0.3", PORT))
    assert alone.added == alone.removed == ()


def test_a_failed_name_keeps_its_last_good_answer() -> None:
    """A timeout or resolver error keeps what the name had; the other names move on."""
    previous = {"a": ("10.0.0.2",), "b": ("10.0.0.3",)}
    results: dict[str, Lookup] = {"a": TIMEOUT, "b": Found(("10.0.0.4",))}
    plan = plan_round(previous, results, PORT, ME, alone=False)
    assert plan.answers == {"a": ("10.0.0.2",), "b": ("10.0.0.4",)}
    assert plan.seeds == (("10.0.0.2", PORT), ("10.0.0.4", PORT))
    assert plan.removed == (("10.0.0.3", PORT),)


def test_a_name_that_never_answered_has_no_seeds_and_stays_out_of_the_answers() -> None:
    """A failure with no answer before is no seed and no (empty) answer to keep either."""
    plan = plan_round({}, {"a": TIMEOUT}, PORT, ME, alone=True)
    assert plan.answers == {}
    assert plan.seeds == plan.join == ()


def test_nxdomain_or_no_records_is_an_answer_without_seeds() -> None:
    """A name that is gone (a Service scaled to zero) removes its seeds: it is an answer."""
    previous = {"svc": ("10.0.0.2",)}
    plan = plan_round(previous, {"svc": Found((), "nxdomain")}, PORT, ME, alone=True)
    assert plan.answers == {"svc": ()}
    assert plan.seeds == plan.join == ()
    assert plan.removed == (("10.0.0.2", PORT),)


def test_two_names_listing_one_address_give_one_seed() -> None:
    """Seeds are deduplicated across names; a seed listed by another name stays."""
    previous = {"a": ("10.0.0.2",), "b": ("10.0.0.2",)}
    results: dict[str, Lookup] = {"a": Found(()), "b": Found(("10.0.0.2",))}
    plan = plan_round(previous, results, PORT, ME, alone=False)
    assert plan.seeds == (("10.0.0.2", PORT),)
    assert plan.added == plan.removed == ()


def test_a_and_aaaa_merge_into_one_lookup() -> None:
    """A name's A and AAAA lookups: a failure of either wins, else the union of both."""
    assert merge(Found(("10.0.0.2",)), Found((), "no records")) == Found(("10.0.0.2",))
    assert merge(Found(("10.0.0.2",)), Found(("fd00::2",))) == Found(("10.0.0.2", "fd00::2"))
    assert merge(Found(("10.0.0.2",)), TIMEOUT) == TIMEOUT
    assert merge(TIMEOUT, Found(("fd00::2",))) == TIMEOUT
    assert merge(Found((), "nxdomain"), Found((), "nxdomain")) == Found((), "nxdomain")
    assert merge(Found((), "nxdomain"), Found((), "no records")) == Found((), "no records")


def dns_error(cls: type[BaseException], **kwargs: object) -> BaseException:
    """An exception of dnspython's (whose constructors are untyped)."""
    make: Callable[..., BaseException] = cls
    return make(**kwargs)


def test_failures_are_labelled_by_kind() -> None:
    """Timeouts, resolvers that all failed, a missing configuration and the rest each have
    their own counter label."""
    timeout = dns_error(dns.resolver.LifetimeTimeout, timeout=2.0, errors=[])
    assert failure_of(timeout).reason == "timeout"
    assert failure_of(TimeoutError()).reason == "timeout"
    assert failure_of(dns_error(dns.resolver.NoNameservers)).reason == "resolver"
    assert failure_of(dns_error(dns.resolver.NoResolverConfiguration)).reason == "config"
    assert failure_of(dns_error(dns.exception.SyntaxError)).reason == "error"
    assert failure_of(OSError("unreachable")).reason == "error"


def test_status_names_what_a_change_of_state_is_logged_for() -> None:
    """A name is "ok", "empty: <why>" or "failed: <reason>": each change is one log line."""
    assert status_of(Found(("10.0.0.2",))) == "ok"
    assert status_of(Found((), "nxdomain")) == "empty: nxdomain"
    assert status_of(TIMEOUT) == "failed: timeout"


# ---- one round of the shell, with canned lookups --------------------------------------


class Scripted(DnsDiscovery):
    """A discovery whose rounds return canned lookups instead of asking DNS."""

    def __init__(self, script: list[dict[str, Lookup]], alone: Callable[[], bool]) -> None:
        self.joined: list[tuple[Addr, ...]] = []
        super().__init__(
            ["svc"],
            ME,
            lambda seeds: self.joined.append(tuple(seeds)),
            alone=alone,
            counters=Counters(),
        )
        self.script = script

    async def lookup_all(self) -> dict[str, Lookup]:
        return self.script.pop(0)


Logged = list[tuple[str, int, dict[str, object]]]


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> Logged:
    """Every event logged through meshproxy.log while the test runs."""
    events: Logged = []

    def record(name: str, level: int = logging.INFO, **fields: object) -> None:
        events.append((name, level, fields))

    monkeypatch.setattr(log, "event", record)
    return events


def run_rounds(discovery: DnsDiscovery, n: int) -> None:
    async def rounds() -> None:
        for _ in range(n):
            await discovery.round()

    asyncio.run(rounds())


def names(events: Logged) -> list[str]:
    return [name for name, _, _ in events]


def test_rounds_count_every_failure_but_log_each_change_of_state_once(logged: Logged) -> None:
    """Three timeouts in a row are three counts and one warning; the answer kept meanwhile
    is joined again while alone; recovery and an empty answer are each logged once."""
    ok = Found(("10.0.0.2", "10.0.0.3"))
    script: list[dict[str, Lookup]] = [{"svc": ok}, {"svc": TIMEOUT}, {"svc": TIMEOUT}]
    script += [{"svc": TIMEOUT}, {"svc": ok}, {"svc": Found((), "nxdomain")}]
    script += [{"svc": Found((), "nxdomain")}]
    alone = iter([False, False, True, False, False, False, False])
    discovery = Scripted(script, lambda: next(alone))
    run_rounds(discovery, 7)

    assert discovery.counters.get("gossip_dns_failures", reason="timeout") == 3
    assert names(logged) == [
        "dns_resolved",
        "dns_seeds",
        "dns_failed",
        "dns_resolved",
        "dns_empty",
        "dns_seeds",
    ]
    failed = logged[2]
    assert failed[1] == logging.WARNING
    assert failed[2]["reason"] == "timeout"
    assert failed[2]["kept"] == 2
    assert logged[1][2] == {"added": "10.0.0.2:7946,10.0.0.3:7946", "removed": "-", "seeds": 2}
    assert logged[5][2] == {"added": "-", "removed": "10.0.0.2:7946,10.0.0.3:7946", "seeds": 0}
    both = (("10.0.0.2", PORT), ("10.0.0.3", PORT))
    # The first round, then the third (alone: the kept answer is joined again).
    assert discovery.joined == [both, both]
    assert discovery.found == 0


def test_ipv6_seeds_are_logged_bracketed(logged: Logged) -> None:
    """An IPv6 seed is written [addr]:port in the dns_seeds line."""
    discovery = Scripted([{"svc": Found(("fd00::2",))}], lambda: False)
    run_rounds(discovery, 1)
    assert logged[-1][2]["added"] == "[fd00::2]:7946"
    assert discovery.joined == [(("fd00::2", PORT),)]
    assert discovery.found == 1


def test_a_round_that_finds_nobody_joins_nobody(logged: Logged) -> None:
    """An empty answer never reaches the agent as an empty join (that would drop its seeds)."""
    seen: list[Sequence[Addr]] = []
    discovery = Scripted([{"svc": Found((), "nxdomain")}], lambda: True)
    discovery.join = seen.append
    run_rounds(discovery, 1)
    assert seen == []
    assert names(logged) == ["dns_empty"]
