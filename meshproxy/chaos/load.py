"""Steady client load for chaos scenarios, run inside an app container.

``python -m meshproxy.chaos.load --host EDGE --port 6033 --duration-s 12``

Each worker thread opens a session through the edge, asks the backend who connected
(``USER()`` names the address the last proxy dialled from, which ``--middle ADDR=NAME``
maps to a node name), runs a few paced queries and disconnects, so new connections keep
flowing. A failed connect or a broken session is counted and the worker reconnects at
once; a query that answers only after half a second is reported as stalled. Output is
JSON lines on stdout, one per 100 ms bucket and one per client event, so
the harness can follow the load live and build the scenario's timeline from it.

``--mode transactions`` (session-mode topologies) keeps ONE session per worker for the
whole run instead, and loops transactions on it: read-only (``BEGIN; SELECT; SELECT;
COMMIT``) and read-write (``BEGIN; UPDATE counters SET n = n + 1 WHERE client = ME;
SELECT; COMMIT``), each followed by a ``SELECT USER()`` outside the transaction (which
middle the session is on). Every statement's answer is the same on any middle, so every
transaction may be replayed elsewhere. A bucket's ``m`` then counts transactions per middle (not new
sessions); an error event carries its MySQL error ``code``, the ``stmt`` it answered and
the transaction kind ``tx`` (``ro``/``rw``/``""``); after a 9004 or 9005 a ``DO 1``
checks that the session carries on outside a transaction. A worker whose session broke
(any other error, or still in a transaction) reconnects and counts a ``broken`` session.
At the end each worker reads its counter row back and emits one ``{"client": ...}`` line:
the commits it saw succeed, the counter's value, the 9004s on its read-write COMMITs, and
its longest statement wait.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import socket
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
# meshproxy's documented errors of a session that moved: the session stays usable.
ER_OUTCOME_UNKNOWN = 9004
ER_NOT_REPLAYED = 9005
DOCUMENTED = (ER_OUTCOME_UNKNOWN, ER_NOT_REPLAYED)
# The table of counters, one row per worker (``client``: host-worker).
CREATE_COUNTERS = (
    "CREATE TABLE IF NOT EXISTS counters (client VARCHAR(64) PRIMARY KEY,"
    " n BIGINT NOT NULL) ENGINE=InnoDB"
)
READ_COUNTER = "SELECT n FROM counters WHERE client = %s"
SERVER_STATUS_IN_TRANS = 1


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

    def stalled(self, asked: float, waited: float, worker: int, middle: str, **more: str) -> None:
        """A statement served in the end after hanging: a paused middle that woke up."""
        if waited >= STALL_S:
            record = {"ev": "stalled", "t": asked, "w": worker, "m": middle, "d": f"{waited:.3f}"}
            self.emit({**record, **more})


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


def _connect(
    settings: Settings, *, autocommit: bool = False, defer_connect: bool = False
) -> pymysql.connections.Connection:
    """A connection to the edge with the load's login and timeouts (PyMySQL's defaults
    for ``autocommit`` and ``defer_connect``)."""
    return pymysql.connections.Connection(
        host=settings.host,
        port=settings.port,
        user=settings.user,
        password=settings.password,
        database=settings.database,
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        write_timeout=settings.read_timeout_s,
        autocommit=autocommit,
        defer_connect=defer_connect,
    )


def worker(index: int, settings: Settings, totals: Totals, out: Output, stop: float) -> None:
    failed_at: float | None = None
    # Start out of step with the other workers, so their sessions do not begin in waves.
    time.sleep(random.uniform(0, settings.queries_per_session * settings.pause_s))
    while time.time() < stop:
        middle = ""
        started = time.time()
        conn = _connect(settings, defer_connect=True)
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
                        out.stalled(asked, time.time() - asked, index, middle)
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


def error_code(exc: BaseException) -> int:
    """The MySQL error code of a PyMySQL error (0 when it carries none)."""
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else 0


@dataclass
class Session:
    """One transactions-mode worker's tally."""

    client: str
    seen: int = 0  # read-write transactions whose COMMIT it saw succeed
    unknown_commits: int = 0  # 9004 on a read-write COMMIT: may have committed
    unknown_other: int = 0  # 9004 on anything else
    rolled_back: int = 0  # 9005
    broken: int = 0  # sessions that broke and were opened again
    other_errors: int = 0  # any error but 9004/9005
    transactions: int = 0  # transactions that ended with a successful COMMIT, both kinds
    longest_wait: float = 0.0


