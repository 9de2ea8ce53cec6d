"""MySQL traffic through client -> edge -> middle -> MariaDB with real clients.

Every test runs twice: with the Python pump, and with the kernel fast path
(``dataplane.accel = "sockmap"``), where linked sessions' bytes never enter Python.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import pymysql
import pymysql.cursors
import pytest

from meshproxy.testbed import mariadb
from tests.integration.conftest import start_chain
from tests.integration.harness import (
    HOST,
    Chain,
    NodeFactory,
    close_quietly,
    connect,
    edge_config,
    free_port,
    middle_config,
    query,
    raw_login,
    read_to_eof,
    rss_bytes,
    split_packets,
    wait_until,
    write_packet,
)

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture(scope="module", params=["none", "sockmap"])
def accel(request: pytest.FixtureRequest) -> str:
    """The data plane the module's chains run: the Python pump, or the BPF sockmap."""
    return str(request.param)


@pytest.fixture(scope="module")
def _module_chain(
    tmp_path_factory: pytest.TempPathFactory, shared_mariadb: mariadb.MariaDB, accel: str
) -> Iterator[tuple[NodeFactory, Chain]]:
    factory = NodeFactory(tmp_path_factory.mktemp(f"chain-{accel}"))
    try:
        yield factory, start_chain(factory, shared_mariadb, accel)
    finally:
        problems = factory.stop_all()
        if problems:
            pytest.fail("\n".join(problems))


@pytest.fixture
def chain(nodes: NodeFactory, shared_mariadb: mariadb.MariaDB, accel: str) -> Chain:
    return start_chain(nodes, shared_mariadb, accel)


def test_large_result_set_arrives_complete(shared_chain: Chain) -> None:
    """A 50 MiB result of 51,200 rows streams through the chain with every row intact."""
    rows, width = 51_200, 1024
    conn = connect(shared_chain.port, cursorclass=pymysql.cursors.SSCursor)
    try:
        with conn.cursor() as cursor:
            # seq_1_to_N is MariaDB's sequence engine: N generated rows, no table needed.
            cursor.execute(
                f"SELECT seq, REPEAT(CHAR(65 + MOD(seq, 26) USING ascii), %s) FROM seq_1_to_{rows}",
                (width,),
            )
            count = 0
            for seq, payload in cursor:
                count += 1
                assert seq == count
                assert payload == chr(65 + seq % 26) * width
    finally:
        conn.close()
    assert count == rows


def test_packets_over_16_mib_pass_both_ways(shared_chain: Chain) -> None:
    """A 20 MiB result row and a 20 MiB INSERT (split into several MySQL packets) pass
    through the chain byte for byte."""
    size = 20 * MiB
    blob = os.urandom(size)
    table = f"blob_{uuid.uuid4().hex[:8]}"
    conn = connect(shared_chain.port, max_allowed_packet=64 * MiB)
    try:
        with conn.cursor() as cursor:
            cursor.execute(f"SELECT REPEAT('x', {size})")
            (text,) = cursor.fetchone()
            assert len(text) == size
            assert text == "x" * size

            cursor.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY, b LONGBLOB)")
            cursor.execute(f"INSERT INTO {table} VALUES (1, %s)", (blob,))
            cursor.execute(f"SELECT LENGTH(b), SHA2(b, 256) FROM {table}")
            assert cursor.fetchone() == (size, hashlib.sha256(blob).hexdigest())
            cursor.execute(f"SELECT b FROM {table}")
            assert cursor.fetchone()[0] == blob
            cursor.execute(f"DROP TABLE {table}")
    finally:
        conn.close()


def test_tls_negotiated_with_the_server_through_the_chain(shared_chain: Chain) -> None:
    """A client negotiates TLS with MariaDB itself through both proxies, verifying the
    server's certificate, and runs queries over it."""
    ca = shared_chain.backend.dir / "cert.pem"
    conn = connect(
        shared_chain.port, ssl_ca=str(ca), ssl_verify_cert=True, ssl_verify_identity=False
    )
    try:
        with conn.cursor() as cursor:
            cursor.execute("SHOW STATUS LIKE 'Ssl_cipher'")
            (_, cipher) = cursor.fetchone()
            assert cipher, "the session is not encrypted"
            cursor.execute("SELECT REPEAT('t', 3 * 1024 * 1024), @@port")
            payload, port = cursor.fetchone()
            assert payload == "t" * 3 * MiB
            assert port == shared_chain.backend.port
    finally:
        conn.close()


def test_long_query_survives(shared_chain: Chain) -> None:
    """A SELECT SLEEP(3), silent for three seconds in both directions, returns its result."""
    conn = connect(shared_chain.port)
    try:
        with conn.cursor() as cursor:
            started = time.monotonic()
            cursor.execute("SELECT SLEEP(3), 'awake'")
            assert cursor.fetchone() == (0, "awake")
            assert time.monotonic() - started >= 3.0
            cursor.execute("SELECT 1")
            assert cursor.fetchone() == (1,)
    finally:
        conn.close()


