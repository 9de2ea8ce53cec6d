"""Seed discovery from DNS: ``discovery = "dns"``.

Every ``dns_interval_s`` (the first round at start) each of ``dns_names`` is resolved for
its A and AAAA records through the resolver's search list, so short names work where the
platform's resolver has a search path: a Kubernetes headless Service (``chain-gossip``),
swarm's ``tasks.middle``. Every address is a seed on this node's own advertised gossip
port (every node of such a deployment gossips on the same port); this node's own address
is dropped. ``join`` gets the seeds that were not in the previous round, or every seed
while this node knows no live peer, so a node that lost everyone keeps knocking.

A name that does not exist or has no records (a Service with no pods yet) is an answer: it
has no seeds. A timeout or a resolver error is not: the name keeps its last good answer,
the failure is counted in ``gossip_dns_failures{reason}``, and logged when the name's state
changes. DNS complements static seeds and gossip's own anti-entropy; it never stops them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from meshproxy import log
from meshproxy.counters import Counters
from meshproxy.gossip.messages import Addr
from meshproxy.supervise import Supervisor

Join = Callable[[Sequence[Addr]], None]

RECORD_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)


# ---- the pure part --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Found:
    """A name resolved: its addresses (none for NXDOMAIN or an empty answer)."""

    addresses: tuple[str, ...]
    empty: str = ""  # why there are none: "nxdomain" or "no records"


@dataclass(frozen=True, slots=True)
class Failed:
    """A name could not be resolved this round (timeout, resolver error)."""

    reason: str  # "timeout", "resolver", "config" or "error": the counter's label
    error: str


Lookup = Found | Failed


@dataclass(frozen=True, slots=True)
class Plan:
    """What one round of lookups means for the seeds."""

    answers: dict[str, tuple[str, ...]]  # per name, its last good addresses
    seeds: tuple[Addr, ...]  # sorted, without duplicates or this node
    added: tuple[Addr, ...]
    removed: tuple[Addr, ...]
    join: tuple[Addr, ...]  # what to hand to the agent (maybe nothing)


def normalize(host: str) -> str:
    """One spelling per IP address (``::ffff:...``/zero runs of IPv6); other text as is."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def seeds_of(addresses: Iterable[str], port: int, me: Addr) -> tuple[Addr, ...]:
    """Addresses as gossip seeds on ``port``: deduplicated, sorted, without ``me``."""
    own = (normalize(me[0]), me[1])
    found = {(normalize(host), port) for host in addresses}
    found.discard(own)
    return tuple(sorted(found, key=_sort_key))


def _sort_key(seed: Addr) -> tuple[int, bytes | str, int]:
    try:
        ip = ipaddress.ip_address(seed[0])
    except ValueError:
        return (2, seed[0], seed[1])
    return (ip.version == 6, ip.packed, seed[1])


def plan_round(
    previous: Mapping[str, tuple[str, ...]],
    results: Mapping[str, Lookup],
    port: int,
    me: Addr,
    *,
    alone: bool,
) -> Plan:
    """Turn one round's lookups into seeds.

    A failed name keeps its answer of ``previous`` (none if it never had one); the seeds
    are every name's addresses on ``port`` without ``me``; ``join`` holds the seeds not in
    the previous round's, or all of them when this node is ``alone``.
    """
    answers: dict[str, tuple[str, ...]] = {}
    for name, result in results.items():
        if isinstance(result, Found):
            answers[name] = result.addresses
        elif name in previous:
            answers[name] = previous[name]
    before = set(seeds_of((a for addrs in previous.values() for a in addrs), port, me))
    seeds = seeds_of((a for addrs in answers.values() for a in addrs), port, me)
    added = tuple(s for s in seeds if s not in before)
    removed = tuple(sorted(before - set(seeds), key=_sort_key))
    return Plan(answers, seeds, added, removed, seeds if alone else added)


def status_of(result: Lookup) -> str:
    """A name's state for logging at change: "ok", "empty: ..." or "failed: ..."."""
    if isinstance(result, Failed):
        return f"failed: {result.reason}"
    return f"empty: {result.empty}" if not result.addresses else "ok"


def merge(a: Lookup, aaaa: Lookup) -> Lookup:
    """A name's A and AAAA lookups as one: failed if either failed, else their union."""
    if isinstance(a, Failed):
        return a
    if isinstance(aaaa, Failed):
        return aaaa
    addresses = tuple(dict.fromkeys(a.addresses + aaaa.addresses))
    if addresses:
        return Found(addresses)
    nxdomain = a.empty == aaaa.empty == "nxdomain"
    return Found((), "nxdomain" if nxdomain else "no records")


def failure_of(exc: BaseException) -> Failed:
    if isinstance(exc, dns.exception.Timeout | TimeoutError):
        reason = "timeout"
    elif isinstance(exc, dns.resolver.NoNameservers):
        reason = "resolver"  # every resolver answered SERVFAIL/REFUSED or could not be reached
    elif isinstance(exc, dns.resolver.NoResolverConfiguration):
        reason = "config"
    else:
        reason = "error"
    return Failed(reason, f"{type(exc).__name__}: {exc}")


# ---- the shell ------------------------------------------------------------------------


ALONE_RETRY_S = 1.0


