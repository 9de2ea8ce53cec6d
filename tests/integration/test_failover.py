"""Failures under the chain: backends killed or drained, middles that accept nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pymysql
import pytest

from meshproxy.testbed import mariadb
from tests.integration.harness import (
    MYSQL_CHECK,
    Load,
    MariaDBFarm,
    NodeFactory,
    NodeProcess,
    Outcome,
    addr,
    blackhole,
    close_quietly,
    connect,
    edge_config,
    free_port,
    middle_config,
    query,
    wait_until,
)

pytestmark = pytest.mark.integration

MariaDBFactory = Callable[..., mariadb.MariaDB]


@pytest.fixture(scope="module")
def backend_pair(mariadb_farm: MariaDBFarm) -> Iterator[tuple[mariadb.MariaDB, mariadb.MariaDB]]:
    """Two MariaDB servers for the tests of this module that leave them as they found them."""
    pair = mariadb_farm.start(), mariadb_farm.start()
    yield pair
    for server in pair:
        mariadb_farm.stop(server)


# The kill test's checks: fast, with the longest timeout the interval allows, so that a
# starved machine does not fail the survivor's checks too.
FAST_CHECK = {**MYSQL_CHECK, "interval_ms": 200, "timeout_ms": 190, "fall": 2, "rise": 2}
CALM_CHECK = {**MYSQL_CHECK, "interval_ms": 400, "timeout_ms": 390, "fall": 2, "rise": 2}


def assert_session_cut_or_kept(middle: NodeProcess, session: Any, port: int, cut: bool) -> None:
    """The middle closed the one session to ``port`` (``cut``), or it still answers there."""
    if cut:
        closed = middle.wait_for_event("sessions_closed", server=addr(port))
        assert closed.fields["count"] == "1"
        with pytest.raises(pymysql.err.OperationalError), session.cursor() as cursor:
            cursor.execute("SELECT 1")
    else:
        with session.cursor() as cursor:
            cursor.execute("SELECT @@port")
            assert cursor.fetchone() == (port,)
        assert not middle.events("sessions_closed")


def test_killed_backend_is_shunned_and_avoided(
    nodes: NodeFactory, mariadb_factory: MariaDBFactory
) -> None:
    """When one of two backends is killed under connect/query/close load, the middle marks
    it SHUNNED within fall x interval (plus slack), no connection opened after the kill
    fails, and those opened after the verdict all land on the surviving backend."""
    doomed, survivor = mariadb_factory(), mariadb_factory()
    mesh_port, edge_port = free_port(), free_port()
    middle = nodes.start(
        middle_config("middle1", mesh_port, servers=[doomed.port, survivor.port], check=FAST_CHECK)
    )
    nodes.start(edge_config("edge1", edge_port, [mesh_port]))
    fall_window_s = FAST_CHECK["fall"] * FAST_CHECK["interval_ms"] / 1000
    with Load(edge_port, threads=3) as load:
        wait_until(
            lambda: {o.port for o in load.snapshot()} >= {doomed.port, survivor.port},
            15,
            "load to reach both backends",
        )
        killed_at = time.time()
        doomed.kill()
        dead_at = time.time()  # the kill has been reaped: the port refuses from here on
        down = middle.wait_for_event(
            "server_state", timeout_s=10, server=addr(doomed.port), new="SHUNNED"
        )
        assert down.ts - killed_at <= fall_window_s + 1.0, (
            f"SHUNNED {down.ts - killed_at:.2f} s after the kill: {down.line}"
        )

        def opened_after_shunned() -> list[Outcome] | None:
            done = [o for o in load.snapshot() if o.started > down.ts + 0.01]
            return done if len(done) >= 30 else None

        after = wait_until(
            opened_after_shunned, 30, "30 connections opened after the backend was shunned"
        )
    failures = [o for o in after if o.error is not None]
    assert not failures, failures[:5]
    assert {o.port for o in after} == {survivor.port}
    assert query(edge_port, "SELECT @@port") == [(survivor.port,)]
    # Only sessions already open at the kill may fail: a later connect that meets the dead
    # port before the SHUNNED verdict is retried on the survivor.
    late = [o for o in load.outcomes if o.error is not None and o.started > dead_at]
    assert not late, late[:5]


@pytest.mark.parametrize("close_sessions_on_down", [True, False])
def test_close_sessions_on_down(
    nodes: NodeFactory,
    backend_pair: tuple[mariadb.MariaDB, mariadb.MariaDB],
    close_sessions_on_down: bool,
) -> None:
    """When a backend fails its checks and goes SHUNNED, its open sessions are closed if and
    only if the pool sets close_sessions_on_down; new sessions go to the other backend."""
    backends = {b.port: b for b in backend_pair}
    mesh_port, edge_port = free_port(), free_port()
    middle = nodes.start(
        middle_config(
            "middle1",
            mesh_port,
            servers=list(backends),
            check=CALM_CHECK,
            pool={"close_sessions_on_down": close_sessions_on_down},
        )
    )
    nodes.start(edge_config("edge1", edge_port, [mesh_port]))
    monitor = f"'{mariadb.MONITOR_USER}'@'%'"
    dropped_on: int | None = None
    session = connect(edge_port)
    try:
        with session.cursor() as cursor:
            cursor.execute("SELECT @@port")
            (failing_port,) = cursor.fetchone()
        (other_port,) = set(backends) - {failing_port}
        # The server stays up for our session, but the monitor user can no longer log in.
        query(failing_port, f"DROP USER {monitor}")
        dropped_on = failing_port
        middle.wait_for_event("server_state", server=addr(failing_port), new="SHUNNED")
        assert_session_cut_or_kept(middle, session, failing_port, close_sessions_on_down)
        for _ in range(5):
            assert query(edge_port, "SELECT @@port") == [(other_port,)]
    finally:
        close_quietly(session)
        if dropped_on is not None:
            query(dropped_on, f"CREATE USER {monitor} IDENTIFIED BY '{mariadb.MONITOR_PASSWORD}'")


@pytest.mark.parametrize("admin_state", ["OFFLINE_SOFT", "OFFLINE_HARD"])
def test_offline_server_gets_no_connections(
    nodes: NodeFactory,
    backend_pair: tuple[mariadb.MariaDB, mariadb.MariaDB],
    admin_state: str,
) -> None:
    """A server configured OFFLINE_SOFT or OFFLINE_HARD receives no new connections; its
    pool sends them all to the ONLINE server."""
    offline, online = backend_pair
    mesh_port, edge_port = free_port(), free_port()
    servers: list[int | Mapping[str, object]] = [
        {"address": addr(offline.port), "state": admin_state},
        online.port,
    ]
    nodes.start(middle_config("middle1", mesh_port, servers=servers))
    nodes.start(edge_config("edge1", edge_port, [mesh_port]))
    ports = {query(edge_port, "SELECT @@port")[0][0] for _ in range(20)}
    assert ports == {online.port}


def test_no_eligible_server_fails_within_budget(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """When the only backend is OFFLINE_SOFT, a client gets an error naming the cause
    once the edge's connect budget is spent, not later."""
    mesh_port, edge_port = free_port(), free_port()
    servers = [{"address": addr(shared_mariadb.port), "state": "OFFLINE_SOFT"}]
    nodes.start(
        middle_config(
            "middle1",
            mesh_port,
            servers=servers,
            timeouts={"connect_ms": 200, "connect_budget_ms": 500},
        )
    )
    budget_s = 1.5
    edge = nodes.start(
        edge_config(
            "edge1",
            edge_port,
            [mesh_port],
            timeouts={"connect_ms": 500, "connect_budget_ms": int(budget_s * 1000)},
        )
    )
    started = time.monotonic()
    with pytest.raises(pymysql.err.OperationalError) as failed:
        connect(edge_port)
    elapsed = time.monotonic() - started
    assert budget_s - 0.1 <= elapsed <= budget_s + 2.0, elapsed
    assert "no upstream reachable" in str(failed.value)
    edge.wait_for_event("upstream_unavailable", upstream="tier:middle")


