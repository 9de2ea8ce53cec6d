"""Session mode against real MariaDB servers and real clients: logins, TLS, the backend
pool, multiplexing and its pins, state that never leaks, prepared statements, big packets,
LOCAL INFILE, CALL, KILL, and backends that fail."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import aiomysql
import mysql.connector
import pymysql
import pytest
from pymysql.constants import CLIENT

from meshproxy.mysql import auth
from meshproxy.security import pki
from meshproxy.testbed import mariadb
from tests.integration.conftest import MariaDBFactory
from tests.integration.harness import (
    HOST,
    MYSQL_CHECK,
    Doc,
    NodeFactory,
    NodeProcess,
    addr,
    close_quietly,
    connect,
    edge_config,
    free_port,
    raw_login,
    read_packet,
    read_to_eof,
    rss_bytes,
    split_packets,
    wait_until,
    write_packet,
)

pytestmark = pytest.mark.integration

TOKEN = "session-admin-token-0123456789"
MiB = 1024 * 1024
ANSI = "REAL_AS_FLOAT,PIPES_AS_CONCAT,ANSI_QUOTES,IGNORE_SPACE,ANSI"
CHECK = {**MYSQL_CHECK, "interval_ms": 1000, "timeout_ms": 900, "fall": 3}


# --------------------------------------------------------------------------- nodes


def session_doc(
    name: str,
    servers: list[int],
    port: int,
    admin_port: int,
    *,
    connections: Mapping[str, object] | None = None,
    users: list[dict[str, object]] | None = None,
    listener: Mapping[str, object] | None = None,
) -> Doc:
    """A node whose listener on ``port`` is in session mode in front of pool ``main``."""
    return {
        "node": {"name": name, "role": "edge"},
        "admin": {"bind": addr(admin_port), "token": TOKEN},
        "listener": [
            {
                "name": "mysql",
                "bind": addr(port),
                "upstream": "pool:main",
                "mode": "session",
                **(listener or {}),
            }
        ],
        "pool": [
            {
                "name": "main",
                "servers": [addr(p) for p in servers],
                "check": CHECK,
                "connections": {"checkout_timeout_ms": 10000, **(connections or {})},
            }
        ],
        "user": users or [{"name": mariadb.APP_USER, "password": mariadb.APP_PASSWORD}],
    }


class SessionNode:
    """A running session-mode node: its process, client port and admin API."""

    def __init__(self, process: NodeProcess, port: int, admin_port: int) -> None:
        self.process = process
        self.port = port
        self.admin_port = admin_port

    def status(self) -> Any:
        request = urllib.request.Request(f"http://{HOST}:{self.admin_port}/status")
        request.add_header("Authorization", f"Bearer {TOKEN}")
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return json.loads(response.read())

    def counter(self, name: str, **labels: str) -> int:
        entries = self.status()["counters"].get(name, [])
        return sum(
            int(e["value"])
            for e in entries
            if all(e["labels"].get(k) == v for k, v in labels.items())
        )

    def servers(self) -> dict[str, Any]:
        """Backend connection figures per server of pool ``main``."""
        return dict(self.status()["session_mode"]["pools"].get("main", {}))

    def metrics(self) -> str:
        request = urllib.request.Request(f"http://{HOST}:{self.admin_port}/metrics")
        request.add_header("Authorization", f"Bearer {TOKEN}")
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return str(response.read().decode())


def start_session_node(
    nodes: NodeFactory,
    servers: list[int],
    name: str = "s1",
    angel: bool = False,
    **options: Any,
) -> SessionNode:
    port, admin_port = free_port(), free_port()
    doc = session_doc(name, servers, port, admin_port, **options)
    process = nodes.start(doc, () if angel else ("--no-angel",))
    return SessionNode(process, port, admin_port)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A certificate and key for the listener (from meshproxy's own CA helper)."""
    root = tmp_path_factory.mktemp("session-tls")
    pki.init_ca(root, "test CA")
    files = pki.issue(root, "s1", "middle")
    return str(files.cert), str(files.key)


def no_verify() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def one(conn: Any, sql: str, args: Any = None) -> Any:
    """The first column of the first row of ``sql``."""
    with conn.cursor() as cursor:
        cursor.execute(sql, args)
        row = cursor.fetchone()
    return row[0] if row else None


_OPEN: list[Any] = []


@pytest.fixture(autouse=True)
def _close_clients(nodes: NodeFactory) -> Iterator[None]:
    """Close the test's client connections before its nodes stop (a failed test leaves
    some open, and a node drains open sessions before it exits)."""
    yield
    while _OPEN:
        close_quietly(_OPEN.pop())