def test_client_half_close_is_forwarded(shared_chain: Chain) -> None:
    """After a client sends a query and shuts down its sending side, the answer still comes
    back through the chain, and the server, seeing the EOF, closes: the client reads EOF."""
    with socket.create_connection((HOST, shared_chain.port), timeout=10) as sock:
        raw_login(sock, mariadb.APP_USER, mariadb.APP_PASSWORD)
        write_packet(sock, 0, b"\x03SELECT SLEEP(1), 'after-half-close'")
        sock.shutdown(socket.SHUT_WR)
        shut = time.monotonic()
        # The server answers a second after our FIN (so the proxies kept the other direction
        # open), then reads EOF on its side of the chain and closes (so the FIN was passed
        # on: otherwise it would wait for our next command for hours).
        try:
            data = read_to_eof(sock, timeout_s=15)
        except TimeoutError:
            pytest.fail("no EOF within 15 s: the client's EOF was not passed on to the server")
        elapsed = time.monotonic() - shut
    packets = split_packets(data)
    assert packets[0] == b"\x02", f"expected a two-column result set, got {packets[:1]!r}"
    assert b"\x010\x10after-half-close" in packets, f"row missing from {packets!r}"
    assert packets[-1][:1] == b"\xfe", "result set not terminated"
    assert elapsed >= 0.9


def test_backpressure_bounds_proxy_memory(chain: Chain) -> None:
    """While a client does not read a 64 MiB result, no proxy process buffers it: each one's
    resident memory stays within a few MiB of what it was."""
    # Standby workers carry no traffic, and one the angel has just started is still
    # importing: its growth is not the proxy buffering.
    nodes = (chain.edge, chain.middle)
    standbys = {int(e.fields["pid"]) for n in nodes for e in n.events("angel_standby_started")}
    pids = [pid for n in nodes for pid in n.pids() if pid not in standbys]
    before = {pid: rss_bytes(pid) for pid in pids}
    peak = dict(before)
    conn = connect(chain.port, cursorclass=pymysql.cursors.SSCursor)
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT REPEAT('b', 65536) FROM seq_1_to_1024")
            # The client stalls for two seconds, time for the server to push what the chain
            # will take; memory is sampled meanwhile.
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                for pid in pids:
                    peak[pid] = max(peak[pid], rss_bytes(pid))
                time.sleep(0.05)
            count = sum(1 for _ in cursor)
    finally:
        conn.close()
    assert count == 1024
    for pid, value in peak.items():
        grown = value - before[pid]
        assert grown < 16 * MiB, f"pid {pid} grew by {grown / MiB:.1f} MiB while the client stalled"


