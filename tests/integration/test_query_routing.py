"""Query routing against a real GTID primary and replicas: the read/write split, lagging
readers, read-your-writes, a promotion under load, each query rule action, the query cache
and query digests (admin API, ``meshproxy ctl top``, Prometheus)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

import pymysql
import pytest

from meshproxy.testbed import mariadb
from meshproxy.testbed.replication import (
    ER_READ_ONLY,
    WRITER_PASSWORD,
    WRITER_USER,
    ReplicationSet,
)
from meshproxy.testbed.replication import sql as admin_sql
from tests.integration.harness import (
    HOST,
    MYSQL_CHECK,
    Doc,
    NodeFactory,
    addr,
    close_quietly,
    connect,
    free_port,
    wait_until,
)

pytestmark = pytest.mark.integration

TOKEN = "routing-admin-token-0123456789"
FAST_CHECK = {**MYSQL_CHECK, "interval_ms": 300, "timeout_ms": 250, "fall": 2, "rise": 1}
ER_NOT_ALLOWED_COMMAND = 1148
ER_QUERY_INTERRUPTED = 1317


class RoutingNode:
    def __init__(self, port: int, admin_port: int) -> None:
        self.port = port
        self.admin_port = admin_port

    def api(self, method: str, path: str, body: object = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://{HOST}:{self.admin_port}{path}", data=data, method=method
        )
        request.add_header("Authorization", f"Bearer {TOKEN}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return json.loads(response.read())

    def counter(self, name: str, **labels: str) -> int:
        entries = self.api("GET", "/status")["counters"].get(name, [])
        return sum(
            int(e["value"])
            for e in entries
            if all(e["labels"].get(k) == v for k, v in labels.items())
        )

    def sides(self, pool: str = "main") -> dict[int, tuple[str, str]]:
        """Each server's (role, state) by port, as the node routes on them."""
        rows = self.api("GET", "/status")["upstreams"][f"pool:{pool}"]
        return {int(r["server"].rsplit(":", 1)[1]): (r.get("role", ""), r["state"]) for r in rows}


def routing_doc(
    port: int,
    admin_port: int,
    servers: list[int],
    *,
    replication: Mapping[str, object] | None = None,
    rules: list[dict[str, object]] | None = None,
    pools: list[dict[str, object]] | None = None,
) -> Doc:
    return {
        "node": {"name": "r1", "role": "edge"},
        "admin": {"bind": addr(admin_port), "token": TOKEN},
        "listener": [
            {"name": "mysql", "bind": addr(port), "upstream": "pool:main", "mode": "session"}
        ],
        "pool": [
            {
                "name": "main",
                "servers": [addr(p) for p in servers],
                "check": FAST_CHECK,
                "replication": {"enabled": True, **(replication or {})},
            },
            *(pools or []),
        ],
        "user": [
            {"name": WRITER_USER, "password": WRITER_PASSWORD},
            {"name": mariadb.APP_USER, "password": mariadb.APP_PASSWORD},
        ],
        "query_rule": rules or [],
    }


def start_node(
    nodes: NodeFactory,
    servers: list[int],
    writer: int,
    readers: list[int],
    workers: int = 0,
    **options: Any,
) -> RoutingNode:
    """A node in one process, or with ``workers`` worker processes under its angel."""
    port, admin_port = free_port(), free_port()
    doc = routing_doc(port, admin_port, servers, **options)
    if workers:
        doc["node"]["workers"] = workers
    nodes.start(doc, () if workers else ("--no-angel",))
    node = RoutingNode(port, admin_port)
    wanted = {writer: ("writer", "ONLINE"), **{r: ("reader", "ONLINE") for r in readers}}
    wait_until(lambda: node.sides() == wanted, 15, f"roles {wanted}")
    return node


def start_on(nodes: NodeFactory, replication: ReplicationSet, **options: Any) -> RoutingNode:
    """A node over the whole replication set, once it routes on its writer and readers."""
    primary, replicas = replication.primary, replication.replicas
    return start_node(nodes, ports([primary, *replicas]), primary.port, ports(replicas), **options)


_OPEN: list[Any] = []


@pytest.fixture(autouse=True)
def _close_clients(nodes: NodeFactory) -> Iterator[None]:
    """Close the test's clients before its node stops (it drains open sessions)."""
    yield
    while _OPEN:
        close_quietly(_OPEN.pop())


