"""Soak: the shipped chain under load for a long time, with a middle killed and restarted
every few minutes; reports each meshproxy process's memory and file descriptors.

    python -m bench.soak [--minutes 30] [--warmup-minutes 3] [--kill-every-minutes 4]

The chain (edge p1, middles p2-p4, two MariaDB servers) runs on loopback as
``meshproxy topology up chain --local`` runs it. Beside it: sysbench ``oltp_read_only``
on persistent connections (started again whenever it exits, as sysbench 1.0.20 gives up
when a connection through the killed middle breaks) and a connection storm (PyMySQL:
connect, ``SELECT 1``, disconnect). Every ``--sample-s`` seconds it reads each node
process's RSS and open file descriptors from /proc (per process, not per thread).

Growth is judged after the warm-up, on the first and the last minute of samples, per
process: RSS growth per 100k sessions through the edge (medians: open connections make
single samples jitter) against ``--rss-target-kib`` (1024); descriptors other than sockets
(medians) against 0; and sockets on their floor (the fewest in each minute) against 0, as
connections open and close around a sample while a leaked socket never goes away.
Every node process traces its allocations (``meshproxy.runtime.memtrace``); for a process
over its RSS target the report shows the allocation sites that grew most. It is a report,
never a gate: the exit status is 0 whatever it finds, 1 only if the soak could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pymysql

from bench import sysbench
from bench.procs import with_descendants
from meshproxy.config import Address
from meshproxy.runtime import memtrace
from meshproxy.testbed import mariadb
from meshproxy.topology import packaged_spec
from meshproxy.topology.local import LocalTopology, MariaDBBackends
from meshproxy.topology.spec import Spec

RESULTS = Path(__file__).with_name("results")
WINDOW_S = 60.0  # the first and last stretch of samples whose medians are compared
RESTART_AFTER_S = 5.0  # how long a killed middle stays down


@dataclass
class Track:
    """One node process's samples: (seconds since the soak began, RSS bytes, open fds, of
    them sockets)."""

    node: str
    role: str
    pid: int
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)


@dataclass
class Storm:
    """Connection-storm threads and what they counted."""

    listener: Address
    stop: threading.Event
    lock: threading.Lock = field(default_factory=threading.Lock)
    sessions: int = 0
    errors: int = 0
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (t, sessions so far)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                conn = pymysql.connect(
                    host=self.listener.host,
                    port=self.listener.port,
                    user=mariadb.APP_USER,
                    password=mariadb.APP_PASSWORD,
                    database=mariadb.DATABASE,
                    connect_timeout=5,
                    read_timeout=10,
                )
                with conn.cursor() as cursor:
                    cursor.execute("SELECT 1")
                conn.close()
                with self.lock:
                    self.sessions += 1
            except pymysql.MySQLError:
                with self.lock:
                    self.errors += 1
                self.stop.wait(0.05)


def role_of(pid: int) -> str:
    """``angel``, ``control``, ``worker-N`` or ``standby`` from a node process's cmdline."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    words = [a.decode(errors="replace") for a in argv]
    if "_control" in words:
        return "control"
    if "_worker" in words:
        index = words[words.index("--index") + 1] if "--index" in words else "0"
        return "standby" if "--standby-fd" in words else f"worker-{index}"
    return "angel"


def sample(pid: int) -> tuple[int, int, int] | None:
    """(RSS bytes, open fds, of them sockets) of one process, or None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = os.listdir(f"/proc/{pid}/fd")
        sockets = sum(_is_socket(f"/proc/{pid}/fd/{fd}") for fd in fds)
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024, len(fds), sockets
    return None


def _is_socket(path: str) -> bool:
    try:
        return os.readlink(path).startswith("socket:")
    except OSError:  # closed since it was listed
        return False


@dataclass(frozen=True)
class Window:
    """One minute of a process's samples, as judged."""

    rss: int  # median
    fds: int  # median
    files: int  # median of the descriptors that are not sockets
    sockets_floor: int  # the fewest sockets


def window_of(samples: list[tuple[float, int, int, int]], start: float, end: float) -> Window:
    window = [(rss, fds, socks) for t, rss, fds, socks in samples if start <= t <= end]
    return Window(
        int(statistics.median(r for r, _, _ in window)),
        int(statistics.median(f for _, f, _ in window)),
        int(statistics.median(f - k for _, f, k in window)),
        min(k for _, _, k in window),
    )


def sessions_at(storm: Storm, t: float) -> int:
    return next((n for at, n in reversed(storm.timeline) if at <= t), 0)


