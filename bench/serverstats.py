"""What MariaDB saw of a run: the connections made to it, and how many were open at once.

A pooling proxy (meshproxy in session mode, ProxySQL) should open few backend connections
however many clients come and go, so the benchmark counts them at the server itself:

- ``SHOW GLOBAL STATUS LIKE 'Connections'`` before and after a run: every connection the
  server accepted, health checks included;
- ``information_schema.USER_STATISTICS`` (``userstat`` is switched on at the start) splits
  that by user: the pools and sysbench log in as the app user, the health checks of
  HAProxy, meshproxy and ProxySQL as the monitor user, so the app user's count is the new
  backend connections of the path, with the checks taken out rather than estimated;
- while the run lasts, a thread samples ``Threads_connected`` and the app user's open
  connections (``information_schema.PROCESSLIST``) every ``SAMPLE_S`` and keeps the
  maxima. The harness's own two connections are left out of both;
- and, when asked (the storm, many clients), the connections the path's own proxy
  processes hold open to the server: the established TCP connections to its port (from
  the kernel, by sock_diag) whose sockets those processes own.

Every pool that is idle in the run (the other paths' proxies) keeps its idle connections
open; they count in ``Threads_connected`` and the app user's open connections, but not in
the path's own count nor in the new connections, unless a pool replaces one of them
during the run (``max_idle_s``, ``max_age_s``), which is rare in a benchmark this short.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pymysql

from bench.procs import established_to, socket_inodes, with_descendants
from meshproxy.testbed import mariadb

SAMPLE_S = 0.1
PATH_SAMPLE_S = 0.2  # counting a path's own sockets costs a few ms, so less often


@dataclass(frozen=True)
class Counters:
    connections: int  # Connections: every connection the server has accepted
    app: int | None  # of them, the app user's (None without USER_STATISTICS)
    monitor: int | None  # and the monitor user's: health checks


@dataclass(frozen=True)
class Backend:
    """MariaDB's side of one run."""

    connections: int  # new connections, all users
    app_logins: int | None  # new connections as the app user: the path's backend logins
    check_logins: int | None  # new connections as the monitor user: health checks
    threads_max: int | None  # most Threads_connected seen, the harness's own left out
    app_threads_max: int | None  # most open connections of the app user seen
    path_max: int | None  # most connections the path's own processes held to the server
    samples: int


def _connect(port: int) -> pymysql.Connection:
    return pymysql.connect(
        host="127.0.0.1",
        port=port,
        user=mariadb.APP_USER,
        password=mariadb.APP_PASSWORD,
        autocommit=True,
        connect_timeout=5,
        read_timeout=10,
    )


class Watch:
    """Two connections of our own to MariaDB: one for counters, one for the sampler."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = _connect(port)
        self.sampler = _connect(port)
        self.own_ids = (self.conn.thread_id(), self.sampler.thread_id())
        self.userstat = True
        try:
            self._query("SET GLOBAL userstat = 1")
        except pymysql.err.MySQLError:
            self.userstat = False

    def close(self) -> None:
        for conn in (self.conn, self.sampler):
            with contextlib.suppress(pymysql.err.Error):
                conn.close()

    def _query(self, sql: str) -> tuple[tuple[object, ...], ...]:
        with self.conn.cursor() as cursor:
            cursor.execute(sql)
            return tuple(cursor.fetchall())

    def counters(self) -> Counters:
        rows = self._query("SHOW GLOBAL STATUS LIKE 'Connections'")
        connections = int(str(rows[0][1]))
        if not self.userstat:
            return Counters(connections, None, None)
        rows = self._query("SELECT USER, TOTAL_CONNECTIONS FROM information_schema.USER_STATISTICS")
        users = {str(row[0]): int(str(row[1])) for row in rows}
        app = users.get(mariadb.APP_USER, 0)
        monitor = users.get(mariadb.MONITOR_USER, 0)
        return Counters(connections, app, monitor)

    def open_now(self) -> tuple[int, int]:
        """Threads_connected and the app user's open connections, ours left out."""
        return _open_now(self.conn, self.own_ids)

    @contextlib.contextmanager
    def recording(self, pids: Sequence[int] = ()) -> Iterator[Recorder]:
        """Counters before and after the block, and the sampled maxima during it; with
        ``pids``, also the most connections those processes held to the server."""
        recorder = Recorder(self, pids)
        recorder.start()
        try:
            yield recorder
        finally:
            recorder.stop()


def _open_now(conn: pymysql.Connection, own: tuple[int, int]) -> tuple[int, int]:
    sql = (
        "SELECT (SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS"
        " WHERE VARIABLE_NAME = 'THREADS_CONNECTED'),"
        " (SELECT COUNT(*) FROM information_schema.PROCESSLIST"
        " WHERE USER = %s AND ID NOT IN (%s, %s))"
    )
    with conn.cursor() as cursor:
        cursor.execute(sql, (mariadb.APP_USER, *own))
        row = cursor.fetchone()
    assert row is not None
    return int(row[0]) - len(own), int(row[1])


class Recorder:
    """One run's recording; ``result`` is filled in when it stops."""

    def __init__(self, watch: Watch, pids: Sequence[int] = ()) -> None:
        self.watch = watch
        self.pids = sorted(with_descendants(pids)) if pids else []
        self.before: Counters | None = None
        self.threads_max: int | None = None
        self.app_max: int | None = None
        self.path_max: int | None = None
        self._path_at = 0.0
        self.samples = 0
        self.result: Backend | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="mariadb-sampler", daemon=True)

    def start(self) -> None:
        with contextlib.suppress(pymysql.err.Error):
            self.before = self.watch.counters()
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                threads, app = _open_now(self.watch.sampler, self.watch.own_ids)
            except pymysql.err.Error:
                return  # the server is in trouble; the run's own figures will show it
            self.threads_max = max(threads, self.threads_max or 0)
            self.app_max = max(app, self.app_max or 0)
            if self.pids and time.monotonic() >= self._path_at:
                self._path_at = time.monotonic() + PATH_SAMPLE_S
                try:
                    held = len(socket_inodes(self.pids) & established_to(self.watch.port))
                except OSError:  # no sock_diag here: go without the path's own count
                    self.pids = []
                else:
                    self.path_max = max(held, self.path_max or 0)
            self.samples += 1
            self._stop.wait(SAMPLE_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            after = self.watch.counters()
        except pymysql.err.Error:
            return
        before = self.before
        if before is None:
            return
        self.result = Backend(
            connections=after.connections - before.connections,
            app_logins=_delta(after.app, before.app),
            check_logins=_delta(after.monitor, before.monitor),
            threads_max=self.threads_max,
            app_threads_max=self.app_max,
            path_max=self.path_max,
            samples=self.samples,
        )


def _delta(after: int | None, before: int | None) -> int | None:
    return after - before if after is not None and before is not None else None
