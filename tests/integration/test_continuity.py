"""Sessions that an edge owns carry on when a middle fails: real MariaDB, real PyMySQL
clients, an edge in session mode over three session-mode middles, all gossiping.

Each middle reaches MariaDB from its own loopback address (``source_ip``), so ``USER()``
names the middle that ran a statement."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import mysql.connector
import pymysql
import pytest

from meshproxy.gossip.settings import GossipSettings
from meshproxy.mysql.constants import ER_PROXY_NOT_REPLAYED, ER_PROXY_OUTCOME_UNKNOWN
from meshproxy.testbed import mariadb
from tests.integration.harness import (
    HOST,
    Doc,
    NodeFactory,
    NodeProcess,
    addr,
    close_quietly,
    connect,
    edge_config,
    free_port,
    middle_config,
    query,
    wait_until,
)
from tests.integration.test_gossip import SLACK_S, api, signal_family, tier_states, with_gossip
from tests.integration.test_session_mode import session_doc

pytestmark = pytest.mark.integration

USERS = [{"name": mariadb.APP_USER, "password": mariadb.APP_PASSWORD}]
# A statement in flight on a hung middle moves once gossip declares the middle dead.
BOUND_S = GossipSettings().detection_bound_s(4) + SLACK_S


@dataclass
class Mesh:
    edge_port: int
    edge_admin: int
    middles: dict[str, NodeProcess]
    docs: dict[str, Doc]
    nodes: NodeFactory
    edge: NodeProcess

    def online(self) -> bool:
        states = tier_states(self.edge_admin)
        return len(states) == 3 and set(states.values()) == {"ONLINE"}

    def restart(self, name: str) -> None:
        """SIGTERM the middle (it drains, then exits), start it again, and wait until the
        edge routes to it."""
        assert self.middles[name].stop() == 0
        self.middles[name] = self.nodes.start(self.docs[name])
        wait_until(self.online, 20, f"the edge to take {name} back")

    def kill(self, name: str) -> None:
        """SIGKILL every process of the middle, children first (were the angel first, they
        would be told to stop, and could leave gracefully)."""
        killed = self.middles[name]
        for pid in sorted(killed.pids(), key=lambda pid: pid == killed.pid):
            os.kill(pid, signal.SIGKILL)
        assert killed.process is not None
        killed.process.wait(10)
        killed.returncode = 0  # killed on purpose: not a failure of the node

    def pause(self, name: str) -> None:
        signal_family(self.middles[name], signal.SIGSTOP, children_first=False)


@pytest.fixture
def mesh(nodes: NodeFactory, shared_mariadb: mariadb.MariaDB) -> Iterator[Mesh]:
    """An edge owning its sessions (session mode on ``tier:middle``) and middles p2-p4 in
    session mode on one MariaDB; paused middles are killed at the end."""
    middles: dict[str, NodeProcess] = {}
    docs: dict[str, Doc] = {}
    seeds: list[int] = []
    for name in ("p2", "p3", "p4"):
        gossip = free_port()
        doc = middle_config(
            name, free_port(), servers=[shared_mariadb.port], node={"tier": "middle"}
        )
        doc["service"][0]["mode"] = "session"
        doc["pool"][0]["source_ip"] = f"127.0.0.{name[1]}"
        doc["user"] = USERS
        doc, _ = with_gossip(doc, gossip, seeds or [gossip])
        docs[name] = doc
        middles[name] = nodes.start(doc)
        seeds = seeds or [gossip]
    edge_port = free_port()
    edge = edge_config(
        "p1",
        edge_port,
        [],
        listener={"mode": "session"},
        tier={"close_sessions_on_down": True},
        timeouts={"connect_ms": 500},
    )
    edge["user"] = USERS
    edge, edge_admin = with_gossip(edge, free_port(), seeds)
    edge_process = nodes.start(edge)
    wait_until(
        lambda: (
            set(tier_states(edge_admin).values()) == {"ONLINE"}
            and len(tier_states(edge_admin)) == 3
        ),
        15,
        "the edge to learn all three middles from gossip",
    )
    yield Mesh(edge_port, edge_admin, middles, docs, nodes, edge_process)
    for middle in middles.values():
        signal_family(middle, signal.SIGCONT, children_first=True)


@pytest.fixture
def table(shared_mariadb: mariadb.MariaDB) -> Iterator[str]:
    """A counter table with one row (id 1, v 0), dropped afterwards."""
    name = f"continuity_{time.monotonic_ns()}"
    query(shared_mariadb.port, f"CREATE TABLE {name} (id INT PRIMARY KEY, v INT) ENGINE=InnoDB")
    query(shared_mariadb.port, f"INSERT INTO {name} VALUES (1, 0)")
    yield name
    query(shared_mariadb.port, f"DROP TABLE IF EXISTS {name}")


def run(session: Any, sql: str) -> list[tuple[Any, ...]]:
    with session.cursor() as cursor:
        cursor.execute(sql)
        return list(cursor.fetchall())


def middle_of(session: Any) -> str:
    """The middle that runs this session's statements now (``app@127.0.0.N`` -> pN)."""
    user = run(session, "SELECT USER()")[0][0]
    return f"p{user.rsplit('.', 1)[1]}"


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    return call(), time.monotonic() - started