class _Failed(Exception):
    """A statement failed; the worker decides what the session does next."""

    def __init__(self, code: int, stmt: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.stmt, self.detail = code, stmt, detail


def tx_worker(
    index: int,
    settings: Settings,
    totals: Totals,
    out: Output,
    stop: float,
    tally: Session,
    ready: threading.Barrier,
) -> None:
    """One persistent session looping transactions (see the module)."""
    me = tally.client
    conn: pymysql.connections.Connection | None = None
    middle = ""

    def statement(
        sql: str, stmt: str, tx: str, args: tuple[object, ...] = ()
    ) -> tuple[tuple[object, ...], ...]:
        assert conn is not None
        asked = time.time()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args or None)
                rows: tuple[tuple[object, ...], ...] = tuple(cur.fetchall())
        except pymysql.err.MySQLError as exc:
            raise _Failed(error_code(exc), stmt, str(exc)[:200]) from None
        finally:
            waited = time.time() - asked
            tally.longest_wait = max(tally.longest_wait, waited)
            out.stalled(asked, waited, index, middle, stmt=stmt, tx=tx)
        with totals.lock:
            totals.queries += 1
        return rows

    def open_session() -> None:
        nonlocal conn
        while time.time() < stop + settings.read_timeout_s:
            started = time.time()
            try:
                conn = _connect(settings, autocommit=True)
            except pymysql.err.MySQLError as exc:
                with totals.lock:
                    totals.errors += 1
                tally.other_errors += 1
                out.emit(
                    {
                        "ev": "connect_error",
                        "t": time.time(),
                        "w": index,
                        "m": "",
                        "d": str(exc)[:200],
                        "s": started,
                        "code": error_code(exc),
                    }
                )
                time.sleep(CONNECT_RETRY_S)
            else:
                with totals.lock:
                    totals.connects += 1
                return

    def outside_transaction() -> None:
        """After 9004/9005 the session must carry on outside a transaction: ``DO 1`` is
        answered with an OK packet, whose status flags say (a result set's EOF does not
        update PyMySQL's ``server_status``)."""
        assert conn is not None
        statement("DO 1", "CHECK", "")
        if conn.server_status & SERVER_STATUS_IN_TRANS:
            raise _Failed(0, "CHECK", "still in a transaction after 9004/9005")

    def where() -> str:
        row = statement("SELECT USER()", "USER", "")
        return middle_of(str(row[0][0]) if row else "", settings.middles)

    open_session()
    try:
        middle = where()
        statement(
            CREATE_COUNTERS,
            "CREATE",
            "",
        )
        statement("REPLACE INTO counters (client, n) VALUES (%s, 0)", "REPLACE", "", (me,))
    except _Failed as failed:
        out.emit(
            {
                "ev": "session_error",
                "t": time.time(),
                "w": index,
                "m": "",
                "d": f"setup: {failed.detail}",
                "code": failed.code,
                "stmt": failed.stmt,
            }
        )
        tally.other_errors += 1
    # Every counter row exists from here on: COUNT(*) below answers the same everywhere.
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait()
    n = 0
    checking = False  # after 9004/9005: is the session outside a transaction?
    while time.time() < stop:
        n += 1
        tx = "rw" if n % 2 else "ro"
        try:
            if checking:
                checking = False
                outside_transaction()
            statement("BEGIN", "BEGIN", tx)
            if tx == "rw":
                statement("UPDATE counters SET n = n + 1 WHERE client = %s", "UPDATE", tx, (me,))
                statement(READ_COUNTER, "SELECT", tx, (me,))
            else:
                statement(READ_COUNTER, "SELECT", tx, (me,))
                statement("SELECT COUNT(*) FROM counters", "SELECT", tx)
            statement("COMMIT", "COMMIT", tx)
            tally.transactions += 1
            tally.seen += tx == "rw"
            # Where the session is now: the middle that committed it (unless it moved
            # between the COMMIT and this), and most likely the next one's.
            middle = where()
            with totals.lock:
                totals.by_middle[middle] += 1
        except _Failed as failed:
            with totals.lock:
                totals.errors += 1
            code, what = failed.code, failed.stmt
            if code == ER_OUTCOME_UNKNOWN and what == "COMMIT" and tx == "rw":
                tally.unknown_commits += 1
            elif code == ER_OUTCOME_UNKNOWN:
                tally.unknown_other += 1
            elif code == ER_NOT_REPLAYED:
                tally.rolled_back += 1
            else:
                tally.other_errors += 1
            assert conn is not None
            usable = code in DOCUMENTED and conn.open
            event = {
                "ev": "session_error",
                "t": time.time(),
                "w": index,
                "m": middle,
                "d": failed.detail,
                "code": code,
                "stmt": what,
                "tx": tx if what not in ("USER", "CHECK") else "",
            }
            if not usable:
                event["broken"] = True
            out.emit(event)
            checking = usable
            if not usable:
                tally.broken += 1
                with contextlib.suppress(pymysql.err.Error):
                    conn.close()
                open_session()
                out.emit({"ev": "reconnected", "t": time.time(), "w": index, "m": ""})
        time.sleep(settings.pause_s)
    value: int | None = None
    try:
        rows = statement(READ_COUNTER, "FINAL", "", (me,))
        value = int(str(rows[0][0])) if rows else None
    except _Failed as failed:
        out.emit(
            {
                "ev": "session_error",
                "t": time.time(),
                "w": index,
                "m": middle,
                "d": f"final read: {failed.detail}",
                "code": failed.code,
                "stmt": "FINAL",
            }
        )
    finally:
        if conn is not None:
            with contextlib.suppress(pymysql.err.Error):
                conn.close()
    out.emit(
        {
            "client": me,
            "w": index,
            "t": time.time(),
            "seen": tally.seen,
            "counter": value,
            "unknown_commits": tally.unknown_commits,
            "unknown_other": tally.unknown_other,
            "rolled_back": tally.rolled_back,
            "broken": tally.broken,
            "other_errors": tally.other_errors,
            "transactions": tally.transactions,
            "longest_wait": round(tally.longest_wait, 3),
        }
    )


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
    parser.add_argument(
        "--mode",
        choices=("sessions", "transactions"),
        default="sessions",
        help="short sessions of SELECT 1, or one persistent session per worker of transactions",
    )
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
    if args.mode == "transactions":
        ready = threading.Barrier(args.workers, timeout=args.duration_s)
        host = socket.gethostname()
        threads = [
            threading.Thread(
                target=tx_worker,
                args=(i, settings, totals, out, stop, Session(f"{host}-{i}"), ready),
                daemon=True,
            )
            for i in range(args.workers)
        ]
    else:
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
