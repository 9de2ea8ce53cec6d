"""Machinery of the integration suite: ports, configs, node processes, logs and raw clients.

Fixtures live in ``conftest.py``; the classes and helpers they hand out live here so that
test modules can import them for type annotations.
"""

from __future__ import annotations

import calendar
import contextlib
import ctypes
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pymysql

from meshproxy.testbed import mariadb
from meshproxy.testbed.polling import poll

T = TypeVar("T")
Doc = dict[str, Any]

HOST = "127.0.0.1"

# --------------------------------------------------------------------------- waiting


def wait_until(
    predicate: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.02
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` after the
    deadline."""
    return poll(predicate, timeout_s, lambda: what, interval_s, AssertionError)


# --------------------------------------------------------------------------- ports

_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def free_port() -> int:
    """A loopback TCP port that is free now, below the ephemeral range.

    Staying out of the ephemeral range means the thousands of client connections a load
    test opens cannot take a port that a node is about to bind.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    with _ports_lock:
        for _ in range(1000):
            port = random.randint(max(1024, low - 12000), low - 1)
            if port in _handed_out:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind((HOST, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found")


def addr(port: int) -> str:
    return f"{HOST}:{port}"


def port_accepts(port: int) -> bool:
    """Whether a TCP connect to the port succeeds; the probe is reset, never used."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        try:
            sock.connect((HOST, port))
        except OSError:
            return False
        # Close with RST: the node sees a client that vanished before sending anything.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return True


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A loopback port that is bound and listening but drops every SYN.

    The listener has a backlog of 0 and never accepts; one completed connection fills its
    accept queue, after which Linux drops new SYNs, so a connect there times out exactly as
    it would to a host that vanished from the network.
    """
    port = free_port()
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind((HOST, port))
        listener.listen(0)
        for _ in range(8):
            filler = socket.socket()
            filler.settimeout(0.3)
            try:
                filler.connect((HOST, port))
            except TimeoutError:
                filler.close()
                break
            fillers.append(filler)
        else:
            raise AssertionError("the accept queue of the blackhole never filled")
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


# --------------------------------------------------------------------------- TOML


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(doc: Mapping[str, object]) -> str:
    """Write a config document: tables as ``[name]``, lists of tables as ``[[name]]``."""
    lines: list[str] = []
    for key, value in doc.items():
        items: Sequence[object]
        if isinstance(value, Mapping):
            items, header = [value], f"[{key}]"
        elif isinstance(value, list) and all(isinstance(v, Mapping) for v in value):
            items, header = value, f"[[{key}]]"
        else:
            raise TypeError(f"top-level key {key!r} must be a table or a list of tables")
        for item in items:
            assert isinstance(item, Mapping)
            lines.append(header)
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
            lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- configs

MYSQL_CHECK: Doc = {
    "type": "mysql",
    "user": mariadb.MONITOR_USER,
    "password": mariadb.MONITOR_PASSWORD,
    "interval_ms": 1000,
    "timeout_ms": 900,
    "rise": 2,
    "fall": 2,
}


def _server(entry: int | str | Mapping[str, object]) -> object:
    if isinstance(entry, int):
        return addr(entry)
    return entry


def middle_config(
    name: str,
    mesh_port: int,
    *,
    servers: Sequence[int | str | Mapping[str, object]] = (),
    upstream: str = "pool:main",
    tier_members: Sequence[int | str | Mapping[str, object]] = (),
    check: Mapping[str, object] | None = None,
    pool: Mapping[str, object] | None = None,
    node: Mapping[str, object] | None = None,
    timeouts: Mapping[str, object] | None = None,
) -> Doc:
    """A middle: mesh port, one ``mysql`` service, and a pool of MariaDB servers or a tier."""
    doc: Doc = {
        "node": {"name": name, "role": "middle", "mesh_bind": addr(mesh_port), **(node or {})},
    }
    if timeouts:
        doc["timeouts"] = dict(timeouts)
    doc["service"] = [{"name": "mysql", "upstream": upstream}]
    if servers:
        doc["pool"] = [
            {
                "name": "main",
                "servers": [_server(s) for s in servers],
                "check": dict(MYSQL_CHECK if check is None else check),
                **(pool or {}),
            }
        ]
    if tier_members:
        tier_name = upstream.partition(":")[2]
        doc["tier"] = [{"name": tier_name, "members": [_server(m) for m in tier_members]}]
    return doc


def edge_config(
    name: str,
    port: int,
    middles: Sequence[int | str | Mapping[str, object]],
    *,
    listener: Mapping[str, object] | None = None,
    tier: Mapping[str, object] | None = None,
    node: Mapping[str, object] | None = None,
    timeouts: Mapping[str, object] | None = None,
) -> Doc:
    """An edge: one MySQL listener sending everything to the tier ``middle``."""
    doc: Doc = {"node": {"name": name, "role": "edge", **(node or {})}}
    if timeouts:
        doc["timeouts"] = dict(timeouts)
    doc["listener"] = [
        {
            "name": "mysql",
            "bind": addr(port),
            "upstream": "tier:middle",
            **(listener or {}),
        }
    ]
    doc["tier"] = [{"name": "middle", "members": [_server(m) for m in middles], **(tier or {})}]
    return doc


def bound_ports(doc: Mapping[str, Any]) -> list[int]:
    """Every port a node config binds: its listeners and its mesh port."""
    binds = [listener["bind"] for listener in doc.get("listener", [])]
    if "mesh_bind" in doc["node"]:
        binds.append(doc["node"]["mesh_bind"])
    return [int(b.rpartition(":")[2]) for b in binds]


# --------------------------------------------------------------------------- logs

_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z (\w+)\s+(\S+)(.*)$")
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


@dataclass(frozen=True)
class LogEvent:
    """One line of a node's text log: ``<time> <level> <event> key=value ...``."""

    ts: float  # seconds since the epoch, from the line's own time stamp
    level: str
    event: str
    fields: dict[str, str]
    line: str


def parse_log_line(line: str) -> LogEvent | None:
    match = _LINE.match(line)
    if match is None:
        return None
    stamp, millis, level, event, rest = match.groups()
    ts = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) + int(millis) / 1000
    fields: dict[str, str] = {}
    for key, raw in _FIELD.findall(rest):
        fields[key] = json.loads(raw) if raw.startswith('"') else raw
    return LogEvent(ts, level, event, fields, line)


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: if the test run itself dies, the kernel stops the node too.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)


@dataclass
class NodeProcess:
    """One ``meshproxy run`` process, its config file and its captured stderr."""

    name: str
    config_path: Path
    log_path: Path
    ports: list[int]
    run_args: tuple[str, ...] = ()  # extra arguments to ``meshproxy run``
    wrapper: tuple[str, ...] = ()  # a command it runs under (e.g. setpriv, to drop capabilities)
    process: subprocess.Popen[bytes] | None = None
    returncode: int | None = None
    hang_report: str = ""  # the sockets it held, if it did not stop on SIGTERM
    leftovers: list[int] = field(default_factory=list)  # processes alive after it exited
    _log_file: Any = field(default=None, repr=False)

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the process and return once it logged ``node_started`` and every port it
        binds accepts connections."""
        self._log_file = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                *self.wrapper,
                sys.executable,
                "-m",
                "meshproxy",
                "run",
                *self.run_args,
                "-c",
                str(self.config_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.config_path.parent,
            preexec_fn=_die_with_parent,
        )

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"node {self.name} exited with {self.process.returncode} at start-up:\n"
                    + self.text()
                )
            return bool(self.events("node_started")) and all(map(port_accepts, self.ports))

        wait_until(ready, timeout_s, f"node {self.name} to accept connections")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def pids(self) -> list[int]:
        """Every live process of the node: itself and whatever it started (angel, control,
        workers)."""
        return _family(self.pid)

    def reload(self, doc: Doc) -> None:
        """Rewrite the config file and send SIGHUP, as an operator would."""
        self.config_path.write_text(to_toml(doc))
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str | None = None, **match: str) -> list[LogEvent]:
        """Log events named ``name`` whose fields contain each ``match`` value as a substring."""
        found = []
        for line in self.text().splitlines():
            event = parse_log_line(line)
            if event is None or (name is not None and event.event != name):
                continue
            if all(value in event.fields.get(key, "") for key, value in match.items()):
                found.append(event)
        return found

    def wait_for_event(self, name: str, timeout_s: float = 10.0, **match: str) -> LogEvent:
        """The first event matching, waiting for it to be logged; fails with the log."""
        try:
            events = wait_until(
                lambda: self.events(name, **match), timeout_s, f"{name} {match} on {self.name}"
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log of {self.name}:\n{self.text()[-6000:]}") from None
        return events[0]

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, wait (SIGKILL after ``timeout_s``), and return the exit status; any of
        its processes still alive after it exited are killed and reported."""
        process = self.process
        if process is not None and self.returncode is None:
            family = self.pids()
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.hang_report = _sockets_of(family)
                    _kill(family)
                    process.wait()
                    self.returncode = -signal.SIGKILL
                    with contextlib.suppress(AssertionError):
                        wait_until(lambda: not any(map(_alive, family)), 5, "SIGKILL")
            if self.returncode is None:
                self.returncode = process.returncode
            self.leftovers = [pid for pid in family if _alive(pid)]
            _kill(self.leftovers)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        assert self.returncode is not None
        return self.returncode

    def problems(self) -> list[str]:
        """Anything in the log that must never happen: tracebacks and crashed tasks."""
        return [
            line
            for line in self.text().splitlines()
            if "Traceback" in line or " task_crashed " in line
        ]


def _stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent pid, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The fields after the parenthesised command name: state, ppid, ...
    state, ppid = stat.rpartition(")")[2].split()[:2]
    return state, int(ppid)


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _family(root: int) -> list[int]:
    """A live process and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        stat = _stat(int(entry.name)) if entry.name.isdigit() else None
        if stat is not None and stat[0] != "Z":
            children.setdefault(stat[1], []).append(int(entry.name))
    family: list[int] = []
    todo = [root] if _alive(root) else []
    while todo:
        pid = todo.pop()
        family.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(family)


def session_members(sid: int) -> list[int]:
    """The live processes of session ``sid``: a command started with ``start_new_session``
    and everything it started, however deep (orphans keep their session)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After "pid (comm)": state ppid pgrp session ...; zombies are already gone.
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _sockets_of(pids: list[int]) -> str:
    """The TCP sockets some processes hold, as ``ss`` shows them (for a hang report)."""
    ss = shutil.which("ss")
    if ss is None:
        return "(ss is not installed)"
    result = subprocess.run([ss, "-tanp"], capture_output=True, text=True, check=False, timeout=10)
    wanted = tuple(f"pid={pid}," for pid in pids)
    return "\n".join(line for line in result.stdout.splitlines() if any(w in line for w in wanted))


class NodeFactory:
    """Starts node processes for one test and stops them all at its end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.nodes: list[NodeProcess] = []

    def start(
        self, doc: Doc, run_args: Sequence[str] = (), wrapper: Sequence[str] = ()
    ) -> NodeProcess:
        name = doc["node"]["name"]
        config_path = self.workdir / f"{name}.toml"
        config_path.write_text(to_toml(doc))
        log_path = self.workdir / f"{name}.log"
        node = NodeProcess(
            name, config_path, log_path, bound_ports(doc), tuple(run_args), tuple(wrapper)
        )
        self.nodes.append(node)
        node.start()
        return node

    def stop_all(self) -> list[str]:
        """Stop every node (last started first); return what went wrong, if anything."""
        problems: list[str] = []
        for node in reversed(self.nodes):
            code = node.stop()
            if code != 0:
                problems.append(f"node {node.name} exited with {code} after SIGTERM")
                if node.hang_report:
                    problems.append(f"sockets it held:\n{node.hang_report}")
            if node.leftovers:
                problems.append(f"node {node.name} left processes behind: {node.leftovers}")
            problems.extend(
                f"node {node.name}: port {port} still accepts connections after it stopped"
                for port in node.ports
                if port_accepts(port)
            )
            problems.extend(f"node {node.name}: {line}" for line in node.problems())
        return problems


@dataclass
class Chain:
    """An edge and a middle in front of one MariaDB server: the common topology."""

    edge: NodeProcess
    middle: NodeProcess
    port: int  # the edge's MySQL listener
    backend: mariadb.MariaDB


# --------------------------------------------------------------------------- MariaDB


class MariaDBFarm:
    """Throwaway MariaDB servers, each with its own data directory and port."""

    def __init__(self, workdir: Path, template: Path) -> None:
        self.workdir = workdir
        self.template = template
        self.servers: list[mariadb.MariaDB] = []
        self._count = 0

    def start(self, tls: bool = False) -> mariadb.MariaDB:
        self._count += 1
        server = mariadb.MariaDB(self.workdir, f"db{self._count}", port=free_port(), tls=tls)
        self.servers.append(server)
        server.start(self.template)
        return server

    def stop(self, server: mariadb.MariaDB) -> None:
        server.stop()
        if server in self.servers:
            self.servers.remove(server)

    def stop_all(self) -> None:
        for server in list(self.servers):
            self.stop(server)


# --------------------------------------------------------------------------- clients


def connect(port: int, **kwargs: Any) -> Any:
    """A PyMySQL connection as the app user, to MariaDB directly or through a node."""
    options: dict[str, Any] = {
        "host": HOST,
        "port": port,
        "user": mariadb.APP_USER,
        "password": mariadb.APP_PASSWORD,
        "database": mariadb.DATABASE,
        "connect_timeout": 10,
        "read_timeout": 60,
        "write_timeout": 60,
        "autocommit": True,
    }
    options.update(kwargs)
    return pymysql.connect(**options)


def query(port: int, sql: str, **kwargs: Any) -> list[tuple[Any, ...]]:
    """Connect, run one statement, return its rows, and close."""
    conn = connect(port, **kwargs)
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql)
            return list(cursor.fetchall())
    finally:
        conn.close()


def close_quietly(conn: Any) -> None:
    """Close a PyMySQL connection that may already be broken."""
    with contextlib.suppress(Exception):
        conn.close()


@dataclass
class Outcome:
    """One connect, query and close done by a load thread."""

    started: float  # time.time()
    ended: float
    port: int | None  # @@port of the backend that answered
    error: str | None


class Load:
    """Client threads that connect, run ``SELECT @@port`` and disconnect, in a loop."""

    def __init__(self, port: int, threads: int = 3) -> None:
        self.port = port
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, name=f"load-{i}", daemon=True)
            for i in range(threads)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.time()
            port: int | None = None
            error: str | None = None
            try:
                conn = connect(self.port, connect_timeout=5, read_timeout=5, write_timeout=5)
                try:
                    with conn.cursor() as cursor:
                        cursor.execute("SELECT @@port")
                        port = int(cursor.fetchone()[0])
                finally:
                    close_quietly(conn)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.outcomes.append(Outcome(started, time.time(), port, error))

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)


# --------------------------------------------------------------------------- raw MySQL

CLIENT_LONG_PASSWORD = 0x1
CLIENT_PROTOCOL_41 = 0x200
CLIENT_SECURE_CONNECTION = 0x8000
CLIENT_PLUGIN_AUTH = 0x80000


def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """One MySQL packet: (sequence id, payload)."""
    header = read_exactly(sock, 4)
    length = int.from_bytes(header[:3], "little")
    return header[3], read_exactly(sock, length)


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def write_packet(sock: socket.socket, seq: int, payload: bytes) -> None:
    sock.sendall(len(payload).to_bytes(3, "little") + bytes([seq]) + payload)


def native_password_token(password: str, scramble: bytes) -> bytes:
    stage1 = hashlib.sha1(password.encode()).digest()  # noqa: S324 - the protocol's hash
    stage2 = hashlib.sha1(stage1).digest()  # noqa: S324
    mix = hashlib.sha1(scramble + stage2).digest()  # noqa: S324
    return bytes(a ^ b for a, b in zip(stage1, mix, strict=True))


def raw_login(sock: socket.socket, user: str, password: str) -> None:
    """Read the server greeting and log in with mysql_native_password; fail otherwise."""
    _, greeting = read_packet(sock)
    assert greeting[0] == 10, f"not a protocol 10 greeting: {greeting[:40]!r}"
    pos = greeting.index(b"\0", 1) + 1 + 4  # server version, connection id
    scramble = greeting[pos : pos + 8]
    pos += 8 + 1 + 2 + 1 + 2 + 2  # part 1, filler, caps low, charset, status, caps high
    part2_len = max(13, greeting[pos] - 8)
    pos += 1 + 10
    scramble += greeting[pos : pos + part2_len].rstrip(b"\0")[:12]
    token = native_password_token(password, scramble)
    caps = CLIENT_LONG_PASSWORD | CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION
    caps |= CLIENT_PLUGIN_AUTH
    response = struct.pack("<IIB23x", caps, 1 << 24, 33)
    response += user.encode() + b"\0" + bytes([len(token)]) + token
    response += b"mysql_native_password\0"
    write_packet(sock, 1, response)
    _, reply = read_packet(sock)
    assert reply[:1] == b"\x00", f"login failed: {reply!r}"


def read_to_eof(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything the peer sends until it closes; fails if it does not close in time."""
    sock.settimeout(timeout_s)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def split_packets(data: bytes) -> list[bytes]:
    packets = []
    while data:
        length = int.from_bytes(data[:3], "little")
        packets.append(data[4 : 4 + length])
        data = data[4 + length :]
    return packets


def rss_bytes(pid: int) -> int:
    """Resident set size of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the peer closes (FIN or RST) without sending anything, within the time."""
    sock.settimeout(timeout_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
