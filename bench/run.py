"""Benchmark: sysbench through MariaDB direct, HAProxy, ProxySQL and meshproxy's paths.

    python -m bench.run [--duration 10] [--rounds 3] [--storm-duration 5] [--targets ...]
                        [--workloads ...] [--many-clients 1000] [--idle-clients 5000]
                        [--routing]

Rounds are interleaved: each round runs every workload against every path (starting from
a different path each round), so drift on a shared machine touches every path alike; the
table reports medians over rounds. It is a report, never a gate: the exit status is 0
whether or not the targets are met. Everything it starts is stopped and its temporary
directory removed on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import pymysql

from bench import idle, report, routing, sysbench
from bench.procs import cpu_seconds, host_cpu_seconds
from bench.serverstats import Watch
from bench.stack import (
    ALL_TARGETS,
    DEFAULT_TARGETS,
    MAIN,
    REPLICATED,
    ROUTING_TARGETS,
    ROUTING_WORKLOADS,
    Stack,
    Target,
    proxysql_binary,
    runs,
)

RESULTS = Path(__file__).with_name("results")
WARMUP_S = 2.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--threads", type=int, default=8, help="sysbench threads (8)")
    parser.add_argument(
        "--storm-duration", type=float, default=5.0, help="seconds per connection-storm run (5)"
    )
    parser.add_argument(
        "--targets",
        help=f"comma-separated paths to measure (default: {','.join(DEFAULT_TARGETS)}; "
        f"known: {','.join(ALL_TARGETS)})",
    )
    parser.add_argument(
        "--workloads",
        help=f"comma-separated workloads (default: {','.join(sysbench.DEFAULT_WORKLOADS)}; "
        f"known: {','.join(sysbench.WORKLOADS)}; {sysbench.MANY_CLIENTS} and "
        f"{sysbench.IDLE_MEMORY} are heavy and opt-in)",
    )
    parser.add_argument(
        "--routing",
        action="store_true",
        help="query routing's comparisons: by default then, targets "
        f"{','.join(ROUTING_TARGETS)} and workloads {','.join(ROUTING_WORKLOADS)} "
        "(starts a replication set: a primary and two replicas)",
    )
    parser.add_argument("--no-storm", action="store_true", help="skip the connection storm")
    parser.add_argument(
        "--many-clients",
        type=int,
        default=1000,
        help=f"sysbench threads of {sysbench.MANY_CLIENTS} (1000)",
    )
    parser.add_argument(
        "--idle-clients",
        type=int,
        default=5000,
        help=f"idle sessions {sysbench.IDLE_MEMORY} opens (5000)",
    )
    parser.add_argument(
        "--no-angel",
        action="store_true",
        help="run each meshproxy node as one process (run --no-angel): no angel, no workers",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where JSON goes")
    args = parser.parse_args(argv)
    if args.targets is None:
        args.targets = ",".join(ROUTING_TARGETS if args.routing else DEFAULT_TARGETS)
    if args.workloads is None:
        defaults = ROUTING_WORKLOADS if args.routing else sysbench.DEFAULT_WORKLOADS
        args.workloads = ",".join(defaults)
    wanted = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = sorted(set(wanted) - set(ALL_TARGETS))
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(ALL_TARGETS)}")
    args.wanted = tuple(t for t in ALL_TARGETS if t in wanted)
    workloads = tuple(w.strip() for w in args.workloads.split(",") if w.strip())
    unknown = sorted(set(workloads) - set(sysbench.WORKLOADS))
    if unknown:
        known = ", ".join(sysbench.WORKLOADS)
        parser.error(f"unknown workload(s) {', '.join(unknown)}; known: {known}")
    if args.no_storm:
        workloads = tuple(w for w in workloads if w != sysbench.STORM)
    # the interleaved sysbench workloads in a fixed order; idle_memory runs once, after
    args.workloads = tuple(w for w in sysbench.SYSBENCH_WORKLOADS if w in workloads)
    args.idle_memory = sysbench.IDLE_MEMORY in workloads
    # a routing path none of whose workloads is in the run is not even started
    args.wanted = tuple(
        t for t in args.wanted if any(runs(t, w) for w in (*args.workloads, sysbench.IDLE_MEMORY))
    )
    if not args.wanted:
        parser.error("none of those targets runs any of those workloads (see bench/README.md)")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _command_output(argv: list[str]) -> str:
    """The first line a command prints (haproxy -v prints to stdout, others to stderr)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else ""


