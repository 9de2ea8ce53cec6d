"""Memory per idle client session: open thousands of logged-in, idle MySQL connections.

The clients are aiomysql connections made from the harness (a login, nothing else: with
``autocommit=True`` matching the server's default, aiomysql sends no statement after it);
the figure is the growth of the proxy's data-plane process RSS (``VmRSS``) from before
the first login to a moment after the last, divided by the number of sessions. For a
meshproxy node under its angel that process is the worker serving the listener (of the
node's ``_worker`` processes, the one holding the client sockets; the other is its
standby); for ProxySQL, its only process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiomysql

from bench.procs import established_to, socket_inodes, with_descendants
from bench.serverstats import Watch
from meshproxy.testbed import mariadb

LOGIN_CONCURRENCY = 32
SETTLE_S = 2.0


@dataclass(frozen=True)
class IdleMemory:
    target: str
    pid: int | None  # the process measured
    sessions: int  # idle sessions open at the second reading
    failed: int  # logins that failed
    rss_before_kib: int | None
    rss_after_kib: int | None
    rss_closed_kib: int | None  # after the clients have gone again
    kib_per_session: float | None
    login_s: float  # how long the logins took, all of them
    backend_open: int | None  # connections the proxy held to MariaDB while they idled
    error: str | None = None


def raise_fd_limit(wanted: int) -> int:
    """Raise our soft RLIMIT_NOFILE towards ``wanted`` (at most the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def _rss_kib(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def candidates(pids: Sequence[int]) -> list[int]:
    """The data-plane processes among ``pids`` and their descendants."""
    everything = sorted(with_descendants(pids))
    workers = [pid for pid in everything if " _worker " in _cmdline(pid)]
    return workers or list(pids)


async def _open(port: int, count: int) -> tuple[list[aiomysql.Connection], int]:
    gate = asyncio.Semaphore(LOGIN_CONCURRENCY)
    conns: list[aiomysql.Connection] = []
    failed = 0

    async def login() -> None:
        nonlocal failed
        async with gate:
            try:
                conn = await aiomysql.connect(
                    host="127.0.0.1",
                    port=port,
                    user=mariadb.APP_USER,
                    password=mariadb.APP_PASSWORD,
                    db=mariadb.DATABASE,
                    autocommit=True,
                    connect_timeout=30,
                )
            except (TimeoutError, OSError, aiomysql.Error):
                failed += 1
                return
            conns.append(conn)

    await asyncio.gather(*(login() for _ in range(count)))
    return conns, failed


def measure(target: str, port: int, pids: Sequence[int], count: int, watch: Watch) -> IdleMemory:
    """Open ``count`` idle sessions through 127.0.0.1:port and measure the proxy's RSS."""
    raise_fd_limit(count + 1024)
    before = {pid: _rss_kib(pid) for pid in candidates(pids)}
    loop = asyncio.new_event_loop()
    conns: list[aiomysql.Connection] = []
    try:
        started = time.monotonic()
        conns, failed = loop.run_until_complete(_open(port, count))
        login_s = time.monotonic() - started
        time.sleep(SETTLE_S)
        # the process holding the client sockets serves them
        pid = max(before, key=_fds) if before else None
        after = _rss_kib(pid) if pid is not None else None
        backend = len(socket_inodes(list(with_descendants(pids))) & established_to(watch.port))
        open_count = len(conns)
    finally:
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()
        loop.run_until_complete(asyncio.sleep(0.1))
        loop.close()
    time.sleep(SETTLE_S)
    closed = _rss_kib(pid) if pid is not None else None
    first = before.get(pid) if pid is not None else None
    per = (after - first) / open_count if after is not None and first and open_count else None
    return IdleMemory(
        target=target,
        pid=pid,
        sessions=open_count,
        failed=failed,
        rss_before_kib=first,
        rss_after_kib=after,
        rss_closed_kib=closed,
        kib_per_session=per,
        login_s=round(login_s, 2),
        backend_open=backend,
    )
