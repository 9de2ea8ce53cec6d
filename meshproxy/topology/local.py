"""A topology spec as processes on loopback: ``meshproxy topology up SPEC --local``.

The backends are MySQL servers on 127.0.0.1: MariaDB when ``mariadbd`` is installed, else
the embedded mysql-mimic server of :mod:`meshproxy.testbed.embedded`
(``MESHPROXY_DEMO_BACKEND=embedded`` or ``=mariadb`` chooses). Every edge and middle is a
``meshproxy run`` process under its angel, with the config that
:func:`~meshproxy.topology.render.node_config` renders for the containers, only with
:class:`LoopbackAddressing`: each proxy gets its own loopback address, 127.0.0.N with N its
host number in the spec's subnets (``.10`` on, in spec order), and free ports there. A
middle dials the backends from its own address, so a backend's ``USER()`` names the middle
that carried a session. App nodes are not started: applications connect to an edge.
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol

import tomli_w

from meshproxy.config import Address
from meshproxy.errors import ConfigError
from meshproxy.runtime.children import die_with_parent
from meshproxy.testbed import mariadb
from meshproxy.topology import secrets
from meshproxy.topology.render import node_config
from meshproxy.topology.spec import BACKENDS, FIRST_HOST, Backend, Node, Service, Spec

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


# --------------------------------------------------------------------------- addressing


@dataclass(frozen=True)
class LoopbackAddressing:
    """Where each proxy of a spec binds on loopback, and where each backend listens.

    ``hosts`` maps a proxy to its loopback address; ``ports`` a proxy to the port of each
    thing it binds: ``mesh`` (middles), ``gossip``, ``admin``, and ``listener:<service>``
    (edges). ``backends`` maps a backend to its ``host:port``.
    """

    hosts: Mapping[str, str]
    ports: Mapping[str, Mapping[str, int]]
    backends: Mapping[str, str]
    secret_files: Mapping[str, Path] = field(default_factory=dict)  # secret name -> file

    @classmethod
    def plan(
        cls,
        spec: Spec,
        backends: Mapping[str, str],
        port: Callable[[str], int] = mariadb.free_port,
        secrets_dir: Path = Path(secrets.DIR),
    ) -> LoopbackAddressing:
        """Give every proxy its address 127.0.0.N and a port from ``port(host)`` for each
        thing it binds; ``backends`` says where the started backends listen."""
        containers = [c.name for c in spec.containers()]
        if FIRST_HOST + len(containers) > 254:
            raise ConfigError(
                spec.source, "node", f"too many nodes for 127.0.0.{FIRST_HOST}-254 on loopback"
            )
        missing = [b.name for b in spec.backends if b.name not in backends]
        if missing:
            raise ValueError(f"no address for backends {missing}")
        hosts: dict[str, str] = {}
        ports: dict[str, dict[str, int]] = {}
        for node in spec.proxies():
            host = f"127.0.0.{FIRST_HOST + containers.index(node.name)}"
            wanted = ["mesh"] if node.role == "middle" else []
            wanted += ["gossip", "admin"]
            if node.role == "edge":
                wanted += [f"listener:{s.name}" for s in spec.services]
            taken: dict[str, int] = {}
            for what in wanted:
                chosen = port(host)
                while chosen in taken.values():
                    chosen = port(host)
                taken[what] = chosen
            hosts[node.name] = host
            ports[node.name] = taken
        files = {name: secrets_dir / file for name, file in secrets.files(spec).items()}
        return cls(hosts, ports, dict(backends), files)

    def _at(self, node: Node, what: str) -> str:
        return f"{self.hosts[node.name]}:{self.ports[node.name][what]}"

    def mesh(self, node: Node) -> str:
        return self._at(node, "mesh")

    def gossip(self, node: Node) -> str:
        return self._at(node, "gossip")

    def admin(self, node: Node) -> str:
        return self._at(node, "admin")

    def listener(self, node: Node, service: Service) -> str:
        return self._at(node, f"listener:{service.name}")

    def backend(self, node: Node, backend: Backend) -> str:
        return self.backends[backend.name]

    def source_ip(self, node: Node) -> str:
        return self.hosts[node.name]

    def secret(self, name: str) -> str:
        return str(self.secret_files[name])

    def stream_ports(self, node: Node) -> list[Address]:
        """The TCP ports that accept connections once the node is up (not gossip's)."""
        host = self.hosts[node.name]
        return [Address(host, p) for what, p in self.ports[node.name].items() if what != "gossip"]


def start_groups(spec: Spec) -> list[list[Node]]:
    """The proxies in the order they start, each group once the one before accepts
    connections: middles nearest the backends first, edges last, so that no node dials
    one that is not listening yet (which would count as a connect failure)."""
    tiers = {t.name: t for t in spec.tiers}

    def depth(tier: str) -> int:
        upstream = tiers[tier].upstream
        return 0 if upstream == BACKENDS else 1 + depth(upstream)

    middles = [n for n in spec.proxies() if n.role == "middle"]
    groups = [
        [n for n in middles if depth(n.tier) == d] for d in sorted({depth(n.tier) for n in middles})
    ]
    edges = [n for n in spec.proxies() if n.role == "edge"]
    return [group for group in [*groups, edges] if group]


# --------------------------------------------------------------------------- backends


class BackendServer(Protocol):
    """One local MySQL server: its name, where it listens, and how to stop it (harmless
    if it never started or has already stopped)."""

    @property
    def name(self) -> str: ...

    @property
    def address(self) -> Address: ...

    def stop(self) -> None: ...


class BackendKind(Protocol):
    """How to start local MySQL servers; ``label`` names them in messages."""

    label: str

    def unavailable(self) -> str | None:
        """Why these servers cannot run here, or None if they can."""

    def start(self, workdir: Path, names: list[str], into: list[BackendServer]) -> None:
        """Start one server per name, appending each to ``into`` before it starts, so
        that whoever owns ``into`` can stop even a server whose start failed halfway."""


class MariaDBBackends:
    label = "MariaDB servers"

    def unavailable(self) -> str | None:
        if mariadb.mariadbd_path() is None:
            return "mariadbd is not installed: apt-get install mariadb-server"
        return None

    def start(self, workdir: Path, names: list[str], into: list[BackendServer]) -> None:
        template = mariadb.make_template(workdir)
        for name in names:
            server = mariadb.MariaDB(workdir, name)
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

    def start(self, workdir: Path, names: list[str], into: list[BackendServer]) -> None:
        from meshproxy.testbed.embedded import EmbeddedDB  # imports mysql-mimic and sqlglot

        for name in names:
            server = EmbeddedDB(workdir, name)
            into.append(server)
            server.start()


def choose_backends() -> BackendKind:
    """MariaDB when installed, else embedded; MESHPROXY_DEMO_BACKEND=embedded|mariadb decides."""
    wanted = os.environ.get("MESHPROXY_DEMO_BACKEND", "")
    if wanted == "embedded" or (wanted != "mariadb" and mariadb.mariadbd_path() is None):
        return EmbeddedBackends()
    return MariaDBBackends()


# --------------------------------------------------------------------------- processes


def _descendants(pid: int) -> list[int]:
    """Every live descendant of a process, deepest first."""
    children_file = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        children = [int(c) for c in children_file.read_text().split()]
    except OSError:
        return []
    return [d for child in children for d in (*_descendants(child), child)]


def _is_ours(pid: int) -> bool:
    """Whether a pid still belongs to a live meshproxy process (not a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z" and b"meshproxy" in cmdline


def _accepts(address: Address) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((address.host, address.port), 0.2):
        return True
    return False


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM for a while (main thread only): a second Ctrl-C must not
    interrupt the clean-up the first one started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


class LocalTopology:
    """A spec's backends and proxies as processes on loopback, with their files in ``dir``.

    ``start`` starts them (backends, then middles nearest the backends, ..., then edges)
    and returns once each accepts connections; ``stop`` stops them all and removes ``dir``,
    leaving nothing behind. Used as a context manager it does both. Every process it starts
    is killed by the kernel should this process die first.
    """

    def __init__(
        self,
        spec: Spec,
        backend_kind: BackendKind | None = None,
        prefix: str = "meshproxy-local-",
    ) -> None:
        spec.require_passthrough("topology up --local")
        if (spec.monitor_user, spec.monitor_password) != (
            mariadb.MONITOR_USER,
            mariadb.MONITOR_PASSWORD,
        ):
            raise ConfigError(
                spec.source,
                "topology.monitor",
                "local backends know only the monitor user "
                f"{mariadb.MONITOR_USER!r} with password {mariadb.MONITOR_PASSWORD!r}",
            )
        self.spec = spec
        self.backend_kind = backend_kind or choose_backends()
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.backends: list[BackendServer] = []
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.killed: set[str] = set()
        self._addressing: LoopbackAddressing | None = None

    @property
    def addressing(self) -> LoopbackAddressing:
        """Where everything listens; known once ``start`` has started the backends."""
        if self._addressing is None:
            raise RuntimeError("the topology has not been started")
        return self._addressing

    def config_path(self, name: str) -> Path:
        return self.dir / f"{name}.toml"

    def log_path(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    def start(self) -> None:
        names = [b.name for b in self.spec.backends]
        self.backend_kind.start(mariadb.prepare_workdir(self.dir), names, self.backends)
        where = secrets.ensure(self.spec, self.dir / secrets.DIR)
        at = LoopbackAddressing.plan(
            self.spec, {b.name: str(b.address) for b in self.backends}, secrets_dir=where
        )
        self._addressing = at
        for group in start_groups(self.spec):
            for node in group:
                self._launch(node, at)
            for node in group:
                self._wait_ready(node, at)

    def _launch(self, node: Node, at: LoopbackAddressing) -> None:
        path = self.config_path(node.name)
        path.write_text(tomli_w.dumps(node_config(self.spec, node, at)))
        with self.log_path(node.name).open("ab") as log:
            self.nodes[node.name] = subprocess.Popen(  # noqa: S603 - our own interpreter
                [sys.executable, "-m", "meshproxy", "run", "-c", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=die_with_parent,
            )

    def _wait_ready(self, node: Node, at: LoopbackAddressing) -> None:
        process = self.nodes[node.name]
        deadline = time.monotonic() + START_TIMEOUT_S
        waiting = at.stream_ports(node)
        while waiting:
            if process.poll() is not None:
                log = self.log_path(node.name).read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"node {node.name} exited with status {process.returncode} at start-up:\n" + log
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"node {node.name}: nothing listens on {', '.join(map(str, waiting))}"
                    f" after {START_TIMEOUT_S:g} s"
                )
            waiting = [a for a in waiting if not _accepts(a)]
            if waiting:
                time.sleep(0.05)

    def kill(self, name: str) -> None:
        """SIGKILL a node's angel and every process under it at once, as a crash would
        (the children first, so that none of them sees its angel go and leaves politely)."""
        process = self.nodes[name]
        for pid in [*_descendants(process.pid), process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()
        self.killed.add(name)

    def restart(self, name: str) -> None:
        """Start a node again (after ``kill``) with the same config and addresses, and
        return once it accepts connections."""
        node = next(n for n in self.spec.nodes if n.name == name)
        self._launch(node, self.addressing)
        self._wait_ready(node, self.addressing)
        self.killed.discard(name)

    def exited(self) -> dict[str, int]:
        """The nodes that exited by themselves (not by ``kill``), with their exit status."""
        return {
            name: code
            for name, process in self.nodes.items()
            if (code := process.poll()) is not None and name not in self.killed
        }

    def stop(self) -> None:
        """SIGTERM every node (SIGKILL what is left after a while), stop the backends and
        remove the directory; safe to call more than once."""
        with _signals_ignored():
            family = {pid for p in self.nodes.values() for pid in _descendants(p.pid)}
            for process in self.nodes.values():
                if process.poll() is None:
                    process.terminate()
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for process in self.nodes.values():
                try:
                    process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    family.update(_descendants(process.pid))
                    process.kill()
                    process.wait()
            for pid in family:  # children die with their angel; make sure of it
                if _is_ours(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            for backend in self.backends:
                backend.stop()
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalTopology:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def describe(self) -> list[str]:
        """Where every node listens, one line each, for people."""
        at = self.addressing
        lines = [f"  {b.name:<6}backend  {b.address}" for b in self.backends]
        apps: dict[str, list[str]] = {}
        for node in self.spec.nodes:
            if node.role == "app":
                apps.setdefault(node.edge, []).append(node.name)
        for group in start_groups(self.spec):
            for node in group:
                admin = f"admin http://{at.admin(node)}"
                if node.role == "middle":
                    lines.append(f"  {node.name:<6}middle   mesh {at.mesh(node)}  {admin}")
                    continue
                lines.append(f"  {node.name:<6}edge     {admin}")
                for_apps = f" (app {', '.join(apps[node.name])})" if node.name in apps else ""
                lines.extend(
                    f"  {node.name:<6}edge     listens for {s.name} on {at.listener(node, s)}"
                    + for_apps
                    for s in self.spec.services
                )
        return lines


# --------------------------------------------------------------------------- the command


def run_local(spec: Spec) -> int:
    """Start a spec on loopback, say where everything listens, and keep it running until
    SIGINT or SIGTERM; then stop everything. Returns the exit status."""
    kind = choose_backends()
    if problem := kind.unavailable():
        print(f"meshproxy topology up: {problem}", file=sys.stderr)
        return 1
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        topology = LocalTopology(spec, kind)
        print(
            f"starting topology {spec.name} on loopback with {len(spec.backends)} {kind.label}"
            f" in {topology.dir}",
            flush=True,
        )
        with topology:
            edge = next((n for n in spec.proxies() if n.role == "edge"), None)
            for line in topology.describe():
                print(line)
            print(
                f"applications log in as user {mariadb.APP_USER!r}, password"
                f" {mariadb.APP_PASSWORD!r}; mesh TLS, gossip key and admin token are in"
                f" {topology.dir / secrets.DIR}"
            )
            if edge is not None:
                print(f"  e.g. meshproxy ctl -c {topology.config_path(edge.name)} status")
            print("ready; Ctrl-C or SIGTERM stops everything", flush=True)
            _watch(topology)
    except KeyboardInterrupt:
        print("interrupted at start-up: stopped everything", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as exc:  # TimeoutError is an OSError
        print(f"meshproxy topology up: {exc}", file=sys.stderr)
        return 1
    else:
        print("stopped", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _watch(topology: LocalTopology) -> None:
    """Until SIGINT or SIGTERM: report each node that exits by itself."""
    reported: set[str] = set()
    try:
        while True:
            time.sleep(0.5)
            for name, code in topology.exited().items():
                if name not in reported:
                    reported.add(name)
                    print(
                        f"node {name} exited with status {code}; see {topology.log_path(name)}",
                        file=sys.stderr,
                        flush=True,
                    )
    except KeyboardInterrupt:
        print("stopping everything", file=sys.stderr, flush=True)