class DnsDiscovery:
    """Resolve names every interval and join the gossip seeds they list."""

    def __init__(
        self,
        names: Sequence[str],
        advertise: Addr,
        join: Join,
        *,
        alone: Callable[[], bool],
        counters: Counters,
        interval_s: float = 10.0,
        timeout_s: float = 2.0,
        servers: Sequence[Addr] = (),
    ) -> None:
        self.names = tuple(names)
        self.advertise = advertise
        self.join = join
        self.alone = alone
        self.counters = counters
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.servers = tuple(servers)
        self.answers: dict[str, tuple[str, ...]] = {}
        self.seeds: tuple[Addr, ...] = ()
        self._status: dict[str, str] = {}
        self.tasks = Supervisor()

    @property
    def found(self) -> int:
        """How many seeds the names list now (this node not counted)."""
        return len(self.seeds)

    async def start(self) -> None:
        self.tasks.spawn("gossip dns discovery", self._loop)
        log.event(
            "dns_started",
            names=",".join(self.names),
            port=self.advertise[1],
            interval_s=self.interval_s,
            servers=_text(self.servers) or "system",
        )

    async def stop(self) -> None:
        await self.tasks.stop()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.round()
            # A node still alone asks again soon, as it retries static seeds: its peers'
            # records appear as they are scheduled, moments after it starts.
            interval = min(self.interval_s, ALONE_RETRY_S) if self.alone() else self.interval_s
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))

    async def round(self) -> Plan:
        """Resolve every name once, log and count what changed, join what is new."""
        results = await self.lookup_all()
        for name, result in results.items():
            self._note(name, result)
        plan = plan_round(
            self.answers, results, self.advertise[1], self.advertise, alone=self.alone()
        )
        self.answers = plan.answers
        if plan.added or plan.removed:
            log.event(
                "dns_seeds",
                added=_text(plan.added) or "-",
                removed=_text(plan.removed) or "-",
                seeds=len(plan.seeds),
            )
        self.seeds = plan.seeds
        if plan.join:
            self.join(plan.join)
        return plan

    def _note(self, name: str, result: Lookup) -> None:
        if isinstance(result, Failed):
            self.counters.inc("gossip_dns_failures", reason=result.reason)
        status = status_of(result)
        if self._status.get(name) == status:
            return
        self._status[name] = status
        if isinstance(result, Failed):
            kept = len(self.answers.get(name, ()))
            log.warning(
                "dns_failed", dns_name=name, reason=result.reason, error=result.error, kept=kept
            )
        elif not result.addresses:
            log.event("dns_empty", dns_name=name, why=result.empty)
        else:
            log.event("dns_resolved", dns_name=name, addresses=len(result.addresses))

    async def lookup_all(self) -> dict[str, Lookup]:
        """Every name's lookup, all at once; never raises for a DNS failure."""
        try:
            resolver = await self._resolver()
        except (dns.exception.DNSException, OSError, ValueError) as exc:
            failure = failure_of(exc)
            return dict.fromkeys(self.names, failure)
        async with asyncio.TaskGroup() as group:
            tasks = {
                (name, rdtype): group.create_task(self._lookup(resolver, name, rdtype))
                for name in self.names
                for rdtype in RECORD_TYPES
            }
        return {
            name: merge(
                tasks[name, dns.rdatatype.A].result(), tasks[name, dns.rdatatype.AAAA].result()
            )
            for name in self.names
        }

    async def _lookup(
        self, resolver: dns.asyncresolver.Resolver, name: str, rdtype: dns.rdatatype.RdataType
    ) -> Lookup:
        try:
            # dnspython bounds the query by ``lifetime``; the outer timeout is a backstop.
            async with asyncio.timeout(self.timeout_s + 1.0):
                answer = await resolver.resolve(
                    name,
                    rdtype,
                    search=True,
                    lifetime=self.timeout_s,
                    raise_on_no_answer=False,
                )
        except dns.resolver.NXDOMAIN:
            return Found((), "nxdomain")
        except (dns.exception.DNSException, OSError, TimeoutError, ValueError) as exc:
            return failure_of(exc)
        if answer.rrset is None:
            return Found((), "no records")
        return Found(tuple(str(getattr(rr, "address", "")) for rr in answer.rrset))

    async def _resolver(self) -> dns.asyncresolver.Resolver:
        """A resolver for this round: the system's configuration (read again each round:
        search list, ndots, resolvers), with ``servers`` instead of its resolvers if given."""
        servers = await self._nameservers()
        try:
            resolver = dns.asyncresolver.Resolver(configure=True)
        except dns.resolver.NoResolverConfiguration:
            if not servers:
                raise
            resolver = dns.asyncresolver.Resolver(configure=False)
        if servers:
            resolver.nameservers = servers
        resolver.cache = None
        # Each query gets ``timeout_s`` in all, shared by the resolvers it may have to try.
        resolver.lifetime = self.timeout_s
        resolver.timeout = self.timeout_s / max(1, len(resolver.nameservers))
        return resolver

    async def _nameservers(self) -> list[str | dns.nameserver.Nameserver]:
        found: list[str | dns.nameserver.Nameserver] = []
        loop = asyncio.get_running_loop()
        for host, port in self.servers:
            try:
                ipaddress.ip_address(host)
                addresses = [host]
            except ValueError:  # a resolver given by name: ask the system where it is
                async with asyncio.timeout(self.timeout_s):
                    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
                addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            found.extend(dns.nameserver.Do53Nameserver(a, port) for a in addresses)
        return found


def _text(seeds: Sequence[Addr]) -> str:
    return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in seeds)
