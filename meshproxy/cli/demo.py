"""``meshproxy demo``: the whole chain on loopback, under load, losing a middle halfway.

The chain topology (``topology/chain.toml``: one edge, three middles, two MySQL servers)
runs as local processes, exactly as ``meshproxy topology up chain --local`` runs it
(:class:`~meshproxy.topology.local.LocalTopology`): MariaDB when ``mariadbd`` is installed,
else the embedded mysql-mimic server (``MESHPROXY_DEMO_BACKEND=embedded`` or ``=mariadb``
chooses). Client threads connect through the edge, run a few queries per connection and
reconnect, so new connections keep flowing. Each middle dials the backends from its own
loopback address, which lets a client see which middle carried its session: both servers
report the connecting address in ``USER()``. Halfway, one middle is killed with SIGKILL.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pymysql

from meshproxy.config import Address
from meshproxy.errors import ConfigError
from meshproxy.testbed import mariadb
from meshproxy.topology.local import LocalTopology, choose_backends
from meshproxy.topology.spec import BACKENDS, Node, Service, Spec

QUERIES_PER_CONNECTION = 20


@dataclass(frozen=True)
class Cast:
    """Who plays what in the demo: the edge the clients use, the middles whose share of the
    queries is shown (those that dial the backends), and the one that is killed."""

    edge: Node
    service: Service
    middles: list[str]
    victim: str

    @classmethod
    def of(cls, spec: Spec) -> Cast:
        edge = next((n for n in spec.nodes if n.role == "edge"), None)
        if edge is None:
            raise ConfigError(spec.source, "node", "the demo needs an edge")
        tiers = {t.name: t for t in spec.tiers}
        middles = [
            n.name for n in spec.nodes if n.role == "middle" and tiers[n.tier].upstream == BACKENDS
        ]
        return cls(edge, spec.services[0], middles, middles[len(middles) // 2])


@dataclass
class Tally:
    """What the client threads saw; guarded by ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    queries: int = 0
    errors: int = 0
    per_middle: Counter[str] = field(default_factory=Counter)
    last_new_connection: dict[str, float] = field(default_factory=dict)
    last_error: str = ""


def _client(edge: Address, by_ip: dict[str, str], tally: Tally, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            conn = pymysql.connect(
                host=edge.host,
                port=edge.port,
                user=mariadb.APP_USER,
                password=mariadb.APP_PASSWORD,
                connect_timeout=5,
                read_timeout=5,
                # PyMySQL otherwise loads the system CA store on every connect (~30 ms).
                ssl_disabled=True,
            )
            with conn, conn.cursor() as cursor:
                cursor.execute("SELECT SUBSTRING_INDEX(USER(), '@', -1)")
                row = cursor.fetchone()
                middle = by_ip.get(str(row[0]) if row else "", "?")
                with tally.lock:
                    tally.last_new_connection[middle] = time.monotonic()
                for _ in range(QUERIES_PER_CONNECTION):
                    if stop.is_set():
                        break
                    cursor.execute("SELECT 1")
                    cursor.fetchone()
                    with tally.lock:
                        tally.queries += 1
                        tally.per_middle[middle] += 1
        except pymysql.err.MySQLError as exc:
            with tally.lock:
                tally.errors += 1
                tally.last_error = str(exc)
            time.sleep(0.05)


class Progress:
    """One line per interval: queries/s, errors so far, and each middle's share of queries."""

    def __init__(self, tally: Tally, middles: list[str]) -> None:
        self.tally = tally
        self.middles = middles
        self.start = self.last = time.monotonic()
        self.queries = 0
        self.share: Counter[str] = Counter()

    def line(self, killed: str) -> str:
        now = time.monotonic()
        with self.tally.lock:
            queries, errors = self.tally.queries, self.tally.errors
            share = self.tally.per_middle.copy()
        delta = share - self.share
        total = sum(delta.values()) or 1
        parts = "  ".join(
            f"{name} {100 * delta[name] / total:3.0f}%{' (killed)' if name == killed else ''}"
            for name in self.middles
        )
        qps = (queries - self.queries) / max(now - self.last, 1e-3)
        self.queries, self.share, self.last = queries, share, now
        return f"t={now - self.start:5.1f}s {qps:7.0f} q/s  errors {errors:<4d} {parts}"


def run_demo(duration_s: float = 20.0, clients: int = 8, spec: Spec | None = None) -> int:
    """Run the demo on ``spec`` (default: the chain spec shipped with meshproxy)."""
    if spec is None:
        from meshproxy.topology import packaged_spec

        spec = packaged_spec("chain")
    cast = Cast.of(spec)
    kind = choose_backends()
    if problem := kind.unavailable():
        print(f"meshproxy demo: {problem}", file=sys.stderr)
        return 1
    cluster = LocalTopology(spec, kind, prefix="meshproxy-demo-")
    stop = threading.Event()
    threads: list[threading.Thread] = []
    victim, edge = cast.victim, cast.edge.name
    try:
        print(
            f"starting {len(spec.backends)} {kind.label}, {len(cast.middles)} middles"
            f" {cast.middles} and edge {edge} in {cluster.dir}"
        )
        cluster.start()
        at = cluster.addressing
        listener = Address.parse(at.listener(cast.edge, cast.service))
        by_ip = {at.source_ip(n): n.name for n in spec.nodes if n.name in cast.middles}
        print(f"edge {edge} listens on {listener}; {clients} clients start now\n")
        tally = Tally()
        threads = [
            threading.Thread(target=_client, args=(listener, by_ip, tally, stop), daemon=True)
            for _ in range(clients)
        ]
        for thread in threads:
            thread.start()
        progress = Progress(tally, cast.middles)
        killed_at: float | None = None
        while (elapsed := time.monotonic() - progress.start) < duration_s:
            if killed_at is None and elapsed >= duration_s / 2:
                cluster.kill(victim)
                killed_at = time.monotonic()
                print(f"*** t={elapsed:5.1f}s middle {victim} killed with SIGKILL ***", flush=True)
            time.sleep(1.0)
            print(progress.line(victim if killed_at else ""), flush=True)
        stop.set()
        for thread in threads:
            thread.join(10)
        _summary(tally, time.monotonic() - progress.start, killed_at, cast)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        stop.set()
        cluster.stop()
    return 0


def _summary(tally: Tally, elapsed_s: float, killed_at: float | None, cast: Cast) -> None:
    rate = tally.queries / elapsed_s
    print("\nsummary")
    print(f"  queries          {tally.queries} in {elapsed_s:.1f} s ({rate:.0f}/s)")
    print(
        f"  client errors    {tally.errors}"
        + (f" (last: {tally.last_error})" if tally.errors else "")
    )
    for name in cast.middles:
        print(f"  via {name:<13}{tally.per_middle[name]} queries")
    if killed_at is not None:
        last = tally.last_new_connection.get(cast.victim, 0.0)
        after = max(0.0, last - killed_at)
        print(
            f"  {cast.victim} killed; its last new connection came {after * 1000:.0f} ms after"
            " the kill (0 = none after)"
        )
    print(
        "  errors are sessions that were open on the killed middle: a TCP proxy cannot move"
        " a live MySQL session, so those clients reconnect and land on another middle."
    )
