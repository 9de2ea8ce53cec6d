"""The system under test: one MariaDB, HAProxy, and a meshproxy middle and edge.

Every path ends at the same MariaDB server, so the paths differ only in what sits between
sysbench and the server:

    direct      sysbench -> MariaDB
    haproxy     sysbench -> HAProxy (TCP mode, nbthread 1) -> MariaDB
    haproxy-mt  sysbench -> HAProxy (TCP mode, nbthread 2) -> MariaDB
    relay       sysbench -> bench/relay.py (a bare uvloop TCP relay) -> MariaDB
    single      sysbench -> meshproxy middle (listener, pool:main) -> MariaDB
    single-w2   the same with ``workers = 2`` (two data-plane processes on SO_REUSEPORT)
    chain       sysbench -> meshproxy edge -> (mesh hop) -> the same middle -> MariaDB
    chain-tls   the same chain with mutual TLS on the mesh hop ([mesh_tls]: its own pair)
    session     sysbench -> meshproxy middle, listener in session mode -> MariaDB
    chain-session  sysbench -> meshproxy edge -> (mesh hop) -> a middle whose mesh
                service is in session mode (the same middle as ``session``) -> MariaDB
    proxysql    sysbench -> ProxySQL 2.5.5, ``threads=1``, pool capped at 64 -> MariaDB

and, for the many-clients workload only, ``session-32`` and ``proxysql-32``: the same
session-mode middle and ProxySQL with their pools capped at 32 connections per server.

Why HAProxy runs with ``nbthread 1``: a meshproxy node's data plane is one event loop in
one process (one worker under the angel by default, or the only process with
``--no-angel``), so it can use at most one core; one HAProxy thread is the like-for-like
reference for the "single hop >= 0.95x HAProxy" target. On this 2-core machine
sysbench's 8 client threads and MariaDB already want both cores, so a second HAProxy
thread mostly competes with them for CPU rather than adding capacity; ``haproxy-mt``
(nbthread 2) is measured alongside so that this is visible rather than assumed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pymysql

from bench.procs import Child, Processes, wait_port
from meshproxy.security import pki
from meshproxy.testbed import mariadb

MESHPROXY_LOG_LEVEL = "warning"

# Health checks are lenient on purpose, alike for HAProxy and meshproxy: the benchmark
# measures the data plane, and on 2 busy cores (sysbench, MariaDB, the proxies and whatever
# else runs) a check with a 500 ms timeout can fail twice in a row and take the only server
# out of the pool in the middle of a run, which has been seen to happen.
CHECK_INTERVAL_MS = 2000
CHECK_TIMEOUT_MS = 1500
CHECK_FALL = 3


# Session mode's backend pool, per server and process (meshproxy's default), and the same
# cap for ProxySQL (mysql_servers.max_connections), so that both pool alike.
POOL_MAX = 64
MANY_CLIENTS_POOL_MAX = 32
PROXYSQL_ANCHOR = Path("/work/shared/anchors/proxysql/proxysql")


@dataclass(frozen=True)
class Target:
    """One path from sysbench to MariaDB."""

    name: str
    label: str
    port: int
    pids: tuple[int, ...] = ()  # the proxy processes on this path, for CPU accounting
    pool_max: int | None = None  # a pooling proxy's cap on backend connections per server


TARGET_LABELS = {
    "direct": "MariaDB direct",
    "haproxy": "HAProxy nbthread 1",
    "haproxy-mt": "HAProxy nbthread 2",
    "relay": "bare uvloop relay",
    "single": "meshproxy single hop",
    "single-w2": "meshproxy single, 2 workers",
    "chain": "meshproxy chain",
    "chain-tls": "meshproxy chain, mesh TLS",
    "session": "meshproxy session mode",
    "chain-session": "meshproxy chain, session",
    "proxysql": "ProxySQL threads=1",
}
ALL_TARGETS = tuple(TARGET_LABELS)
# Started only for the many-clients workload, never chosen with --targets.
MANY_CLIENTS_LABELS = {
    "session-32": "meshproxy session, pool 32",
    "proxysql-32": "ProxySQL, pool 32",
}
LABELS = TARGET_LABELS | MANY_CLIENTS_LABELS


def proxysql_binary() -> Path | None:
    """ProxySQL to run: $BENCH_PROXYSQL, the anchor build, or one on PATH."""
    named = os.environ.get("BENCH_PROXYSQL")
    if named:
        return Path(named)
    if PROXYSQL_ANCHOR.exists():
        return PROXYSQL_ANCHOR
    found = shutil.which("proxysql")
    return Path(found) if found else None


def haproxy_config(port: int, server_port: int, nbthread: int) -> str:
    return f"""\