def client(node: RoutingNode, user: str = WRITER_USER, password: str = WRITER_PASSWORD) -> Any:
    conn = connect(node.port, user=user, password=password)
    _OPEN.append(conn)
    return conn


def one(conn: Any, statement: str) -> Any:
    with conn.cursor() as cursor:
        cursor.execute(statement)
        row = cursor.fetchone()
    return row[0] if row else None


def run(conn: Any, statement: str) -> None:
    with conn.cursor() as cursor:
        cursor.execute(statement)


def server_id(server: mariadb.MariaDB) -> int:
    return int(admin_sql(server, "SELECT @@server_id")[0][0])


def ports(servers: list[mariadb.MariaDB]) -> list[int]:
    return [s.port for s in servers]


def table(replication: ReplicationSet, name: str) -> None:
    """A fresh table on the primary, replicated everywhere before the test uses it."""
    admin_sql(replication.primary, f"DROP TABLE IF EXISTS {mariadb.DATABASE}.{name}")
    admin_sql(
        replication.primary,
        f"CREATE TABLE {mariadb.DATABASE}.{name} (id INT PRIMARY KEY, v VARCHAR(40))",
    )
    replication.wait_caught_up()


# --------------------------------------------------------------------------- the split


def test_reads_go_to_replicas_and_writes_and_transactions_to_the_primary(
    nodes: NodeFactory, replication: ReplicationSet
) -> None:
    """Autocommit reads land on the replicas (a session keeps its reader, sessions spread
    over both), writes and every statement of a transaction on the primary, as @@server_id
    shows."""
    primary, replicas = replication.primary, replication.replicas
    node = start_on(nodes, replication)
    table(replication, "split")
    conn = client(node)
    assert len({one(conn, "SELECT @@server_id") for _ in range(10)}) == 1  # monotonic reads
    seen = set()
    for _ in range(30):
        other = client(node)
        seen.add(one(other, "SELECT @@server_id"))
        other.close()
    assert seen == {server_id(r) for r in replicas}
    run(conn, "INSERT INTO split VALUES (1, CAST(@@server_id AS CHAR))")
    assert admin_sql(primary, f"SELECT v FROM {mariadb.DATABASE}.split")[0][0] == "1"
    run(conn, "BEGIN")
    in_transaction = {one(conn, "SELECT @@server_id") for _ in range(5)}
    run(conn, "COMMIT")
    assert in_transaction == {server_id(primary)}
    assert one(conn, "SELECT id FROM split FOR UPDATE") == 1  # a locking read: the writer
    assert node.counter("session_state_restores") >= 0  # the node answered every time


def test_a_lagging_replica_leaves_the_readers_and_returns_when_it_catches_up(
    nodes: NodeFactory, replication: ReplicationSet
) -> None:
    """A replica whose SQL thread stops is SHUNNED (no read reaches it) and takes reads
    again once it runs and has caught up."""
    replicas = replication.replicas
    node = start_on(nodes, replication)
    stopped, running = replicas
    replication.stop_sql_thread(stopped)
    wait_until(lambda: node.sides()[stopped.port] == ("reader", "SHUNNED"), 10, "lag seen")
    for _ in range(10):
        conn = client(node)
        assert one(conn, "SELECT @@server_id") == server_id(running)
        conn.close()
    replication.start_sql_thread(stopped)
    wait_until(lambda: node.sides()[stopped.port] == ("reader", "ONLINE"), 10, "caught up")

    def read_on_a_new_session() -> int:
        conn = client(node)
        try:
            return int(one(conn, "SELECT @@server_id"))
        finally:
            conn.close()

    wait_until(
        lambda: read_on_a_new_session() == server_id(stopped), 10, "reads on the replica again"
    )
    assert node.counter("replication_changes", server=addr(stopped.port)) >= 2


# --------------------------------------------------------------------------- read-your-writes


def _held_replica(replication: ReplicationSet, name: str) -> tuple[mariadb.MariaDB, Any]:
    """The first replica, its SQL thread stuck behind a read lock on ``name`` (it still
    replicates, and so stays a reader, and answers reads, but applies no write to it)."""
    replica = replication.replicas[0]
    lock = connect(replica.port)
    _OPEN.append(lock)
    run(lock, f"LOCK TABLES {name} READ")
    return replica, lock