def in_thread(conn: Any, sql: str) -> tuple[threading.Thread, list[BaseException | None]]:
    """Run ``sql`` in a thread of its own; its outcome (None, or the client's error) lands
    in the list when it ends."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            one(conn, sql)
            outcome.append(None)
        except pymysql.err.MySQLError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def session_connect(node: SessionNode, **kwargs: Any) -> Any:
    conn = connect(node.port, **kwargs)
    _OPEN.append(conn)
    return conn


# --------------------------------------------------------------------------- logins


def test_logins_pass_with_each_plugin_and_fail_as_mysql_words_it(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """Native and caching_sha2 logins (full authentication over RSA, then the fast path)
    pass; a wrong password and an unknown user get MySQL's ERR 1045 text, are counted per
    user, and no password reaches the log."""
    users = [
        {"name": "app", "password": "app"},
        {
            "name": "sha2user",
            "password": "s3cret-sha2",
            "auth_plugin": "caching_sha2_password",
            "backend_user": "app",
            "backend_password": "app",
        },
        {"name": "hashed", "password": "*" + "5BCB3E6AC345B435C7C2E6B7949A803D2A5D7A3E"},
    ]
    node = start_session_node(nodes, [shared_mariadb.port], users=users)
    conn = session_connect(node)
    assert one(conn, "SELECT CURRENT_USER()") == "app@%"
    conn.close()
    for _ in range(2):  # the first is a full authentication, the second the fast path
        conn = session_connect(node, user="sha2user", password="s3cret-sha2")
        assert one(conn, "SELECT 1") == 1
        conn.close()
    with pytest.raises(pymysql.err.OperationalError) as wrong:
        session_connect(node, password="nope")
    assert wrong.value.args == (
        1045,
        "Access denied for user 'app'@'127.0.0.1' (using password: YES)",
    )
    with pytest.raises(pymysql.err.OperationalError) as unknown:
        session_connect(node, user="nobody")
    assert unknown.value.args[0] == 1045
    assert "'nobody'@'127.0.0.1'" in unknown.value.args[1]
    with pytest.raises(pymysql.err.OperationalError):
        session_connect(node, user="sha2user", password="wrong")
    assert node.counter("logins_refused", user="app", reason="wrong password") == 1
    assert node.counter("logins_refused", user="(unknown)", reason="unknown user") == 1
    assert node.counter("logins_refused", user="sha2user") == 1
    assert node.counter("logins", user="sha2user") == 2
    log = node.process.text()
    for secret in ("s3cret-sha2", "nope", "5BCB3E6AC345"):
        assert secret not in log


def test_a_stored_hash_user_learns_its_backend_login_from_its_first_client(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """A user configured with only MySQL's ``*HEX`` hash logs in, and its statements run on
    backend connections logged in with what its native login proved."""
    stored = "*" + auth.native_stage2(mariadb.APP_PASSWORD).hex().upper()
    node = start_session_node(
        nodes, [shared_mariadb.port], users=[{"name": "app", "password": stored}]
    )
    conn = session_connect(node)
    assert one(conn, "SELECT CURRENT_USER()") == "app@%"
    conn.close()


def test_tls_to_clients_and_users_that_require_it(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB, tls_files: tuple[str, str]
) -> None:
    """Clients log in over TLS (PyMySQL; mysql-connector-python with caching_sha2, full
    then fast; the mariadb CLI); a user with require_tls is refused without TLS."""
    cert, key = tls_files
    users = [
        {"name": "app", "password": "app"},
        {
            "name": "secure",
            "password": "pw-secure",
            "require_tls": True,
            "backend_user": "app",
            "backend_password": "app",
        },
    ]
    node = start_session_node(
        nodes, [shared_mariadb.port], users=users, listener={"tls_cert": cert, "tls_key": key}
    )
    conn = session_connect(node, ssl=no_verify())
    assert conn._sock.version().startswith("TLS")
    assert one(conn, "SELECT 1") == 1
    conn.close()
    for _ in range(2):
        c = mysql.connector.connect(
            host=HOST,
            port=node.port,
            user="app",
            password="app",
            database="sbtest",
            use_pure=True,
            auth_plugin="caching_sha2_password",
            ssl_verify_cert=False,
        )
        cursor = c.cursor()
        cursor.execute("SELECT 40 + 2")
        assert cursor.fetchall() == [(42,)]
        c.close()
    with pytest.raises(pymysql.err.OperationalError) as plain:
        session_connect(node, user="secure", password="pw-secure", ssl_disabled=True)
    assert plain.value.args[0] == 1045
    secure = session_connect(node, user="secure", password="pw-secure", ssl=no_verify())
    assert one(secure, "SELECT 1") == 1
    secure.close()
    cli = shutil.which("mariadb")
    if cli is not None:
        out = subprocess.run(
            [
                cli,
                f"-h{HOST}",
                f"-P{node.port}",
                "-uapp",
                "-papp",
                "--ssl",
                "--skip-ssl-verify-server-cert",
                "sbtest",
                "-N",
                "-e",
                "SELECT 6*7",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert out.stdout.strip() == "42"
    assert node.counter("logins_refused", user="secure", reason="tls required") == 1


# --------------------------------------------------------------------------- multiplexing


def test_sessions_take_turns_on_one_backend_connection(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """With the pool capped at one connection, two client sessions alternate on it: both
    see the same CONNECTION_ID(), and the status counts two sessions per connection."""
    node = start_session_node(
        nodes, [shared_mariadb.port], connections={"max_per_server": 1, "idle": 1}
    )
    a, b = session_connect(node), session_connect(node)
    seen = {one(a, "SELECT CONNECTION_ID()"), one(b, "SELECT CONNECTION_ID()")}
    for _ in range(5):
        seen.add(one(a, "SELECT CONNECTION_ID()"))
        seen.add(one(b, "SELECT CONNECTION_ID()"))
    assert len(seen) == 1
    status = node.status()["session_mode"]
    assert status["client_sessions"] == 2
    assert status["multiplexing_ratio"] == 2.0
    assert "meshproxy_multiplexing_ratio 2.0" in node.metrics()
    a.close()
    b.close()


PINS = [
    ("SET @v = 1", "user variable"),
    ("BEGIN", None),
    # With autocommit off, the first statement that reads a table opens a transaction.
    ("SET autocommit = 0; SELECT COUNT(*) FROM pins", None),
    ("LOCK TABLES pins READ", "lock tables"),
    ("SELECT GET_LOCK('session-test', 1)", "get_lock"),
    ("CREATE TEMPORARY TABLE tmp_pin (a INT)", "temporary table"),
    ("SELECT SQL_CALC_FOUND_ROWS 1", "sql_calc_found_rows"),
    ("SET SESSION sql_warnings = 1", "untracked set"),
    ("SET TIMESTAMP = 1000000000", "untracked set"),
    ("PREPARE ps FROM 'SELECT 1'", "sql prepared statement"),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "set transaction"),
    ("HANDLER pins OPEN", "handler"),
    ("XA START 'session-test'", "transaction"),
    ("SET ROLE NONE", "set role"),
    ("SHOW STATUS LIKE 'Questions'", "session status"),
]


@pytest.mark.parametrize(("statement", "reason"), PINS, ids=[p[0] for p in PINS])
def test_a_pinning_statement_keeps_the_backend_connection(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB, statement: str, reason: str | None
) -> None:
    """After a pinning statement a session keeps its backend connection while another
    session's statements run on the other one (CONNECTION_ID() seen from both), and the pin
    is counted by reason."""
    node = start_session_node(
        nodes, [shared_mariadb.port], connections={"max_per_server": 2, "idle": 2}
    )
    setup = session_connect(node)
    one(setup, "CREATE TABLE IF NOT EXISTS pins (a INT)")
    setup.close()
    a, b = session_connect(node), session_connect(node)
    with a.cursor() as cursor:
        for part in statement.split("; "):
            cursor.execute(part)
    mine = one(a, "SELECT CONNECTION_ID()")
    others = {one(b, "SELECT CONNECTION_ID()") for _ in range(6)}
    assert mine not in others
    assert one(a, "SELECT CONNECTION_ID()") == mine
    if reason is not None:
        assert node.counter("session_pins", reason=reason) >= 1
    a.close()
    b.close()


def test_unlock_tables_and_commit_release_the_pin(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """COMMIT and UNLOCK TABLES end their pins: the connection goes back to the pool, and
    with a cap of one the other session can use it again."""
    node = start_session_node(
        nodes, [shared_mariadb.port], connections={"max_per_server": 1, "idle": 1}
    )
    a, b = session_connect(node), session_connect(node)
    one(a, "CREATE TABLE IF NOT EXISTS pins (a INT)")
    for begin, end in (("BEGIN", "COMMIT"), ("LOCK TABLES pins READ", "UNLOCK TABLES")):
        one(a, begin)
        one(a, "SELECT 1")
        one(a, end)
        assert one(b, "SELECT 2") == 2  # would wait out the checkout timeout if still pinned
    a.close()
    b.close()


def test_no_client_sees_another_clients_session_state(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """Tracked variables, the schema, LAST_INSERT_ID() and FOUND_ROWS() set by one session
    are never seen by another that shares its backend connection, and each session finds
    its own state again after the other ran."""
    node = start_session_node(
        nodes, [shared_mariadb.port], connections={"max_per_server": 1, "idle": 1}
    )
    a, b = session_connect(node), session_connect(node)
    one(a, "CREATE DATABASE IF NOT EXISTS other_schema")
    one(a, "CREATE TABLE IF NOT EXISTS ids (id INT AUTO_INCREMENT PRIMARY KEY, v INT)")
    default_mode = one(b, "SELECT @@sql_mode")
    changes = [
        "SET sql_mode = 'ANSI'",
        "SET time_zone = '+05:30'",
        "SET NAMES latin1",
        "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
        "SET SESSION group_concat_max_len = 4",
        "USE other_schema",
    ]
    for statement in changes:
        one(a, statement)
    one(a, "INSERT INTO sbtest.ids (v) VALUES (1)")
    inserted = one(a, "SELECT LAST_INSERT_ID()")
    assert inserted > 0
    probe = (
        "SELECT CONCAT_WS('|', @@sql_mode, @@time_zone, @@character_set_client, "
        "@@tx_isolation, @@group_concat_max_len, IFNULL(DATABASE(), ''))"
    )
    for _ in range(3):
        assert one(b, probe) == f"{default_mode}|SYSTEM|utf8mb4|REPEATABLE-READ|1048576|sbtest"
        assert one(b, "SELECT LAST_INSERT_ID()") == 0
        assert one(b, "SELECT FOUND_ROWS()") in (0, 1)  # its own previous SELECT's
        assert one(a, probe) == f"{ANSI}|+05:30|latin1|READ-COMMITTED|4|other_schema"
        assert one(a, "SELECT LAST_INSERT_ID()") == inserted
    with a.cursor() as cursor:
        cursor.execute("SELECT * FROM (SELECT 1 UNION SELECT 2 UNION SELECT 3) t")
    assert one(b, "SELECT FOUND_ROWS()") != 3
    assert node.counter("session_state_restores") > 0
    a.close()
    b.close()


# --------------------------------------------------------------------------- statements


def test_a_session_without_a_schema_runs_where_connections_selected_one(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """A session that selected no schema, arriving when every idle backend connection has
    selected one, runs its statements on a fresh connection (it once hung, then failed with
    9003: the statement went to the connection given up for the fresh one)."""
    node = start_session_node(nodes, [shared_mariadb.port])
    with_schema = session_connect(node)
    assert one(with_schema, "SELECT DATABASE()") == mariadb.DATABASE
    without = session_connect(node, database=None)
    assert one(without, "SELECT DATABASE()") is None
    assert one(without, "SELECT 2") == 2


def test_a_statement_prepared_inside_a_transaction_keeps_it_pinned(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """A prepare's answer carries no server status: a session that prepares a statement
    inside its transaction keeps its connection (the transaction goes on there), and no
    other session is given that connection with the transaction open."""
    node = start_session_node(
        nodes, [shared_mariadb.port], connections={"max_per_server": 2, "idle": 2}
    )
    table = f"prepared_in_tx_{time.monotonic_ns()}"
    one(session_connect(node), f"CREATE TABLE {table} (id INT PRIMARY KEY, v INT)")
    one(session_connect(node), f"INSERT INTO {table} VALUES (1, 0)")
    options = {
        "host": HOST,
        "port": node.port,
        "user": mariadb.APP_USER,
        "password": mariadb.APP_PASSWORD,
        "database": mariadb.DATABASE,
        "use_pure": True,
    }
    client = mysql.connector.connect(**options)
    other = mysql.connector.connect(**options, autocommit=True)
    try:
        client.cmd_query("BEGIN")
        client.cmd_query(f"UPDATE {table} SET v = v + 1 WHERE id = 1")
        client.cmd_stmt_prepare(f"SELECT v FROM {table} WHERE id = 1".encode())
        cursor = other.cursor()
        cursor.execute(f"SELECT @@in_transaction, (SELECT v FROM {table} WHERE id = 1)")
        assert cursor.fetchall() == [(0, 0)]  # not the client's connection, nor its update
        cursor = client.cursor()
        cursor.execute("SELECT @@in_transaction")
        assert cursor.fetchall() == [(1,)]
        client.rollback()
    finally:
        client.close()
        other.close()


def test_prepared_statements_survive_backend_switches(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """A client's prepared statement keeps working when its next execute lands on another
    backend connection, where meshproxy prepares it lazily (parameter types included)."""
    node = start_session_node(
        nodes, [shared_mariadb.port], connections={"max_per_server": 2, "idle": 2}
    )

    def connector() -> Any:
        conn = mysql.connector.connect(
            host=HOST,
            port=node.port,
            user="app",
            password="app",
            database="sbtest",
            use_pure=True,
            auth_plugin="mysql_native_password",
            autocommit=True,  # off, every statement would open a transaction, and pin
        )
        _OPEN.append(conn)
        return conn

    # The same driver on both: backend connections serve clients of the same flags.
    client, other = connector(), connector()
    cursor, holder = client.cursor(prepared=True), other.cursor()
    seen = set()
    for i in range(8):
        if i % 2:
            holder.execute("BEGIN")  # holds a connection: the next execute takes the other
        cursor.execute("SELECT ? * 2, ?, CONNECTION_ID()", (i, f"text-{i}"))
        row = cursor.fetchone()
        assert row is not None
        doubled, text, connection = row
        assert (doubled, text) == (2 * i, f"text-{i}")
        seen.add(connection)
        if i % 2:
            holder.execute("COMMIT")
    assert len(seen) == 2


def test_sysbench_read_write_and_prepared_point_selects_run_without_errors(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """sysbench oltp_read_write and oltp_point_select with server-side prepared statements
    run through session mode with a pool smaller than the client threads, error-free."""
    sysbench = shutil.which("sysbench")
    if sysbench is None:
        pytest.skip("sysbench is not installed")
    node = start_session_node(
        nodes, [shared_mariadb.port], connections={"max_per_server": 3, "idle": 2}
    )
    common = [
        sysbench,
        "--db-driver=mysql",
        f"--mysql-host={HOST}",
        "--mysql-user=app",
        "--mysql-password=app",
        "--mysql-db=sbtest",
        "--tables=1",
        "--table-size=200",
    ]
    subprocess.run(
        [*common, f"--mysql-port={shared_mariadb.port}", "oltp_read_write", "cleanup"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    subprocess.run(
        [*common, f"--mysql-port={shared_mariadb.port}", "oltp_read_write", "prepare"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    for workload in (["oltp_read_write"], ["oltp_point_select", "--db-ps-mode=auto"]):
        run = subprocess.run(
            [*common, f"--mysql-port={node.port}", "--threads=4", "--time=3", *workload, "run"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "FATAL" not in run.stdout + run.stderr
    assert max(s["open"] for s in node.servers().values()) <= 3


def test_big_results_and_packets_keep_proxy_memory_bounded(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """A 50 MiB result set streams through without the proxy holding it, and a 20 MiB
    statement (split into packets) arrives whole; the proxy's RSS stays bounded."""
    node = start_session_node(nodes, [shared_mariadb.port])
    conn = session_connect(node)
    pid = node.process.pid
    one(conn, "SELECT 1")
    before = rss_bytes(pid)
    with conn.cursor(pymysql.cursors.SSCursor) as cursor:
        cursor.execute("SELECT REPEAT('x', 1024 * 1024) FROM seq_1_to_50")
        total = sum(len(row[0]) for row in cursor)
    assert total == 50 * MiB
    assert rss_bytes(pid) - before < 16 * MiB
    one(conn, "CREATE TABLE IF NOT EXISTS blobs (id INT AUTO_INCREMENT PRIMARY KEY, b LONGBLOB)")
    with conn.cursor() as cursor:
        cursor.execute("INSERT INTO blobs (b) VALUES (%s)", (b"y" * (20 * MiB),))
        inserted = cursor.lastrowid
    assert one(conn, "SELECT LENGTH(b) FROM blobs WHERE id = %s", (inserted,)) == 20 * MiB
    assert rss_bytes(pid) - before < 100 * MiB
    conn.close()


