"""The system under test: one MariaDB, HAProxy, and a meshproxy middle and edge.

Every path ends at the same MariaDB server, so the paths differ only in what sits between
sysbench and the server:

    direct      sysbench -> MariaDB
    haproxy     sysbench -> HAProxy (TCP mode, nbthread 1) -> MariaDB
    haproxy-mt  sysbench -> HAProxy (TCP mode, nbthread 2) -> MariaDB
    single      sysbench -> meshproxy middle (listener, pool:main) -> MariaDB
    single-w2   the same with ``workers = 2`` (two data-plane processes on SO_REUSEPORT)
    chain       sysbench -> meshproxy edge -> (mesh hop) -> the same middle -> MariaDB
    chain-tls   the same chain with mutual TLS on the mesh hop ([mesh_tls]: its own pair)

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
import shutil
import signal
import sys
import tempfile
import time
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


@dataclass(frozen=True)
class Target:
    """One path from sysbench to MariaDB."""

    name: str
    label: str
    port: int
    pids: tuple[int, ...] = ()  # the proxy processes on this path, for CPU accounting


TARGET_LABELS = {
    "direct": "MariaDB direct",
    "haproxy": "HAProxy nbthread 1",
    "haproxy-mt": "HAProxy nbthread 2",
    "single": "meshproxy single hop",
    "single-w2": "meshproxy single, 2 workers",
    "chain": "meshproxy chain",
    "chain-tls": "meshproxy chain, mesh TLS",
}
ALL_TARGETS = tuple(TARGET_LABELS)


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
    """Starts the selected paths; a context manager that always stops and removes it all."""

    def __init__(self, wanted: tuple[str, ...], angel: bool = True) -> None:
        self.wanted = wanted
        self.angel = angel
        self.workdir = mariadb.prepare_workdir(Path(tempfile.mkdtemp(prefix="meshproxy-bench-")))
        self.processes = Processes(self.workdir)
        self.db: mariadb.MariaDB | None = None
        self.targets: list[Target] = []

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
        for name, nbthread in (("haproxy", 1), ("haproxy-mt", 2)):
            if name in self.wanted:
                child, port = self._start_haproxy(name, db_port, nbthread)
                self._add(name, port, (child.process.pid,))
        if "single" in self.wanted or "chain" in self.wanted:
            middle, single_port, mesh_port = self._start_middle(db_port)
            self._add("single", single_port, (middle.process.pid,))
            if "chain" in self.wanted:
                edge, edge_port = self._start_edge(mesh_port)
                self._add("chain", edge_port, (edge.process.pid, middle.process.pid))
        if "chain-tls" in self.wanted:
            pki_dir = self.workdir / "pki"
            middle, _, mesh_port = self._start_middle(
                db_port, tls=mesh_tls(pki_dir, "bench-middle", "middle")
            )
            edge, edge_port = self._start_edge(mesh_port, mesh_tls(pki_dir, "bench-edge", "edge"))
            self._add("chain-tls", edge_port, (edge.process.pid, middle.process.pid))
        if "single-w2" in self.wanted:
            middle, single_port, _ = self._start_middle(db_port, workers=2)
            self._add("single-w2", single_port, (middle.process.pid,))
        self.targets = [t for t in self.targets if t.name in self.wanted]
        return self.targets

    def _add(self, name: str, port: int, pids: tuple[int, ...]) -> None:
        self.targets.append(Target(name, TARGET_LABELS[name], port, pids))

    def _start_mariadb(self) -> int:
        template = mariadb.make_template(self.workdir)
        self.db = mariadb.MariaDB(self.workdir, "mariadb")
        self.db.start(template)
        return self.db.port

    def _start_haproxy(self, name: str, db_port: int, nbthread: int) -> tuple[Child, int]:
        port = mariadb.free_port()
        cfg = self.workdir / f"{name}.cfg"
        cfg.write_text(haproxy_config(port, db_port, nbthread))
        child = self.processes.spawn(name, ["haproxy", "-f", str(cfg), "-db"])
        wait_port(child, port)
        wait_mysql(child, port)
        return child, port

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

    def _start_edge(self, mesh_port: int, tls: str = "") -> tuple[Child, int]:
        port = mariadb.free_port()
        text = edge_config(port, mesh_port) + tls
        return self._start_meshproxy("edge-tls" if tls else "edge", text, port), port

    def node_warnings(self) -> dict[str, list[str]]:
        """What the meshproxy nodes logged at warning level or above (restarts, say)."""
        nodes = [c for c in self.processes.children if c.name.startswith(("middle", "edge"))]
        return {c.name: c.warnings() for c in nodes}

    def pids(self) -> dict[str, int]:
        """Process ids of the proxies, for profiling them while the benchmark runs."""
        return {c.name: c.process.pid for c in self.processes.children}
