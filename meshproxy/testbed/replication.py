"""A throwaway MariaDB primary and its replicas on loopback, replicating by GTID.

Every server is a :class:`~meshproxy.testbed.mariadb.MariaDB` started from the same template
data directory, with a binary log, its own server id and ``--log-slave-updates`` (so that any
replica can be promoted and serve the others from its own binlog). Replicas run with
``--read-only=1``.

Each server's init file is binlogged at start-up (under the server's own server id), so
:meth:`ReplicationSet.start` first empties every binlog with ``RESET MASTER``: from then on
the only transactions anywhere are the primary's, and GTID positions compare cleanly.

Two users are created on the primary and replicate: ``repl`` (REPLICATION SLAVE), which the
replicas connect as, and ``writer``, an application user without READ_ONLY ADMIN whose
writes a read-only server refuses with error 1290 (ER_OPTION_PREVENTS_STATEMENT). The
init file's ``app`` user has ALL PRIVILEGES, READ_ONLY ADMIN among them, so it can write to
a read-only replica. (In MariaDB 10.11 SUPER alone no longer bypasses ``read_only``.)

Administration goes through the unix socket as ``root`` (socket authentication; the test
run is root): it needs GRANT OPTION, which ``app`` lacks.

Waits poll the servers (or use ``MASTER_GTID_WAIT``) against a deadline; none sleeps a
fixed time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pymysql
import pymysql.cursors

from meshproxy.testbed import mariadb
from meshproxy.testbed.mariadb import MariaDB
from meshproxy.testbed.polling import poll

REPL_USER = "repl"
REPL_PASSWORD = "repl"  # noqa: S105 - throwaway local servers only
WRITER_USER = "writer"
WRITER_PASSWORD = "writer"  # noqa: S105 - throwaway local servers only
# An application's privileges: no SUPER, no READ_ONLY ADMIN, so read_only applies to it.
WRITER_PRIVILEGES = (
    "SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, INDEX, ALTER, "
    "CREATE TEMPORARY TABLES, LOCK TABLES"
)

# ER_OPTION_PREVENTS_STATEMENT: "running with the --read-only option"
ER_READ_ONLY = 1290


class ReplicationError(RuntimeError):
    """Replication did not get (or stay) where it was asked to go."""


def sql(
    server: MariaDB,
    statement: str,
    args: Sequence[object] | None = None,
    *,
    user: str | None = None,
    password: str = "",
    database: str | None = None,
    timeout_s: float = 30.0,
) -> list[tuple[Any, ...]]:
    """Run one statement on ``server`` and return its rows.

    As ``root`` over the unix socket when ``user`` is None, else as ``user`` over TCP.
    Errors are PyMySQL's, with the server's error code in ``args[0]``.
    """
    conn = _connect(server, user, password, database, timeout_s)
    try:
        with conn.cursor() as cursor:
            cursor.execute(statement, args)
            return list(cursor.fetchall())
    finally:
        conn.close()


def slave_status(server: MariaDB, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """``SHOW SLAVE STATUS`` of ``server`` as a dict, or None if it replicates from nobody."""
    conn = _connect(server, None, "", None, timeout_s)
    try:
        with conn.cursor(pymysql.cursors.DictCursor) as cursor:
            cursor.execute("SHOW SLAVE STATUS")
            row: dict[str, Any] | None = cursor.fetchone()
            return row
    finally:
        conn.close()


def _connect(
    server: MariaDB, user: str | None, password: str, database: str | None, timeout_s: float
) -> Any:
    common: dict[str, Any] = {
        "database": database,
        "connect_timeout": max(1.0, min(timeout_s, 10.0)),
        "read_timeout": timeout_s,
        "write_timeout": timeout_s,
        "autocommit": True,
        # Else PyMySQL builds a TLS context for every connection (40 ms loading CA files) to
        # try TLS the servers do not offer.
        "ssl_disabled": True,
    }
    if user is None:
        return pymysql.connect(unix_socket=str(server.socket_path), user="root", **common)
    return pymysql.connect(
        host=server.address.host, port=server.port, user=user, password=password, **common
    )


def _threads(status: dict[str, Any] | None) -> str:
    if status is None:
        return "no replication configured"
    text = (
        f"Slave_IO_Running={status['Slave_IO_Running']} "
        f"Slave_SQL_Running={status['Slave_SQL_Running']} "
        f"Gtid_Slave_Pos={status['Gtid_Slave_Pos']!r}"
    )
    for kind in ("IO", "SQL"):
        if status[f"Last_{kind}_Errno"]:
            text += f" Last_{kind}_Error={status[f'Last_{kind}_Error']!r}"
    return text


def _broken(status: dict[str, Any] | None) -> bool:
    """A replication thread stopped on an error (not one stopped on request, nor one that
    is retrying its connection)."""
    if status is None:
        return False
    return any(
        status[f"Slave_{kind}_Running"] == "No" and status[f"Last_{kind}_Errno"]
        for kind in ("IO", "SQL")
    )


class ReplicationSet:
    """A primary and ``replicas`` replicas, each a mariadbd under ``workdir``.

    ``primary`` and ``replicas`` follow :meth:`promote`. Use as a context manager, or call
    :meth:`start` and then :meth:`stop` (which stops every server, whatever happened).
    """

    def __init__(
        self,
        workdir: Path,
        template: Path,
        replicas: int = 2,
        free_port: Callable[[], int] = mariadb.free_port,
        extra_args: Sequence[str] = (),
    ) -> None:
        if replicas < 1:
            raise ValueError("a replication set needs at least one replica")
        self.workdir = workdir
        self.template = template
        self.servers: list[MariaDB] = []
        for server_id in range(1, replicas + 2):
            args = [
                f"--server-id={server_id}",
                "--log-bin=mysql-bin",
                "--relay-log=relay-bin",
                "--binlog-format=ROW",
                "--log-slave-updates=1",
                f"--read-only={0 if server_id == 1 else 1}",
                *extra_args,
            ]
            self.servers.append(
                MariaDB(workdir, f"server{server_id}", port=free_port(), extra_args=args)
            )
        self._primary = self.servers[0]
        self._replicas = self.servers[1:]

    def __enter__(self) -> ReplicationSet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def primary(self) -> MariaDB:
        return self._primary

    @property
    def replicas(self) -> list[MariaDB]:
        return list(self._replicas)

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 60.0) -> None:
        """Start every server, set up replication and wait until every replica has caught up.

        Servers start one after another from this thread: they are started to die with the
        thread that forks them, so a worker thread's exit would kill its server.
        """
        deadline = time.monotonic() + timeout_s
        try:
            for server in self.servers:
                server.start(self.template, timeout_s=_left(deadline))
            for server in self.servers:
                # Forget what the init file binlogged under each server's own id.
                sql(server, "RESET MASTER")
            for statement in (
                f"CREATE USER '{REPL_USER}'@'%' IDENTIFIED BY '{REPL_PASSWORD}'",
                f"GRANT REPLICATION SLAVE ON *.* TO '{REPL_USER}'@'%'",
                f"CREATE USER '{WRITER_USER}'@'%' IDENTIFIED BY '{WRITER_PASSWORD}'",
                f"GRANT {WRITER_PRIVILEGES} ON *.* TO '{WRITER_USER}'@'%'",
            ):
                sql(self._primary, statement)
            for replica in self._replicas:
                self._replicate(replica, self._primary)
            for replica in self._replicas:
                self.wait_running(replica, _left(deadline))
            self.wait_caught_up(_left(deadline))
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop every server (SIGTERM, then SIGKILL after ``timeout_s``); safe to repeat."""
        for server in self.servers:
            server.stop(timeout_s)

    def running(self, server: MariaDB) -> bool:
        return server.process is not None and server.process.poll() is None

    # ------------------------------------------------------------------ queries

    sql = staticmethod(sql)
    slave_status = staticmethod(slave_status)

    def gtid_binlog_pos(self, server: MariaDB | None = None) -> str:
        """``@@gtid_binlog_pos`` of ``server`` (the primary by default)."""
        rows = sql(server or self._primary, "SELECT @@gtid_binlog_pos")
        return str(rows[0][0])

    # ------------------------------------------------------------------ waits

    def wait_running(self, replica: MariaDB, timeout_s: float = 30.0) -> None:
        """Wait until both replication threads of ``replica`` run; fail at once on an error
        that stopped one."""

        def running() -> bool:
            status = slave_status(replica)
            if status is None:
                raise ReplicationError(f"{replica.name} has no replication configured")
            if _broken(status):
                raise ReplicationError(f"{replica.name} stopped replicating: {_threads(status)}")
            return (status["Slave_IO_Running"], status["Slave_SQL_Running"]) == ("Yes", "Yes")

        poll(running, timeout_s, lambda: f"{replica.name} to replicate: {self._describe(replica)}")

    def wait_caught_up(
        self, timeout_s: float = 30.0, replicas: Iterable[MariaDB] | None = None
    ) -> str:
        """Wait until every running replica (or each of ``replicas``) has applied the
        primary's ``@@gtid_binlog_pos`` as it is now; return that position."""
        deadline = time.monotonic() + timeout_s
        position = self.gtid_binlog_pos()
        targets = self._replicas if replicas is None else list(replicas)
        for replica in targets:
            if replicas is None and not self.running(replica):
                continue
            self._wait_gtid(replica, position, deadline)
        return position

    def _wait_gtid(self, replica: MariaDB, position: str, deadline: float) -> None:
        # In slices, so that a replica whose replication broke fails now, not at the deadline.
        while True:
            left = _left(deadline)
            rows = sql(
                replica,
                "SELECT MASTER_GTID_WAIT(%s, %s)",
                (position, min(left, 1.0)),
                timeout_s=min(left, 1.0) + 10.0,
            )
            if rows[0][0] == 0:
                return
            status = slave_status(replica)
            if _broken(status):
                raise ReplicationError(f"{replica.name} stopped replicating: {_threads(status)}")
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{replica.name} has not applied {position!r}: {_threads(status)}"
                )

    # ------------------------------------------------------------------ control

    def stop_sql_thread(self, replica: MariaDB, timeout_s: float = 10.0) -> None:
        """Stop ``replica`` applying events (it still receives them) and wait until it has."""
        sql(replica, "STOP SLAVE SQL_THREAD", timeout_s=timeout_s)
        self._wait_sql_thread(replica, "No", timeout_s)

    def start_sql_thread(self, replica: MariaDB, timeout_s: float = 10.0) -> None:
        """Let ``replica`` apply events again and wait until its SQL thread runs."""
        sql(replica, "START SLAVE SQL_THREAD", timeout_s=timeout_s)
        self._wait_sql_thread(replica, "Yes", timeout_s)

    def _wait_sql_thread(self, replica: MariaDB, state: str, timeout_s: float) -> None:
        def reached() -> bool:
            status = slave_status(replica)
            return status is not None and status["Slave_SQL_Running"] == state

        poll(reached, timeout_s, lambda: f"Slave_SQL_Running={state} on {replica.name}")

    def promote(self, candidate: MariaDB, timeout_s: float = 30.0) -> None:
        """A planned switchover to ``candidate``, one of the replicas.

        The old primary goes read-only (which stops ``writer``, not ``app``: its READ_ONLY
        ADMIN lets it write on), the candidate applies everything the old primary binlogged,
        stops replicating and becomes writable, and every other server, the old primary
        included, replicates from it. Returns once they all have caught up with it.
        """
        if candidate not in self._replicas:
            raise ValueError(f"{candidate.name} is not a replica of this set")
        deadline = time.monotonic() + timeout_s
        old = self._primary
        others = [replica for replica in self._replicas if replica is not candidate]
        sql(old, "SET GLOBAL read_only=1")
        self._wait_gtid(candidate, self.gtid_binlog_pos(old), deadline)
        for statement in ("STOP SLAVE", "RESET SLAVE ALL", "SET GLOBAL read_only=0"):
            sql(candidate, statement)
        for replica in others:
            sql(replica, "STOP SLAVE")
            self._replicate(replica, candidate)
        # The old primary has been applying nothing: its position is what it binlogged.
        sql(old, "SET GLOBAL gtid_slave_pos = @@gtid_binlog_pos")
        self._replicate(old, candidate)
        self._primary = candidate
        self._replicas = [*others, old]
        for replica in self._replicas:
            self.wait_running(replica, _left(deadline))
        self.wait_caught_up(_left(deadline))

    def _replicate(self, replica: MariaDB, source: MariaDB) -> None:
        # slave_pos: start from the GTIDs this server has applied as a replica. Retry the
        # connection every second (not every minute) while the source is unreachable.
        sql(
            replica,
            "CHANGE MASTER TO MASTER_HOST=%s, MASTER_PORT=%s, MASTER_USER=%s,"
            " MASTER_PASSWORD=%s, MASTER_CONNECT_RETRY=1, MASTER_USE_GTID=slave_pos",
            (source.address.host, source.port, REPL_USER, REPL_PASSWORD),
        )
        sql(replica, "START SLAVE")

    def _describe(self, replica: MariaDB) -> str:
        try:
            return _threads(slave_status(replica))
        except pymysql.err.MySQLError as exc:
            return f"(status unavailable: {exc})"


def _left(deadline: float) -> float:
    """Seconds to ``deadline``, at least a little, so that a last attempt can still be made."""
    return max(0.1, deadline - time.monotonic())
