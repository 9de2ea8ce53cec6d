"""Session continuity (issue 11): sysbench through an edge that owns its sessions, over three
session-mode middles, in steady state and while middles are killed and paused.

    python -m bench.continuity [--duration 10] [--rounds 3] [--threads 16]
                               [--fault-duration 30] [--pause-s 10]

Everything runs on loopback against one MariaDB (sysbench's 4 tables x 10k rows): three
middles (``[[service]] mode = "session"`` on ``pool:main``, ``[[user]] app``), each its own
``meshproxy run`` process tree, all gossiping with a key; a session-mode edge
(``[[listener]] mode = "session"`` on ``tier:middle``, ``close_sessions_on_down = true``)
and, for comparison, a passthrough edge on the same tier, whose clients log in at the
session-mode middles through its byte pump.

- Steady rounds (no faults), interleaved between the two edges: ``oltp_point_select`` and
  ``oltp_read_only``, ``--threads`` persistent connections, ``--duration`` s each, ``--rounds``
  rounds. Medians of QPS, p95 and the edge's CPU per query (user + system of the edge's
  processes, angel, control and worker, over the run, divided by sysbench's queries).
- Fault runs through the session edge, one per workload: ``--fault-duration`` s with
  ``--report-interval=1`` and sysbench's default ``--mysql-ignore-errors``; ``kill -9`` of
  every process of one middle at 1/3 of the run, SIGSTOP of every process of another for
  ``--pause-s`` at 2/3. Reported: sysbench's exit status, errors, reconnects, QPS, and the
  QPS dip around each fault (the lowest 1-s QPS in the 10 s after it against the median
  1-s QPS of the 5 s before, and the seconds below half that median). The killed middle is
  started again after each run.

It is a report, never a gate: the exit status is 0 whatever it finds, 1 only if it could not
run. Everything it starts is stopped and its temporary directory removed on exit, Ctrl-C and
SIGTERM included.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import datetime
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pymysql

from bench import routing, sysbench
from bench.procs import Child, cpu_seconds, wait_port, with_descendants
from bench.run import environment
from bench.stack import (
    MESHPROXY_LOG_LEVEL,
    POOL_MAX,
    Stack,
    admin_toml,
    entrance_toml,
    node_toml,
    pool_toml,
    users_toml,
    wait_mysql,
)
from bench.sysbench import APP

RESULTS = Path(__file__).with_name("results")
WORKLOADS = ("oltp_point_select", "oltp_read_only")
EDGES = ("session", "passthrough")
MIDDLES = ("middle-a", "middle-b", "middle-c")
TIER = "middle"
CPU_TARGET = 1.3  # session edge's CPU per query at most this times the passthrough edge's
WARMUP_S = 2.0
BEFORE_S = 5  # the 1-s QPS before a fault whose median is the reference
AFTER_S = 10  # the 1-s QPS after a fault searched for the dip
# The nodes log at info: the edge's ``session_moved`` events are what a fault run is about.
LOG_LEVEL = "info"
GOSSIP_KEY = base64.b64encode(bytes(range(32))).decode()
READY_S = 60.0  # how long the edges may take to see all three middles ONLINE


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.continuity", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per steady run (10)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved steady rounds (3; 0: none)"
    )
    parser.add_argument("--threads", type=int, default=16, help="sysbench threads (16)")
    parser.add_argument(
        "--fault-duration", type=float, default=30.0, help="seconds per fault run (30)"
    )
    parser.add_argument("--pause-s", type=float, default=10.0, help="SIGSTOP lasts this long (10)")
    parser.add_argument("--no-faults", action="store_true", help="steady rounds only")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where JSON goes")
    args = parser.parse_args(argv)
    if args.fault_duration < 3 * (BEFORE_S + 1):
        parser.error(f"--fault-duration must be at least {3 * (BEFORE_S + 1)} s")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


# --------------------------------------------------------------------------- the mesh


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port that is free now, below the ephemeral range: a middle killed and
    started again binds its ports again, and by then a client connection (sysbench's, the
    edges', anything else on the machine) could hold an ephemeral one as its own end."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(1000):
        port = random.randint(max(1024, low - 12000), low - 1)
        if port in _handed_out:
            continue
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                tcp.bind(("127.0.0.1", port))
                udp.bind(("127.0.0.1", port))  # gossip takes UDP and TCP of one number
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def gossip_toml(port: int, seeds: Sequence[int]) -> str:
    listed = ", ".join(f'"127.0.0.1:{s}"' for s in seeds)
    return f'\n[gossip]\nbind = "127.0.0.1:{port}"\nseeds = [{listed}]\nkeys = ["{GOSSIP_KEY}"]\n'


def at_info(text: str) -> str:
    return text.replace(f'log_level = "{MESHPROXY_LOG_LEVEL}"', f'log_level = "{LOG_LEVEL}"')


def middle_toml(
    name: str, mesh_port: int, gossip_port: int, admin_port: int, seeds: Sequence[int], db: int
) -> str:
    """A middle of tier ``middle``: its mesh service in session mode on ``pool:main``."""
    return (
        at_info(node_toml(name, "middle", mesh_port))
        + f'tier = "{TIER}"\n'
        + entrance_toml("service", "mysql", "pool:main", None, "session")
        + pool_toml([db], POOL_MAX)
        + users_toml(APP)
        + gossip_toml(gossip_port, seeds)
        + admin_toml(admin_port)
    )


def edge_toml(
    name: str, port: int, gossip_port: int, admin_port: int, seeds: Sequence[int], session: bool
) -> str:
    """An edge on ``tier:middle`` (members from gossip): in session mode, owning its
    clients' sessions, or a passthrough byte pump."""
    mode = "session" if session else ""
    close = "close_sessions_on_down = true\n" if session else ""
    return (
        at_info(node_toml(name, "edge"))
        + entrance_toml("listener", "mysql", f"tier:{TIER}", port, mode)
        + f'\n[[tier]]\nname = "{TIER}"\nmembers = []\n{close}'
        + (users_toml(APP) if session else "")
        + gossip_toml(gossip_port, seeds)
        + admin_toml(admin_port)
    )


