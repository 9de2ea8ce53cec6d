"""``meshproxy demo``: the whole chain on loopback, under load, losing a middle halfway.

One edge, three middles and two MySQL servers run as real processes: MariaDB when
``mariadbd`` is installed, else the embedded mysql-mimic server of :mod:`meshproxy.embeddeddb`
(``MESHPROXY_DEMO_BACKEND=embedded`` or ``=mariadb`` chooses). Client threads connect
through the edge, run a few queries per connection and reconnect, so new connections keep
flowing. Each middle dials the backends from its own loopback address (127.0.0.2, .3, .4),
which lets a client see which middle carried its session: both servers report the
connecting address in ``USER()``. Halfway, one middle is killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pymysql

from meshproxy import localdb
from meshproxy.children import die_with_parent
from meshproxy.config import Address

MIDDLES = {"p2": "127.0.0.2", "p3": "127.0.0.3", "p4": "127.0.0.4"}
VICTIM = "p3"
QUERIES_PER_CONNECTION = 20


@dataclass
class Tally:
    """What the client threads saw; guarded by ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    queries: int = 0
    errors: int = 0
    per_middle: Counter[str] = field(default_factory=Counter)
    last_new_connection: dict[str, float] = field(default_factory=dict)
    last_error: str = ""


def _descendants(pid: int) -> list[int]:
    children_file = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        children = [int(c) for c in children_file.read_text().split()]
    except OSError:
        return []
    return [d for child in children for d in (*_descendants(child), child)]


def _wait_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"node exited with status {process.returncode} at start-up")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s} s")


def _middle_config(name: str, source_ip: str, mesh_port: int, backends: list[str]) -> str:
    servers = ", ".join(f'"{b}"' for b in backends)
    return f"""\
[node]
name = "{name}"
role = "middle"
mesh_bind = "127.0.0.1:{mesh_port}"

[[service]]
name = "mysql"
upstream = "pool:main"

[[pool]]
name = "main"
servers = [{servers}]
source_ip = "{source_ip}"

[pool.check]
type = "mysql"
user = "{localdb.MONITOR_USER}"
password = "{localdb.MONITOR_PASSWORD}"
interval_ms = 500
timeout_ms = 400
"""


def _edge_config(port: int, mesh_ports: list[int]) -> str:
    members = ", ".join(f'"127.0.0.1:{p}"' for p in mesh_ports)
    return f"""\
[node]
name = "p1"
role = "edge"

[[listener]]
name = "mysql"
bind = "127.0.0.1:{port}"
upstream = "tier:middle"

[[tier]]
name = "middle"
members = [{members}]
warm_connections = 2

[tier.eject]
consecutive_failures = 1
backoff_s = 5
"""


class Backend(Protocol):
    """One of the demo's MySQL servers: where the middles reach it, and how to stop it
    (harmless if it never started or has already stopped)."""

    @property
    def address(self) -> Address: ...

    def stop(self) -> None: ...


class BackendKind(Protocol):
    """How to start the demo's MySQL servers; ``label`` names them in the demo's output."""

    label: str

    def unavailable(self) -> str | None:
        """Why these servers cannot run here, or None if they can."""

    def start(self, workdir: Path, names: list[str], into: list[Backend]) -> None:
        """Start one server per name, appending each to ``into`` before it starts, so
        that whoever owns ``into`` can stop even a server whose start failed halfway."""


class MariaDBBackends:
    label = "MariaDB servers"

    def unavailable(self) -> str | None:
        if localdb.mariadbd_path() is None:
            return "mariadbd is not installed: apt-get install mariadb-server"
        return None

    def start(self, workdir: Path, names: list[str], into: list[Backend]) -> None:
        template = localdb.make_template(workdir)
        for name in names:
            server = localdb.MariaDB(workdir, name)
            into.append(server)
            server.start(template)


class EmbeddedBackends:
    label = "embedded MySQL-protocol servers (mysql-mimic)"

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("mysql_mimic") is None:
            return (
                "neither mariadbd nor mysql-mimic is installed:"
                " apt-get install mariadb-server, or pip install 'meshproxy[demo]'"
            )
        return None

    def start(self, workdir: Path, names: list[str], into: list[Backend]) -> None:
        from meshproxy.embeddeddb import EmbeddedDB  # imports mysql-mimic and sqlglot

        for name in names:
            server = EmbeddedDB(workdir, name)
            into.append(server)
            server.start()


def choose_backends() -> BackendKind:
    """MariaDB when installed, else embedded; MESHPROXY_DEMO_BACKEND=embedded|mariadb decides."""
    wanted = os.environ.get("MESHPROXY_DEMO_BACKEND", "")
    if wanted == "embedded" or (wanted != "mariadb" and localdb.mariadbd_path() is None):
        return EmbeddedBackends()
    return MariaDBBackends()