def test_blackholed_middle_is_skipped_within_budget(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """With a middle whose port accepts no connections (SYNs dropped), the edge times out
    its connect, moves on to the other middle, and every client query succeeds within the
    connect budget."""
    connect_ms, budget_ms = 300, 2000
    with blackhole() as dead_port:
        mesh_port, edge_port = free_port(), free_port()
        nodes.start(middle_config("middle1", mesh_port, servers=[shared_mariadb.port]))
        edge = nodes.start(
            edge_config(
                "edge1",
                edge_port,
                # The heavy weight makes the blackhole the first choice almost every time.
                [{"address": addr(dead_port), "weight": 1000}, {"address": addr(mesh_port)}],
                tier={"warm_connections": 0},
                timeouts={"connect_ms": connect_ms, "connect_budget_ms": budget_ms},
            )
        )
        for _ in range(3):
            started = time.monotonic()
            conn = connect(edge_port)
            try:
                # The handshake arrived within the budget (plus slack for a busy machine).
                assert time.monotonic() - started < budget_ms / 1000 + 1.0
                with conn.cursor() as cursor:
                    cursor.execute("SELECT 'through', @@port")
                    assert cursor.fetchone() == ("through", shared_mariadb.port)
            finally:
                conn.close()
        failed = edge.wait_for_event("connect_failed", server=addr(dead_port))
        assert failed.fields["error"] == "timed out"


def _syn_sent_to(port: int) -> bool:
    """Whether some local socket is waiting for a SYN-ACK from ``port`` (SYN_SENT)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "02" and int(fields[2].rpartition(":")[2], 16) == port:
            return True
    return False


def test_connect_to_a_member_ruled_out_moves_on_at_once(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """A connect still waiting on a SYN to a member that is then ruled out (set OFFLINE_SOFT
    here) gives up at once and goes to another member, well before its connect timeout."""
    connect_ms = 20_000
    with blackhole() as dead_port:
        mesh_port, edge_port = free_port(), free_port()
        nodes.start(middle_config("middle1", mesh_port, servers=[shared_mariadb.port]))
        dead: dict[str, object] = {"address": addr(dead_port)}
        doc = edge_config(
            "edge1",
            edge_port,
            [dead],  # the only member: the first attempt surely dials the blackhole
            tier={"warm_connections": 0, "check": {"interval_ms": 60_000}},
            timeouts={"connect_ms": connect_ms, "connect_budget_ms": connect_ms},
        )
        edge = nodes.start(doc)
        took: list[float] = []

        def client() -> None:
            started = time.monotonic()
            connect(edge_port, connect_timeout=30).close()
            took.append(time.monotonic() - started)

        thread = threading.Thread(target=client)
        thread.start()
        deadline = time.monotonic() + 10
        while not _syn_sent_to(dead_port):
            assert time.monotonic() < deadline, "the edge never dialled the blackhole"
            time.sleep(0.02)
        dead["state"] = "OFFLINE_SOFT"
        doc["tier"][0]["members"].append(addr(mesh_port))
        edge.reload(doc)
        thread.join(timeout=25)
        assert took, "the client never got through"
        assert took[0] < 5.0, f"took {took[0]:.2f} s: the connect waited for its timeout"


@pytest.mark.parametrize("admin_state", ["OFFLINE_SOFT", "OFFLINE_HARD"])
def test_offline_set_at_runtime(
    nodes: NodeFactory,
    backend_pair: tuple[mariadb.MariaDB, mariadb.MariaDB],
    admin_state: str,
) -> None:
    """A server set OFFLINE_SOFT at runtime (config edited, SIGHUP) lets its open session
    finish, OFFLINE_HARD closes it at once; either way new sessions go to the other server."""
    mesh_port, edge_port = free_port(), free_port()
    ports = [server.port for server in backend_pair]
    doc = middle_config("middle1", mesh_port, servers=ports)
    middle = nodes.start(doc)
    nodes.start(edge_config("edge1", edge_port, [mesh_port]))
    session = connect(edge_port)
    try:
        with session.cursor() as cursor:
            cursor.execute("SELECT @@port")
            (port,) = cursor.fetchone()
        (other_port,) = set(ports) - {port}
        doc["pool"][0]["servers"] = [
            {"address": addr(p), "state": admin_state if p == port else "ONLINE"} for p in ports
        ]
        middle.reload(doc)
        middle.wait_for_event("server_state", server=addr(port), new=admin_state)
        assert_session_cut_or_kept(middle, session, port, admin_state == "OFFLINE_HARD")
        for _ in range(5):
            assert query(edge_port, "SELECT @@port") == [(other_port,)]
    finally:
        close_quietly(session)
