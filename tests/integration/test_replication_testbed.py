"""The GTID replication testbed, and the active check's view of replication on it."""

from __future__ import annotations

import asyncio

import pymysql
import pytest

from meshproxy.config import CheckConfig
from meshproxy.health.checks import CheckResult, run_check
from meshproxy.testbed import mariadb
from meshproxy.testbed.mariadb import MariaDB
from meshproxy.testbed.replication import (
    ER_READ_ONLY,
    WRITER_PASSWORD,
    WRITER_USER,
    ReplicationSet,
)
from tests.integration.harness import wait_until

pytestmark = pytest.mark.integration

CHECK = CheckConfig(
    type="mysql",
    user=mariadb.MONITOR_USER,
    password=mariadb.MONITOR_PASSWORD,
    timeout_ms=5000,
)


def rows_table(replication: ReplicationSet) -> None:
    """The table of the tests' rows, on the primary (and so on every replica)."""
    replication.sql(
        replication.primary,
        "CREATE TABLE IF NOT EXISTS sbtest.rows (test VARCHAR(64), id INT, PRIMARY KEY (test, id))",
    )


def ids(server: MariaDB, test: str) -> list[int]:
    """The ids of ``test``'s rows on ``server``."""
    rows = ReplicationSet.sql(server, "SELECT id FROM sbtest.rows WHERE test = %s", (test,))
    return sorted(row[0] for row in rows)


def insert(server: MariaDB, test: str, row_id: int, writer: bool = False) -> None:
    """Insert row ``row_id`` of ``test`` on ``server``, as root or as the writer user."""
    user, password = (WRITER_USER, WRITER_PASSWORD) if writer else (None, "")
    ReplicationSet.sql(
        server,
        "INSERT INTO sbtest.rows VALUES (%s, %s)",
        (test, row_id),
        user=user,
        password=password,
    )


def check(server: MariaDB, replication: bool = True) -> CheckResult:
    return asyncio.run(run_check(CHECK, server.address, replication=replication))


def test_write_reaches_every_replica(replication: ReplicationSet) -> None:
    """A row written on the primary is on both replicas once they have caught up."""
    rows_table(replication)
    insert(replication.primary, "write", 1)
    insert(replication.primary, "write", 2)
    replication.wait_caught_up(timeout_s=30)
    assert len(replication.replicas) == 2
    for replica in replication.replicas:
        assert ids(replica, "write") == [1, 2]


def test_stopped_sql_thread_falls_behind_then_catches_up(replication: ReplicationSet) -> None:
    """A replica whose SQL thread is stopped receives the primary's write but does not apply
    it while the other replica does; once started again it applies it."""
    rows_table(replication)
    replication.wait_caught_up()
    stopped, running = replication.replicas
    replication.stop_sql_thread(stopped)
    insert(replication.primary, "behind", 7)
    position = replication.wait_caught_up(replicas=[running])
    assert ids(running, "behind") == [7]
    # Received (its IO thread still runs), not applied.
    wait_until(
        lambda: (replication.slave_status(stopped) or {}).get("Gtid_IO_Pos") == position,
        10,
        "the stopped replica to receive the write",
    )
    assert replication.sql(stopped, "SELECT MASTER_GTID_WAIT(%s, 0)", (position,)) == [(-1,)]
    assert ids(stopped, "behind") == []
    replication.start_sql_thread(stopped)
    replication.wait_caught_up(replicas=[stopped])
    assert ids(stopped, "behind") == [7]


def test_read_only_replica_refuses_a_non_super_writer(replication: ReplicationSet) -> None:
    """The writer user, who has no READ_ONLY ADMIN, writes on the primary, but each replica
    refuses its write with the server's own error 1290."""
    rows_table(replication)
    insert(replication.primary, "refused", 1, writer=True)
    replication.wait_caught_up()
    for replica in replication.replicas:
        with pytest.raises(pymysql.err.OperationalError) as refused:
            insert(replica, "refused", 2, writer=True)
        assert refused.value.args[0] == ER_READ_ONLY
        assert ids(replica, "refused") == [1]


def test_promote_switches_the_writable_server(fresh_replication: ReplicationSet) -> None:
    """After promote(), the old replica is writable and replicates from nobody, the old
    primary is read-only and replicates from it, and its writes reach every other server;
    promoting the old primary back works the same way."""
    replication = fresh_replication
    rows_table(replication)
    old_primary = replication.primary
    candidate, other = replication.replicas
    replication.promote(candidate)

    assert replication.primary is candidate
    assert set(map(id, replication.replicas)) == {id(other), id(old_primary)}
    assert replication.sql(candidate, "SELECT @@read_only") == [(0,)]
    assert replication.sql(old_primary, "SELECT @@read_only") == [(1,)]
    assert replication.slave_status(candidate) is None
    for replica in replication.replicas:
        status = replication.slave_status(replica)
        assert status is not None
        assert status["Master_Port"] == candidate.port
        assert status["Using_Gtid"] == "Slave_Pos"

    insert(candidate, "promote", 1, writer=True)
    with pytest.raises(pymysql.err.OperationalError) as refused:
        insert(old_primary, "promote", 2, writer=True)
    assert refused.value.args[0] == ER_READ_ONLY
    replication.wait_caught_up()
    for replica in replication.replicas:
        assert ids(replica, "promote") == [1]

    replication.promote(old_primary)
    assert replication.primary is old_primary
    assert replication.sql(candidate, "SELECT @@read_only") == [(1,)]
    insert(old_primary, "promote", 3, writer=True)
    replication.wait_caught_up()
    for server in (candidate, other):
        assert ids(server, "promote") == [1, 3]


# --------------------------------------------------------------------------- the check


def test_check_reports_no_lag_on_a_caught_up_replica(replication: ReplicationSet) -> None:
    """With replication, the check of a caught-up replica reports a replica, read-only, with
    a lag of 0 s."""
    replication.wait_caught_up()
    for replica in replication.replicas:
        result = check(replica)
        assert result == CheckResult(True, "read_only=1 lag=0s", True, replica=True, lag_s=0.0)


def test_check_reports_a_stopped_sql_thread(replication: ReplicationSet) -> None:
    """With replication, the check of a replica whose SQL thread is stopped reports a
    replica with no lag and names the stopped thread."""
    stopped = replication.replicas[0]
    replication.stop_sql_thread(stopped)
    result = check(stopped)
    assert result == CheckResult(
        True,
        "read_only=1 replication stopped (Slave_SQL_Running=No)",
        True,
        replica=True,
        lag_s=None,
    )
    replication.start_sql_thread(stopped)


def test_check_reports_the_primary_as_no_replica(replication: ReplicationSet) -> None:
    """With replication, the check of the primary reports a writable server that is not a
    replica and has no lag."""
    result = check(replication.primary)
    assert result == CheckResult(True, "read_only=0 not a replica", False, replica=False)


def test_check_without_replication_is_unchanged(replication: ReplicationSet) -> None:
    """Without replication, the check reports read_only alone, as it always has, on a
    replica as on the primary."""
    assert check(replication.replicas[0], replication=False) == CheckResult(
        True, "read_only=1", True
    )
    assert check(replication.primary, replication=False) == CheckResult(True, "read_only=0", False)