def error_of(call: Callable[[], Any]) -> tuple[int, str]:
    with pytest.raises(pymysql.MySQLError) as caught:
        call()
    code, message = caught.value.args
    return code, message


@pytest.fixture
def sessions(mesh: Mesh) -> Iterator[list[Any]]:
    opened: list[Any] = []
    yield opened
    for session in opened:
        close_quietly(session)


def open_session(mesh: Mesh, sessions: list[Any]) -> Any:
    session = connect(mesh.edge_port, read_timeout=60)
    sessions.append(session)
    return session


def test_sessions_between_statements_carry_on_when_their_middle_is_killed(
    mesh: Mesh, sessions: list[Any]
) -> None:
    """Every session open on a middle killed with SIGKILL runs its next statements through
    another middle without an error, and so do the sessions on the other middles."""
    for _ in range(9):
        open_session(mesh, sessions)
    where = [middle_of(s) for s in sessions]
    victim = max(set(where), key=where.count)
    mesh.kill(victim)
    for session in sessions:
        assert run(session, "SELECT 1") == [(1,)]
        assert middle_of(session) != victim
    assert all(query(mesh.edge_port, "SELECT 2") == [(2,)] for _ in range(5))


def test_a_read_in_flight_on_a_paused_middle_is_answered_through_another(
    mesh: Mesh, sessions: list[Any]
) -> None:
    """A read sent to a middle that is then found hung (SIGSTOP: its kernel still ACKs) is
    run again through another middle once gossip declares the hung one dead, and the client
    gets its answer, not an error, within the detection bound."""
    session = open_session(mesh, sessions)
    victim = middle_of(session)
    mesh.pause(victim)
    rows, took = timed(lambda: run(session, "SELECT USER(), 42"))
    assert rows[0][1] == 42
    assert not rows[0][0].endswith(f".{victim[1]}"), rows
    assert took < BOUND_S


def test_a_transaction_moves_with_its_session_when_its_middle_is_killed(
    mesh: Mesh, sessions: list[Any], table: str
) -> None:
    """A transaction open on a middle killed with SIGKILL is replayed through another
    middle: the client carries on in the same transaction, commits, and each of its
    updates is applied exactly once."""
    session = open_session(mesh, sessions)
    victim = middle_of(session)
    run(session, "BEGIN")
    assert run(session, f"SELECT v FROM {table} WHERE id = 1 FOR UPDATE") == [(0,)]
    run(session, f"UPDATE {table} SET v = v + 1 WHERE id = 1")
    mesh.kill(victim)
    run(session, f"UPDATE {table} SET v = v + 10 WHERE id = 1")
    assert run(session, f"SELECT v FROM {table} WHERE id = 1") == [(11,)]
    run(session, "COMMIT")
    assert middle_of(session) != victim
    assert query(mesh.edge_port, f"SELECT v FROM {table} WHERE id = 1") == [(11,)]


def test_a_transaction_whose_answers_differ_elsewhere_is_rolled_back_with_an_error(
    mesh: Mesh, sessions: list[Any], table: str
) -> None:
    """A transaction whose replay through another middle answers differently (here: the
    connection id it read) is rolled back, its client gets ERR 9005 naming why, and the
    session stays usable outside a transaction."""
    session = open_session(mesh, sessions)
    victim = middle_of(session)
    run(session, "BEGIN")
    run(session, f"UPDATE {table} SET v = v + 1 WHERE id = 1")
    run(session, "SELECT CONNECTION_ID()")
    mesh.kill(victim)
    code, message = error_of(lambda: run(session, f"UPDATE {table} SET v = v + 1 WHERE id = 1"))
    assert code == ER_PROXY_NOT_REPLAYED
    assert "gave another result" in message
    assert run(session, "SELECT @@in_transaction") == [(0,)]
    assert query(mesh.edge_port, f"SELECT v FROM {table} WHERE id = 1") == [(0,)]