@pytest.mark.parametrize("mode", ["gtid", "writer", "off"])
def test_read_your_writes(nodes: NodeFactory, replication: ReplicationSet, mode: str) -> None:
    """After a session writes, its reads see the write: by waiting for the reader's GTID
    and then taking the writer ("gtid"), or by reading on the writer for a window
    ("writer"); with "off" a lagging reader answers without it (which proves the test)."""
    primary = replication.primary
    table(replication, "ryw")
    replica, lock = _held_replica(replication, "ryw")
    node = start_node(
        nodes,
        [primary.port, replica.port],
        primary.port,
        [replica.port],
        replication={"read_your_writes": mode, "max_lag_s": 60, "gtid_wait_ms": 200},
    )
    conn = client(node)
    seen = []
    for i in range(5):
        run(conn, f"INSERT INTO ryw VALUES ({i}, 'x')")
        seen.append(one(conn, f"SELECT COUNT(*) FROM ryw WHERE id = {i}"))
    run(lock, "UNLOCK TABLES")
    if mode == "off":
        assert seen == [0] * 5
        return
    assert seen == [1] * 5
    if mode == "gtid":
        assert node.counter("read_your_writes", outcome="writer") == 5
        replication.wait_caught_up()
        run(conn, "INSERT INTO ryw VALUES (100, 'y')")
        replication.wait_caught_up()
        assert one(conn, "SELECT @@server_id") == server_id(replica)  # caught up: a reader
        assert node.counter("read_your_writes", outcome="reader waited") >= 1


# --------------------------------------------------------------------------- promotion


def test_a_promotion_under_load_moves_writes_and_loses_none(
    nodes: NodeFactory, fresh_replication: ReplicationSet
) -> None:
    """A switchover under a writing load: writes move to the new primary within two check
    intervals, each write either succeeds (and is on the new primary) or gets the server's
    own read_only error, and none is applied twice or lost."""
    replication = fresh_replication
    old, (new, other) = replication.primary, replication.replicas
    node = start_node(nodes, ports([old, new, other]), old.port, [new.port, other.port])
    table(replication, "promo")
    acknowledged: list[int] = []
    refused: list[int] = []
    errors: set[int] = set()
    stop = threading.Event()

    def load() -> None:
        conn = connect(node.port, user=WRITER_USER, password=WRITER_PASSWORD)
        try:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    run(conn, f"INSERT INTO promo VALUES ({i}, CAST(@@server_id AS CHAR))")
                    acknowledged.append(i)
                except pymysql.err.OperationalError as exc:
                    refused.append(i)
                    errors.add(exc.args[0])
        finally:
            close_quietly(conn)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        wait_until(lambda: len(acknowledged) > 50, 10, "writes before the promotion")
        replication.promote(new)
        promoted = time.monotonic()
        wait_until(lambda: node.sides()[new.port][0] == "writer", 5, "new writer")
        moved_s = time.monotonic() - promoted
        count = len(acknowledged)
        wait_until(lambda: len(acknowledged) > count + 50, 10, "writes after the promotion")
    finally:
        stop.set()
        worker.join(30)
    assert errors <= {ER_READ_ONLY}  # the server's own error, and only while it switched
    assert moved_s <= 2 * 0.3 + 1.0  # two check intervals, and time to publish on a busy box
    replication.wait_caught_up()
    rows = dict(admin_sql(new, f"SELECT id, v FROM {mariadb.DATABASE}.promo"))
    assert set(acknowledged) <= set(rows)  # nothing acknowledged is lost
    assert not set(refused) & set(rows)  # nothing refused was applied
    assert rows[acknowledged[-1]] == str(server_id(new))


# --------------------------------------------------------------------------- rules