global
    nbthread {nbthread}
    maxconn 4096

defaults
    mode tcp
    timeout connect 1s
    timeout client 8h
    timeout server 8h
    timeout check {CHECK_TIMEOUT_MS}ms

frontend mysql
    bind 127.0.0.1:{port}
    default_backend mariadb

backend mariadb
    server db1 127.0.0.1:{server_port} check inter {CHECK_INTERVAL_MS}ms fall {CHECK_FALL} rise 1
"""


def proxysql_config(
    datadir: Path, port: int, admin_port: int, server_port: int, pool_max: int
) -> str:
    """ProxySQL with one worker thread (like one meshproxy worker) and a capped pool.

    Its monitor checks like the others do (connect and ping every CHECK_INTERVAL_MS); no
    query rules, so no query cache and no routing beyond the default hostgroup.
    """
    return f"""\
datadir="{datadir}"

admin_variables=
{{
    admin_credentials="admin:admin"
    mysql_ifaces="127.0.0.1:{admin_port}"
}}

mysql_variables=
{{
    threads=1
    max_connections=10000
    interfaces="127.0.0.1:{port}"
    default_schema="information_schema"
    monitor_username="{mariadb.MONITOR_USER}"
    monitor_password="{mariadb.MONITOR_PASSWORD}"
    monitor_enabled=true
    monitor_connect_interval={CHECK_INTERVAL_MS}
    monitor_connect_timeout={CHECK_TIMEOUT_MS}
    monitor_ping_interval={CHECK_INTERVAL_MS}
    monitor_ping_timeout={CHECK_TIMEOUT_MS}
    monitor_ping_max_failures={CHECK_FALL}
}}

mysql_servers=
(
    {{ address="127.0.0.1", port={server_port}, hostgroup=0, max_connections={pool_max} }}
)

mysql_users=
(
    {{ username="{mariadb.APP_USER}", password="{mariadb.APP_PASSWORD}", default_hostgroup=0,
       active=1 }}
)
"""


def mesh_tls(directory: Path, node: str, role: str) -> str:
    """A node's [mesh_tls] section, with a certificate from the bench's own CA."""
    pki.init_ca(directory)
    files = pki.issue(directory, node, role)
    return (
        f'\n[mesh_tls]\nca = "{directory / pki.CA_CERT}"\n'
        f'cert = "{files.cert}"\nkey = "{files.key}"\n'
    )


def middle_config(single_port: int, mesh_port: int, server_port: int, workers: int = 1) -> str:
    return f"""\
[node]
name = "bench-middle"
role = "middle"
mesh_bind = "127.0.0.1:{mesh_port}"
log_level = "{MESHPROXY_LOG_LEVEL}"
workers = {workers}

[[listener]]
name = "single"
bind = "127.0.0.1:{single_port}"
upstream = "pool:main"

[[service]]
name = "mysql"
upstream = "pool:main"