def test_a_commit_cut_off_by_a_hung_middle_is_reported_as_outcome_unknown(
    mesh: Mesh, sessions: list[Any], table: str
) -> None:
    """A COMMIT sent to a middle that hangs is never run again elsewhere: the client gets
    ERR 9004 (outcome unknown) within the detection bound and its session stays usable;
    the hung path's server connection is ended at once, so its locks are free for others
    and it cannot commit late when the middle resumes."""
    session = open_session(mesh, sessions)
    victim = middle_of(session)
    run(session, "BEGIN")
    run(session, f"UPDATE {table} SET v = v + 1 WHERE id = 1")
    mesh.pause(victim)
    (code, message), took = timed(lambda: error_of(lambda: run(session, "COMMIT")))
    assert code == ER_PROXY_OUTCOME_UNKNOWN
    assert "may or may not have been applied" in message
    assert took < BOUND_S
    assert run(session, "SELECT @@in_transaction") == [(0,)]
    # The row the hung transaction locked is free while its middle still hangs.
    other = open_session(mesh, sessions)
    _, took = timed(lambda: run(other, f"UPDATE {table} SET v = v + 10 WHERE id = 1"))
    assert took < 5.0
    signal_family(mesh.middles[victim], signal.SIGCONT, children_first=True)
    wait_until(mesh.online, 20, f"{victim} back in the tier")  # its backlog is long done
    assert query(mesh.edge_port, f"SELECT v FROM {table} WHERE id = 1") == [(10,)]


def test_a_write_in_flight_on_a_hung_middle_gets_outcome_unknown_and_no_retry(
    mesh: Mesh, sessions: list[Any], table: str
) -> None:
    """An autocommit write sent to a middle that hangs is not run again elsewhere (it may
    have been applied): the client gets ERR 9004 and its next statement works."""
    session = open_session(mesh, sessions)
    victim = middle_of(session)
    mesh.pause(victim)
    code, _ = error_of(lambda: run(session, f"UPDATE {table} SET v = v + 1 WHERE id = 1"))
    assert code == ER_PROXY_OUTCOME_UNKNOWN
    mesh.kill(victim)
    assert run(session, f"SELECT v FROM {table} WHERE id = 1") == [(0,)]
    assert addr(mesh.edge_port)  # the edge still serves new sessions too
    assert query(mesh.edge_port, "SELECT 3") == [(3,)]


def test_a_transaction_of_prepared_statements_is_replayed_with_them(mesh: Mesh, table: str) -> None:
    """A transaction run with server-side prepared statements (mysql-connector-python's
    prepared cursor) moves too: its statements are prepared again on the new middle and
    the client's statement ids keep working."""
    client = mysql.connector.connect(
        host=HOST,
        port=mesh.edge_port,
        user=mariadb.APP_USER,
        password=mariadb.APP_PASSWORD,
        database=mariadb.DATABASE,
        use_pure=True,
    )
    try:
        cursor = client.cursor(prepared=True)
        cursor.execute("SELECT USER()")
        user = str(cursor.fetchone()[0])  # type: ignore[index]
        on = f"p{user.rsplit('.', 1)[1]}"
        client.start_transaction()
        update = f"UPDATE {table} SET v = v + ? WHERE id = ?"
        cursor.execute(update, (1, 1))
        mesh.kill(on)
        cursor.execute(update, (10, 1))
        cursor.execute(f"SELECT v FROM {table} WHERE id = ?", (1,))
        assert cursor.fetchall() == [(11,)]
        client.commit()
    finally:
        client.close()
    assert query(mesh.edge_port, f"SELECT v FROM {table} WHERE id = 1") == [(11,)]


def test_a_read_only_transaction_cut_off_at_its_commit_commits_through_another_middle(
    mesh: Mesh, sessions: list[Any], table: str
) -> None:
    """A COMMIT of a transaction that only read, sent to a middle that hangs, is not an
    unknown outcome (committing it again changes nothing): the transaction is replayed
    through another middle and the COMMIT succeeds there."""
    session = open_session(mesh, sessions)
    victim = middle_of(session)
    run(session, "BEGIN")
    assert run(session, f"SELECT v FROM {table} WHERE id = 1") == [(0,)]
    mesh.pause(victim)
    _, took = timed(lambda: run(session, "COMMIT"))
    assert took < BOUND_S
    assert middle_of(session) != victim
    mesh.kill(victim)  # its connection still holds the table's metadata lock