def test_local_infile_multi_results_call_and_kill_query(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB, tmp_path: Path
) -> None:
    """LOAD DATA LOCAL INFILE sends the client's file, CALL and multi-statements return
    every result, and KILL QUERY with the id the client saw interrupts its statement."""
    node = start_session_node(nodes, [shared_mariadb.port])
    data = tmp_path / "rows.csv"
    data.write_text("".join(f"{i},row{i}\n" for i in range(1000)))
    conn = session_connect(node, local_infile=True, client_flag=CLIENT.MULTI_STATEMENTS)
    with conn.cursor() as cursor:
        cursor.execute("CREATE TEMPORARY TABLE li (a INT, b TEXT)")
        cursor.execute(f"LOAD DATA LOCAL INFILE '{data}' INTO TABLE li FIELDS TERMINATED BY ','")
        cursor.execute("SELECT COUNT(*), SUM(a) FROM li")
        assert cursor.fetchone() == (1000, sum(range(1000)))
        cursor.execute("DROP PROCEDURE IF EXISTS two_results")
        cursor.execute("CREATE PROCEDURE two_results() BEGIN SELECT 1; SELECT 2, 3; END")
        cursor.execute("CALL two_results()")
        assert cursor.fetchall() == ((1,),)
        assert cursor.nextset()
        assert cursor.fetchall() == ((2, 3),)
        cursor.execute("SELECT 'a'; SELECT 'b'")
        assert cursor.fetchall() == (("a",),)
        assert cursor.nextset()
        assert cursor.fetchall() == (("b",),)
    victim = session_connect(node)
    started = time.monotonic()
    thread, outcome = in_thread(victim, "SELECT SLEEP(30)")
    wait_until(
        lambda: (
            one(
                conn,
                "SELECT COUNT(*) FROM information_schema.processlist "
                "WHERE info = 'SELECT SLEEP(30)'",
            )
            == 1
        ),
        10,
        "the statement to run",
    )
    one(conn, f"KILL QUERY {victim.thread_id()}")
    thread.join(10)
    assert time.monotonic() - started < 10
    assert outcome
    assert outcome[0] is not None
    assert one(victim, "SELECT 'still here'") == "still here"
    with pytest.raises(pymysql.err.MySQLError) as unknown:
        one(conn, "KILL QUERY 4242")
    assert unknown.value.args[0] == 1094
    conn.close()
    victim.close()