def test_rules_route_refuse_rewrite_and_pin(
    nodes: NodeFactory, replication: ReplicationSet, mariadb_factory: Any
) -> None:
    """A rule sends statements to another pool, refuses with its message (ERR 1148),
    rewrites text, forces the writer, and keeps the backend connection; PUT /query_rules
    changes them at runtime."""
    primary = replication.primary
    elsewhere = mariadb_factory()
    rules = [
        {"name": "reports", "match_pattern": "^SELECT @@port", "pool": "reports"},
        {"name": "firewall", "match_digest": "^DROP TABLE", "error": "no DROP through here"},
        {
            "name": "old name",
            "match_pattern": r"\bFROM old_split\b",
            "rewrite": "FROM split",
            "then": "continue",
        },
        {"name": "primary reads", "match_pattern": "/\\* writer \\*/", "route": "writer"},
        {
            "name": "sticky",
            "match_pattern": "^SELECT CONNECTION_ID",
            "multiplex": False,
            "route": "writer",
        },
    ]
    node = start_on(
        nodes,
        replication,
        rules=rules,
        pools=[{"name": "reports", "servers": [addr(elsewhere.port)]}],
    )
    table(replication, "split")
    conn = client(node, mariadb.APP_USER, mariadb.APP_PASSWORD)
    assert one(conn, "SELECT @@port") == elsewhere.port
    with pytest.raises(pymysql.err.OperationalError) as refused:
        run(conn, "DROP TABLE split")
    assert refused.value.args == (ER_NOT_ALLOWED_COMMAND, "no DROP through here")
    assert one(conn, "SELECT COUNT(*) FROM old_split") == 0
    assert one(conn, "SELECT /* writer */ @@server_id") == server_id(primary)
    other = client(node, mariadb.APP_USER, mariadb.APP_PASSWORD)
    first = one(conn, "SELECT CONNECTION_ID()")
    # Unpinned, that writer connection would be the idle one the other session takes next.
    assert one(other, "SELECT /* writer */ CONNECTION_ID()") != first
    assert one(conn, "SELECT CONNECTION_ID()") == first
    assert node.counter("query_rule_hits", rule="firewall") == 1
    node.api(
        "PUT", "/query_rules", [{"name": "all refused", "match_pattern": "^SELECT", "error": "x"}]
    )
    fresh = client(node, mariadb.APP_USER, mariadb.APP_PASSWORD)
    with pytest.raises(pymysql.err.OperationalError) as now_refused:
        run(fresh, "SELECT 1")
    assert now_refused.value.args == (ER_NOT_ALLOWED_COMMAND, "x")
    assert [r["name"] for r in node.api("GET", "/query_rules")] == ["all refused"]


def test_statement_timeout_kills_the_statement_and_the_session_carries_on(
    nodes: NodeFactory, replication: ReplicationSet
) -> None:
    """A rule's statement timeout interrupts a slow statement on its server; the client
    gets the server's error 1317 and its next statement works."""
    rules = [{"name": "slow", "match_pattern": "SLEEP", "statement_timeout_ms": 300}]
    node = start_on(nodes, replication, rules=rules)
    conn = client(node)
    started = time.monotonic()
    with pytest.raises(pymysql.err.OperationalError) as killed:
        one(conn, "SELECT SLEEP(20)")
    assert killed.value.args[0] == ER_QUERY_INTERRUPTED
    assert time.monotonic() - started < 5
    assert one(conn, "SELECT 1") == 1
    assert node.counter("statement_timeouts", user=WRITER_USER) == 1


def test_mirror_runs_statements_on_the_mirror_pool_too(
    nodes: NodeFactory, replication: ReplicationSet, mariadb_factory: Any
) -> None:
    """A mirror rule runs each matching statement on its pool as well; the client sees only
    its own pool's answer."""
    primary = replication.primary
    shadow = mariadb_factory()
    admin_sql(shadow, f"CREATE TABLE {mariadb.DATABASE}.mirrored (id INT PRIMARY KEY, v TEXT)")
    table(replication, "mirrored")
    rules = [{"name": "shadow", "match_pattern": "^INSERT INTO mirrored", "mirror": "shadow"}]
    node = start_on(
        nodes,
        replication,
        rules=rules,
        pools=[{"name": "shadow", "servers": [addr(shadow.port)]}],
    )
    conn = client(node, mariadb.APP_USER, mariadb.APP_PASSWORD)
    for i in range(10):
        run(conn, f"INSERT INTO mirrored VALUES ({i}, 'x')")
    wait_until(
        lambda: admin_sql(shadow, f"SELECT COUNT(*) FROM {mariadb.DATABASE}.mirrored")[0][0] == 10,
        10,
        "mirrored rows",
    )
    assert admin_sql(primary, f"SELECT COUNT(*) FROM {mariadb.DATABASE}.mirrored")[0][0] == 10
    wait_until(lambda: node.counter("mirrors", pool="shadow", outcome="ok") == 10, 10, "counted")


# --------------------------------------------------------------------------- cache and digests