def test_a_transaction_moves_to_another_server_of_an_interchangeable_pool(
    nodes: NodeFactory, mariadb_factory: Callable[..., mariadb.MariaDB]
) -> None:
    """In a pool declared ``interchangeable`` (its servers hold the same data), a session
    whose server dies between two statements of a transaction carries on: the transaction
    is replayed on the other server and commits there once."""
    first, second = mariadb_factory(), mariadb_factory()
    for server in (first, second):  # the same data on both, as in one cluster
        query(server.port, "CREATE TABLE moved (id INT PRIMARY KEY, v INT) ENGINE=InnoDB")
        query(server.port, "INSERT INTO moved VALUES (1, 0)")
    port = free_port()
    doc = session_doc("s1", [first.port, second.port], port, free_port())
    doc["pool"][0]["interchangeable"] = True
    nodes.start(doc, ("--no-angel",))
    session = connect(port)
    try:
        victim = first if run(session, "SELECT @@port") == [(first.port,)] else second
        survivor = second if victim is first else first
        run(session, "BEGIN")
        run(session, "UPDATE moved SET v = v + 1 WHERE id = 1")
        victim.kill()
        run(session, "UPDATE moved SET v = v + 10 WHERE id = 1")
        assert run(session, "SELECT v, @@port FROM moved WHERE id = 1") == [(11, survivor.port)]
        run(session, "COMMIT")
    finally:
        close_quietly(session)
    assert query(survivor.port, "SELECT v FROM moved WHERE id = 1") == [(11,)]


def test_a_rolling_restart_of_every_middle_under_load_loses_nothing(
    mesh: Mesh, shared_mariadb: mariadb.MariaDB, table: str
) -> None:
    """Each middle in turn drains (SIGTERM) and restarts while clients run write
    transactions on persistent sessions through the edge: no client sees an error, and each
    client's counter equals the commits it saw succeed."""
    clients = 4
    for k in range(2, clients + 1):
        query(shared_mariadb.port, f"INSERT INTO {table} VALUES ({k}, 0)")
    stop = threading.Event()
    commits = [0] * (clients + 1)
    errors: list[str] = []

    def work(k: int) -> None:
        session = connect(mesh.edge_port, read_timeout=30)
        try:
            while not stop.is_set():
                run(session, "BEGIN")
                run(session, f"UPDATE {table} SET v = v + 1 WHERE id = {k}")
                run(session, f"SELECT v FROM {table} WHERE id = {k}")
                run(session, "COMMIT")
                commits[k] += 1
        except pymysql.MySQLError as exc:
            errors.append(f"client {k}: {exc}")
        finally:
            close_quietly(session)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(1, clients + 1)]
    for thread in threads:
        thread.start()
    try:
        for name in ("p2", "p3", "p4"):
            before = sum(commits)
            mesh.restart(name)
            wait_until(lambda: sum(commits) > before + 20 or bool(errors), 20, "commits")  # noqa: B023
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert errors == []
    rows = dict(query(shared_mariadb.port, f"SELECT id, v FROM {table}"))
    assert [rows[k] for k in range(1, clients + 1)] == commits[1:]
    # The restarted middles stop before the edge otherwise: the last one of the tier would
    # keep the edge's idle connections (gossip fails open) until its drain timeout.
    assert mesh.edge.stop() == 0


def test_a_write_transaction_on_a_hung_middle_moves_although_its_locks_are_held_there(
    mesh: Mesh, sessions: list[Any], table: str
) -> None:
    """A transaction that wrote, on a middle that then hangs (keeping its server connection
    and the row lock open), is replayed through another middle, which first kills the hung
    path's server connection: the replay does not wait on the lock, and the client carries
    on and commits its updates exactly once."""
    session = open_session(mesh, sessions)
    victim = middle_of(session)
    run(session, "BEGIN")
    run(session, f"UPDATE {table} SET v = v + 1 WHERE id = 1")
    mesh.pause(victim)
    _, took = timed(lambda: run(session, f"UPDATE {table} SET v = v + 10 WHERE id = 1"))
    assert took < BOUND_S
    assert run(session, f"SELECT v FROM {table} WHERE id = 1") == [(11,)]
    run(session, "COMMIT")
    mesh.kill(victim)
    assert query(mesh.edge_port, f"SELECT v FROM {table} WHERE id = 1") == [(11,)]