class Cluster:
    """The demo's processes and files; ``close`` removes every trace of them."""

    def __init__(self, backend_kind: BackendKind) -> None:
        self.dir = localdb.prepare_workdir(Path(tempfile.mkdtemp(prefix="meshproxy-demo-")))
        self.backend_kind = backend_kind
        self.backends: list[Backend] = []
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.edge_port = localdb.free_port()

    def start(self) -> None:
        self.backend_kind.start(self.dir, ["b1", "b2"], self.backends)
        backends = [str(b.address) for b in self.backends]
        mesh_ports = []
        for name, source_ip in MIDDLES.items():
            mesh_port = localdb.free_port()
            mesh_ports.append(mesh_port)
            self._node(name, _middle_config(name, source_ip, mesh_port, backends), mesh_port)
        self._node("p1", _edge_config(self.edge_port, mesh_ports), self.edge_port)

    def _node(self, name: str, config: str, port: int) -> None:
        path = self.dir / f"{name}.toml"
        path.write_text(config)
        log = (self.dir / f"{name}.log").open("wb")
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "meshproxy", "run", "-c", str(path)],
            stdout=log,
            stderr=log,
            preexec_fn=die_with_parent,
        )
        self.nodes[name] = process
        _wait_port(port, process)

    def kill(self, name: str) -> None:
        """SIGKILL a node's angel and every process under it at once, as a crash would."""
        process = self.nodes[name]
        for pid in [*_descendants(process.pid), process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()

    def close(self) -> None:
        for process in self.nodes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.nodes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for backend in self.backends:
            backend.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _client(port: int, tally: Tally, stop: threading.Event) -> None:
    by_ip = {ip: name for name, ip in MIDDLES.items()}
    while not stop.is_set():
        try:
            conn = pymysql.connect(
                host="127.0.0.1",
                port=port,
                user=localdb.APP_USER,
                password=localdb.APP_PASSWORD,
                connect_timeout=5,
                read_timeout=5,
                # PyMySQL otherwise loads the system CA store on every connect (~30 ms).
                ssl_disabled=True,
            )
            with conn, conn.cursor() as cursor:
                cursor.execute("SELECT SUBSTRING_INDEX(USER(), '@', -1)")
                row = cursor.fetchone()
                middle = by_ip.get(str(row[0]) if row else "", "?")
                with tally.lock:
                    tally.last_new_connection[middle] = time.monotonic()
                for _ in range(QUERIES_PER_CONNECTION):
                    if stop.is_set():
                        break
                    cursor.execute("SELECT 1")
                    cursor.fetchone()
                    with tally.lock:
                        tally.queries += 1
                        tally.per_middle[middle] += 1
        except pymysql.err.MySQLError as exc:
            with tally.lock:
                tally.errors += 1
                tally.last_error = str(exc)
            time.sleep(0.05)


class Progress:
    """One line per interval: queries/s, errors so far, and each middle's share of queries."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.start = self.last = time.monotonic()
        self.queries = 0
        self.share: Counter[str] = Counter()

    def line(self, killed: str) -> str:
        now = time.monotonic()
        with self.tally.lock:
            queries, errors = self.tally.queries, self.tally.errors
            share = self.tally.per_middle.copy()
        delta = share - self.share
        total = sum(delta.values()) or 1
        parts = "  ".join(
            f"{name} {100 * delta[name] / total:3.0f}%{' (killed)' if name == killed else ''}"
            for name in MIDDLES
        )
        qps = (queries - self.queries) / max(now - self.last, 1e-3)
        self.queries, self.share, self.last = queries, share, now
        return f"t={now - self.start:5.1f}s {qps:7.0f} q/s  errors {errors:<4d} {parts}"


def run_demo(duration_s: float = 20.0, clients: int = 8) -> int:
    kind = choose_backends()
    if problem := kind.unavailable():
        print(f"meshproxy demo: {problem}", file=sys.stderr)
        return 1
    cluster = Cluster(kind)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        print(f"starting 2 {kind.label}, 3 middles {list(MIDDLES)} and edge p1 in {cluster.dir}")
        cluster.start()
        print(f"edge p1 listens on 127.0.0.1:{cluster.edge_port}; {clients} clients start now\n")
        tally = Tally()
        threads = [
            threading.Thread(target=_client, args=(cluster.edge_port, tally, stop), daemon=True)
            for _ in range(clients)
        ]
        for thread in threads:
            thread.start()
        progress = Progress(tally)
        killed_at: float | None = None
        while (elapsed := time.monotonic() - progress.start) < duration_s:
            if killed_at is None and elapsed >= duration_s / 2:
                cluster.kill(VICTIM)
                killed_at = time.monotonic()
                print(f"*** t={elapsed:5.1f}s middle {VICTIM} killed with SIGKILL ***", flush=True)
            time.sleep(1.0)
            print(progress.line(VICTIM if killed_at else ""), flush=True)
        stop.set()
        for thread in threads:
            thread.join(10)
        _summary(tally, time.monotonic() - progress.start, killed_at)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        stop.set()
        cluster.close()
    return 0


def _summary(tally: Tally, elapsed_s: float, killed_at: float | None) -> None:
    rate = tally.queries / elapsed_s
    print("\nsummary")
    print(f"  queries          {tally.queries} in {elapsed_s:.1f} s ({rate:.0f}/s)")
    print(
        f"  client errors    {tally.errors}"
        + (f" (last: {tally.last_error})" if tally.errors else "")
    )
    for name in MIDDLES:
        print(f"  via {name:<13}{tally.per_middle[name]} queries")
    if killed_at is not None:
        last = tally.last_new_connection.get(VICTIM, 0.0)
        after = max(0.0, last - killed_at)
        print(
            f"  {VICTIM} killed; its last new connection came {after * 1000:.0f} ms after the"
            " kill (0 = none after)"
        )
    print(
        "  errors are sessions that were open on the killed middle: a TCP proxy cannot move"
        " a live MySQL session, so those clients reconnect and land on another middle."
    )
