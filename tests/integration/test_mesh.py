"""Mesh hops: hostile hop headers on a middle's mesh port, deeper cascades, the loop guard."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import msgpack
import pymysql
import pytest

from meshproxy.dataplane.hop import MAGIC, VERSION, HopHeader
from meshproxy.testbed import mariadb
from tests.integration.harness import (
    HOST,
    Load,
    LogEvent,
    NodeFactory,
    closed_by_peer,
    connect,
    edge_config,
    free_port,
    middle_config,
    query,
    wait_until,
)

pytestmark = pytest.mark.integration


def _prefix(length: int, version: int = VERSION) -> bytes:
    return MAGIC + struct.pack("!BH", version, length)


def _body(value: object) -> bytes:
    body: bytes = msgpack.packb(value)
    return _prefix(len(body)) + body


# (what is sent, whether we then shut down our side, log event, expected reason substring)
HOSTILE: dict[str, tuple[bytes, bool, str, str]] = {
    "bad magic": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, "hop_rejected", "bad magic"),
    "unknown version": (
        _prefix(3, version=9) + b"\x80\x80\x80",
        False,
        "hop_rejected",
        "unknown hop header version 9",
    ),
    "oversized length": (_prefix(0xFFFF) + b"\x00" * 64, False, "hop_rejected", "exceeds"),
    "garbage msgpack": (_prefix(4) + b"\xc1\xc1\xc1\xc1", False, "hop_rejected", "not msgpack"),
    "not a map": (_body([1, 2, 3]), False, "hop_rejected", "not a map"),
    "no client field": (_body({"s": "mysql", "h": 1}), False, "hop_rejected", "no client"),
    "truncated": (_prefix(40) + b"\x83\xa1s", True, "hop_rejected", "middle of a hop header"),
    "silent": (b"", False, "hop_rejected", "no hop header in time"),
    "hop count over max_hops": (
        HopHeader("mysql", "192.0.2.1:1234", 5).encode(),
        False,
        "hop_refused",
        "hop limit exceeded (5 hops)",
    ),
    "unknown service": (
        HopHeader("nosuch", "192.0.2.1:1234", 1).encode(),
        False,
        "hop_refused",
        "unknown service 'nosuch'",
    ),
}


def test_hostile_hop_headers_close_only_their_connection(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """Each malformed, oversized, unknown-version, over-the-hop-limit or unknown-service
    header sent to a middle's mesh port gets that connection closed and its reason logged,
    while clients going through the edge to that middle keep working throughout."""
    mesh_port, edge_port = free_port(), free_port()
    middle = nodes.start(
        middle_config(
            "middle1",
            mesh_port,
            servers=[shared_mariadb.port],
            node={"max_hops": 4},
            timeouts={"hop_header_s": 1},
        )
    )
    nodes.start(edge_config("edge1", edge_port, [mesh_port]))
    with Load(edge_port, threads=2) as load:
        for case, (data, shut, event, reason) in HOSTILE.items():
            with socket.create_connection((HOST, mesh_port), timeout=5) as sock:
                peer = "{}:{}".format(*sock.getsockname())
                if data:
                    sock.sendall(data)
                if shut:
                    sock.shutdown(socket.SHUT_WR)
                assert closed_by_peer(sock, timeout_s=5), f"{case}: connection left open"

            def logged(event: str = event, peer: str = peer) -> list[LogEvent]:
                return [e for e in middle.events(event) if e.fields.get("peer") == peer]

            (line,) = wait_until(logged, 5, f"the middle to log {event} for {case}")
            assert reason in line.fields["reason"], (case, line.line)
            assert line.level == "warning", case
            assert query(edge_port, "SELECT 'still fine'") == [("still fine",)], case
    outcomes = load.snapshot()
    assert outcomes, "the load threads made no connections"
    errors = [o.error for o in outcomes if o.error is not None]
    assert not errors, errors[:5]


def test_three_layer_cascade(nodes: NodeFactory, shared_mariadb: mariadb.MariaDB) -> None:
    """edge -> middle tier a -> middle tier b -> MariaDB carries queries, a 4 MiB result
    and a TLS session, with the second middle reached only through the first."""
    mesh_b, mesh_a, edge_port = free_port(), free_port(), free_port()
    nodes.start(middle_config("middle-b", mesh_b, servers=[shared_mariadb.port]))
    nodes.start(middle_config("middle-a", mesh_a, upstream="tier:b", tier_members=[mesh_b]))
    nodes.start(edge_config("edge1", edge_port, [mesh_a]))
    assert query(edge_port, "SELECT 6 * 7, @@port") == [(42, shared_mariadb.port)]
    rows = query(edge_port, "SELECT REPEAT('c', 4 * 1024 * 1024)")
    assert rows[0][0] == "c" * 4 * 1024 * 1024
    conn = connect(edge_port, ssl_ca=str(shared_mariadb.dir / "cert.pem"))
    try:
        with conn.cursor() as cursor:
            cursor.execute("SHOW STATUS LIKE 'Ssl_cipher'")
            assert cursor.fetchone()[1]
    finally:
        conn.close()


def _established_to(port: int) -> int:
    """Local sockets connected to ``port`` (ESTABLISHED, the remote end being ``port``)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(
        1
        for fields in (line.split() for line in lines)
        if fields[3] == "01" and int(fields[2].rpartition(":")[2], 16) == port
    )


def test_an_edge_refills_its_warm_sockets_as_sessions_take_them(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """An edge keeps ``warm_connections`` idle sockets open to its middle; each new session
    takes one, another is opened in its place, and the sessions' own are gone with them."""
    mesh, edge_port = free_port(), free_port()
    nodes.start(middle_config("middle", mesh, servers=[shared_mariadb.port]))
    nodes.start(edge_config("edge", edge_port, [mesh], tier={"warm_connections": 3}))
    wait_until(lambda: _established_to(mesh) == 3, 10, "3 warm sockets")
    for _ in range(5):
        assert query(edge_port, "SELECT 1") == [(1,)]
    wait_until(lambda: _established_to(mesh) == 3, 10, "3 warm sockets again")


def test_hop_limit_stops_a_routing_loop(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """A middle whose service forwards to a tier containing itself refuses the connection
    once the hop count exceeds max_hops, and the client gets an error instead of a hang."""
    mesh_port, edge_port = free_port(), free_port()
    middle = nodes.start(
        middle_config(
            "middle-loop",
            mesh_port,
            upstream="tier:self",
            tier_members=[mesh_port],
            node={"max_hops": 3},
            timeouts={"connect_ms": 200, "connect_budget_ms": 400},
        )
    )
    nodes.start(
        edge_config(
            "edge1",
            edge_port,
            [mesh_port],
            timeouts={"connect_ms": 300, "connect_budget_ms": 1500},
        )
    )
    with pytest.raises(pymysql.err.OperationalError):
        connect(edge_port, connect_timeout=10)
    middle.wait_for_event("hop_refused", reason="hop limit exceeded (4 hops)")