def sysbench_loop(
    listener: Address, threads: int, stop: threading.Event, restarts: list[float]
) -> None:
    """Run ``oltp_read_only`` until told to stop, starting it again whenever it exits."""
    argv = [
        "sysbench",
        "oltp_read_only",
        *sysbench.connection_args(listener.port, listener.host),
        f"--threads={threads}",
        "--time=0",
        "--report-interval=0",
        "run",
    ]
    while not stop.is_set():
        with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
            while proc.poll() is None and not stop.wait(0.5):
                pass
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
                return
        restarts.append(time.monotonic())
        stop.wait(0.5)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the soak (30)")
    parser.add_argument("--warmup-minutes", type=float, default=3.0, help="not judged (3)")
    parser.add_argument(
        "--kill-every-minutes", type=float, default=4.0, help="kill -9 a middle this often (4)"
    )
    parser.add_argument("--sample-s", type=float, default=10.0, help="sampling interval (10)")
    parser.add_argument("--sysbench-threads", type=int, default=2)
    parser.add_argument("--storm-threads", type=int, default=6)
    parser.add_argument("--rss-target-kib", type=float, default=1024.0, help="per 100k sessions")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where JSON goes")
    parser.add_argument(
        "--no-trace",
        action="store_true",
        help="no tracemalloc in the nodes (RSS without the observer's own effect)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the topology and the trace folder are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    duration_s, warmup_s = args.minutes * 60, args.warmup_minutes * 60
    if duration_s - warmup_s < 2 * WINDOW_S or warmup_s < 2 * WINDOW_S:
        print(
            "bench.soak: the warm-up must be two minutes at least, and the soak must outlast"
            " it by two minutes",
            file=sys.stderr,
        )
        return 1
    spec = packaged_spec("chain")
    kind = MariaDBBackends()
    if problem := kind.unavailable():
        print(f"bench.soak: {problem}", file=sys.stderr)
        return 1
    trace_dir = Path(tempfile.mkdtemp(prefix="meshproxy-soak-trace-"))
    try:
        return soak(args, spec, kind, trace_dir)
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)


def soak(args: argparse.Namespace, spec: Spec, kind: MariaDBBackends, trace_dir: Path) -> int:
    duration_s, warmup_s = args.minutes * 60, args.warmup_minutes * 60
    if not args.no_trace:
        os.environ[memtrace.DIR_ENV] = str(trace_dir)
    # Tracing starts a window before the warm-up ends, so that the traces' own memory has
    # grown to its steady size by the time growth is judged.
    os.environ[memtrace.START_ENV] = str(warmup_s - WINDOW_S)
    os.environ[memtrace.EVERY_ENV] = str(WINDOW_S)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    restarts: list[float] = []
    kills: list[tuple[float, str]] = []
    tracks: dict[int, Track] = {}
    middles = [n.name for n in spec.nodes if n.role == "middle"]
    victim = middles[-1]  # the same one each time, so the others live through the soak
    with LocalTopology(spec, kind, prefix="meshproxy-soak-") as topology:
        edge = next(n for n in spec.nodes if n.role == "edge")
        listener = Address.parse(topology.addressing.listener(edge, spec.services[0]))
        print(f"bench.soak: chain up in {topology.dir}; preparing sysbench tables", flush=True)
        for backend in topology.backends:  # independent servers: each needs the tables
            sysbench.prepare(backend.address.port)
        storm = Storm(listener, stop)
        threads = [
            threading.Thread(target=storm.run, daemon=True) for _ in range(args.storm_threads)
        ]
        threads.append(
            threading.Thread(
                target=sysbench_loop,
                args=(listener, args.sysbench_threads, stop, restarts),
                daemon=True,
            )
        )
        for thread in threads:
            thread.start()
        began = time.monotonic()
        next_kill = args.kill_every_minutes * 60
        try:
            while (now := time.monotonic() - began) < duration_s:
                with storm.lock:
                    storm.timeline.append((now, storm.sessions))
                for name, process in topology.nodes.items():
                    if process.poll() is not None:
                        continue
                    for pid in with_descendants([process.pid]):
                        track = tracks.get(pid)
                        if track is None:
                            track = tracks[pid] = Track(name, role_of(pid), pid)
                        if (got := sample(pid)) is not None:
                            track.samples.append((now, *got))
                if now >= next_kill:
                    topology.kill(victim)
                    kills.append((now, victim))
                    print(f"t={now:6.0f}s kill -9 {victim}", flush=True)
                    stop.wait(RESTART_AFTER_S)
                    topology.restart(victim)
                    next_kill += args.kill_every_minutes * 60
                print(
                    f"t={now:6.0f}s sessions {storm.sessions} (errors {storm.errors}),"
                    f" sysbench restarts {len(restarts)}",
                    flush=True,
                )
                stop.wait(max(0.0, args.sample_s - (time.monotonic() - began - now)))
        finally:
            stop.set()
            for thread in threads:
                thread.join(15)
        rows = judge(tracks, storm, warmup_s, duration_s, args.rss_target_kib, trace_dir)
    report_text = render(rows, storm, restarts, kills, args)
    print(report_text)
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.results / f"soak-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "args": vars(args) | {"results": str(args.results)},
                "rows": rows,
                "samples": {f"{t.node} {t.role} {t.pid}": t.samples for t in tracks.values()},
            },
            indent=2,
        )
    )
    print(f"bench.soak: wrote {out}")
    return 0


