"""Benchmark: sysbench through MariaDB direct, HAProxy, meshproxy single hop and chain.

    python -m bench.run [--duration 10] [--rounds 3] [--storm-duration 5] [--targets ...]

Rounds are interleaved: each round runs every workload against every path (starting from
a different path each round), so drift on a shared machine touches every path alike; the
table reports medians over rounds. It is a report, never a gate: the exit status is 0
whether or not the targets are met. Everything it starts is stopped and its temporary
directory removed on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
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

from bench import report, sysbench
from bench.procs import cpu_seconds
from bench.stack import ALL_TARGETS, Stack, Target

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
        default=",".join(ALL_TARGETS),
        help=f"comma-separated paths to measure (default: {','.join(ALL_TARGETS)})",
    )
    parser.add_argument("--no-storm", action="store_true", help="skip the connection storm")
    parser.add_argument(
        "--no-angel",
        action="store_true",
        help="run each meshproxy node as one process (run --no-angel): no angel, no workers",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where JSON goes")
    args = parser.parse_args(argv)
    wanted = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = sorted(set(wanted) - set(ALL_TARGETS))
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(ALL_TARGETS)}")
    args.wanted = tuple(t for t in ALL_TARGETS if t in wanted)
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
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "sysbench": sysbench.version(),
        "haproxy": _command_output(["haproxy", "-v"]),
        "mariadb": _command_output(["mariadbd", "--version"]),
        "git_commit": _command_output(["git", "-C", str(repo), "rev-parse", "HEAD"]),
        "meshproxy_modified": bool(dirty),
    }


def schedule(
    rounds: int, workloads: Sequence[str], targets: list[Target]
) -> list[tuple[int, str, Target]]:
    """Every (round, workload, target); each round starts one path further along."""
    plan = []
    for r in range(rounds):
        order = targets[r % len(targets) :] + targets[: r % len(targets)]
        plan += [(r + 1, workload, target) for workload in workloads for target in order]
    return plan


def measure_one(
    number: int, workload: str, target: Target, threads: int, seconds: float
) -> report.Run:
    """One sysbench run, with the CPU the path's proxies spent on it; a failure is recorded."""
    user0, sys0 = cpu_seconds(target.pids)
    try:
        sample = sysbench.run(workload, target.port, threads, seconds)
    except (sysbench.SysbenchError, subprocess.TimeoutExpired) as exc:
        load = os.getloadavg()[0]
        return report.Run(number, workload, target.name, None, load, error=str(exc)[:2000])
    user1, sys1 = cpu_seconds(target.pids)
    load = os.getloadavg()[0]
    units = report.units_of(workload, sample)
    if not target.pids or not units:
        return report.Run(number, workload, target.name, sample, load)
    cpu_us = (user1 - user0 + sys1 - sys0) * 1e6 / units
    user_us = (user1 - user0) * 1e6 / units
    return report.Run(number, workload, target.name, sample, load, None, cpu_us, user_us)


def progress(run: report.Run, rounds: int, label: str) -> str:
    head = f"  round {run.round}/{rounds} {run.workload:<18} {label:<22}"
    if run.sample is None:
        lines = (run.error or "").splitlines()
        reason = next((line for line in lines if "FATAL: error" in line), lines[0] if lines else "")
        return f"{head} FAILED: {reason.strip()[:120]}"
    unit = "conn/s" if run.workload == sysbench.STORM else "qps"
    cpu = f"{run.cpu_us:7.1f} us CPU" if run.cpu_us is not None else " " * 14
    rate = report.rate_of(run.workload, run.sample)
    return (
        f"{head} {rate:>8.0f} {unit:<6} p95 {run.sample.p95_ms:6.2f} ms {cpu}  "
        f"load {run.loadavg_1m:.1f}"
    )


def measure(args: argparse.Namespace, targets: list[Target]) -> list[report.Run]:
    workloads = list(sysbench.WORKLOADS) + ([] if args.no_storm else [sysbench.STORM])
    runs: list[report.Run] = []
    for number, workload, target in schedule(args.rounds, workloads, targets):
        seconds = args.storm_duration if workload == sysbench.STORM else args.duration
        run = measure_one(number, workload, target, args.threads, seconds)
        runs.append(run)
        print(progress(run, args.rounds, target.label), flush=True)
    return runs


def warm_up(targets: list[Target], threads: int) -> None:
    """A short point-select run through every path, so no path pays for first use."""
    for target in targets:
        try:
            sysbench.run("oltp_point_select", target.port, threads, WARMUP_S)
        except sysbench.SysbenchError as exc:
            print(f"  warm-up through {target.label} failed: {str(exc)[:300]}", flush=True)


def render(
    args: argparse.Namespace, runs: list[report.Run]
) -> tuple[str, list[report.Summary], list[report.Check]]:
    names = list(args.wanted)
    blocks: list[str] = []
    summaries: list[report.Summary] = []
    workloads = list(sysbench.WORKLOADS) + ([] if args.no_storm else [sysbench.STORM])
    for workload in workloads:
        rows = report.summarize(runs, workload, names)
        summaries += rows
        seconds = args.storm_duration if workload == sysbench.STORM else args.duration
        if workload == sysbench.STORM:
            title = "connection storm (connect, SELECT 1, disconnect)"
            unit = "conn/s"
        else:
            title, unit = workload, "QPS"
        heading = (
            f"\n{title}: {args.threads} threads, {seconds:g} s x {args.rounds} rounds, medians"
        )
        blocks.append(report.table(rows, heading, unit))
    results = report.checks(summaries)
    blocks.append("\n" + report.checks_table(results))
    return "\n".join(blocks), summaries, results


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
    try:
        with Stack(args.wanted, angel=not args.no_angel) as stack:
            print(f"starting MariaDB and the proxies in {stack.workdir}", flush=True)
            targets = stack.start()
            print(f"proxy pids: {stack.pids()}", flush=True)
            print("preparing sbtest (4 tables x 10k rows) and warming up", flush=True)
            sysbench.prepare(stack.db_port)
            warm_up(targets, args.threads)
            runs = measure(args, targets)
            warnings = stack.node_warnings()
    except KeyboardInterrupt:
        print("\ninterrupted: everything stopped and removed", file=sys.stderr)
        return 130
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        print(f"\nbench failed: {exc}", file=sys.stderr)
        return 1
    text, summaries, results = render(args, runs)
    print(text)
    if warnings:
        print(node_report(warnings))
    record = {
        "started": started.isoformat(),
        "elapsed_s": round(time.monotonic() - clock, 1),
        "settings": settings(args),
        "environment": environment(),
        "meshproxy_warnings": warnings,
        **report.as_json(runs, summaries, results),
    }
    path = report.write_json(args.results, stamp, record)
    print(f"\nwrote {path} and {path.with_name('latest.json')}")
    return 0


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "duration_s": args.duration,
        "storm_duration_s": args.storm_duration,
        "rounds": args.rounds,
        "threads": args.threads,
        "tables": sysbench.TABLES,
        "table_size": sysbench.TABLE_SIZE,
        "targets": list(args.wanted),
        "meshproxy_angel": not args.no_angel,
    }


if __name__ == "__main__":
    sys.exit(main())