@dataclass
class Node:
    name: str
    config: Path
    mesh_port: int  # a middle's mesh port, an edge's MySQL listener
    admin_port: int
    child: Child | None = None
    starts: int = 0

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.process.pid

    def pids(self) -> list[int]:
        """The node's processes, its angel last."""
        family = with_descendants([self.pid]) - {self.pid}
        return [*sorted(family), self.pid]


class Mesh:
    """MariaDB, three middles and two edges, started in the bench Stack's directory (so the
    Stack stops and removes all of it)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.middles: dict[str, Node] = {}
        self.edges: dict[str, Node] = {}
        self.paused: set[str] = set()

    def start(self) -> None:
        self.stack.start()  # MariaDB (its "direct" target is not measured)
        db = self.stack.db_port
        gossip = {name: free_port() for name in MIDDLES}
        seeds = list(gossip.values())
        for name in MIDDLES:
            mesh_port, admin_port = free_port(), free_port()
            text = middle_toml(name, mesh_port, gossip[name], admin_port, seeds, db)
            self.middles[name] = self._node(name, text, mesh_port, admin_port)
        for name in MIDDLES:
            self.spawn(self.middles[name])
        for name in EDGES:
            port, admin_port = free_port(), free_port()
            text = edge_toml(
                f"edge-{name}", port, free_port(), admin_port, seeds, name == "session"
            )
            self.edges[name] = self._node(f"edge-{name}", text, port, admin_port)
            self.spawn(self.edges[name])
        self.wait_full()
        for edge in self.edges.values():
            assert edge.child is not None
            wait_mysql(edge.child, edge.mesh_port)

    def _node(self, name: str, text: str, port: int, admin_port: int) -> Node:
        config = self.stack.workdir / f"{name}.toml"
        config.write_text(text)
        return Node(name, config, port, admin_port)

    def spawn(self, node: Node) -> None:
        node.starts += 1
        log = node.name if node.starts == 1 else f"{node.name}-start{node.starts}"
        argv = [sys.executable, "-m", "meshproxy", "run", "-c", str(node.config)]
        node.child = self.stack.processes.spawn(log, argv)
        wait_port(node.child, node.mesh_port, timeout_s=30)

    def tier_view(self, edge: Node) -> dict[str, str]:
        """The edge's routing view of the tier: mesh address -> state."""
        rows = routing.admin_get(edge.admin_port, "/status")["upstreams"][f"tier:{TIER}"]
        return {str(row["server"]): str(row["state"]) for row in rows}

    def wait_full(self, timeout_s: float = READY_S) -> None:
        """Until both edges route to all three middles, each ONLINE."""
        deadline = time.monotonic() + timeout_s
        seen: dict[str, Any] = {}
        while True:
            for node in [*self.middles.values(), *self.edges.values()]:
                assert node.child is not None
                node.child.check_alive()
            try:
                seen = {name: self.tier_view(edge) for name, edge in self.edges.items()}
            except (OSError, KeyError, ValueError) as exc:
                seen = {"admin": str(exc)}
            if all(
                isinstance(view, dict) and len(view) == 3 and set(view.values()) == {"ONLINE"}
                for view in seen.values()
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the edges' view of the tier after {timeout_s:g} s: {seen}")
            time.sleep(0.25)

    def kill(self, name: str) -> None:
        """SIGKILL every process of the middle, children first (were the angel first, it
        would tell them to stop and they could leave gracefully), then reap the angel."""
        node = self.middles[name]
        for pid in node.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert node.child is not None
        node.child.process.wait(10)
        for pid in self.stragglers(node):  # one the angel started as it died, say
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    @staticmethod
    def stragglers(node: Node) -> list[int]:
        """Live processes running the node's config (angel, control, workers)."""
        found = []
        needle = str(node.config).encode()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if needle in argv and state != "Z":
                        found.append(int(entry.name))
        return found

    def pause(self, name: str) -> None:
        """SIGSTOP every process of the middle, the angel first (so it never sees its
        children's silence)."""
        self.paused.add(name)
        for pid in reversed(self.middles[name].pids()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        """SIGCONT the children, then (half a second later, time for them to heartbeat)
        the angel."""
        pids = self.middles[name].pids()
        for pid in pids[:-1]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        time.sleep(0.5)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[-1], signal.SIGCONT)
        self.paused.discard(name)

    def resume_all(self) -> None:
        for name in list(self.paused):
            self.resume(name)

    def restart(self, name: str) -> None:
        self.spawn(self.middles[name])

    def log_size(self, node: Node) -> int:
        assert node.child is not None
        return node.child.log.stat().st_size if node.child.log.exists() else 0

    def log_since(self, node: Node, offset: int) -> str:
        assert node.child is not None
        with node.child.log.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")


# --------------------------------------------------------------------------- steady rounds


@dataclass
class Steady:
    """One steady sysbench run through one edge."""

    round: int
    workload: str
    edge: str
    qps: float | None = None
    p95_ms: float | None = None
    queries: int = 0
    errors: int = 0
    edge_cpu_us: float | None = None  # per query, the edge's processes
    edge_user_us: float | None = None
    middles_cpu_us: float | None = None  # per query, all three middles together
    loadavg_1m: float = 0.0
    error: str = ""


def steady_run(
    mesh: Mesh, number: int, workload: str, edge: str, args: argparse.Namespace
) -> Steady:
    node = mesh.edges[edge]
    middles = [m.pid for m in mesh.middles.values()]
    user0, sys0 = cpu_seconds([node.pid])
    mid0 = sum(cpu_seconds(middles))
    run = Steady(number, workload, edge)
    try:
        sample = sysbench.run(workload, node.mesh_port, args.threads, args.duration)
    except (sysbench.SysbenchError, subprocess.TimeoutExpired) as exc:
        run.error = str(exc)[-2000:]
        return run
    user1, sys1 = cpu_seconds([node.pid])
    mid1 = sum(cpu_seconds(middles))
    run.loadavg_1m = os.getloadavg()[0]
    run.qps, run.p95_ms = sample.queries_per_s, sample.p95_ms
    run.queries, run.errors = sample.queries, sample.errors
    if sample.queries:
        run.edge_cpu_us = (user1 - user0 + sys1 - sys0) * 1e6 / sample.queries
        run.edge_user_us = (user1 - user0) * 1e6 / sample.queries
        run.middles_cpu_us = (mid1 - mid0) * 1e6 / sample.queries
    return run


def steady_rounds(mesh: Mesh, args: argparse.Namespace) -> list[Steady]:
    done: list[Steady] = []
    for number in range(1, args.rounds + 1):
        for workload in WORKLOADS:
            shift = (number - 1) % len(EDGES)
            for edge in EDGES[shift:] + EDGES[:shift]:
                run = steady_run(mesh, number, workload, edge, args)
                done.append(run)
                print("  " + steady_line(run, args.rounds), flush=True)
    return done


def steady_line(run: Steady, rounds: int) -> str:
    head = f"round {run.round}/{rounds} {run.workload:<18} {run.edge:<11}"
    if run.qps is None:
        reason = next((x for x in run.error.splitlines() if "FATAL" in x), run.error[:160])
        return f"{head} FAILED: {reason.strip()[:200]}"
    return (
        f"{head} {run.qps:8.0f} qps  p95 {run.p95_ms:6.2f} ms  edge {run.edge_cpu_us:6.1f} us/q"
        f"  middles {run.middles_cpu_us:6.1f} us/q  load {run.loadavg_1m:.1f}"
        + (f"  {run.errors} errors" if run.errors else "")
    )


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def steady_summary(runs: list[Steady]) -> list[dict[str, Any]]:
    rows = []
    for workload in WORKLOADS:
        for edge in EDGES:
            mine = [r for r in runs if r.workload == workload and r.edge == edge]
            rows.append(
                {
                    "workload": workload,
                    "edge": edge,
                    "qps": _median([r.qps for r in mine]),
                    "p95_ms": _median([r.p95_ms for r in mine]),
                    "edge_cpu_us": _median([r.edge_cpu_us for r in mine]),
                    "edge_user_us": _median([r.edge_user_us for r in mine]),
                    "middles_cpu_us": _median([r.middles_cpu_us for r in mine]),
                    "errors": sum(r.errors for r in mine),
                    "failed": sum(r.qps is None for r in mine),
                    "qps_per_round": [r.qps for r in mine],
                    "edge_cpu_us_per_round": [r.edge_cpu_us for r in mine],
                }
            )
    return rows


def cpu_ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Session edge's median CPU per query over the passthrough edge's, per workload."""
    by = {(r["workload"], r["edge"]): r for r in rows}
    out: dict[str, float | None] = {}
    for workload in WORKLOADS:
        session = by[(workload, "session")]["edge_cpu_us"]
        passthrough = by[(workload, "passthrough")]["edge_cpu_us"]
        out[workload] = session / passthrough if session and passthrough else None
    return out


# --------------------------------------------------------------------------- fault runs

_INTERVAL = re.compile(
    r"^\[ (\d+)s \] thds: (\d+) tps: ([\d.]+) qps: ([\d.]+) .*?"
    r"lat \(ms,95%\): ([\d.]+) err/s: ([\d.]+) reconn/s: ([\d.]+)"
)
_RECONNECTS = re.compile(r"reconnects:\s+(\d+)")
_ERRORS = re.compile(r"ignored errors:\s+(\d+)")
_PROBLEM = re.compile(r"FATAL|WARNING|error|Segmentation|Aborted", re.IGNORECASE)
_QUERIES = re.compile(r"queries:\s+(\d+)\s+\(([\d.]+) per sec\.\)")


@dataclass
class Fault:
    kind: str  # "kill -9" or "SIGSTOP"
    middle: str
    at_s: float  # since sysbench's threads started
    lasted_s: float = 0.0  # a pause: SIGSTOP to SIGCONT
    before_median_qps: float | None = None
    after_min_qps: float | None = None
    dip: float | None = None  # after_min / before_median
    seconds_below_half: int = 0
    recovered_after_s: int | None = None  # first second back at >= 90 % of the median
    reached: bool = True  # False: sysbench had exited before its time came


@dataclass
class FaultRun:
    workload: str
    duration_s: float
    exit_status: int | None = None
    errors: int | None = None
    reconnects: int | None = None
    queries: int | None = None
    qps: float | None = None
    faults: list[Fault] = field(default_factory=list)
    seconds: list[dict[str, float]] = field(default_factory=list)  # sysbench's 1-s lines
    session_moves: dict[str, int] = field(default_factory=dict)  # the edge's log, by outcome
    edge_problems: list[str] = field(default_factory=list)  # warnings, errors, tracebacks
    edge_errors_sent: list[str] = field(default_factory=list)  # moves that ended in an ERR
    edge_events: list[str] = field(default_factory=list)  # moves, tier changes, in order
    sysbench_problems: list[str] = field(default_factory=list)  # FATAL, error lines
    sysbench_tail: str = ""
    timed_out: bool = False
    error: str = ""


class Sysbench:
    """One sysbench run in the background, its output read line by line as it comes."""

    def __init__(self, argv: list[str]) -> None:
        self.lines: list[str] = []
        self.started = threading.Event()  # "Threads started!"
        self.start_time = 0.0
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if not self.started.is_set() and "Threads started" in line:
                self.start_time = time.monotonic()
                self.started.set()
            self.lines.append(line.rstrip("\n"))
        self.started.set()  # it ended, started or not

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.reader.join(5)


def fault_argv(workload: str, port: int, threads: int, duration_s: float) -> list[str]:
    spec = sysbench.SYSBENCH_WORKLOADS[workload]
    return [
        "sysbench",
        spec.test,
        *spec.options,
        *sysbench.connection_args(port),
        f"--threads={threads}",
        f"--time={max(round(duration_s), 1)}",
        "--percentile=95",
        "--report-interval=1",
        "run",
    ]


def sleep_until(moment: float, bench: Sysbench) -> bool:
    """Sleep until the monotonic ``moment``; False if sysbench ended first."""
    while (left := moment - time.monotonic()) > 0:
        if bench.process.poll() is not None:
            return False
        time.sleep(min(left, 0.05))
    return bench.process.poll() is None


def fault_run(
    mesh: Mesh, workload: str, victims: tuple[str, str], args: argparse.Namespace
) -> FaultRun:
    """sysbench through the session edge; ``victims[0]`` killed at 1/3, ``victims[1]``
    paused at 2/3. The killed middle is started again afterwards."""
    edge = mesh.edges["session"]
    killed, paused = victims
    run = FaultRun(workload, args.fault_duration)
    offset = mesh.log_size(edge)
    argv = fault_argv(workload, edge.mesh_port, args.threads, args.fault_duration)
    bench = Sysbench(argv)
    try:
        if not bench.started.wait(30) or bench.process.poll() is not None:
            run.error = "sysbench did not start its threads"
        else:
            t0 = bench.start_time
            first, second = args.fault_duration / 3, 2 * args.fault_duration / 3
            if sleep_until(t0 + first, bench):
                at = time.monotonic() - t0
                mesh.kill(killed)
                run.faults.append(Fault("kill -9", killed, round(at, 2)))
            else:
                run.faults.append(Fault("kill -9", killed, round(first, 2), reached=False))
            if not sleep_until(t0 + second, bench):
                run.faults.append(Fault("SIGSTOP", paused, round(second, 2), reached=False))
            else:
                at = time.monotonic() - t0
                mesh.pause(paused)
                try:
                    sleep_until(t0 + at + args.pause_s, bench)
                finally:
                    mesh.resume(paused)
                lasted = time.monotonic() - t0 - at
                run.faults.append(Fault("SIGSTOP", paused, round(at, 2), round(lasted, 2)))
        try:
            bench.process.wait(args.fault_duration + 120)
        except subprocess.TimeoutExpired:
            run.timed_out = True
    finally:
        mesh.resume_all()
        bench.stop()
    run.exit_status = bench.process.returncode
    read_sysbench(run, bench.lines)
    for fault in run.faults:
        if fault.reached:
            measure_dip(fault, run.seconds)
    read_edge_log(run, mesh.log_since(edge, offset))
    return run


def read_sysbench(run: FaultRun, lines: list[str]) -> None:
    text = "\n".join(lines)
    for line in lines:
        match = _INTERVAL.match(line)
        if match:
            second, threads, tps, qps, p95, err, reconn = match.groups()
            run.seconds.append(
                {
                    "s": int(second),
                    "threads": int(threads),
                    "tps": float(tps),
                    "qps": float(qps),
                    "p95_ms": float(p95),
                    "err_per_s": float(err),
                    "reconn_per_s": float(reconn),
                }
            )
        elif _PROBLEM.search(line) and not _ERRORS.search(line):
            run.sysbench_problems.append(line)
    if match := _ERRORS.search(text):
        run.errors = int(match.group(1))
    if match := _RECONNECTS.search(text):
        run.reconnects = int(match.group(1))
    if match := _QUERIES.search(text):
        run.queries, run.qps = int(match.group(1)), float(match.group(2))
    run.sysbench_tail = "\n".join(lines[-60:])


def measure_dip(fault: Fault, seconds: list[dict[str, float]]) -> None:
    """The lowest 1-s QPS in the AFTER_S seconds after the fault (the second it happened in
    included) against the median of the BEFORE_S whole seconds before it."""
    at = fault.at_s
    before = [s["qps"] for s in seconds if at - BEFORE_S < s["s"] <= at]
    after = [(int(s["s"]), s["qps"]) for s in seconds if at < s["s"] <= at + AFTER_S]
    if not before:
        return
    median = statistics.median(before)
    fault.before_median_qps = median
    if not after:  # sysbench ended within the second
        return
    fault.after_min_qps = min(q for _, q in after)
    fault.dip = fault.after_min_qps / median if median else None
    fault.seconds_below_half = sum(q < median / 2 for _, q in after)
    low = [s for s, q in after if q < 0.9 * median]
    if not low:
        fault.recovered_after_s = 0
    else:
        back = [s for s, q in after if s > max(low) and q >= 0.9 * median]
        fault.recovered_after_s = (min(back) - int(at)) if back else None


# What the edge logged about the tier and its sessions during a fault run (kept in the JSON).
_EVENT = re.compile(r" (session_moved|server_state|tier_member|connect_failed|gossip_member) ")
MAX_EVENTS = 500
_OUTCOME = re.compile(r'outcome=("(?:[^"\\]|\\.)*"|\S+)')


def outcome_of(line: str) -> str:
    match = _OUTCOME.search(line)
    if match is None:
        return "?"
    raw = match.group(1)
    return str(json.loads(raw)) if raw.startswith('"') else raw


def read_edge_log(run: FaultRun, text: str) -> None:
    """The edge's session_moved events by outcome, and its warnings, errors, tracebacks."""
    moves: collections.Counter[str] = collections.Counter()
    lines = text.splitlines()
    in_traceback = False
    for line in lines:
        if _EVENT.search(line) and len(run.edge_events) < MAX_EVENTS:
            run.edge_events.append(line)
        if "session_moved" in line:
            outcome = outcome_of(line)
            moves[outcome] += 1
            if outcome in ("outcome unknown", "rolled back"):
                run.edge_errors_sent.append(line)
        if line.startswith("Traceback"):
            in_traceback = True
        if in_traceback or " warning " in line or " error " in line or " critical " in line:
            run.edge_problems.append(line)
        if in_traceback and line and not line.startswith((" ", "Traceback")):
            in_traceback = False
    run.session_moves = dict(moves)


def fault_runs(mesh: Mesh, args: argparse.Namespace) -> list[FaultRun]:
    done: list[FaultRun] = []
    names = list(MIDDLES)
    for index, workload in enumerate(("oltp_read_only", "oltp_point_select")):
        killed, paused = names[index % 3], names[(index + 1) % 3]
        print(
            f"  fault run {workload}: {args.fault_duration:g} s, kill -9 {killed} at 1/3,"
            f" SIGSTOP {paused} {args.pause_s:g} s at 2/3",
            flush=True,
        )
        run = fault_run(mesh, workload, (killed, paused), args)
        done.append(run)
        print("  " + fault_line(run), flush=True)
        try:
            mesh.restart(killed)
            mesh.wait_full()
        except (OSError, RuntimeError) as exc:
            run.error = f"{run.error}; the killed middle did not come back: {exc}"[-3000:]
            print(f"  {killed} did not come back, no more fault runs: {exc}", flush=True)
            break
    return done


def fault_line(run: FaultRun) -> str:
    qps = f"{run.qps:.0f}" if run.qps is not None else "-"
    text = (
        f"{run.workload}: exit {run.exit_status}, errors {run.errors}, reconnects"
        f" {run.reconnects}, {qps} qps, moves {run.session_moves or '{}'}"
    )
    if run.sysbench_problems:
        text += f"\n    sysbench: {run.sysbench_problems[0][:300]}"
    return text


# --------------------------------------------------------------------------- report


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    ratios: dict[str, float | None],
    faults: list[FaultRun],
) -> tuple[str, dict[str, Any]]:
    lines = [
        "",
        f"steady: {args.threads} threads, persistent connections, {args.duration:g} s x "
        f"{args.rounds} rounds, medians; CPU per query in us (user + system)",
    ]
    head = (
        f"{'workload':<18} {'edge':<11} {'QPS':>8} {'p95 ms':>7} {'edge CPU':>8} "
        f"{'edge usr':>8} {'middles':>8} {'errors':>6}  QPS per round"
    )
    lines += [head, "-" * len(head)]
    for row in rows:
        per_round = " ".join(_f(q, ".0f") for q in row["qps_per_round"])
        lines.append(
            f"{row['workload']:<18} {row['edge']:<11} {_f(row['qps'], '8.0f')} "
            f"{_f(row['p95_ms'], '7.2f')} {_f(row['edge_cpu_us'], '8.1f')} "
            f"{_f(row['edge_user_us'], '8.1f')} {_f(row['middles_cpu_us'], '8.1f')} "
            f"{row['errors'] + row['failed']:>6}  {per_round}"
        )
    verdicts: dict[str, Any] = {}
    lines.append("")
    for workload, ratio in ratios.items():
        ok = ratio is not None and ratio <= CPU_TARGET
        verdicts[f"cpu_ratio_{workload}"] = {"value": ratio, "target": CPU_TARGET, "pass": ok}
        lines.append(
            f"edge CPU per query, session / passthrough, {workload:<18} {_f(ratio, '5.2f')}x"
            f"  (target <= {CPU_TARGET}x)  {'PASS' if ok else 'MISS'}"
        )
    if faults:
        lines += [
            "",
            f"fault runs through the session edge: {args.threads} threads, "
            f"{args.fault_duration:g} s, kill -9 at 1/3, SIGSTOP {args.pause_s:g} s at 2/3; "
            f"dip = lowest 1-s QPS in the {AFTER_S} s after / median of the {BEFORE_S} s before",
        ]
        head = (
            f"{'workload':<18} {'exit':>4} {'errors':>6} {'reconn':>6} {'QPS':>7}  "
            f"{'fault':<19} {'at s':>5} {'before':>7} {'min':>7} {'dip':>5} {'s<half':>6} "
            f"{'back s':>6}"
        )
        lines += [head, "-" * len(head)]
        for run in faults:
            first = True
            for fault in run.faults or [Fault("(none)", "", 0.0)]:
                lead = (
                    f"{run.workload:<18} {_f(run.exit_status, '>4')} {_f(run.errors, '>6')} "
                    f"{_f(run.reconnects, '>6')} {_f(run.qps, '7.0f')}  "
                    if first
                    else " " * 48
                )
                first = False
                what = f"{fault.kind} {fault.middle}"
                if not fault.reached:
                    lines.append(
                        f"{lead}{what:<19} {fault.at_s:5.1f}  not reached: sysbench had exited"
                    )
                    continue
                lines.append(
                    f"{lead}{what:<19} {fault.at_s:5.1f} {_f(fault.before_median_qps, '7.0f')} "
                    f"{_f(fault.after_min_qps, '7.0f')} {_f(fault.dip, '5.2f')} "
                    f"{fault.seconds_below_half:>6} {_f(fault.recovered_after_s, '>6')}"
                )
        lines.append("")
        for run in faults:
            lines.append(f"{run.workload}: edge session_moved by outcome: {run.session_moves}")
            if run.edge_errors_sent:
                lines.append(f"  edge moves that ended in an ERR ({len(run.edge_errors_sent)}):")
                lines += [f"    {line[:300]}" for line in run.edge_errors_sent[:8]]
            if run.edge_problems:
                lines.append(f"  edge warnings/errors ({len(run.edge_problems)}):")
                lines += [f"    {line[:300]}" for line in run.edge_problems[:12]]
            if run.sysbench_problems:
                lines.append(f"  sysbench errors ({len(run.sysbench_problems)}):")
                lines += [f"    {line[:300]}" for line in run.sysbench_problems[:12]]
            if run.error or run.timed_out:
                lines.append(f"  run: {run.error or 'sysbench timed out'}")
        clean = all(
            r.exit_status == 0 and r.errors == 0 and not r.timed_out and not r.error for r in faults
        )
        verdicts["fault_runs_zero_errors"] = {"pass": clean}
        lines.append(
            f"\nsysbench completes with 0 errors under kill -9 and SIGSTOP: "
            f"{'PASS' if clean else 'MISS'}"
        )
    lines.append(
        "\n(2 shared cores: sysbench, MariaDB, five meshproxy nodes and other work compete;"
        " the figures are noisy)"
    )
    return "\n".join(lines), verdicts


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    started = datetime.datetime.now(datetime.UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    clock = time.monotonic()
    faults: list[FaultRun] = []
    try:
        with Stack(("direct",)) as stack:
            mesh = Mesh(stack)
            try:
                print(f"starting MariaDB, 3 middles and 2 edges in {stack.workdir}", flush=True)
                mesh.start()
                pids = {n.name: n.pid for n in [*mesh.middles.values(), *mesh.edges.values()]}
                print(f"node pids (angels): {pids}", flush=True)
                print("preparing sbtest (4 tables x 10k rows) and warming up", flush=True)
                stack.prepare()
                for edge in mesh.edges.values():
                    with contextlib.suppress(sysbench.SysbenchError):
                        sysbench.run("oltp_point_select", edge.mesh_port, args.threads, WARMUP_S)
                print("steady rounds", flush=True)
                steady = steady_rounds(mesh, args)
                if not args.no_faults:
                    print("fault runs", flush=True)
                    faults = fault_runs(mesh, args)
                warnings = {
                    c.name: c.warnings()[:50]
                    for c in stack.processes.children
                    if c.name.startswith(("middle", "edge"))
                }
            finally:
                mesh.resume_all()
    except KeyboardInterrupt:
        print("\ninterrupted: everything stopped and removed", file=sys.stderr)
        return 130
    except (OSError, RuntimeError, subprocess.SubprocessError, pymysql.err.MySQLError) as exc:
        print(f"\nbench failed: {exc}", file=sys.stderr)
        return 1
    rows = steady_summary(steady)
    ratios = cpu_ratios(rows)
    text, verdicts = render(args, rows, ratios, faults)
    print(text)
    record = {
        "started": started.isoformat(),
        "elapsed_s": round(time.monotonic() - clock, 1),
        "settings": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "threads": args.threads,
            "fault_duration_s": args.fault_duration,
            "pause_s": args.pause_s,
            "tables": sysbench.TABLES,
            "table_size": sysbench.TABLE_SIZE,
            "workloads": list(WORKLOADS),
            "middles": list(MIDDLES),
            "pool_max_per_server": POOL_MAX,
            "log_level": LOG_LEVEL,
            "dip_window_s": {"before": BEFORE_S, "after": AFTER_S},
        },
        "environment": environment(),
        "steady": {"runs": [asdict(r) for r in steady], "medians": rows, "cpu_ratio": ratios},
        "faults": [asdict(r) for r in faults],
        "verdicts": verdicts,
        "meshproxy_warnings": warnings,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"continuity-{stamp}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