def judge(
    tracks: dict[int, Track],
    storm: Storm,
    warmup_s: float,
    duration_s: float,
    target_kib: float,
    trace_dir: Path,
) -> list[dict[str, object]]:
    """Per process that lived long enough: growth from its first minute after its warm-up
    (counted from its own first sample: a restarted middle warms up again) to its last."""
    rows: list[dict[str, object]] = []
    for track in sorted(tracks.values(), key=lambda t: (t.node, t.role, t.pid)):
        if not track.samples:
            continue
        born, last = track.samples[0][0], track.samples[-1][0]
        start = born + warmup_s
        if last - start < 2 * WINDOW_S:
            continue
        first = window_of(track.samples, start, start + WINDOW_S)
        end = window_of(track.samples, last - WINDOW_S, last)
        rss0, rss1 = first.rss, end.rss
        sessions = sessions_at(storm, last) - sessions_at(storm, start)
        trace = trace_dir / f"{track.node}-{track.role}-{track.pid}.txt"
        text = trace.read_text() if trace.exists() else ""
        # What tracing itself added since its baseline, taken as the judged stretch began.
        traced = tracemalloc_bytes(text)
        growth = rss1 - rss0 - traced
        per_100k = growth / 1024 / max(sessions / 100_000, 1e-9)
        row: dict[str, object] = {
            "node": track.node,
            "role": track.role,
            "pid": track.pid,
            "judged_s": round(last - start),
            "sessions": sessions,
            "rss_start_kib": rss0 // 1024,
            "rss_end_kib": rss1 // 1024,
            "tracemalloc_kib": traced // 1024,
            "rss_growth_kib_per_100k_sessions": round(per_100k, 1),
            "fds_start": first.fds,
            "fds_end": end.fds,
            "files_start": first.files,
            "files_end": end.files,
            "sockets_floor_start": first.sockets_floor,
            "sockets_floor_end": end.sockets_floor,
            "ok": (
                per_100k <= target_kib
                and end.files <= first.files
                and end.sockets_floor <= first.sockets_floor
            ),
        }
        if per_100k > target_kib:
            row["top_growth"] = text or "(no trace written)"
        rows.append(row)
    return rows


def tracemalloc_bytes(report: str) -> int:
    """How much tracemalloc's own memory grew since its baseline, as a process's last
    report states it (0 without one)."""
    for line in report.splitlines():
        if line.startswith("# tracemalloc_growth_bytes "):
            return int(line.split()[2])
    return 0


def render(
    rows: list[dict[str, object]],
    storm: Storm,
    restarts: list[float],
    kills: list[tuple[float, str]],
    args: argparse.Namespace,
) -> str:
    lines = [
        "",
        f"soak: {args.minutes:g} min, warm-up {args.warmup_minutes:g} min, {len(kills)} middle"
        f" kills, {storm.sessions} storm sessions ({storm.errors} errors),"
        f" sysbench restarted {len(restarts)} times",
        "",
        "| node | process | judged | sessions | RSS start -> end | of it tracemalloc's growth"
        " | growth per 100k sessions, net | fds start -> end | non-socket fds |"
        " socket floor | ok |",
        "|---|---|---:|---:|---|---:|---:|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['node']} | {r['role']} | {r['judged_s']} s | {r['sessions']} |"
            f" {r['rss_start_kib']} -> {r['rss_end_kib']} KiB | {r['tracemalloc_kib']} KiB |"
            f" {r['rss_growth_kib_per_100k_sessions']} KiB | {r['fds_start']} -> {r['fds_end']} |"
            f" {r['files_start']} -> {r['files_end']} |"
            f" {r['sockets_floor_start']} -> {r['sockets_floor_end']} |"
            f" {'yes' if r['ok'] else 'NO'} |"
        )
    for r in rows:
        if "top_growth" in r:
            lines += [
                "",
                f"top growing allocation sites of {r['node']} {r['role']}:",
                str(r["top_growth"]),
            ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