[[pool]]
name = "main"
servers = ["127.0.0.1:{server_port}"]
[pool.check]
type = "mysql"
user = "{mariadb.MONITOR_USER}"
password = "{mariadb.MONITOR_PASSWORD}"
interval_ms = {CHECK_INTERVAL_MS}
timeout_ms = {CHECK_TIMEOUT_MS}
fall = {CHECK_FALL}
rise = 1
"""


def session_config(port: int, mesh_port: int, server_port: int, pool_max: int = POOL_MAX) -> str:
    """A middle in session mode on both its listener and its mesh service."""
    return f"""\
[node]
name = "bench-session-{pool_max}"
role = "middle"
mesh_bind = "127.0.0.1:{mesh_port}"
log_level = "{MESHPROXY_LOG_LEVEL}"

[[listener]]
name = "session"
bind = "127.0.0.1:{port}"
upstream = "pool:main"
mode = "session"

[[service]]
name = "mysql"
upstream = "pool:main"
mode = "session"

[[pool]]
name = "main"
servers = ["127.0.0.1:{server_port}"]
[pool.check]
type = "mysql"
user = "{mariadb.MONITOR_USER}"
password = "{mariadb.MONITOR_PASSWORD}"
interval_ms = {CHECK_INTERVAL_MS}
timeout_ms = {CHECK_TIMEOUT_MS}
fall = {CHECK_FALL}
rise = 1
[pool.connections]
max_per_server = {pool_max}

[[user]]
name = "{mariadb.APP_USER}"
password = "{mariadb.APP_PASSWORD}"
"""


def edge_config(port: int, mesh_port: int) -> str:
    return f"""\
[node]
name = "bench-edge"
role = "edge"
log_level = "{MESHPROXY_LOG_LEVEL}"

[[listener]]
name = "mysql"
bind = "127.0.0.1:{port}"
upstream = "tier:middle"

[[tier]]
name = "middle"
members = ["127.0.0.1:{mesh_port}"]
[tier.check]
type = "tcp"
interval_ms = {CHECK_INTERVAL_MS}
timeout_ms = {CHECK_TIMEOUT_MS}
fall = {CHECK_FALL}
rise = 1
"""


def wait_mysql(child: Child | None, port: int, timeout_s: float = 20.0) -> None:
    """Wait until a MySQL login and ``SELECT 1`` work through ``port``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if child is not None:
            child.check_alive()
        try:
            conn = pymysql.connect(
                host="127.0.0.1",
                port=port,
                user=mariadb.APP_USER,
                password=mariadb.APP_PASSWORD,
                database=mariadb.DATABASE,
                connect_timeout=2,
            )
        except pymysql.err.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
            continue
        with contextlib.closing(conn), conn.cursor() as cursor:
            cursor.execute("SELECT 1")
        return


