"""The system under test: one MariaDB, HAProxy, and a meshproxy middle and edge.

Every path ends at the same MariaDB server, so the paths differ only in what sits between
sysbench and the server:

    direct      sysbench -> MariaDB
    haproxy     sysbench -> HAProxy (TCP mode, nbthread 1) -> MariaDB
    haproxy-mt  sysbench -> HAProxy (TCP mode, nbthread 2) -> MariaDB
    relay       sysbench -> bench/relay.py (a bare uvloop TCP relay) -> MariaDB
    single      sysbench -> meshproxy middle (listener, pool:main) -> MariaDB
    single-w2   the same with ``workers = 2`` (two data-plane processes, one accept queue)
    chain       sysbench -> meshproxy edge -> (mesh hop) -> the same middle -> MariaDB
    single-accel, chain-accel  the same with the kernel fast path on every hop
                (``dataplane.accel = "sockmap"``: linked sessions spliced by a BPF sockmap)
    chain-tls   the same chain with mutual TLS on the mesh hop ([mesh_tls]: its own pair)
    session     sysbench -> meshproxy middle, listener in session mode -> MariaDB
    chain-session  sysbench -> meshproxy edge -> (mesh hop) -> a middle whose mesh
                service is in session mode (the same middle as ``session``) -> MariaDB
    continuity  sysbench -> an edge in session mode (it owns its clients' sessions) ->
                pooled mesh hops, reused from client to client -> a session-mode middle
                -> MariaDB
    continuity-tls  the same with mutual TLS on the pooled hops (its own pair)
    proxysql    sysbench -> ProxySQL 2.5.5, ``threads=1``, pool capped at 64 -> MariaDB

and, for the many-clients workload only, ``session-32`` and ``proxysql-32``: the same
session-mode middle and ProxySQL with their pools capped at 32 connections per server.

Query routing's paths are session-mode middles like ``session``, each with one thing more
(``SESSION_VARIANTS``), on the same MariaDB:

    session-rules50   50 query rules that match nothing
    session-nodigest  ``[digests] enabled = false``
    session-cache     a rule that caches sysbench's point select (60 s TTL)

and, on a replication set of its own (a GTID primary and two read-only replicas,
``meshproxy.testbed.replication``), started only when one of them is wanted:

    primary          sysbench -> the primary
    session-primary  sysbench -> session-mode middle, pool of the primary alone -> primary
    session-split    sysbench -> session-mode middle, ``[pool.replication]`` over all three
    session-split-noryw  the same with ``read_your_writes = "off"``

Each of those runs only the workloads it is about (``RUNS_ONLY``).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pymysql

from bench import routing, sysbench
from bench.procs import Child, Processes, wait_port
from bench.sysbench import APP, Login
from meshproxy.security import pki
from meshproxy.testbed import mariadb
from meshproxy.testbed.replication import WRITER_PASSWORD, WRITER_USER, ReplicationSet

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


MAIN, REPLICATED = "main", "replicated"  # the one MariaDB, or the replication set
# The replication set's paths log in as its ``writer``: no READ_ONLY ADMIN, so a write that
# reached a replica would fail (``app`` could write there).
WRITER = Login(WRITER_USER, WRITER_PASSWORD)


@dataclass(frozen=True)
class Target:
    """One path from sysbench to MariaDB."""

    name: str
    label: str
    port: int
    pids: tuple[int, ...] = ()  # the proxy processes on this path, for CPU accounting
    pool_max: int | None = None  # a pooling proxy's cap on backend connections per server
    servers: str = MAIN  # where the path ends: MAIN or REPLICATED
    login: Login = APP  # sysbench's user
    admin_port: int | None = None  # the node's admin API, read around each run


TARGET_LABELS = {
    "direct": "MariaDB direct",
    "haproxy": "HAProxy nbthread 1",
    "haproxy-mt": "HAProxy nbthread 2",
    "relay": "bare uvloop relay",
    "single": "meshproxy single hop",
    "single-w2": "meshproxy single, 2 workers",
    "chain": "meshproxy chain",
    "single-accel": "single hop, sockmap",
    "chain-accel": "chain, sockmap",
    "chain-tls": "meshproxy chain, mesh TLS",
    "session": "meshproxy session mode",
    "chain-session": "meshproxy chain, session",
    "continuity": "session edge -> session middle",
    "continuity-tls": "session edge, mesh TLS",
    "proxysql": "ProxySQL threads=1",
    "session-rules50": "session, 50 rules",
    "session-nodigest": "session, digests off",
    "session-cache": "session, query cache",
    "primary": "repl. primary direct",
    "session-primary": "session, primary only",
    "session-split": "session, split 1+2",
    "session-split-noryw": "session, split, RYW off",
}
ALL_TARGETS = tuple(TARGET_LABELS)
REPLICATED_TARGETS = ("primary", "session-primary", "session-split", "session-split-noryw")
# The session-mode paths on the replication set: read_your_writes, "" for no split at all.
SPLITS = {"session-primary": "", "session-split": "gtid", "session-split-noryw": "off"}
# The default run leaves out what needs the replication set or a workload of its own.
DEFAULT_TARGETS = tuple(t for t in ALL_TARGETS if t not in (*REPLICATED_TARGETS, "session-cache"))
# `--routing`: the query routing comparisons, each against `session` or `session-primary`
ROUTING_TARGETS = (
    "session",
    "session-rules50",
    "session-nodigest",
    "session-cache",
    *REPLICATED_TARGETS,
)
POINT_SELECTS = ("oltp_point_select", "point_select_ps", "point_select_text")
READ_WRITES = ("oltp_read_write", sysbench.READ_WRITE_SKIP_TRX)
ROUTING_WORKLOADS = (
    "oltp_point_select",
    "point_select_text",
    sysbench.POINT_SELECT_CACHED,
    *READ_WRITES,
)
# The workloads each routing path runs (the others run every workload).
RUNS_ONLY = {
    "session-rules50": POINT_SELECTS,
    "session-nodigest": POINT_SELECTS,
    "session-cache": (sysbench.POINT_SELECT_CACHED,),
    **dict.fromkeys(REPLICATED_TARGETS, ("oltp_read_only", *READ_WRITES)),
}


def runs(target: str, workload: str) -> bool:
    return workload in RUNS_ONLY.get(target, (workload,))


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


# Building blocks of the nodes' TOML, shared by every config below.


def node_toml(name: str, role: str, mesh_port: int | None = None, workers: int = 1) -> str:
    mesh = f'mesh_bind = "127.0.0.1:{mesh_port}"\n' if mesh_port is not None else ""
    more = f"workers = {workers}\n" if workers != 1 else ""
    return (
        f'[node]\nname = "{name}"\nrole = "{role}"\n{mesh}'
        f'log_level = "{MESHPROXY_LOG_LEVEL}"\n{more}'
    )


def entrance_toml(kind: str, name: str, upstream: str, port: int | None, mode: str = "") -> str:
    """A ``[[listener]]`` (with ``port``) or ``[[service]]`` (mesh, without)."""
    bind = f'bind = "127.0.0.1:{port}"\n' if port is not None else ""
    session = f'mode = "{mode}"\n' if mode else ""
    return f'\n[[{kind}]]\nname = "{name}"\n{bind}upstream = "{upstream}"\n{session}'


def check_toml(table: str, kind: str = "mysql") -> str:
    """The lenient health check every proxy here runs (see CHECK_INTERVAL_MS)."""
    auth = ""
    if kind == "mysql":
        auth = f'user = "{mariadb.MONITOR_USER}"\npassword = "{mariadb.MONITOR_PASSWORD}"\n'
    return (
        f'[{table}]\ntype = "{kind}"\n{auth}interval_ms = {CHECK_INTERVAL_MS}\n'
        f"timeout_ms = {CHECK_TIMEOUT_MS}\nfall = {CHECK_FALL}\nrise = 1\n"
    )


def pool_toml(
    server_ports: Sequence[int], pool_max: int | None = None, replication: str = ""
) -> str:
    """Pool ``main`` on those servers; with ``replication`` (a ``read_your_writes``
    mode), split by their read_only roles."""
    servers = ", ".join(f'"127.0.0.1:{p}"' for p in server_ports)
    text = f'\n[[pool]]\nname = "main"\nservers = [{servers}]\n' + check_toml("pool.check")
    if pool_max is not None:
        text += f"[pool.connections]\nmax_per_server = {pool_max}\n"
    if replication:
        text += f'[pool.replication]\nenabled = true\nread_your_writes = "{replication}"\n'
    return text


def users_toml(*logins: Login) -> str:
    return "".join(
        f'\n[[user]]\nname = "{login.user}"\npassword = "{login.password}"\n' for login in logins
    )


def admin_toml(port: int) -> str:
    return f'\n[admin]\nbind = "127.0.0.1:{port}"\ntoken = "{routing.ADMIN_TOKEN}"\n'


def accel_state(node: Child) -> str:
    """'ready', the reason the fast path is unavailable, or '' while it is loading."""
    for line in node.warnings():
        if "accel_unavailable" in line:
            return line
    return "ready" if "accel_ready" in node.log_tail(1_000_000) else ""


ACCEL_TOML = '\n[dataplane]\naccel = "sockmap"\n'


def with_accel(text: str) -> str:
    """A node config with the fast path, logging at info: its ``accel_ready`` says it loaded."""
    level = f'log_level = "{MESHPROXY_LOG_LEVEL}"'
    return text.replace(level, 'log_level = "info"') + ACCEL_TOML


def middle_config(single_port: int, mesh_port: int, server_port: int, workers: int = 1) -> str:
    return (
        node_toml("bench-middle", "middle", mesh_port, workers)
        + entrance_toml("listener", "single", "pool:main", single_port)
        + entrance_toml("service", "mysql", "pool:main", None)
        + pool_toml([server_port])
    )


def session_config(
    port: int,
    mesh_port: int,
    server_ports: Sequence[int],
    pool_max: int = POOL_MAX,
    name: str = "",
    replication: str = "",
    login: Login = APP,
) -> str:
    """A middle in session mode on both its listener and its mesh service."""
    return (
        node_toml(name or f"bench-session-{pool_max}", "middle", mesh_port)
        + entrance_toml("listener", "session", "pool:main", port, "session")
        + entrance_toml("service", "mysql", "pool:main", None, "session")
        + pool_toml(server_ports, pool_max, replication)
        + users_toml(login)
    )


def _toml_value(value: str | int) -> str:
    return str(value) if isinstance(value, int) else f"'{value}'"


def rule_toml(name: str, **keys: str | int) -> str:
    """A ``[[query_rule]]``; strings go in TOML literal quotes, backslashes as they are."""
    body = "".join(f"{k} = {_toml_value(v)}\n" for k, v in keys.items())
    return f'\n[[query_rule]]\nname = "{name}"\n{body}'


def no_match_rules(count: int) -> str:
    """``count`` query rules that no sysbench statement matches (a firewall list, say)."""
    patterns = (rf"^SELECT .* FROM no_such_table_{i}\b" for i in range(count))  # noqa: S608
    return "".join(
        rule_toml(f"no-match-{i}", match_pattern=pattern, pool="main")
        for i, pattern in enumerate(patterns)
    )


# sysbench's text point select, "SELECT c FROM sbtest3 WHERE id=4711", normalizes to
# "SELECT c FROM sbtest3 WHERE id=?" (meshproxy.mysql.digest.normalize).
CACHE_RULE = rule_toml(
    "cache-point-select", match_digest=r"^SELECT c FROM sbtest\d+ WHERE id=\?$", cache_ttl_ms=60000
)
DIGESTS_OFF = "\n[digests]\nenabled = false\n"
# What the session-mode variants add to the config of ``session``, which has none of it.
SESSION_VARIANTS = {
    "session-rules50": no_match_rules(50),
    "session-nodigest": DIGESTS_OFF,
    "session-cache": CACHE_RULE,
}


def edge_config(port: int, mesh_port: int, name: str = "bench-edge", session: bool = False) -> str:
    """An edge on ``tier:middle`` (the middle at ``mesh_port``): a byte pump, or with
    ``session`` in session mode, its clients logging in to it and their statements running
    on pooled hops to a session-mode middle."""
    return (
        node_toml(name, "edge")
        + entrance_toml("listener", "mysql", "tier:middle", port, "session" if session else "")
        + f'\n[[tier]]\nname = "middle"\nmembers = ["127.0.0.1:{mesh_port}"]\n'
        + check_toml("tier.check", "tcp")
        + (users_toml(APP) if session else "")
    )


def wait_mysql(child: Child | None, port: int, timeout_s: float = 20.0, login: Login = APP) -> None:
    """Wait until a MySQL login and ``SELECT 1`` work through ``port``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if child is not None:
            child.check_alive()
        try:
            conn = pymysql.connect(
                host="127.0.0.1",
                port=port,
                user=login.user,
                password=login.password,
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
        self.template: Path | None = None
        self.replication: ReplicationSet | None = None
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
            if self.replication is not None:
                self.replication.stop()
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
        if want & {"single-accel", "chain-accel"}:
            self._try("single-accel", lambda: self._accel(db_port, want))
        if want & {"session", "chain-session"}:
            self._try("session", lambda: self._session_and_chain(db_port, want))
        if "session-32" in want:
            self._try("session-32", lambda: self._session_32(db_port))
        for name in ("continuity", "continuity-tls"):
            if name in want:
                self._try(name, functools.partial(self._continuity, name, db_port))
        for name in SESSION_VARIANTS:
            if name in want:
                self._try(name, functools.partial(self._session_variant, name, db_port))
        replicated = [t for t in REPLICATED_TARGETS if t in want]
        if replicated:
            self._try(", ".join(replicated), lambda: self._replicated(replicated))
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

    def _add(
        self,
        name: str,
        port: int,
        pids: tuple[int, ...],
        pool: int | None = None,
        servers: str = MAIN,
        login: Login = APP,
        admin_port: int | None = None,
    ) -> None:
        target = Target(name, LABELS[name], port, pids, pool, servers, login, admin_port)
        self.targets.append(target)

    def _start_mariadb(self) -> int:
        self.template = mariadb.make_template(self.workdir)
        self.db = mariadb.MariaDB(self.workdir, "mariadb")
        self.db.start(self.template)
        return self.db.port

    def prepare(self) -> None:
        """The sbtest tables on MariaDB and, written on the primary, on the replication set
        (replicated: every replica has applied them when this returns)."""
        sysbench.prepare(self.db_port)
        if self.replication is not None:
            sysbench.prepare(self.replication.primary.port)
            self.replication.wait_caught_up(timeout_s=300)

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

    def _accel(self, db_port: int, want: set[str]) -> None:
        """A middle and an edge with the kernel fast path, which each must have loaded."""
        middle, single_port, mesh_port = self._start_middle(db_port, accel=True)
        nodes = [middle]
        if "chain-accel" in want:
            edge, edge_port = self._start_edge(mesh_port, name="edge-accel", accel=True)
            nodes.append(edge)
        for node in nodes:
            # Loaded after the node binds: ask the node, as its log may say nothing at info.
            deadline = time.monotonic() + 30
            while not (loaded := accel_state(node)) and time.monotonic() < deadline:
                time.sleep(0.1)
            if loaded != "ready":
                raise RuntimeError(
                    f"{node.name}: the fast path did not load: {loaded or 'no word'}"
                )
        self._add("single-accel", single_port, (middle.process.pid,))
        if "chain-accel" in want:
            self._add("chain-accel", edge_port, (edge.process.pid, middle.process.pid))

    def _single_w2(self, db_port: int) -> None:
        middle, single_port, _ = self._start_middle(db_port, workers=2)
        self._add("single-w2", single_port, (middle.process.pid,))

    def _session_and_chain(self, db_port: int, want: set[str]) -> None:
        """One session-mode middle: its listener is ``session``, its mesh service the
        far end of ``chain-session``'s passthrough edge."""
        middle, port, mesh_port = self._start_session("middle-session", [db_port])
        pids = (middle.process.pid,)
        self._add("session", port, pids, POOL_MAX)
        if "chain-session" in want:
            edge, edge_port = self._start_edge(mesh_port, name="edge-session")
            self._add("chain-session", edge_port, (edge.process.pid, *pids), POOL_MAX)

    def _continuity(self, name: str, db_port: int) -> None:
        """A session-mode edge and its own session-mode middle; ``continuity-tls`` with
        mutual TLS between them."""
        pki_dir = self.workdir / "pki"
        tls = name.endswith("-tls")
        middle_tls = mesh_tls(pki_dir, f"middle-{name}", "middle") if tls else ""
        middle, _, mesh_port = self._start_session(f"middle-{name}", [db_port], extra=middle_tls)
        port = mariadb.free_port()
        text = edge_config(port, mesh_port, f"bench-{name}-edge", session=True)
        text += mesh_tls(pki_dir, f"bench-{name}-edge", "edge") if tls else ""
        edge = self._start_meshproxy(f"edge-{name}", text, port)
        self._add(name, port, (edge.process.pid, middle.process.pid), POOL_MAX)

    def _session_32(self, db_port: int) -> None:
        name = f"middle-session-{MANY_CLIENTS_POOL_MAX}"
        middle, port, _ = self._start_session(name, [db_port], MANY_CLIENTS_POOL_MAX)
        self._add("session-32", port, (middle.process.pid,), MANY_CLIENTS_POOL_MAX)

    def _start_session(
        self,
        name: str,
        server_ports: Sequence[int],
        pool_max: int = POOL_MAX,
        extra: str = "",
        replication: str = "",
        login: Login = APP,
    ) -> tuple[Child, int, int]:
        port, mesh_port = mariadb.free_port(), mariadb.free_port()
        text = session_config(port, mesh_port, server_ports, pool_max, name, replication, login)
        return self._start_meshproxy(name, text + extra, port, login), port, mesh_port

    def _session_variant(self, name: str, db_port: int) -> None:
        """``session`` with one of SESSION_VARIANTS, and an admin API for its figures."""
        admin = mariadb.free_port()
        extra = SESSION_VARIANTS[name] + admin_toml(admin)
        middle, port, _ = self._start_session(f"middle-{name}", [db_port], extra=extra)
        self._add(name, port, (middle.process.pid,), POOL_MAX, admin_port=admin)

    def _replicated(self, wanted: list[str]) -> None:
        """The replication set, and the wanted paths that end at it."""
        assert self.template is not None
        directory = self.workdir / "replication"
        directory.mkdir()
        self.replication = ReplicationSet(directory, self.template, replicas=2)
        self.replication.start()
        primary, replicas = self.replication.primary.port, self.replication.replicas
        if "primary" in wanted:
            self._add("primary", primary, (), servers=REPLICATED, login=WRITER)
        for name, mode in SPLITS.items():
            if name in wanted:
                ports = [primary, *(r.port for r in replicas)] if mode else [primary]
                self._try(name, functools.partial(self._replicated_session, name, ports, mode))

    def _replicated_session(self, name: str, server_ports: list[int], split: str) -> None:
        admin = mariadb.free_port()
        middle, port, _ = self._start_session(
            f"middle-{name}", server_ports, extra=admin_toml(admin), replication=split, login=WRITER
        )
        if split:  # the first checks name the roles; until then every server may take either
            writer, *readers = server_ports
            wanted = {writer: ("writer", "ONLINE")} | dict.fromkeys(readers, ("reader", "ONLINE"))
            routing.wait_roles(admin, wanted, middle.check_alive)
        pids = (middle.process.pid,)
        self._add(name, port, pids, POOL_MAX, REPLICATED, WRITER, admin)

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

    def _start_meshproxy(self, name: str, text: str, port: int, login: Login = APP) -> Child:
        cfg = self.workdir / f"{name}.toml"
        cfg.write_text(text)
        argv = [sys.executable, "-m", "meshproxy", "run", "-c", str(cfg)]
        if not self.angel:
            argv.append("--no-angel")
        child = self.processes.spawn(name, argv)
        wait_port(child, port)
        wait_mysql(child, port, login=login)
        return child

    def _start_middle(
        self, db_port: int, workers: int = 1, tls: str = "", accel: bool = False
    ) -> tuple[Child, int, int]:
        single_port, mesh_port = mariadb.free_port(), mariadb.free_port()
        text = middle_config(single_port, mesh_port, db_port, workers) + tls
        name = ("middle" if workers == 1 else f"middle-w{workers}") + ("-tls" if tls else "")
        if accel:
            text, name = with_accel(text), name + "-accel"
        return self._start_meshproxy(name, text, single_port), single_port, mesh_port

    def _start_edge(
        self, mesh_port: int, tls: str = "", name: str = "", accel: bool = False
    ) -> tuple[Child, int]:
        port = mariadb.free_port()
        text = edge_config(port, mesh_port) + tls
        text = with_accel(text) if accel else text
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
