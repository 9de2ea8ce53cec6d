"""Running sysbench 1.0.20 and reading its report."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from meshproxy.testbed import mariadb

TABLES = 4
TABLE_SIZE = 10_000
# point_select_cached picks ids among the first CACHED_TABLE_SIZE rows of each table only,
# so that a query cache holds every statement the workload sends (4 x 1000 answers).
CACHED_TABLE_SIZE = 1000
STORM_SCRIPT = Path(__file__).with_name("connect_storm.lua")

STORM = "connect_storm"
MANY_CLIENTS = "many_clients"  # oltp_point_select with --many-clients threads (1000)
IDLE_MEMORY = "idle_memory"  # not sysbench: bench/idle.py
READ_WRITE_SKIP_TRX = "read_write_skip_trx"  # oltp_read_write in autocommit
POINT_SELECT_CACHED = "point_select_cached"  # text point selects over 1000 ids a table


@dataclass(frozen=True)
class Workload:
    """A sysbench test and the options that make it one of our workloads."""

    test: str  # a built-in test, or the path of a Lua script
    options: tuple[str, ...] = ()
    about: str = ""
    table_size: int = TABLE_SIZE  # ids are picked in 1..table_size (the tables hold 10k)
    warm_up_s: float = 0.0  # an unmeasured run of the same just before each measured one


# sysbench's --db-ps-mode is "auto" by default: its built-in OLTP tests use server-side
# prepared statements (COM_STMT_PREPARE once per thread, then COM_STMT_EXECUTE) wherever
# the driver has them, as the MySQL driver does. oltp_point_select is therefore the
# prepared-statement workload already; point_select_ps says so explicitly, and
# point_select_text (--db-ps-mode=disable) sends every query as COM_QUERY text instead.
SYSBENCH_WORKLOADS: dict[str, Workload] = {
    "oltp_point_select": Workload("oltp_point_select", about="1 SELECT by id per event"),
    "oltp_read_only": Workload("oltp_read_only", about="BEGIN, 14 SELECTs, COMMIT"),
    "oltp_read_write": Workload("oltp_read_write", about="BEGIN, 14 SELECTs, 4 writes, COMMIT"),
    "point_select_ps": Workload(
        "oltp_point_select", ("--db-ps-mode=auto",), "prepared statements, stated"
    ),
    "point_select_text": Workload(
        "oltp_point_select", ("--db-ps-mode=disable",), "text protocol (COM_QUERY)"
    ),
    # The storm is not a built-in test: sysbench takes a path to our Lua script instead.
    STORM: Workload(str(STORM_SCRIPT), about="connect, SELECT 1, disconnect"),
    MANY_CLIENTS: Workload("oltp_point_select", about="1000 clients, point selects"),
    # sysbench wraps every oltp_read_write event in BEGIN/COMMIT, which a read/write split
    # sends to the writer whole; --skip_trx runs the same statements in autocommit. Then
    # two threads that pick the same id can interleave their DELETE and INSERT of it, and
    # one INSERT fails with a duplicate key (1062): ignored and counted (column "errors"),
    # as sysbench does by default for deadlocks (1213, 1020, 1205).
    READ_WRITE_SKIP_TRX: Workload(
        "oltp_read_write",
        ("--skip_trx=on", "--mysql-ignore-errors=1062,1213,1020,1205"),
        "14 SELECTs, 4 writes, autocommit",
    ),
    # The query cache's hit path: every statement is among 4000, and the unmeasured run
    # just before fills the cache (its TTL outlasts a run, not a round).
    POINT_SELECT_CACHED: Workload(
        "oltp_point_select",
        ("--db-ps-mode=disable",),
        f"text, ids 1..{CACHED_TABLE_SIZE}",
        table_size=CACHED_TABLE_SIZE,
        warm_up_s=3.0,
    ),
}
WORKLOADS = (*SYSBENCH_WORKLOADS, IDLE_MEMORY)
DEFAULT_WORKLOADS = ("oltp_point_select", "oltp_read_only", "oltp_read_write", STORM)


@dataclass(frozen=True)
class Sample:
    """What one sysbench run measured."""

    events: int  # transactions; for the storm, connections
    events_per_s: float
    queries: int
    queries_per_s: float
    p95_ms: float
    errors: int
    reads: int = 0  # of the queries, sysbench's "read" ones (SELECTs)


class SysbenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Login:
    user: str = mariadb.APP_USER
    password: str = mariadb.APP_PASSWORD


APP = Login()


def connection_args(
    port: int, host: str = "127.0.0.1", login: Login = APP, table_size: int = TABLE_SIZE
) -> list[str]:
    return [
        "--db-driver=mysql",
        f"--mysql-host={host}",
        f"--mysql-port={port}",
        f"--mysql-user={login.user}",
        f"--mysql-password={login.password}",
        f"--mysql-db={mariadb.DATABASE}",
        f"--tables={TABLES}",
        f"--table-size={table_size}",
    ]


def prepare(port: int) -> None:
    """Create and fill the sbtest tables (4 tables x 10k rows), as the app user."""
    argv = ["sysbench", "oltp_read_only", *connection_args(port), "--threads=4", "prepare"]
    _run(argv, timeout_s=300)


def run(workload: str, port: int, threads: int, duration_s: float, login: Login = APP) -> Sample:
    """One timed run of ``workload`` against 127.0.0.1:port."""
    spec = SYSBENCH_WORKLOADS[workload]
    argv = [
        "sysbench",
        spec.test,
        *spec.options,
        *connection_args(port, login=login, table_size=spec.table_size),
        f"--threads={threads}",
        f"--time={max(round(duration_s), 1)}",
        "--percentile=95",
        "--report-interval=0",
        "run",
    ]
    return parse(_run(argv, timeout_s=duration_s + 60))


def _run(argv: list[str], timeout_s: float) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout)[-2000:]
        raise SysbenchError(f"{' '.join(argv[:2])} failed ({result.returncode}): {detail}")
    return result.stdout


_EVENTS = re.compile(r"transactions:\s+(\d+)")
_TPS = re.compile(r"transactions:\s+\d+\s+\(([\d.]+) per sec\.\)")
_QUERIES = re.compile(r"queries:\s+(\d+)")
_QPS = re.compile(r"queries:\s+\d+\s+\(([\d.]+) per sec\.\)")
_P95 = re.compile(r"95th percentile:\s+([\d.]+)")
_ERRORS = re.compile(r"ignored errors:\s+(\d+)")
_READS = re.compile(r"read:\s+(\d+)")


def parse(report: str) -> Sample:
    """Read the figures we need from a sysbench 1.0.20 report."""
    return Sample(
        events=int(_number(_EVENTS, report)),
        events_per_s=_number(_TPS, report),
        queries=int(_number(_QUERIES, report)),
        queries_per_s=_number(_QPS, report),
        p95_ms=_number(_P95, report),
        errors=int(_number(_ERRORS, report)),
        reads=int(match.group(1)) if (match := _READS.search(report)) else 0,
    )


def _number(pattern: re.Pattern[str], report: str) -> float:
    match = pattern.search(report)
    if match is None:
        raise SysbenchError(f"no {pattern.pattern!r} in the sysbench report:\n{report[-2000:]}")
    return float(match.group(1))


def version() -> str:
    out = subprocess.run(["sysbench", "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip()