def environment() -> dict[str, Any]:
    repo = Path(__file__).resolve().parent.parent
    dirty = _command_output(["git", "-C", str(repo), "status", "--porcelain", "meshproxy"])
    proxysql = proxysql_binary()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "sysbench": sysbench.version(),
        "haproxy": _command_output(["haproxy", "-v"]),
        "proxysql": _command_output([str(proxysql or "proxysql"), "--version"]),
        "mariadb": _command_output(["mariadbd", "--version"]),
        "git_commit": _command_output(["git", "-C", str(repo), "rev-parse", "HEAD"]),
        "meshproxy_modified": bool(dirty),
    }


def schedule(
    rounds: int, plan: Sequence[tuple[str, list[Target]]]
) -> list[tuple[int, str, Target]]:
    """Every (round, workload, target); each round starts one path further along."""
    out = []
    for r in range(rounds):
        for workload, targets in plan:
            if targets:
                shift = r % len(targets)
                out += [(r + 1, workload, t) for t in targets[shift:] + targets[:shift]]
    return out


def measure_one(
    number: int,
    workload: str,
    target: Target,
    threads: int,
    seconds: float,
    watch: Watch,
    stack: Stack,
) -> report.Run:
    """One sysbench run, with the CPU the path's proxies spent on it, what MariaDB saw of
    it and, for a routing path, what its node and servers counted; a failure is recorded."""
    replication = stack.replication if target.servers == REPLICATED else None
    if replication is not None:  # the last run's writes applied everywhere, first
        replication.wait_caught_up(timeout_s=120)
    warm_up_s = sysbench.SYSBENCH_WORKLOADS[workload].warm_up_s
    if warm_up_s:  # unmeasured, e.g. to fill a query cache
        with contextlib.suppress(sysbench.SysbenchError, subprocess.TimeoutExpired):
            sysbench.run(workload, target.port, threads, warm_up_s, target.login)
    before = routing.reading(target.admin_port, replication)
    user0, sys0 = cpu_seconds(target.pids)
    host0 = host_cpu_seconds()
    # the path's own connections to the server are counted where they are the point
    pooled = workload in (sysbench.STORM, sysbench.MANY_CLIENTS)
    with watch.recording(target.pids if pooled else ()) as recorder:
        try:
            sample = sysbench.run(workload, target.port, threads, seconds, target.login)
        except (sysbench.SysbenchError, subprocess.TimeoutExpired) as exc:
            sample, error = None, str(exc)[:2000]
    load = os.getloadavg()[0]
    user1, sys1 = cpu_seconds(target.pids)
    host1 = host_cpu_seconds()
    backend = recorder.result
    figures = routing.delta(before, routing.reading(target.admin_port, replication)) or None
    if sample is None:
        return report.Run(
            number,
            workload,
            target.name,
            None,
            load,
            error,
            threads=threads,
            backend=backend,
            routing=figures,
        )
    units = report.units_of(workload, sample)
    cpu_us = user_us = host_us = None
    if target.pids and units:
        cpu_us = (user1 - user0 + sys1 - sys0) * 1e6 / units
        user_us = (user1 - user0) * 1e6 / units
    if units:
        host_us = (host1 - host0) * 1e6 / units
    return report.Run(
        number,
        workload,
        target.name,
        sample,
        load,
        None,
        cpu_us,
        user_us,
        threads,
        backend,
        figures,
        host_us,
    )


def progress(run: report.Run, rounds: int, label: str) -> str:
    head = f"  round {run.round}/{rounds} {run.workload:<19} {label:<26}"
    if run.sample is None:
        lines = (run.error or "").splitlines()
        reason = next((line for line in lines if "FATAL: " in line), lines[0] if lines else "")
        return f"{head} FAILED: {reason.strip()[:160]}"
    unit = "conn/s" if run.workload == sysbench.STORM else "qps"
    cpu = f"{run.cpu_us:7.1f} us CPU" if run.cpu_us is not None else " " * 14
    rate = report.rate_of(run.workload, run.sample)
    line = (
        f"{head} {rate:>8.0f} {unit:<6} p95 {run.sample.p95_ms:6.2f} ms {cpu}  "
        f"load {run.loadavg_1m:.1f}"
    )
    if run.sample.errors:
        line += f"  {run.sample.errors} errors"
    b = run.backend
    hits = routing.hit_ratio(run.routing or {})
    if hits is not None:
        line += f"  cache hits {100 * hits:.1f}%"
    share = routing.replica_share(run.routing or {}, run.sample.reads)
    if share is not None:
        line += f"  replicas ran {100 * share:.0f}% of reads"
    if b is not None and run.workload in (sysbench.STORM, sysbench.MANY_CLIENTS):
        line += (
            f"  backend: {b.app_logins} new, {b.path_max} held max; MariaDB: "
            f"{b.app_threads_max} app conns max, Threads_connected max {b.threads_max}"
        )
    return line


