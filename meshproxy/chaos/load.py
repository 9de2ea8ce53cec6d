"""Steady client load for chaos scenarios, run inside an app container.

``python -m meshproxy.chaos.load --host EDGE --port 6033 --duration-s 12``

Each worker thread opens a session through the edge, asks the backend who connected
(``USER()`` names the address the last proxy dialled from, which ``--middle ADDR=NAME``
maps to a node name), runs a few paced queries and disconnects, so new connections keep
flowing. A failed connect or a broken session is counted and the worker reconnects at
once; a query that answers only after half a second is reported as stalled. Output is
JSON lines on stdout, one per 100 ms bucket and one per client event, so
the harness can follow the load live and build the scenario's timeline from it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import pymysql

BUCKET_S = 0.1
CONNECT_RETRY_S = 0.05
STALL_S = 0.5  # a query that took this long is reported (a "SELECT 1" takes milliseconds)


@dataclass
class Totals:
    """Counts of the bucket being filled; guarded by ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    queries: int = 0
    connects: int = 0
    errors: int = 0
    by_middle: Counter[str] = field(default_factory=Counter)  # new sessions


class Output:
    """JSON lines on stdout, one writer at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def emit(self, record: dict[str, object]) -> None:
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    user: str
    password: str
    database: str
    queries_per_session: int
    pause_s: float
    connect_timeout_s: float
    read_timeout_s: float
    middles: dict[str, str]


def middle_of(user: str, middles: dict[str, str]) -> str:
    """``monitor@10.231.3.13`` -> the node that dialled from that address."""
    address = user.rpartition("@")[2]
    return middles.get(address, address)


def worker(index: int, settings: Settings, totals: Totals, out: Output, stop: float) -> None:
    failed_at: float | None = None
    # Start out of step with the other workers, so their sessions do not begin in waves.
    time.sleep(random.uniform(0, settings.queries_per_session * settings.pause_s))
    while time.time() < stop:
        middle = ""
        started = time.time()
        conn = pymysql.connections.Connection(
            host=settings.host,
            port=settings.port,
            user=settings.user,
            password=settings.password,
            database=settings.database,
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.read_timeout_s,
            write_timeout=settings.read_timeout_s,
            defer_connect=True,
        )
        try:
            try:
                conn.connect()
            except pymysql.err.MySQLError:
                # Once the server's greeting came through, the proxies had linked the
                # session to a middle: a break in the login is a session's, not a new
                # connection's, failure (which middle is not known yet).
                greeted = getattr(conn, "server_version", None) is not None
                phase = "session_error" if greeted else "connect_error"
                raise
            phase = "session_error"
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT USER()")
                    row = cur.fetchone()
                    middle = middle_of(str(row[0]) if row else "", settings.middles)
                    with totals.lock:
                        totals.connects += 1
                        totals.by_middle[middle] += 1
                    if failed_at is not None:
                        out.emit({"ev": "reconnected", "t": time.time(), "w": index, "m": middle})
                        failed_at = None
                    for _ in range(settings.queries_per_session):
                        asked = time.time()
                        cur.execute("SELECT 1")
                        cur.fetchall()
                        waited = time.time() - asked
                        if waited >= STALL_S:
                            # Served in the end, but it hung: a paused middle that woke up.
                            out.emit(
                                {
                                    "ev": "stalled",
                                    "t": asked,
                                    "w": index,
                                    "m": middle,
                                    "d": f"{waited:.3f}",
                                }
                            )
                        with totals.lock:
                            totals.queries += 1
                        time.sleep(settings.pause_s)
                        if time.time() >= stop:
                            break
            finally:
                conn.close()
        except pymysql.err.MySQLError as exc:
            failed_at = time.time()
            with totals.lock:
                totals.errors += 1
            event = {"ev": phase, "t": failed_at, "w": index, "m": middle, "d": str(exc)[:200]}
            if phase == "connect_error":
                event["s"] = started  # whether it began before or after a fault matters
            out.emit(event)
            if phase == "connect_error":
                time.sleep(CONNECT_RETRY_S)  # a refusing edge would otherwise be spun on


def report(totals: Totals, out: Output, stop: float) -> None:
    """One bucket line every 100 ms, aligned to the epoch so buckets from runs line up."""
    bucket = int(time.time() / BUCKET_S)
    while True:
        bucket += 1
        time.sleep(max(0.0, bucket * BUCKET_S - time.time()))
        with totals.lock:
            counts = (totals.queries, totals.connects, totals.errors)
            totals.queries = totals.connects = totals.errors = 0
            by_middle = dict(totals.by_middle)
            totals.by_middle.clear()
        start = round((bucket - 1) * BUCKET_S, 3)
        out.emit({"b": start, "q": counts[0], "c": counts[1], "e": counts[2], "m": by_middle})
        if bucket * BUCKET_S >= stop:
            return


def _middle_pair(text: str) -> tuple[str, str]:
    address, sep, name = text.partition("=")
    if not sep or not address or not name:
        raise argparse.ArgumentTypeError(f"expected ADDRESS=NAME, got {text!r}")
    return address, name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshproxy.chaos.load", description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=6033)
    parser.add_argument("--user", default="monitor")
    parser.add_argument("--password", default="monitor")
    parser.add_argument("--database", default="app")
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--duration-s", type=float, required=True)
    parser.add_argument("--queries-per-session", type=int, default=20)
    parser.add_argument("--pause-s", type=float, default=0.01, help="between queries")
    parser.add_argument("--connect-timeout-s", type=float, default=5.0)
    # Longer than any detection bound: a session the proxies leave hanging shows up as a
    # timeout instead of passing for a session the edge ended.
    parser.add_argument("--read-timeout-s", type=float, default=10.0)
    parser.add_argument("--middle", type=_middle_pair, action="append", default=[])
    args = parser.parse_args(argv)
    settings = Settings(
        host=args.host,
        port=args.port,
        user=args.user,
        password=args.password,
        database=args.database,
        queries_per_session=args.queries_per_session,
        pause_s=args.pause_s,
        connect_timeout_s=args.connect_timeout_s,
        read_timeout_s=args.read_timeout_s,
        middles=dict(args.middle),
    )
    totals = Totals()
    out = Output()
    stop = time.time() + args.duration_s
    threads = [
        threading.Thread(target=worker, args=(i, settings, totals, out, stop), daemon=True)
        for i in range(args.workers)
    ]
    for thread in threads:
        thread.start()
    report(totals, out, stop)
    # A worker stuck in a read gives up at its read timeout; do not wait longer than that.
    deadline = time.time() + args.read_timeout_s + args.connect_timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.time()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