def test_malformed_packets_end_only_their_session(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """A client that sends a malformed command gets a MySQL ERR packet and is closed; the
    error is counted and other sessions carry on."""
    node = start_session_node(nodes, [shared_mariadb.port])
    bystander = session_connect(node)
    with socket.create_connection((HOST, node.port), timeout=10) as bad:
        raw_login(bad, mariadb.APP_USER, mariadb.APP_PASSWORD)
        # A COM_STMT_EXECUTE too short to name a statement.
        write_packet(bad, 0, b"\x17\x01")
        packets = split_packets(read_to_eof(bad, 10))
    assert len(packets) == 1
    assert packets[0][0] == 0xFF
    assert struct.unpack_from("<H", packets[0], 1)[0] == 1835
    assert one(bystander, "SELECT 'fine'") == "fine"
    assert node.counter("session_protocol_errors") == 1
    bystander.close()


# --------------------------------------------------------------------------- the pool


def test_a_full_pool_answers_with_an_error_after_the_checkout_timeout(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """When every connection is pinned, a statement waits at most checkout_timeout_ms and
    then gets a clear ERR; the session works again once a connection is free."""
    node = start_session_node(
        nodes,
        [shared_mariadb.port],
        connections={"max_per_server": 1, "idle": 1, "checkout_timeout_ms": 300},
    )
    holder, waiter = session_connect(node), session_connect(node)
    one(holder, "BEGIN")
    one(holder, "SELECT 1")
    started = time.monotonic()
    with pytest.raises(pymysql.err.MySQLError) as exhausted:
        one(waiter, "SELECT 2")
    assert exhausted.value.args[0] == 9002
    assert "became free within 300 ms" in exhausted.value.args[1]
    assert time.monotonic() - started < 5
    one(holder, "COMMIT")
    assert one(waiter, "SELECT 3") == 3
    assert node.counter("backend_checkout_timeouts") == 1
    holder.close()
    waiter.close()


def _waiting(node: SessionNode) -> int:
    return sum(int(s["waiting"]) for s in node.servers().values())


def test_statements_queued_at_the_cap_run_in_arrival_order_and_leavers_cost_nothing(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """Statements queued for the only backend connection run on it in the order they
    came once it is free, and a client that leaves while its statement waits neither runs
    it nor costs the pool its connection."""
    node = start_session_node(
        nodes, [shared_mariadb.port], connections={"max_per_server": 1, "idle": 1}
    )
    holder, first, last = (session_connect(node) for _ in range(3))
    one(holder, "CREATE TABLE IF NOT EXISTS sbtest.arrivals (n INT, seq INT AUTO_INCREMENT KEY)")
    one(holder, "DELETE FROM sbtest.arrivals")
    one(holder, "BEGIN")
    one(holder, "SELECT 1")  # the connection is pinned by the open transaction
    runs = [in_thread(first, "INSERT INTO sbtest.arrivals (n) VALUES (1)")]
    wait_until(lambda: _waiting(node) == 1, 10, "the first statement queued")
    with socket.create_connection((HOST, node.port), timeout=10) as leaver:
        raw_login(leaver, mariadb.APP_USER, mariadb.APP_PASSWORD)
        write_packet(leaver, 0, b"\x03INSERT INTO sbtest.arrivals (n) VALUES (2)")
        wait_until(lambda: _waiting(node) == 2, 10, "the leaver's statement queued")
    wait_until(lambda: _waiting(node) == 1, 10, "the leaver's statement left the queue")
    runs.append(in_thread(last, "INSERT INTO sbtest.arrivals (n) VALUES (3)"))
    wait_until(lambda: _waiting(node) == 2, 10, "the last statement queued")
    one(holder, "COMMIT")
    for thread, outcome in runs:
        thread.join(15)
        assert outcome == [None]
    with holder.cursor() as cursor:
        cursor.execute("SELECT n FROM sbtest.arrivals ORDER BY seq")
        assert [row[0] for row in cursor.fetchall()] == [1, 3]
    server = next(iter(node.servers().values()))
    assert (server["open"], server["waiting"]) == (1, 0)


def test_every_queued_statement_gets_its_own_error_at_its_deadline(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """Five statements queued behind a pinned connection each end in ERR 9002 once the
    checkout timeout passes, and each of those sessions runs its next statement once the
    connection is free."""
    node = start_session_node(
        nodes,
        [shared_mariadb.port],
        connections={"max_per_server": 1, "idle": 1, "checkout_timeout_ms": 400},
    )
    holder = session_connect(node)
    waiters = [session_connect(node) for _ in range(5)]
    one(holder, "BEGIN")
    one(holder, "SELECT 1")
    runs = [in_thread(conn, "SELECT 2") for conn in waiters]
    for thread, outcome in runs:
        thread.join(15)
        assert len(outcome) == 1
        error = outcome[0]
        assert isinstance(error, pymysql.err.OperationalError)
        assert error.args[0] == 9002
    assert node.counter("backend_checkout_timeouts") == 5
    one(holder, "COMMIT")
    assert [one(conn, "SELECT 3") for conn in waiters] == [3] * 5


def test_the_per_server_cap_holds_under_500_clients(
    nodes: NodeFactory, mariadb_factory: MariaDBFactory
) -> None:
    """500 aiomysql clients running statements at once share at most the cap of backend
    connections: the server never sees more than the cap plus the health check."""
    server = mariadb_factory()
    node = start_session_node(nodes, [server.port], connections={"max_per_server": 12, "idle": 4})
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        conn = connect(server.port)
        while not stop.is_set():
            peak[0] = max(peak[0], _threads(conn))
            stop.wait(0.01)
        conn.close()

    async def clients() -> list[int]:
        async def client(i: int) -> int:
            conn = await aiomysql.connect(
                host=HOST,
                port=node.port,
                user="app",
                password="app",
                db="sbtest",
                autocommit=True,
            )
            try:
                total = 0
                async with conn.cursor() as cursor:
                    for _ in range(3):
                        await cursor.execute("SELECT SLEEP(0.01), %s", (i,))
                        total += (await cursor.fetchone())[1]
                return total
            finally:
                conn.close()

        return await asyncio.gather(*(client(i) for i in range(500)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = asyncio.run(clients())
    finally:
        stop.set()
        watcher.join()
    assert results == [3 * i for i in range(500)]
    # The cap, the health check's login, and the watcher itself.
    assert peak[0] <= 12 + 2
    assert max(s["open"] for s in node.servers().values()) <= 12


def _threads(conn: Any) -> int:
    with conn.cursor() as cursor:
        cursor.execute("SHOW GLOBAL STATUS LIKE 'Threads_connected'")
        row = cursor.fetchone()
    return int(row[1])


def test_a_backend_dying_mid_statement_fails_only_that_statement(
    nodes: NodeFactory, mariadb_factory: MariaDBFactory
) -> None:
    """When the server running a statement dies, that statement gets an error and the
    session's next statement runs on the pool's other server."""
    first, second = mariadb_factory(), mariadb_factory()
    node = start_session_node(nodes, [first.port, second.port])
    conn = session_connect(node)
    victim = first if one(conn, "SELECT @@port") == first.port else second
    survivor = second if victim is first else first
    thread, outcome = in_thread(conn, "SELECT SLEEP(20)")
    wait_until(lambda: node.servers()[addr(victim.port)]["in_use"] == 1, 10, "the statement")
    victim.kill()
    thread.join(20)
    assert outcome
    assert isinstance(outcome[0], pymysql.err.MySQLError)
    assert outcome[0].args[0] == 9003
    assert one(conn, "SELECT @@port") == survivor.port
    conn.close()


def test_the_pool_refills_after_a_backend_restart(
    nodes: NodeFactory, mariadb_farm: Any, mariadb_factory: MariaDBFactory
) -> None:
    """After its server restarts, a pool opens its idle connections again and serves."""
    server = mariadb_factory()
    node = start_session_node(nodes, [server.port], connections={"idle": 3})
    conn = session_connect(node)
    assert one(conn, "SELECT 1") == 1
    conn.close()
    key = addr(server.port)
    wait_until(lambda: node.servers()[key]["idle"] == 3, 15, "three idle connections")
    created = node.servers()[key]["created"]
    server.kill()
    wait_until(lambda: node.servers()[key]["idle"] == 0, 15, "the pool to empty")
    server.start(mariadb_farm.template)
    wait_until(lambda: node.servers()[key]["idle"] == 3, 30, "the pool to refill")
    assert node.servers()[key]["created"] >= created + 3
    conn = session_connect(node)
    assert one(conn, "SELECT 2") == 2
    conn.close()


# --------------------------------------------------------------------------- the mesh


def test_a_passthrough_edge_in_front_of_a_session_mode_middle(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """edge (passthrough) -> middle (session mode, angel and worker) -> MariaDB: clients
    log in to the middle through the edge, and their sessions multiplex there."""
    mesh_port, admin_port, edge_port = free_port(), free_port(), free_port()
    middle = {
        "node": {"name": "m1", "role": "middle", "mesh_bind": addr(mesh_port)},
        "admin": {"bind": addr(admin_port), "token": TOKEN},
        "service": [{"name": "mysql", "upstream": "pool:main", "mode": "session"}],
        "pool": [
            {
                "name": "main",
                "servers": [addr(shared_mariadb.port)],
                "check": CHECK,
                "connections": {"max_per_server": 1, "idle": 1},
            }
        ],
        "user": [{"name": "app", "password": "app"}],
    }
    nodes.start(middle)
    nodes.start(edge_config("e1", edge_port, [mesh_port]))
    a, b = connect(edge_port), connect(edge_port)
    ids = {one(a, "SELECT CONNECTION_ID()"), one(b, "SELECT CONNECTION_ID()")}
    assert len(ids) == 1
    a.close()
    b.close()


def test_change_user_logs_in_again_with_a_fresh_session(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """COM_CHANGE_USER re-authenticates: the session starts over (its user variables are
    gone, the new schema is current), and a wrong password ends it with ERR 1045."""
    users = [
        {"name": "app", "password": "app"},
        {"name": "other", "password": "pw-other", "backend_user": "app", "backend_password": "app"},
    ]
    node = start_session_node(nodes, [shared_mariadb.port], users=users)
    conn = mysql.connector.connect(
        host=HOST,
        port=node.port,
        user="app",
        password="app",
        database="sbtest",
        use_pure=True,
        auth_plugin="mysql_native_password",
        autocommit=True,
    )
    _OPEN.append(conn)
    cursor = conn.cursor()
    cursor.execute("SET @mine = 'app'")
    conn.cmd_change_user(username="other", password="pw-other", database="mysql")
    cursor = conn.cursor()
    cursor.execute("SELECT @mine, DATABASE()")
    assert cursor.fetchall() == [(None, "mysql")]
    assert node.status()["session_mode"]["users"] == {"app": 0, "other": 1}
    with pytest.raises(mysql.connector.Error) as wrong:
        conn.cmd_change_user(username="app", password="bad")
    assert wrong.value.errno == 1045


def test_idle_client_sessions_are_closed_after_idle_s(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """A client session that runs nothing for timeouts.idle_s is closed and counted."""
    port, admin_port = free_port(), free_port()
    doc = session_doc("s1", [shared_mariadb.port], port, admin_port)
    doc["timeouts"] = {"idle_s": 1}
    node = SessionNode(nodes.start(doc, ("--no-angel",)), port, admin_port)
    conn = session_connect(node)
    assert one(conn, "SELECT 1") == 1
    wait_until(lambda: node.counter("idle_timeouts") == 1, 10, "the idle timeout")
    with pytest.raises(pymysql.err.OperationalError):
        one(conn, "SELECT 1")


def test_logins_change_through_the_admin_api(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """A user added through the admin API can log in at once; removed, it is refused, and
    a session it already had open carries on."""
    node = start_session_node(nodes, [shared_mariadb.port])
    new_user = {
        "name": "late",
        "password": "pw-late",
        "backend_user": "app",
        "backend_password": "app",
    }
    request = urllib.request.Request(
        f"http://{HOST}:{node.admin_port}/users",
        data=json.dumps(new_user).encode(),
        method="POST",
    )
    request.add_header("Authorization", f"Bearer {TOKEN}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        assert response.status == 200
    conn = session_connect(node, user="late", password="pw-late")
    assert one(conn, "SELECT CURRENT_USER()") == "app@%"
    request = urllib.request.Request(f"http://{HOST}:{node.admin_port}/users/late", method="DELETE")
    request.add_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        assert response.status == 200
    with pytest.raises(pymysql.err.OperationalError) as refused:
        session_connect(node, user="late", password="pw-late")
    assert refused.value.args[0] == 1045
    assert one(conn, "SELECT 'still open'") == "still open"


def test_tls_to_the_servers(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB, mariadb_factory: MariaDBFactory
) -> None:
    """connections.tls = "verify" logs in to the servers over TLS checked against tls_ca
    (the server sees an encrypted session), a server without TLS fails the connect with
    why, and "verify" refuses a certificate its CA did not sign."""
    ca = str(shared_mariadb.dir / "cert.pem")
    node = start_session_node(
        nodes, [shared_mariadb.port], connections={"tls": "verify", "tls_ca": ca}
    )
    conn = session_connect(node)
    cipher = "SELECT VARIABLE_VALUE FROM information_schema.SESSION_STATUS"
    cipher += " WHERE VARIABLE_NAME = 'Ssl_cipher'"
    assert one(conn, cipher)
    plain = mariadb_factory()
    node = start_session_node(nodes, [plain.port], name="s2", connections={"tls": "on"})
    with pytest.raises(pymysql.err.OperationalError) as refused:
        one(session_connect(node), "SELECT 1")  # (PyMySQL runs a SET as it connects)
    assert "the server offers no TLS" in refused.value.args[1]
    other = mariadb_factory(tls=True)  # its own self-signed certificate
    node = start_session_node(
        nodes, [other.port], name="s3", connections={"tls": "verify", "tls_ca": ca}
    )
    with pytest.raises(pymysql.err.OperationalError) as unverified:
        one(session_connect(node), "SELECT 1")
    assert "CERTIFICATE_VERIFY_FAILED" in unverified.value.args[1]


def test_a_tls_hello_read_with_its_ssl_request_still_starts_tls(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB, tls_files: tuple[str, str]
) -> None:
    """A client whose TLS hello arrives in the same read as its SSLRequest gets its TLS
    handshake: the bytes read in clear are handed to the TLS layer, none is answered."""
    cert, key = tls_files
    node = start_session_node(
        nodes, [shared_mariadb.port], listener={"tls_cert": cert, "tls_key": key}
    )
    with socket.create_connection((HOST, node.port), timeout=10) as sock:
        read_packet(sock)  # the greeting
        caps = 0x00000200 | 0x00000800 | 0x00008000 | 0x00080000 | 1  # 4.1, SSL, auth
        ssl_request = struct.pack("<IIB23x", caps, 1 << 24, 33)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = no_verify().wrap_bio(incoming, outgoing)
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        # One write: the SSLRequest and the TLS hello together.
        sock.sendall(b"\x20\x00\x00\x01" + ssl_request + outgoing.read())
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = outgoing.read()
                if pending:
                    sock.sendall(pending)
                data = sock.recv(65536)
                assert data, "the node closed the connection during the TLS handshake"
                incoming.write(data)
        assert str(tls.version()).startswith("TLS")