def test_mariadb_cli_through_the_chain(shared_chain: Chain) -> None:
    """The mariadb command-line client runs a script of statements, plain and over TLS."""
    client = shutil.which("mariadb")
    assert client is not None, "the mariadb client is not installed"
    base = [
        client,
        "--no-defaults",
        "--protocol=TCP",
        f"--host={HOST}",
        f"--port={shared_chain.port}",
        f"--user={mariadb.APP_USER}",
        f"--password={mariadb.APP_PASSWORD}",
        "--batch",
        "--skip-column-names",
        mariadb.DATABASE,
    ]
    table = f"cli_{uuid.uuid4().hex[:8]}"
    script = (
        f"CREATE TABLE {table} (id INT PRIMARY KEY, v VARCHAR(20));\n"
        f"INSERT INTO {table} VALUES (1, 'one'), (2, 'two');\n"
        f"SELECT id, v FROM {table} ORDER BY id;\n"
        f"SELECT 6 * 7, @@port;\n"
        f"DROP TABLE {table};\n"
    )
    result = subprocess.run(
        base, input=script, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["1\tone", "2\ttwo", f"42\t{shared_chain.backend.port}"]

    tls = subprocess.run(
        [*base, "--ssl", "--ssl-verify-server-cert=0", "-e", "SHOW STATUS LIKE 'Ssl_cipher'"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert tls.returncode == 0, tls.stderr
    name, _, cipher = tls.stdout.strip().partition("\t")
    assert name == "Ssl_cipher"
    assert cipher, "the mariadb client did not negotiate TLS"


def test_sysbench_point_selects_without_errors(shared_chain: Chain) -> None:
    """sysbench prepares a table through the chain and runs oltp_point_select with four
    threads for three seconds without a single error or reconnect."""
    sysbench = shutil.which("sysbench")
    assert sysbench is not None, "sysbench is not installed"
    database = f"sb_{uuid.uuid4().hex[:8]}"
    query(shared_chain.backend.port, f"CREATE DATABASE {database}")
    common = [
        sysbench,
        "oltp_point_select",
        "--db-driver=mysql",
        f"--mysql-host={HOST}",
        f"--mysql-port={shared_chain.port}",
        f"--mysql-user={mariadb.APP_USER}",
        f"--mysql-password={mariadb.APP_PASSWORD}",
        f"--mysql-db={database}",
        "--tables=1",
        "--table-size=1000",
    ]
    try:
        prepare = subprocess.run(
            [*common, "prepare"], capture_output=True, text=True, timeout=60, check=False
        )
        assert prepare.returncode == 0, prepare.stdout + prepare.stderr
        run = subprocess.run(
            [*common, "--threads=4", "--time=3", "run"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        query(shared_chain.backend.port, f"DROP DATABASE {database}")
    output = run.stdout + run.stderr
    assert run.returncode == 0, output

    def figure(label: str) -> int:
        match = re.search(rf"^\s*{label}:\s+(\d+)", output, re.MULTILINE)
        assert match is not None, f"no {label!r} in sysbench output:\n{output}"
        return int(match.group(1))

    assert figure("ignored errors") == 0
    assert figure("reconnects") == 0
    assert figure("queries") > 1000


def test_idle_session_is_closed(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB, accel: str
) -> None:
    """With timeouts.idle_s = 1, a session silent for a second is closed by the edge while
    a session that keeps talking stays open (spliced, its bytes are counted by the kernel)."""
    mesh_port, edge_port = free_port(), free_port()
    middle = middle_config("middle1", mesh_port, servers=[shared_mariadb.port])
    edge_doc = edge_config("edge1", edge_port, [mesh_port], timeouts={"idle_s": 1})
    for doc in (middle, edge_doc):
        doc["dataplane"] = {"accel": accel}
    nodes.start(middle)
    edge = nodes.start(edge_doc)
    idle, busy = connect(edge_port), connect(edge_port)
    stop = threading.Event()
    busy_errors: list[BaseException] = []

    def keep_busy() -> None:
        try:
            while not stop.wait(0.1):
                with busy.cursor() as cursor:
                    cursor.execute("SELECT 1")
        except Exception as exc:
            busy_errors.append(exc)

    busy_thread = threading.Thread(target=keep_busy)
    try:
        with idle.cursor() as cursor:
            cursor.execute("SELECT 1")
        last_used = time.time()
        busy_thread.start()
        event = edge.wait_for_event("idle_timeout", timeout_s=5)
        # The log's time stamps have millisecond resolution.
        assert event.ts >= last_used + 1.0 - 0.01
        with pytest.raises(pymysql.err.OperationalError), idle.cursor() as cursor:
            cursor.execute("SELECT 1")
        stop.set()
        busy_thread.join(10)
        assert not busy_errors
        with busy.cursor() as cursor:
            cursor.execute("SELECT 2")
            assert cursor.fetchone() == (2,)
        assert len(edge.events("idle_timeout")) == 1
    finally:
        stop.set()
        if busy_thread.is_alive():
            busy_thread.join(10)
        close_quietly(idle)
        close_quietly(busy)


def test_listener_max_connections(nodes: NodeFactory, shared_mariadb: mariadb.MariaDB) -> None:
    """A listener with max_connections = 2 refuses a third client at once with a 'Too many
    connections' error, and takes a new client again once one has left."""
    mesh_port, edge_port = free_port(), free_port()
    nodes.start(middle_config("middle1", mesh_port, servers=[shared_mariadb.port]))
    nodes.start(edge_config("edge1", edge_port, [mesh_port], listener={"max_connections": 2}))
    first, second = connect(edge_port), connect(edge_port)
    try:
        started = time.monotonic()
        with pytest.raises(pymysql.err.OperationalError) as refused:
            connect(edge_port)
        assert time.monotonic() - started < 2.0  # at once, not after connect_timeout (10 s)
        assert refused.value.args[0] == 1040, refused.value.args
        assert "Too many connections" in str(refused.value.args[1])
        with second.cursor() as cursor:  # the admitted sessions are unaffected
            cursor.execute("SELECT 1")
            assert cursor.fetchone() == (1,)
        first.close()

        def admitted() -> bool:
            try:
                query(edge_port, "SELECT 1")
            except pymysql.err.OperationalError:
                return False
            return True

        wait_until(admitted, 5, "a slot to free up after a client left")
    finally:
        close_quietly(first)
        close_quietly(second)


def test_single_process_mode(nodes: NodeFactory, shared_mariadb: mariadb.MariaDB) -> None:
    """Nodes run with `meshproxy run --no-angel` (one process, no supervisor) carry the
    chain just the same and stop cleanly on SIGTERM."""
    mesh_port, edge_port = free_port(), free_port()
    single = ["--no-angel"]
    nodes.start(middle_config("middle1", mesh_port, servers=[shared_mariadb.port]), single)
    edge = nodes.start(edge_config("edge1", edge_port, [mesh_port]), single)
    assert edge.pids() == [edge.pid]
    assert query(edge_port, "SELECT 'single', @@port") == [("single", shared_mariadb.port)]
    rows = query(edge_port, "SELECT REPEAT('s', 2 * 1024 * 1024)")
    assert rows == [("s" * 2 * MiB,)]