def test_query_cache_serves_within_its_ttl(nodes: NodeFactory, replication: ReplicationSet) -> None:
    """A rule's TTL caches a read's answer: repeats within it get the cached answer (even
    after the data changed) and count as hits; after it the server answers again."""
    primary = replication.primary
    rules = [{"name": "cached", "match_digest": "FROM cached WHERE", "cache_ttl_ms": 1500}]
    node = start_on(nodes, replication, rules=rules)
    table(replication, "cached")
    admin_sql(primary, f"INSERT INTO {mariadb.DATABASE}.cached VALUES (1, 'before')")
    replication.wait_caught_up()
    conn = client(node)
    assert one(conn, "SELECT v FROM cached WHERE id = 1") == "before"
    stored = time.monotonic()
    admin_sql(primary, f"UPDATE {mariadb.DATABASE}.cached SET v = 'after' WHERE id = 1")
    replication.wait_caught_up()
    answers = []
    while time.monotonic() - stored < 1.0:
        answers.append(one(conn, "SELECT v FROM cached WHERE id = 1"))
    assert set(answers) == {"before"}
    assert one(conn, "SELECT v FROM cached WHERE id = 2") is None  # other literals: own entry
    wait_until(
        lambda: one(conn, "SELECT v FROM cached WHERE id = 1") == "after", 5, "expired entry"
    )
    cache = node.api("GET", "/status")["session_mode"]["query_cache"]
    assert cache["hits"] >= len(answers)
    assert cache["stores"] >= 2


def test_digests_are_listed_by_the_api_ctl_top_and_prometheus(
    nodes: NodeFactory, replication: ReplicationSet
) -> None:
    """Statements that differ only in literals share one digest, counted with their time,
    rows and errors, shown by GET /digests, `meshproxy ctl top` and /metrics, until
    DELETE /digests starts them over."""
    node = start_on(nodes, replication)
    table(replication, "dig")
    conn = client(node)
    for i in range(30):
        one(conn, f"SELECT v FROM dig WHERE id IN ({i}, {i + 1}, {i + 2})")
    with pytest.raises(pymysql.err.MySQLError):
        run(conn, "SELECT nope FROM dig")

    def digest_row() -> dict[str, Any] | None:
        rows = node.api("GET", "/digests?by=count&limit=10")["digests"]
        return next((r for r in rows if r["text"] == "SELECT v FROM dig WHERE id IN (...)"), None)

    row = wait_until(lambda: (r := digest_row()) and r["count"] == 30 and r, 10, "digest row")
    assert (row["user"], row["schema"], row["errors"]) == (WRITER_USER, mariadb.DATABASE, 0)
    assert row["total_s"] > 0
    failed = node.api("GET", "/digests?by=errors&limit=1")["digests"][0]
    assert (failed["text"], failed["errors"]) == ("SELECT nope FROM dig", 1)
    listed = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshproxy",
            "ctl",
            "--url",
            f"http://{HOST}:{node.admin_port}",
            "--token",
            TOKEN,
            "top",
            "--by",
            "count",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "SELECT v FROM dig WHERE id IN (...)" in listed
    request = urllib.request.Request(f"http://{HOST}:{node.admin_port}/metrics")
    request.add_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        metrics = response.read().decode()
    assert "meshproxy_digest_statements_total{" in metrics
    assert 'role="writer"' in metrics
    assert node.api("DELETE", "/digests") == {"reset": True}
    assert node.api("GET", "/digests")["digests"] == []


def test_digests_of_worker_processes_are_merged_and_reset(
    nodes: NodeFactory, replication: ReplicationSet
) -> None:
    """With two worker processes, GET /digests merges what each counted, and DELETE
    /digests starts every worker over."""
    node = start_on(nodes, replication, workers=2)
    clients = [client(node) for _ in range(8)]  # the kernel spreads them over the workers
    for conn in clients:
        for _ in range(5):
            one(conn, "SELECT 1 + 1")

    def count() -> int:
        rows = node.api("GET", "/digests?by=count&limit=5")["digests"]
        return sum(r["count"] for r in rows if r["text"] == "SELECT ? + ?")

    wait_until(lambda: count() == 40, 10, "40 statements counted across the workers")
    node.api("DELETE", "/digests")
    assert count() == 0
    one(clients[0], "SELECT 1 + 1")
    wait_until(lambda: count() == 1, 10, "a statement counted after the reset")