def test_a_read_on_a_middle_that_lost_its_servers_runs_through_another(
    nodes: NodeFactory,
    shared_mariadb: mariadb.MariaDB,
    mariadb_factory: Callable[..., mariadb.MariaDB],
) -> None:
    """A middle that can no longer reach its servers answers a statement with its own
    error (9003 or 9001): the edge does not pass that on but runs the read through another
    middle, even without gossip to tell it the middle is unhealthy."""
    doomed = mariadb_factory()
    ports: list[int] = []
    for name, server in (("p2", doomed), ("p3", shared_mariadb)):
        mesh_port = free_port()
        doc = middle_config(name, mesh_port, servers=[server.port])
        doc["service"][0]["mode"] = "session"
        doc["pool"][0]["source_ip"] = f"127.0.0.{name[1]}"
        doc["user"] = USERS
        nodes.start(doc)
        ports.append(mesh_port)
    edge_port = free_port()
    edge = edge_config("p1", edge_port, ports, listener={"mode": "session"})
    edge["user"] = USERS
    nodes.start(edge)
    sessions: list[Any] = []
    try:
        while not sessions or middle_of(sessions[-1]) != "p2":
            assert len(sessions) < 30, "no session landed on p2"
            sessions.append(connect(edge_port, read_timeout=30))
        session = sessions[-1]
        doomed.kill()
        assert run(session, "SELECT 7, USER()")[0][1].endswith(".3")
    finally:
        for session in sessions:
            close_quietly(session)


def test_sysbench_survives_a_middle_killed_under_it(
    mesh: Mesh, shared_mariadb: mariadb.MariaDB
) -> None:
    """sysbench oltp_read_only, which prepares even BEGIN and COMMIT and gives up at its
    first error, completes without one while the middle serving most of its sessions is
    killed (its transactions are replayed through the others)."""
    sysbench = shutil.which("sysbench")
    if sysbench is None:
        pytest.skip("sysbench is not installed")
    common = [
        sysbench,
        "--db-driver=mysql",
        f"--mysql-host={HOST}",
        f"--mysql-user={mariadb.APP_USER}",
        f"--mysql-password={mariadb.APP_PASSWORD}",
        "--mysql-db=sbtest",
        "--tables=1",
        "--table-size=200",
    ]
    for step in ("cleanup", "prepare"):
        subprocess.run(
            [*common, f"--mysql-port={shared_mariadb.port}", "oltp_read_only", step],
            capture_output=True,
            timeout=60,
            check=step == "prepare",
        )
    run_args = ["--threads=6", "--time=8", "--report-interval=1", "oltp_read_only", "run"]
    load = subprocess.Popen(
        [*common, f"--mysql-port={mesh.edge_port}", *run_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert load.stdout is not None
        lines: list[str] = []
        while not any("[ 1s ]" in line for line in lines):  # transactions are flowing
            line = load.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        pools = api(mesh.edge_admin, "/status")["session_mode"]["pools"]["middle"]
        busiest = max(pools, key=lambda address: pools[address]["open"])
        mesh.kill(next(n for n, d in mesh.docs.items() if d["node"]["mesh_bind"] == busiest))
        output = "".join(lines) + load.communicate(timeout=60)[0]
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    assert load.returncode == 0, output
    assert "FATAL" not in output
    assert re.search(r"errors:\s+0 ", output), output


def test_a_write_whose_answer_a_hung_middle_keeps_is_replayed_once_its_locks_are_freed(
    mesh: Mesh, shared_mariadb: mariadb.MariaDB, sessions: list[Any], table: str
) -> None:
    """A transaction's first write runs on the server, then its middle hangs before the
    answer gets back: the edge knew that transaction's server connection before the write
    went out, so the replay through another middle ends it first, does not wait on its
    row lock, and the update is applied exactly once."""
    session = open_session(mesh, sessions)
    victim = middle_of(session)
    run(session, "BEGIN")
    assert run(session, f"SELECT v FROM {table} WHERE id = 1") == [(0,)]
    update = f"UPDATE {table} SET v = v + 1 WHERE id = 1 AND SLEEP(1) = 0"
    outcome: list[object] = []
    writer = threading.Thread(target=lambda: outcome.append(timed(lambda: run(session, update))))
    writer.start()
    running = "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'UPDATE%SLEEP%'"
    wait_until(
        lambda: query(shared_mariadb.port, running) == [(1,)],
        10,
        "the update to run on the server",
    )
    mesh.pause(victim)
    writer.join(BOUND_S + 5)
    assert outcome, "the update never answered"
    assert outcome[0][1] < BOUND_S + 1  # type: ignore[index]
    assert run(session, f"SELECT v FROM {table} WHERE id = 1") == [(1,)]
    run(session, "COMMIT")
    mesh.kill(victim)
    assert query(mesh.edge_port, f"SELECT v FROM {table} WHERE id = 1") == [(1,)]
