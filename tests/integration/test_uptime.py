"""Uptime: runtime changes through the admin API under load, the angel and its workers,
signals, and what the API refuses.

Every node here runs as ``meshproxy run`` does in production: an angel, a ``_control``
child (health checks, admin API) and ``_worker`` children that accept from the listening
sockets the angel holds.
Clients connect to a listener of a middle whose pool holds real MariaDB servers.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pymysql
import pytest

from meshproxy.testbed import mariadb
from tests.integration.harness import (
    HOST,
    MYSQL_CHECK,
    Doc,
    Load,
    LogEvent,
    MariaDBFarm,
    NodeFactory,
    NodeProcess,
    Outcome,
    addr,
    close_quietly,
    closed_by_peer,
    connect,
    free_port,
    middle_config,
    port_accepts,
    query,
    to_toml,
    wait_until,
)

pytestmark = pytest.mark.integration

TOKEN = "uptime-admin-token-0123456789"
# How long a worker may take to act on a change the API has already answered: the control
# process pushes it over the control channel without waiting for the workers. Generous,
# for a 2-core machine shared with other test runs.
SETTLE_S = 1.0
# Outcomes the load must have produced after a change before we judge where they went.
SAMPLE = 30
# Checks run, but a slow answer or two on a starved machine must not shun a server here.
CHECK = {**MYSQL_CHECK, "interval_ms": 1000, "timeout_ms": 900, "fall": 3}

Backends = tuple[mariadb.MariaDB, mariadb.MariaDB, mariadb.MariaDB]


@pytest.fixture(scope="module")
def backends(mariadb_farm: MariaDBFarm) -> Iterator[Backends]:
    """Three MariaDB servers for this module; the tests change proxies, never the servers."""
    trio = (mariadb_farm.start(), mariadb_farm.start(), mariadb_farm.start())
    yield trio
    for server in trio:
        mariadb_farm.stop(server)


# --------------------------------------------------------------------------- configs


def uptime_config(
    name: str,
    servers: Sequence[int | Mapping[str, object]],
    port: int,
    admin_port: int,
    *,
    workers: int = 2,
    angel: Mapping[str, object] | None = None,
    node: Mapping[str, object] | None = None,
) -> Doc:
    """A middle with a client listener ``app`` on ``port`` in front of pool ``main``, an
    admin API on ``admin_port`` and ``workers`` worker processes."""
    doc = middle_config(
        name, free_port(), servers=servers, check=CHECK, node={"workers": workers, **(node or {})}
    )
    doc["admin"] = {"bind": addr(admin_port), "token": TOKEN}
    if angel:
        doc["angel"] = dict(angel)
    doc["listener"] = [{"name": "app", "bind": addr(port), "upstream": "pool:main"}]
    return doc


def start_node(nodes: NodeFactory, doc: Doc) -> NodeProcess:
    """Start a node and wait until every one of its workers has bound its ports and, unless
    disabled, has its standby (so that the node's set of processes is settled)."""
    node = nodes.start(doc)
    workers = doc["node"].get("workers", 1)
    standbys = workers if doc.get("angel", {}).get("standby_workers", True) else 0
    wait_until(
        lambda: (
            len(node.events("worker_started")) >= workers
            and len(worker_pids(node)) == workers
            and len(node.events("angel_standby_started")) >= standbys
        ),
        30,
        f"{workers} workers of {node.name} to start",
    )
    return node


# --------------------------------------------------------------------------- processes


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0")]


def worker_pids(node: NodeProcess) -> set[int]:
    """The live workers of a node: what its angel started or woke as a worker (a standby
    that was never woken has the same command line, and is not one)."""
    started = {
        int(event.fields["pid"])
        for event in node.events("angel_started_child")
        if event.fields["child"].startswith("worker-")
    }
    return {pid for pid in started if alive(pid)}


def control_pids(node: NodeProcess) -> set[int]:
    return {pid for pid in node.pids() if "_control" in _cmdline(pid)}


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def processes_with(text: str) -> list[int]:
    """Live processes whose command line mentions ``text`` (a config file's path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and any(text in part for part in _cmdline(int(entry.name))):
            found.append(int(entry.name))
    return [pid for pid in found if alive(pid) and pid != os.getpid()]


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)


# --------------------------------------------------------------------------- admin API


class Api:
    """A small admin API client that returns every answer, errors included."""

    def __init__(self, port: int) -> None:
        self.base = f"http://{HOST}:{port}"

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        raw: bytes | None = None,
        token: str | None = TOKEN,
    ) -> tuple[int, Any]:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)  # noqa: S310
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                status, payload = response.status, response.read()
                kind = response.headers.get_content_type()
        except urllib.error.HTTPError as exc:
            status, payload, kind = exc.code, exc.read(), exc.headers.get_content_type()
        text = payload.decode()
        return status, json.loads(text) if kind == "application/json" else text

    def ok(self, method: str, path: str, body: object = None) -> Any:
        status, answer = self.request(method, path, body)
        assert status == 200, f"{method} {path} answered {status}: {answer}"
        return answer

    def running(self) -> Any:
        return self.ok("GET", "/config?view=running")

    def servers(self) -> dict[str, dict[str, Any]]:
        """pool:main's servers as GET /status shows them, by address."""
        rows = self.ok("GET", "/status")["upstreams"]["pool:main"]
        return {row["server"]: row for row in rows}


def rejected_counts(metrics: str) -> dict[str, float]:
    """``admin_requests_rejected`` per reason, from a Prometheus exposition."""
    pattern = re.compile(r'^meshproxy_admin_requests_rejected_total\{reason="([^"]*)"\} (\S+)$')
    counts = {}
    for line in metrics.splitlines():
        match = pattern.match(line)
        if match:
            counts[match.group(1)] = float(match.group(2))
    return counts


# --------------------------------------------------------------------------- clients


def backend_port(conn: Any) -> int:
    """@@port of the MariaDB server behind a connection (raises if the session is gone)."""
    with conn.cursor() as cursor:
        cursor.execute("SELECT @@port")
        return int(cursor.fetchone()[0])


def session_on(port: int, backend: int, timeout_s: float = 15) -> Any:
    """A connection through ``port`` that landed on the MariaDB server at ``backend``."""
    spare: list[Any] = []

    def attempt() -> Any:
        conn = connect(port)
        if backend_port(conn) == backend:
            return conn
        spare.append(conn)
        return None

    try:
        return wait_until(attempt, timeout_s, f"a session on backend {backend}")
    finally:
        for conn in spare:
            close_quietly(conn)


def outcomes_after(load: Load, since: float, count: int = SAMPLE) -> list[Outcome]:
    """Wait for ``count`` outcomes of connections the load started after ``since``."""

    def enough() -> list[Outcome] | None:
        done = [o for o in load.snapshot() if o.started > since]
        return done if len(done) >= count else None

    return wait_until(enough, 30, f"{count} load outcomes after t={since:.2f}")


def ports_of(outcomes: list[Outcome]) -> set[int]:
    return {o.port for o in outcomes if o.port is not None}


def timed(call: Callable[[], Any]) -> tuple[float, float, Any]:
    """(time.time() before, after, result) of a call."""
    before = time.time()
    result = call()
    return before, time.time(), result


# =========================================================================== tests


def test_runtime_changes_under_load(nodes: NodeFactory, backends: Backends) -> None:
    """Under continuous connect/query/close load, adding, removing, soft- and hard-offlining a
    server, changing a timeout and adding, moving and removing a listener all take effect
    through the API without a restart, open sessions survive everything but OFFLINE_HARD of
    their server, and the load sees no error except on the sessions OFFLINE_HARD closes."""
    a, b, c = backends
    port, admin_port = free_port(), free_port()
    node = start_node(nodes, uptime_config("rt", [a.port, b.port], port, admin_port))
    api = Api(admin_port)
    workers_before = worker_pids(node)
    hard_windows: list[tuple[float, float]] = []
    held: list[Any] = []
    try:
        with Load(port, threads=3) as load:
            wait_until(
                lambda: ports_of(load.snapshot()) >= {a.port, b.port}, 15, "load on both servers"
            )

            # Add c: new connections reach it.
            _, added, answer = timed(
                lambda: api.ok("POST", "/pools/main/servers", {"address": addr(c.port)})
            )
            assert f"pool:main: server {addr(c.port)} added" in answer["changes"]
            wait_until(
                lambda: c.port in ports_of([o for o in load.snapshot() if o.started > added]),
                15,
                "load to reach the added server",
            )

            # Remove a: a session open on it carries on, no new connection goes there.
            on_a = session_on(port, a.port)
            held.append(on_a)
            _, removed, answer = timed(
                lambda: api.ok("DELETE", f"/pools/main/servers/{addr(a.port)}")
            )
            assert f"pool:main: server {addr(a.port)} removed" in answer["changes"]
            after = outcomes_after(load, removed + SETTLE_S)
            assert a.port not in ports_of(after), "a removed server got new connections"
            assert backend_port(on_a) == a.port, "the session on the removed server broke"
            assert addr(a.port) not in api.servers()

            # OFFLINE_SOFT b: its open session works on, new connections go to c only.
            on_b = session_on(port, b.port)
            held.append(on_b)
            _, soft, _ = timed(
                lambda: api.ok(
                    "PATCH", f"/pools/main/servers/{addr(b.port)}", {"state": "OFFLINE_SOFT"}
                )
            )
            assert api.servers()[addr(b.port)]["state"] == "OFFLINE_SOFT"
            after = outcomes_after(load, soft + SETTLE_S)
            assert ports_of(after) == {c.port}, "an OFFLINE_SOFT server got new connections"
            assert backend_port(on_b) == b.port, "the session on the OFFLINE_SOFT server broke"

            # Back ONLINE, then OFFLINE_HARD b: sessions on it are closed.
            _, online, _ = timed(
                lambda: api.ok("PATCH", f"/pools/main/servers/{addr(b.port)}", {"state": "ONLINE"})
            )
            wait_until(
                lambda: b.port in ports_of([o for o in load.snapshot() if o.started > online]),
                15,
                "load to reach the server back ONLINE",
            )
            on_b_again = session_on(port, b.port)
            held.append(on_b_again)
            hard_from, hard_to, answer = timed(
                lambda: api.ok(
                    "PATCH", f"/pools/main/servers/{addr(b.port)}", {"state": "OFFLINE_HARD"}
                )
            )
            hard_windows.append((hard_from, hard_to + SETTLE_S))
            hard = f"pool:main: server {addr(b.port)} state ONLINE -> OFFLINE_HARD"
            assert hard in answer["changes"]
            for conn in (on_b, on_b_again):
                assert closed_by_peer(conn._sock, timeout_s=10), "OFFLINE_HARD left a session"
            after = outcomes_after(load, hard_to + SETTLE_S)
            assert ports_of(after) == {c.port}, "an OFFLINE_HARD server got new connections"

            # A timeout changes in the running config, in place.
            answer = api.ok("PATCH", "/config", {"timeouts": {"connect_ms": 700, "idle_s": 3600}})
            assert "timeouts changed" in answer["changes"]
            timeouts = api.running()["timeouts"]
            assert (timeouts["connect_ms"], timeouts["idle_s"]) == (700, 3600)

            # Add a listener: it serves. Remove it: its session works on, connects are refused.
            extra = free_port()
            answer = api.ok(
                "POST",
                "/listeners",
                {"name": "extra", "bind": addr(extra), "upstream": "pool:main"},
            )
            assert f"listener extra bound to {addr(extra)}" in answer["changes"]
            wait_until(lambda: port_accepts(extra), 10, "the added listener to accept")
            on_extra = connect(extra)
            held.append(on_extra)
            assert backend_port(on_extra) == c.port
            # Move it: the old port refuses, the new one serves, the session carries on.
            moved = free_port()
            answer = api.ok("PATCH", "/listeners/extra", {"bind": addr(moved)})
            assert f"listener extra bound to {addr(moved)}" in answer["changes"]
            wait_until(lambda: port_accepts(moved), 10, "the moved listener to accept")
            wait_until(lambda: not port_accepts(extra), 10, "the listener's old port to refuse")
            assert [row[0] for row in query(moved, "SELECT @@port")] == [c.port]
            assert backend_port(on_extra) == c.port, "the session on a moved listener broke"
            answer = api.ok("DELETE", "/listeners/extra")
            assert "listener extra removed" in answer["changes"]
            wait_until(lambda: not port_accepts(moved), 10, "the removed listener to refuse")
            with pytest.raises(pymysql.err.OperationalError):
                close_quietly(connect(moved, connect_timeout=5))
            assert backend_port(on_extra) == c.port, "the session on a removed listener broke"

            outcomes_after(load, time.time())  # the load still runs after all of it
    finally:
        for conn in held:
            close_quietly(conn)

    outcomes = load.snapshot()
    errors = [
        o
        for o in outcomes
        if o.error is not None
        and not any(o.started <= end and o.ended >= start for start, end in hard_windows)
    ]
    assert not errors, f"{len(errors)} client errors of {len(outcomes)}, e.g. {errors[:3]}"
    assert worker_pids(node) == workers_before, "a worker was restarted"
    assert not node.events("angel_restarting")


def test_killed_worker_port_serves_within_1s(nodes: NodeFactory, backends: Backends) -> None:
    """After ``kill -9`` of one of two workers, a client connect and query through the port
    succeeds within 1 s, and the angel starts a new worker in its place."""
    port, admin_port = free_port(), free_port()
    node = start_node(nodes, uptime_config("kw", [backends[0].port], port, admin_port))
    before = worker_pids(node)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()

    def serves() -> float | None:
        try:
            query(port, "SELECT 1", connect_timeout=2, read_timeout=2)
        except pymysql.err.MySQLError:
            return None
        return time.monotonic()

    first_success = wait_until(serves, 10, "a query through the port after the kill", 0.005)
    assert first_success - killed <= 1.0, (
        f"the port served again only {first_success - killed:.2f} s after the kill"
    )
    replaced = wait_until(
        lambda: (worker_pids(node) - before) if len(worker_pids(node)) == 2 else None,
        15,
        "the angel to start a new worker",
    )
    assert victim not in worker_pids(node)
    event = node.wait_for_event("angel_restarting", why="killed by signal 9")
    assert event.fields["child"].startswith("worker-")
    assert len(replaced) == 1
    wait_until(
        lambda: len(node.events("worker_started")) >= 3, 15, "the new worker to start serving"
    )
    assert [row[0] for row in query(port, "SELECT 1")] == [1]


@pytest.mark.parametrize("standby", [True, False])
def test_killed_worker_is_replaced_by_its_standby(
    nodes: NodeFactory, backends: Backends, standby: bool
) -> None:
    """With ``standby_workers``, a killed worker's place goes to its waiting standby (no new
    interpreter to start) and a fresh standby follows (a killed standby is replaced too);
    without, a new process starts and no standby ever exists."""
    port, admin_port = free_port(), free_port()
    doc = uptime_config(
        "sb", [backends[0].port], port, admin_port, workers=1, angel={"standby_workers": standby}
    )
    node = start_node(nodes, doc)
    if standby:
        (waiting,) = node.events("angel_standby_started", child="worker-0")
    (victim,) = worker_pids(node)
    os.kill(victim, signal.SIGKILL)

    def replacement() -> LogEvent | None:
        starts = node.events("angel_started_child", child="worker-0")
        return starts[1] if len(starts) > 1 else None

    woken = wait_until(replacement, 15, "the worker's replacement")
    assert woken.fields["standby"] == ("yes" if standby else "no")
    assert int(woken.fields["pid"]) != victim
    wait_until(lambda: len(node.events("worker_started")) >= 2, 15, "the new worker to serve")
    assert [row[0] for row in query(port, "SELECT 1")] == [1]
    if standby:
        assert woken.fields["pid"] == waiting.fields["pid"]
        fresh = wait_until(lambda: node.events("angel_standby_started")[1:], 15, "a fresh standby")[
            0
        ]
        # A standby killed from outside is simply replaced, without the crash back-off.
        os.kill(int(fresh.fields["pid"]), signal.SIGKILL)
        wait_until(
            lambda: len(node.events("angel_standby_started")) >= 3,
            5,  # below angel.fast_crash_s, the back-off of a standby that fails by itself
            "the killed standby's replacement",
        )
    else:
        assert not node.events("angel_standby_started")


def test_worker_restarted_while_control_stalls_catches_up(
    nodes: NodeFactory, backends: Backends
) -> None:
    """A worker the angel restarts while the control process is stalled (SIGSTOP) serves from
    the config file at first, and takes the running config (here a listener added through the
    API) as soon as the control process answers again."""
    port, admin_port, extra = free_port(), free_port(), free_port()
    doc = uptime_config("cu", [backends[0].port], port, admin_port, angel={"watchdog_s": 60})
    node = start_node(nodes, doc)
    api = Api(admin_port)
    api.ok("POST", "/listeners", {"name": "extra", "bind": addr(extra), "upstream": "pool:main"})
    wait_until(
        lambda: len(node.events("listening", listener="extra")) == 2,
        10,
        "both workers to bind the listener added through the API",
    )
    (control,) = control_pids(node)
    victim = min(worker_pids(node))
    os.kill(control, signal.SIGSTOP)
    try:
        os.kill(victim, signal.SIGKILL)
        # The new worker waits 1 s for the control process, then serves from the file.
        wait_until(lambda: len(node.events("worker_started")) >= 3, 30, "the new worker to start")
    finally:
        os.kill(control, signal.SIGCONT)
    wait_until(
        lambda: len(node.events("listening", listener="extra")) >= 3,
        10,
        "the new worker to bind the listener the running config has",
    )
    assert [row[0] for row in query(extra, "SELECT @@port")] == [backends[0].port]
    assert victim not in worker_pids(node)


def test_stopped_worker_is_replaced_by_watchdog(nodes: NodeFactory, backends: Backends) -> None:
    """A SIGSTOPped worker misses its heartbeats; after ``angel.watchdog_s`` the angel kills it
    and starts a new one, and the node serves afterwards."""
    watchdog_s = 1.0
    port, admin_port = free_port(), free_port()
    doc = uptime_config(
        "sw", [backends[0].port], port, admin_port, angel={"watchdog_s": watchdog_s}
    )
    node = start_node(nodes, doc)
    before = worker_pids(node)
    victim = min(before)
    os.kill(victim, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        wait_until(lambda: not alive(victim), watchdog_s + 15, "the watchdog to kill the worker")
        gone_after = time.monotonic() - stopped
        # The angel checks every 0.1 s; the rest is slack for a busy 2-core machine.
        assert gone_after <= watchdog_s + 5, f"the stopped worker lived {gone_after:.1f} s"
        wait_until(
            lambda: len(worker_pids(node) - before) == 1 and len(worker_pids(node)) == 2,
            15,
            "a new worker in place of the stopped one",
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
    event = node.wait_for_event("angel_watchdog")
    assert event.fields["child"].startswith("worker-")
    wait_until(
        lambda: len(node.events("worker_started")) >= 3, 15, "the new worker to start serving"
    )
    for _ in range(20):
        assert [row[0] for row in query(port, "SELECT 1", connect_timeout=5)] == [1]


def test_sigterm_lets_running_query_finish(nodes: NodeFactory, backends: Backends) -> None:
    """SIGTERM to the angel while ``SELECT SLEEP(2)`` runs through it: new connects are refused,
    the query completes with its result (a config change meanwhile does not reopen them), the
    angel exits 0 and no process of the node (nor a standby) remains."""
    backend = backends[0]
    port, admin_port = free_port(), free_port()
    doc = uptime_config("st", [backend.port], port, admin_port, node={"drain_timeout_s": 10})
    node = start_node(nodes, doc)
    family = node.pids()
    assert len(family) == 6, f"expected angel, control, 2 workers, 2 standbys: {family}"
    result: dict[str, Any] = {}
    conn = connect(port)

    def run() -> None:
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT SLEEP(2) AS uptime_probe")
                result["rows"] = list(cursor.fetchall())
        except Exception as exc:  # reported by the assertion below
            result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            result["ended"] = time.monotonic()
            close_quietly(conn)

    client = threading.Thread(target=run, daemon=True)
    client.start()
    wait_until(
        lambda: query(
            backend.port,
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
            "WHERE INFO = 'SELECT SLEEP(2) AS uptime_probe'",
        )[0][0],
        10,
        "the SLEEP to run on the backend",
    )
    assert node.process is not None
    node.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    wait_until(lambda: not port_accepts(port), 10, "the listeners to close")
    assert client.is_alive(), "the query ended before the listeners closed"
    # A config change reaching the draining workers must not open the listeners again.
    Api(admin_port).ok("PATCH", "/config", {"timeouts": {"connect_ms": 700}})
    # (The worker without a session has left already; the one carrying the SLEEP drains.)
    node.wait_for_event("config_ignored", reason="draining")
    assert not port_accepts(port), "a draining worker listens again"
    code = node.process.wait(10 + 15)  # drain_timeout_s, plus slack
    client.join(10)
    assert "error" not in result, result["error"]
    assert result["rows"] == [(0,)]
    assert result["ended"] > signalled
    assert code == 0
    wait_until(lambda: not any(map(alive, family)), 10, f"every process of {family} to exit")
    assert node.events("angel_stopped")


def test_unbindable_listener_is_reported_and_the_rest_serves(
    nodes: NodeFactory, backends: Backends
) -> None:
    """A listener whose port is taken is logged as bind_failed while the other listener
    serves; once the port is free, a SIGHUP reload binds it without a restart."""
    held = socket.socket()
    held.bind((HOST, 0))
    held.listen(1)
    spare_port = held.getsockname()[1]
    doc = uptime_config("ub", [backends[0].port], free_port(), free_port(), workers=1)
    doc["listener"].append({"name": "spare", "bind": addr(spare_port), "upstream": "pool:main"})
    try:
        node = start_node(nodes, doc)
        node.wait_for_event("bind_failed", listener="spare")
        app_port = int(doc["listener"][0]["bind"].rsplit(":", 1)[1])
        assert query(app_port, "SELECT 1") == [(1,)]
        pids = worker_pids(node)
    finally:
        held.close()
    node.reload(doc)
    node.wait_for_event("listening", listener="spare")
    assert query(spare_port, "SELECT 1") == [(1,)]
    assert worker_pids(node) == pids


def test_sighup_reloads_without_restart(nodes: NodeFactory, backends: Backends) -> None:
    """After the config file gains a server and changes a weight, SIGHUP to the angel puts both
    into effect (GET /status, new connections reach the new server) with the same processes;
    a file with an error is refused whole."""
    a, b, c = backends
    port, admin_port = free_port(), free_port()
    doc = uptime_config("hup", [a.port, b.port], port, admin_port)
    node = start_node(nodes, doc)
    api = Api(admin_port)
    before = node.pids()
    doc["pool"][0]["servers"] = [
        addr(a.port),
        {"address": addr(b.port), "weight": 5},
        addr(c.port),
    ]
    node.reload(doc)

    def applied() -> bool:
        servers = api.servers()
        return addr(c.port) in servers and servers[addr(b.port)]["weight"] == 5

    wait_until(applied, 15, "the reloaded config in GET /status")
    event = node.wait_for_event("reloaded", trigger="SIGHUP")
    assert f"server {addr(c.port)} added" in event.fields["changes"]
    assert f"server {addr(b.port)} weight 1 -> 5" in event.fields["changes"]
    wait_until(
        lambda: query(port, "SELECT @@port")[0][0] == c.port, 15, "a connection to the new server"
    )
    assert node.pids() == before, "SIGHUP restarted a process"

    # A file with an error is refused whole: nothing changes, nothing restarts.
    running = api.running()
    doc["pool"][0]["servers"] = [addr(a.port)]
    doc["timeouts"] = {"connect_ms": 500, "conect_budget_ms": 900}
    node.reload(doc)
    failed = node.wait_for_event("reload_failed", trigger="SIGHUP")
    assert "timeouts.conect_budget_ms" in failed.fields["error"]
    assert api.running() == running
    assert node.pids() == before, "SIGHUP restarted a process"
    assert not node.events("angel_restarting")


def test_bad_api_input_is_rejected_and_changes_nothing(
    nodes: NodeFactory, backends: Backends
) -> None:
    """A wrong or missing token (401), malformed JSON (400), an unknown key (422 naming its
    path), an invalid address (422), an unknown pool (404) and a listener on a busy port (409)
    are each refused with a clear error, leave the running config as it was, and are counted
    in ``admin_requests_rejected``."""
    a, b, _ = backends
    port, admin_port = free_port(), free_port()
    start_node(nodes, uptime_config("bad", [a.port], port, admin_port, workers=1))
    api = Api(admin_port)
    busy = socket.socket()
    busy.bind((HOST, 0))
    busy.listen(1)
    busy_port = busy.getsockname()[1]
    cases: list[tuple[str, Callable[[], tuple[int, Any]], int, str, str | None]] = [
        (
            "wrong token",
            lambda: api.request("GET", "/status", token="not-the-token-at-all"),
            401,
            "bearer token",
            None,
        ),
        ("missing token", lambda: api.request("GET", "/config", token=None), 401, "token", None),
        (
            "malformed JSON",
            lambda: api.request("PATCH", "/config", raw=b'{"timeouts": {"connect_ms": '),
            400,
            "malformed JSON",
            None,
        ),
        (
            "unknown key",
            lambda: api.request("PATCH", "/config", {"timeouts": {"conect_ms": 500}}),
            422,
            "unknown key",
            "timeouts.conect_ms",
        ),
        (
            "invalid address",
            lambda: api.request("POST", "/pools/main/servers", {"address": "127.0.0.1:99999"}),
            422,
            "port must be 1-65535",
            "pool[0].servers[1].address",
        ),
        (
            "unknown pool",
            lambda: api.request("POST", "/pools/nope/servers", {"address": addr(b.port)}),
            404,
            "no pool named 'nope'",
            None,
        ),
        (
            "busy port",
            lambda: api.request(
                "POST",
                "/listeners",
                {"name": "busy", "bind": addr(busy_port), "upstream": "pool:main"},
            ),
            409,
            f"cannot bind {addr(busy_port)}",
            None,
        ),
    ]
    try:
        for what, call, status, message, key in cases:
            before = api.running()
            got, answer = call()
            assert got == status, f"{what}: {got} {answer}"
            assert isinstance(answer, dict), f"{what}: not a JSON error: {answer!r}"
            assert message in answer["error"], f"{what}: unclear error {answer}"
            if key is not None:
                assert answer["key"] == key, f"{what}: error names {answer['key']!r}"
            assert api.running() == before, f"{what} changed the running config"
    finally:
        busy.close()
    assert addr(busy_port) not in json.dumps(api.running())
    assert not port_accepts(busy_port)  # no worker bound it either
    counts = rejected_counts(api.ok("GET", "/metrics"))
    assert counts == {
        "unauthorized": 2,
        "bad_request": 1,
        "invalid_config": 2,
        "not_found": 1,
        "apply_failed": 1,
    }, counts
    assert [row[0] for row in query(port, "SELECT @@port")] == [a.port]


def test_save_writes_running_config_and_keeps_backup(
    nodes: NodeFactory, backends: Backends
) -> None:
    """POST /config/save writes the running config (with a change the file lacked) to the
    config file, which ``meshproxy check-config`` accepts, and keeps the old file as .bak."""
    port, admin_port = free_port(), free_port()
    node = start_node(nodes, uptime_config("save", [backends[0].port], port, admin_port))
    api = Api(admin_port)
    original = node.config_path.read_text()
    api.ok("PATCH", "/config", {"timeouts": {"connect_ms": 750}})
    assert api.ok("GET", "/config?view=disk")["timeouts"].get("connect_ms", 1000) == 1000
    answer = api.ok("POST", "/config/save")
    backup = node.config_path.with_name(node.config_path.name + ".bak")
    assert answer == {"saved": str(node.config_path), "backup": str(backup)}
    assert backup.read_text() == original
    check = subprocess.run(
        [sys.executable, "-m", "meshproxy", "check-config", str(node.config_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    assert api.ok("GET", "/config?view=disk") == api.running()
    assert api.running()["timeouts"]["connect_ms"] == 750
    leftovers = [p.name for p in node.config_path.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def ctl(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshproxy", "ctl", "-c", str(node.config_path), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_ctl_end_to_end(nodes: NodeFactory, backends: Backends) -> None:
    """``meshproxy ctl`` shows the status, adds, changes and removes a server, sets keys (the
    log level reaches the workers), adds and removes a listener, and exits 1 with the API's
    message when the API refuses."""
    a, b, _ = backends
    port, admin_port = free_port(), free_port()
    node = start_node(nodes, uptime_config("ctl", [a.port], port, admin_port, workers=1))
    api = Api(admin_port)

    status = ctl(node, "status")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["node"] == "ctl"

    added = ctl(node, "server", "add", "main", addr(b.port), "--weight", "2")
    assert added.returncode == 0, added.stderr
    assert f"server {addr(b.port)} added" in added.stdout
    assert api.servers()[addr(b.port)]["weight"] == 2

    changed = ctl(node, "server", "set", "main", addr(b.port), "--weight", "3")
    assert changed.returncode == 0, changed.stderr
    changed = ctl(node, "server", "set", "main", addr(b.port), "--state", "OFFLINE_SOFT")
    assert changed.returncode == 0, changed.stderr
    row = api.servers()[addr(b.port)]
    assert (row["weight"], row["state"]) == (3, "OFFLINE_SOFT")

    removed = ctl(node, "server", "rm", "main", addr(b.port))
    assert removed.returncode == 0, removed.stderr
    assert addr(b.port) not in api.servers()

    patched = ctl(node, "set", "timeouts.connect_ms=600", "node.log_level=warning")
    assert patched.returncode == 0, patched.stderr
    running = api.running()
    assert (running["timeouts"]["connect_ms"], running["node"]["log_level"]) == (600, "warning")

    # The log level applies to the workers too: at "warning" a new listener is not logged.
    quiet = free_port()
    added = ctl(node, "listener", "add", "quiet", addr(quiet), "pool:main", "max_connections=5")
    assert added.returncode == 0, added.stderr
    assert ctl(node, "set", "node.log_level=info").returncode == 0
    removed = ctl(node, "listener", "rm", "quiet")
    assert removed.returncode == 0, removed.stderr
    node.wait_for_event("listener_closed", listener="quiet")  # the worker has seen it all
    assert not node.events("listening", listener="quiet"), "a worker ignored log_level"
    running = api.running()

    refused = ctl(node, "server", "rm", "nope", addr(b.port))
    assert refused.returncode == 1
    assert "meshproxy ctl: no pool named 'nope'" in refused.stderr
    refused = ctl(node, "set", "timeouts.bogus=1")
    assert refused.returncode == 1
    assert "timeouts.bogus" in refused.stderr
    assert "unknown key" in refused.stderr
    assert api.running() == running


def test_angel_gives_up_after_fast_crashes(tmp_path: Path, backends: Backends) -> None:
    """A worker whose ports the angel cannot bind (another process holds them) exits 1 at
    each start; with ``angel.max_fast_crashes = 2`` the angel logs ``angel_giving_up``
    after the third crash and exits 1, leaving no process behind."""
    max_fast_crashes = 2
    busy, busy_mesh = socket.socket(), socket.socket()
    for held in (busy, busy_mesh):
        held.bind((HOST, 0))
        held.listen(1)
    port = busy.getsockname()[1]
    doc = uptime_config(
        "gu",
        [backends[0].port],
        port,
        free_port(),
        workers=1,
        angel={"max_fast_crashes": max_fast_crashes, "fast_crash_s": 30},
    )
    # Every port held: a worker with nothing to serve exits (one bad port alone would not).
    doc["node"]["mesh_bind"] = addr(busy_mesh.getsockname()[1])
    config_path = tmp_path / "gu.toml"
    config_path.write_text(to_toml(doc))
    log_path = tmp_path / "gu.log"
    try:
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "meshproxy", "run", "-c", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
            try:
                # Each crash is an interpreter start (a few seconds at worst on a busy
                # machine); back-off adds 0.1 + 0.2 s.
                code = process.wait((max_fast_crashes + 1) * 15)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
    finally:
        busy.close()
        busy_mesh.close()
    text = log_path.read_text(errors="replace")
    assert code == 1, text
    assert " angel_giving_up " in text, text
    assert len(re.findall(r" bind_failed .*listener=app", text)) == max_fast_crashes + 1, text
    assert "Traceback" not in text, text
    wait_until(lambda: not processes_with(str(config_path)), 10, "the node's processes to exit")