def plan_of(args: argparse.Namespace, stack: Stack) -> list[tuple[str, list[Target]]]:
    return [
        (
            w,
            stack.many_targets
            if w == sysbench.MANY_CLIENTS
            else [t for t in stack.targets if runs(t.name, w)],
        )
        for w in args.workloads
    ]


def measure(args: argparse.Namespace, stack: Stack, watches: dict[str, Watch]) -> list[report.Run]:
    done: list[report.Run] = []
    for number, workload, target in schedule(args.rounds, plan_of(args, stack)):
        seconds = args.storm_duration if workload == sysbench.STORM else args.duration
        threads = args.many_clients if workload == sysbench.MANY_CLIENTS else args.threads
        watch = watches[target.servers]
        run = measure_one(number, workload, target, threads, seconds, watch, stack)
        done.append(run)
        print(progress(run, args.rounds, target.label), flush=True)
    return done


def measure_memory(args: argparse.Namespace, stack: Stack, watch: Watch) -> list[idle.IdleMemory]:
    """Idle sessions through the session-mode node (and ProxySQL, for comparison)."""
    out = []
    for target in [t for t in stack.targets if t.name in ("session", "proxysql")]:
        print(f"  {args.idle_clients} idle sessions through {target.label}", flush=True)
        try:
            result = idle.measure(target.name, target.port, target.pids, args.idle_clients, watch)
        except (OSError, RuntimeError) as exc:
            result = idle.IdleMemory(
                target.name, None, 0, 0, None, None, None, None, 0.0, None, str(exc)
            )
        out.append(result)
        print(report.memory_table([result]).splitlines()[-1], flush=True)
    if not out:
        print("  idle_memory: needs the session (or proxysql) target", flush=True)
    return out


def warm_up(targets: list[Target], threads: int) -> None:
    """A short point-select run through every path, so no path pays for first use."""
    for target in targets:
        try:
            sysbench.run("oltp_point_select", target.port, threads, WARMUP_S, target.login)
        except sysbench.SysbenchError as exc:
            print(f"  warm-up through {target.label} failed: {str(exc)[:300]}", flush=True)


def render(
    args: argparse.Namespace,
    runs: list[report.Run],
    memory: list[idle.IdleMemory],
    unavailable: dict[str, str],
) -> tuple[str, list[report.Summary], list[report.Check], list[report.RoutingRow]]:
    names = list(args.wanted)
    blocks: list[str] = []
    summaries: list[report.Summary] = []
    for workload in args.workloads:
        targets = list(dict.fromkeys(r.target for r in runs if r.workload == workload))
        order = targets if workload == sysbench.MANY_CLIENTS else names
        rows = report.summarize(runs, workload, order)
        summaries += rows
        seconds = args.storm_duration if workload == sysbench.STORM else args.duration
        threads = args.many_clients if workload == sysbench.MANY_CLIENTS else args.threads
        if workload == sysbench.STORM:
            title, unit = "connection storm", "conn/s"
        elif workload == sysbench.MANY_CLIENTS:
            title, unit = "many clients: oltp_point_select", "QPS"
        else:
            title, unit = workload, "QPS"
        about = sysbench.SYSBENCH_WORKLOADS[workload].about
        heading = (
            f"\n{title} ({about}): {threads} threads, {seconds:g} s x {args.rounds} rounds, medians"
        )
        backend = workload in (sysbench.STORM, sysbench.MANY_CLIENTS)
        blocks.append(report.table(rows, heading, unit, backend))
    cpu = report.cpu_table(summaries)
    if cpu:
        blocks.append("\n" + cpu)
    routed = report.routing_rows(summaries, runs)
    if routed:
        blocks.append("\n" + report.routing_table(routed))
    if memory:
        blocks.append("\n" + report.memory_table(memory))
    if unavailable:
        blocks.append("\npaths not measured (their proxy did not start):")
        blocks += [
            f"  {name}: {reason.splitlines()[0][:300]}" for name, reason in unavailable.items()
        ]
    results = report.checks(summaries) + report.routing_checks(routed)
    results += report.memory_checks(memory)
    blocks.append("\n" + report.checks_table(results))
    return "\n".join(blocks), summaries, results, routed