class Stack:
    """Starts the selected paths; a context manager that always stops and removes it all.

    A path whose proxy does not start (ProxySQL missing, a node that fails its first
    login) is left out with the reason in ``unavailable``; the others are measured.
    """

    def __init__(
        self, wanted: tuple[str, ...], angel: bool = True, many_clients: bool = False
    ) -> None:
        self.wanted = wanted
        self.angel = angel
        self.many_clients = many_clients
        self.workdir = mariadb.prepare_workdir(Path(tempfile.mkdtemp(prefix="meshproxy-bench-")))
        self.processes = Processes(self.workdir)
        self.db: mariadb.MariaDB | None = None
        self.targets: list[Target] = []
        self.many_targets: list[Target] = []  # the many-clients workload's paths
        self.unavailable: dict[str, str] = {}

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        # A second Ctrl-C (or a SIGTERM) must not cut the clean-up short.
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.processes.stop_all()
            if self.db is not None:
                self.db.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @property
    def db_port(self) -> int:
        assert self.db is not None
        return self.db.port

    def start(self) -> list[Target]:
        db_port = self._start_mariadb()
        self._add("direct", db_port, ())
        want = set(self.wanted)
        many = {"haproxy", "session-32"} | ({"proxysql-32"} if "proxysql" in want else set())
        if self.many_clients:
            want |= many
        for name, nbthread in (("haproxy", 1), ("haproxy-mt", 2)):
            if name in want:
                self._try(name, functools.partial(self._haproxy, name, db_port, nbthread))
        if "relay" in want:
            self._try("relay", lambda: self._relay(db_port))
        if want & {"single", "chain"}:
            self._try("single", lambda: self._single_and_chain(db_port, want))
        if "chain-tls" in want:
            self._try("chain-tls", lambda: self._chain_tls(db_port))
        if "single-w2" in want:
            self._try("single-w2", lambda: self._single_w2(db_port))
        if want & {"session", "chain-session"}:
            self._try("session", lambda: self._session_and_chain(db_port, want))
        if "session-32" in want:
            self._try("session-32", lambda: self._session_32(db_port))
        for name, cap in (("proxysql", POOL_MAX), ("proxysql-32", MANY_CLIENTS_POOL_MAX)):
            if name in want:
                self._try(name, functools.partial(self._proxysql, name, db_port, cap))
        started = self.targets
        self.targets = [t for t in started if t.name in self.wanted]
        if self.many_clients:
            self.many_targets = [t for t in started if t.name in many]
        return self.targets

    def _try(self, name: str, start: Callable[[], None]) -> None:
        """Start one path (or a node serving two); if it fails, say why and go on."""
        try:
            start()
        except (OSError, RuntimeError, pymysql.err.MySQLError) as exc:
            reason = str(exc).strip() or type(exc).__name__
            self.unavailable[name] = reason[-2000:]
            print(f"  {name}: not started, left out: {reason[-600:]}", flush=True)

    def _add(self, name: str, port: int, pids: tuple[int, ...], pool: int | None = None) -> None:
        self.targets.append(Target(name, LABELS[name], port, pids, pool))

    def _start_mariadb(self) -> int:
        template = mariadb.make_template(self.workdir)
        self.db = mariadb.MariaDB(self.workdir, "mariadb")
        self.db.start(template)
        return self.db.port

    def _haproxy(self, name: str, db_port: int, nbthread: int) -> None:
        port = mariadb.free_port()
        cfg = self.workdir / f"{name}.cfg"
        cfg.write_text(haproxy_config(port, db_port, nbthread))
        child = self.processes.spawn(name, ["haproxy", "-f", str(cfg), "-db"])
        wait_port(child, port)
        wait_mysql(child, port)
        self._add(name, port, (child.process.pid,))

    def _relay(self, db_port: int) -> None:
        port = mariadb.free_port()
        argv = [sys.executable, str(Path(__file__).with_name("relay.py")), str(port), str(db_port)]
        child = self.processes.spawn("relay", argv)
        wait_port(child, port)
        wait_mysql(child, port)
        self._add("relay", port, (child.process.pid,))

    def _single_and_chain(self, db_port: int, want: set[str]) -> None:
        middle, single_port, mesh_port = self._start_middle(db_port)
        self._add("single", single_port, (middle.process.pid,))
        if "chain" in want:
            edge, edge_port = self._start_edge(mesh_port)
            self._add("chain", edge_port, (edge.process.pid, middle.process.pid))

    def _chain_tls(self, db_port: int) -> None:
        pki_dir = self.workdir / "pki"
        middle, _, mesh_port = self._start_middle(
            db_port, tls=mesh_tls(pki_dir, "bench-middle", "middle")
        )
        edge, edge_port = self._start_edge(mesh_port, mesh_tls(pki_dir, "bench-edge", "edge"))
        self._add("chain-tls", edge_port, (edge.process.pid, middle.process.pid))

    def _single_w2(self, db_port: int) -> None:
        middle, single_port, _ = self._start_middle(db_port, workers=2)
        self._add("single-w2", single_port, (middle.process.pid,))

    def _session_and_chain(self, db_port: int, want: set[str]) -> None:
        """One session-mode middle: its listener is ``session``, its mesh service the
        far end of ``chain-session``'s passthrough edge."""
        middle, port, mesh_port = self._start_session(db_port, POOL_MAX)
        pids = (middle.process.pid,)
        self._add("session", port, pids, POOL_MAX)
        if "chain-session" in want:
            edge, edge_port = self._start_edge(mesh_port, name="edge-session")
            self._add("chain-session", edge_port, (edge.process.pid, *pids), POOL_MAX)

    def _session_32(self, db_port: int) -> None:
        middle, port, _ = self._start_session(db_port, MANY_CLIENTS_POOL_MAX)
        self._add("session-32", port, (middle.process.pid,), MANY_CLIENTS_POOL_MAX)

    def _start_session(self, db_port: int, pool_max: int) -> tuple[Child, int, int]:
        port, mesh_port = mariadb.free_port(), mariadb.free_port()
        text = session_config(port, mesh_port, db_port, pool_max)
        name = "middle-session" + ("" if pool_max == POOL_MAX else f"-{pool_max}")
        return self._start_meshproxy(name, text, port), port, mesh_port

    def _proxysql(self, name: str, db_port: int, pool_max: int) -> None:
        binary = proxysql_binary()
        if binary is None or not binary.exists():
            raise FileNotFoundError(
                f"no ProxySQL binary (looked for $BENCH_PROXYSQL, {PROXYSQL_ANCHOR}, PATH)"
            )
        port, admin_port = mariadb.free_port(), mariadb.free_port()
        datadir = self.workdir / name
        datadir.mkdir()
        cfg = self.workdir / f"{name}.cnf"
        cfg.write_text(proxysql_config(datadir, port, admin_port, db_port, pool_max))
        # -f: in the foreground, no daemon; --initial: the file, not a datadir's database
        argv = [str(binary), "-f", "--initial", "-c", str(cfg), "-D", str(datadir)]
        child = self.processes.spawn(name, argv)
        wait_port(child, port)
        wait_mysql(child, port)
        self._add(name, port, (child.process.pid,), pool_max)

    def _start_meshproxy(self, name: str, text: str, port: int) -> Child:
        cfg = self.workdir / f"{name}.toml"
        cfg.write_text(text)
        argv = [sys.executable, "-m", "meshproxy", "run", "-c", str(cfg)]
        if not self.angel:
            argv.append("--no-angel")
        child = self.processes.spawn(name, argv)
        wait_port(child, port)
        wait_mysql(child, port)
        return child

    def _start_middle(
        self, db_port: int, workers: int = 1, tls: str = ""
    ) -> tuple[Child, int, int]:
        single_port, mesh_port = mariadb.free_port(), mariadb.free_port()
        text = middle_config(single_port, mesh_port, db_port, workers) + tls
        name = ("middle" if workers == 1 else f"middle-w{workers}") + ("-tls" if tls else "")
        return self._start_meshproxy(name, text, single_port), single_port, mesh_port

    def _start_edge(self, mesh_port: int, tls: str = "", name: str = "") -> tuple[Child, int]:
        port = mariadb.free_port()
        text = edge_config(port, mesh_port) + tls
        name = name or ("edge-tls" if tls else "edge")
        return self._start_meshproxy(name, text, port), port

    def node_warnings(self) -> dict[str, list[str]]:
        """What the meshproxy nodes logged at warning level or above (restarts, say)."""
        nodes = [c for c in self.processes.children if c.name.startswith(("middle", "edge"))]
        return {c.name: c.warnings() for c in nodes}

    def logs(self, name: str) -> str:
        """The end of one child's log (a failing node's, say), or '' if there is none."""
        child = next((c for c in self.processes.children if c.name == name), None)
        return child.log_tail(4000) if child is not None else ""

    def pids(self) -> dict[str, int]:
        """Process ids of the proxies, for profiling them while the benchmark runs."""
        return {c.name: c.process.pid for c in self.processes.children}