def node_report(warnings: dict[str, list[str]]) -> str:
    """Restarts and other warnings from the meshproxy nodes: they bear on the figures."""
    lines = ["", "meshproxy nodes: warnings logged during the run"]
    for node, found in warnings.items():
        restarts = sum("angel_restarting" in line for line in found)
        lines.append(f"  {node}: {len(found)} warnings, {restarts} child restarts")
        lines += [f"    {line}" for line in found[:5]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    started = datetime.datetime.now(datetime.UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    clock = time.monotonic()
    many = sysbench.MANY_CLIENTS in args.workloads
    # Raised before anything starts, so the proxies and sysbench inherit it: each of the
    # many clients or idle sessions is a socket in the client, and two in a proxy.
    fds = max(
        4 * args.many_clients if many else 0, 4 * args.idle_clients if args.idle_memory else 0
    )
    if fds:
        idle.raise_fd_limit(fds + 1024)
    memory: list[idle.IdleMemory] = []
    try:
        with Stack(args.wanted, angel=not args.no_angel, many_clients=many) as stack:
            print(f"starting MariaDB and the proxies in {stack.workdir}", flush=True)
            targets = stack.start()
            print(f"proxy pids: {stack.pids()}", flush=True)
            print("preparing sbtest (4 tables x 10k rows) and warming up", flush=True)
            stack.prepare()
            extra = [t for t in stack.many_targets if t not in targets]
            warm_up(targets + extra, args.threads)
            watches = {MAIN: Watch(stack.db_port)}
            if stack.replication is not None:
                watches[REPLICATED] = Watch(stack.replication.primary.port)
            try:
                runs = measure(args, stack, watches)
                if args.idle_memory:
                    memory = measure_memory(args, stack, watches[MAIN])
            finally:
                for watch in watches.values():
                    watch.close()
            warnings = stack.node_warnings()
            failing = failing_logs(stack, runs)
            unavailable = dict(stack.unavailable)
    except KeyboardInterrupt:
        print("\ninterrupted: everything stopped and removed", file=sys.stderr)
        return 130
    except (OSError, RuntimeError, subprocess.SubprocessError, pymysql.err.MySQLError) as exc:
        print(f"\nbench failed: {exc}", file=sys.stderr)
        return 1
    text, summaries, results, routed = render(args, runs, memory, unavailable)
    print(text)
    if warnings:
        print(node_report(warnings))
    for name, tail in failing.items():
        print(f"\nlog of {name}, whose path had failed runs (last lines):\n{tail}")
    record = {
        "started": started.isoformat(),
        "elapsed_s": round(time.monotonic() - clock, 1),
        "settings": settings(args),
        "environment": environment(),
        "meshproxy_warnings": warnings,
        "unavailable": unavailable,
        **report.as_json(runs, summaries, results, memory, routed),
    }
    path = report.write_json(args.results, stamp, record)
    print(f"\nwrote {path} and {path.with_name('latest.json')}")
    return 0


def failing_logs(stack: Stack, runs: list[report.Run]) -> dict[str, str]:
    """The log tails of the proxies on paths with failed runs, read before they go."""
    failed = {r.target for r in runs if r.sample is None}
    out = {}
    for target in stack.targets + stack.many_targets:
        if target.name in failed:
            for name, pid in stack.pids().items():
                if pid in target.pids and name not in out:
                    out[name] = stack.logs(name)[-1500:]
    return out


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "duration_s": args.duration,
        "storm_duration_s": args.storm_duration,
        "rounds": args.rounds,
        "threads": args.threads,
        "tables": sysbench.TABLES,
        "table_size": sysbench.TABLE_SIZE,
        "targets": list(args.wanted),
        "workloads": list(args.workloads) + ([sysbench.IDLE_MEMORY] if args.idle_memory else []),
        "many_clients": args.many_clients,
        "idle_clients": args.idle_clients,
        "meshproxy_angel": not args.no_angel,
        "routing": args.routing,
        "cached_table_size": sysbench.CACHED_TABLE_SIZE,
    }


if __name__ == "__main__":
    sys.exit(main())
