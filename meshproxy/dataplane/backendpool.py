"""Session mode's pool: authenticated backend connections per server, kept warm.

Each server has a cap on its connections (per process), idle connections per backend
login kept open and logged in, age and idle recycling, a ping before reusing a connection
that sat idle, and a wait queue with a deadline when the cap is reached. A connection goes
back to the idle list only in a known state: the session that returns it has nothing
pinned on it, or it has been reset.
"""

from __future__ import annotations

import asyncio
import math
import ssl
import time
import typing
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from meshproxy import log
from meshproxy.config import Address, ConnectionsConfig
from meshproxy.counters import Counters
from meshproxy.dataplane.backend import BackendConnection, LoginKey
from meshproxy.dataplane.callbacks import factory_for_loop
from meshproxy.dataplane.router import Role
from meshproxy.errors import ConnectFailed, MeshproxyError, ProtocolError, describe
from meshproxy.mysql.constants import Command
from meshproxy.mysql.state import Values

_T = typing.TypeVar("_T")

# (server, error detail or None on success): feeds the pool's passive ejection.
Report = Callable[[Address, str | None], None]
# Opens a transport whose protocol is the factory's connection, from a local address or not.
Dial = Callable[
    [Callable[[], BackendConnection], tuple[str, int] | None], Awaitable[asyncio.Transport]
]


class PoolTimeout(MeshproxyError):
    """No backend connection became free before the checkout deadline."""


class Waiter:
    """A checkout waiting for a connection to come free. The pool takes it out of its
    queue and calls ``hand`` once, with a connection, or with None (room to open one, or
    the server stopped taking checkouts: look again); or ``expire`` at its deadline."""

    def __init__(self, key: LoginKey, deadline: float) -> None:
        self.key = key
        self.deadline = deadline  # time.monotonic()
        self.waiting = True

    def hand(self, conn: BackendConnection | None) -> None:
        raise NotImplementedError

    def expire(self, error: PoolTimeout) -> None:
        raise NotImplementedError


class _Awaiting(Waiter):
    """A coroutine's checkout, awaiting a future."""

    def __init__(
        self,
        server: ServerPool,
        key: LoginKey,
        deadline: float,
        future: asyncio.Future[BackendConnection | None],
    ) -> None:
        super().__init__(key, deadline)
        self.server = server
        self.future = future

    def hand(self, conn: BackendConnection | None) -> None:
        if not self.future.done():
            self.future.set_result(conn)
        elif conn is not None:  # cancelled, and its coroutine not yet told: pass it on
            self.server.give(conn)
        else:
            self.server.wake_one()

    def expire(self, error: PoolTimeout) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclass
class Credentials:
    """SHA1(password) per backend user: from the config, or learned at a client's login."""

    sha1: dict[str, bytes] = field(default_factory=dict)


@dataclass
class ServerStats:
    in_use: int = 0
    created: int = 0
    failed: int = 0
    reused: int = 0
    waits: int = 0
    timeouts: int = 0


class ServerPool:
    """The backend connections of one process to one server."""

    def __init__(
        self,
        pool: str,
        address: Address,
        settings: ConnectionsConfig,
        credentials: Credentials,
        counters: Counters,
        report: Report,
        connect_s: float,
        source_ip: str = "",
    ) -> None:
        self.pool = pool
        self.address = address
        self.settings = settings
        self.credentials = credentials
        self.counters = counters
        self.report = report
        self.connect_s = connect_s
        self.source_ip = source_ip
        self.idle: dict[LoginKey, deque[BackendConnection]] = {}
        self.total = 0  # open or being opened
        self.server_version = ""  # as its greeting says
        self.stats = ServerStats()
        self.accepting = True  # False: OFFLINE_SOFT or worse; no new checkouts
        self.role = Role.ANY  # its side of a replication pool, as the checks see it
        self.tls: ssl.SSLContext | None = None  # TLS to the server (connections.tls)
        # How to reach a middle of a tier (mesh TLS, then the hop header); None: a server,
        # straight over TCP.
        self.dial: Dial | None = None
        # The highest GTID sequence per domain this server is known to have applied (a
        # reader that waited for it): later reads needing no more do not wait again.
        self.applied: dict[int, int] = {}
        self.keys_seen: dict[LoginKey, float] = {}
        # The session state a new connection starts with, per login: a new client session
        # expects exactly that, whichever connection serves it.
        self.baseline: dict[LoginKey, Values] = {}
        # Checkouts waiting for a connection, first come first served, per login.
        self._waiters: dict[LoginKey, Waiters] = {}
        self.waiting = 0  # of them, still waiting
        self._timer: asyncio.TimerHandle | None = None  # at the earliest waiter's deadline
        self._timer_at = 0.0

    # ----------------------------------------------------------------- checkout

    def take_idle(self, key: LoginKey, now: float) -> BackendConnection | None:
        """An idle connection usable without a ping, or None (the slow path decides)."""
        conns = self.idle.get(key)
        if not conns or not self.accepting:
            return None
        conn = conns.pop()  # the most recently used: warm, and likely not timed out
        if (now - conn.last_used) * 1000 > self.settings.ping_after_idle_ms:
            conns.append(conn)
            return None
        self.keys_seen[key] = now
        self.stats.in_use += 1
        self.stats.reused += 1
        return conn

    async def acquire(self, key: LoginKey, timeout_s: float) -> BackendConnection:
        """A connection for ``key``: idle (pinged if it sat), new, or freed within the
        deadline. Raises PoolTimeout, or ConnectFailed when the server cannot be used."""
        deadline = time.monotonic() + timeout_s
        self.keys_seen[key] = time.monotonic()
        while True:
            if not self.accepting:
                raise ConnectFailed(str(self.address), "server is not taking new connections")
            conn = await self._idle_checked(key)
            if conn is not None:
                self.stats.in_use += 1
                self.stats.reused += 1
                return conn
            if self.total >= self.settings.max_per_server:
                self._close_idle_of_other_logins(key)
            if self.total < self.settings.max_per_server:
                conn = await self._open(key, max(deadline - time.monotonic(), 0.001))
                self.stats.in_use += 1
                return conn
            conn = await self._wait(key, deadline)
            if conn is not None:
                self.stats.in_use += 1
                self.stats.reused += 1
                return conn

    async def _idle_checked(self, key: LoginKey) -> BackendConnection | None:
        conns = self.idle.get(key)
        while conns:
            conn = conns.pop()
            idle_ms = (time.monotonic() - conn.last_used) * 1000
            if idle_ms <= self.settings.ping_after_idle_ms:
                return conn
            try:
                reply = await conn.exchange(Command.PING, b"", self.connect_s)
            except ConnectFailed as exc:
                self._forget(conn, f"ping failed: {exc.reason}")
                continue
            if reply.error() is None:
                return conn
            self._forget(conn, f"ping answered {reply.error()}")
        return None

    async def _wait(self, key: LoginKey, deadline: float) -> BackendConnection | None:
        future: asyncio.Future[BackendConnection | None] = (
            asyncio.get_running_loop().create_future()
        )
        waiter = _Awaiting(self, key, deadline, future)
        self.wait(waiter)
        try:
            return await future
        except asyncio.CancelledError:
            if waiter.waiting:
                self.abandon(waiter)
            elif future.done() and not future.cancelled() and future.exception() is None:
                handed = future.result()
                if handed is not None:  # the client left as a connection came: keep it
                    self.give(handed)
            raise

    def must_wait(self, key: LoginKey) -> bool:
        """Whether a checkout for ``key`` can only wait: the server is at its cap and has
        no idle connection at all (one to ping, or another login's to close, is the slow
        path's job)."""
        return (
            self.accepting
            and self.total >= self.settings.max_per_server
            and not any(self.idle.values())
        )

    def wait(self, waiter: Waiter) -> None:
        """Queue a checkout until a connection comes free, room opens, or its deadline."""
        self._waiters.setdefault(waiter.key, deque()).append(waiter)
        self.waiting += 1
        self.stats.waits += 1
        if self._timer is None or waiter.deadline < self._timer_at:
            self._expire_at(waiter.deadline)

    def abandon(self, waiter: Waiter) -> None:
        """A waiter that no longer wants a connection (its client left). It stays in its
        queue until reached: removing it from the middle would cost a scan of every waiter
        (1000 clients, 32 connections); crowded queues are compacted instead."""
        if not waiter.waiting:
            return
        waiter.waiting = False
        self.waiting -= 1
        queue = self._waiters.get(waiter.key)
        if queue is not None and len(queue) > 64 and len(queue) > 4 * self.waiting:
            live = [w for w in queue if w.waiting]
            queue.clear()
            queue.extend(live)

    def _next(self, queue: Waiters | None) -> Waiter | None:
        """The first waiter still waiting, now taken out (those that left are dropped)."""
        while queue:
            waiter = queue.popleft()
            if waiter.waiting:
                waiter.waiting = False
                self.waiting -= 1
                return waiter
        return None

    def _expire_at(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = asyncio.get_running_loop().call_later(
            max(deadline - time.monotonic(), 0), self._expire
        )

    def _expire(self) -> None:
        """Refuse the waiters whose deadline passed; one timer serves every waiter."""
        self._timer = None
        now = time.monotonic()
        due: list[Waiter] = []
        later = math.inf
        for queue in self._waiters.values():
            live = [w for w in queue if w.waiting]
            queue.clear()
            for waiter in live:
                if waiter.deadline <= now:
                    due.append(waiter)
                else:
                    queue.append(waiter)
                    later = min(later, waiter.deadline)
        if later < math.inf:
            self._expire_at(later)
        for waiter in due:
            waiter.waiting = False
            self.waiting -= 1
            self.stats.timeouts += 1
            self.counters.inc("backend_checkout_timeouts", pool=self.pool, server=str(self.address))
            waiter.expire(
                PoolTimeout(
                    f"no connection to {self.address} became free within "
                    f"{self.settings.checkout_timeout_ms} ms "
                    f"({self.settings.max_per_server} in use)"
                )
            )

    async def _open(self, key: LoginKey, timeout_s: float) -> BackendConnection:
        sha1 = self.credentials.sha1.get(key.user)
        self.total += 1
        loop = asyncio.get_running_loop()
        local = (self.source_ip, 0) if self.source_ip else None
        conn = BackendConnection(self.address, key)
        try:
            async with asyncio.timeout(min(self.connect_s, timeout_s)):
                if self.dial is None:
                    await loop.create_connection(
                        factory_for_loop(lambda: conn),
                        self.address.host,
                        self.address.port,
                        local_addr=local,
                    )
                else:
                    await self.dial(lambda: conn, local)
            await conn.login(key.user, sha1, max(timeout_s, self.connect_s), self.tls)
        except (OSError, TimeoutError, ConnectFailed, ProtocolError) as exc:
            self.total -= 1
            self.stats.failed += 1
            detail = exc.reason if isinstance(exc, ConnectFailed) else describe(exc)
            self.counters.inc("backend_connect_failures", pool=self.pool, server=str(self.address))
            self.report(self.address, detail)
            self.wake_one()
            raise ConnectFailed(str(self.address), detail) from None
        except BaseException:
            self.total -= 1
            self.wake_one()
            raise
        conn.on_lost = self._lost
        self.server_version = conn.server_version
        self.baseline.setdefault(key, conn.state.values)
        self.stats.created += 1
        self.counters.inc("backend_connections_created", pool=self.pool, server=str(self.address))
        self.report(self.address, None)
        return conn

    async def fresh(self, key: LoginKey) -> BackendConnection:
        """A newly opened connection (one that has never selected a schema)."""
        if self.total >= self.settings.max_per_server:
            conns = self.idle.get(key)
            if conns:
                self._forget(conns[0], "room for a fresh connection")
            else:
                self._close_idle_of_other_logins(key)
        if self.total >= self.settings.max_per_server:
            raise PoolTimeout(f"{self.address} has {self.total} connections, its cap")
        conn = await self._open(key, self.settings.checkout_timeout_ms / 1000)
        self.stats.in_use += 1
        return conn

    async def on_helper(
        self,
        key: LoginKey,
        timeout_s: float,
        job: Callable[[BackendConnection], Awaitable[_T]],
    ) -> _T:
        """Run ``job`` on a connection of the pool, not a session's (a KILL, say), and give
        the connection back afterwards."""
        helper = await self.acquire(key, timeout_s)
        try:
            return await job(helper)
        finally:
            self.release(helper)

    # ----------------------------------------------------------------- return

    def release(self, conn: BackendConnection) -> None:
        """A connection back from a session, in a known state."""
        self.stats.in_use -= 1
        self.give(conn)

    def give(self, conn: BackendConnection) -> None:
        if conn.closed:
            return  # _lost has accounted for it
        if not self.accepting:
            self._forget(conn, "server not taking new connections")
            return
        if not self.waiting:  # the common case: straight back to the idle list
            self._idle_again(conn)
            return
        waiter = self._next(self._waiters.get(conn.key))
        if waiter is not None:
            waiter.hand(conn)
            return
        self._idle_again(conn)
        other = next((k for k, q in self._waiters.items() if _has_live(q)), None)
        if other is not None:  # someone waits for another login: make room for it
            self._close_idle_of_other_logins(other)

    def _idle_again(self, conn: BackendConnection) -> None:
        conns = self.idle.get(conn.key)  # not setdefault: that builds a deque every call
        if conns is None:
            conns = self.idle[conn.key] = deque()
        conns.append(conn)

    def discard(self, conn: BackendConnection, reason: str) -> None:
        """A connection a session cannot hand back in a known state."""
        self.stats.in_use -= 1
        self._forget(conn, reason)

    def _forget(self, conn: BackendConnection, reason: str) -> None:
        conns = self.idle.get(conn.key)
        if conns is not None and conn in conns:
            conns.remove(conn)
        if not conn.closed:
            conn.on_lost = None
            conn.close()
            self.total -= 1
        log.debug("backend_connection_closed", server=str(self.address), reason=reason)
        self.wake_one()

    def _lost(self, conn: BackendConnection) -> None:
        conns = self.idle.get(conn.key)
        if conns is not None and conn in conns:
            conns.remove(conn)
        self.total -= 1
        self.wake_one()

    def wake_one(self) -> None:
        """Room for one more connection: a waiter of another login may open it."""
        for queue in list(self._waiters.values()):
            waiter = self._next(queue)
            if waiter is not None:
                waiter.hand(None)  # None: try again (open one, or take an idle one)
                return

    def _close_idle_of_other_logins(self, key: LoginKey) -> None:
        for other, conns in self.idle.items():
            if other != key and conns:
                self._forget(conns[0], "room for another login")
                return

    # ----------------------------------------------------------------- upkeep

    def empty(self, reason: str) -> None:
        """Close every idle connection (the server went SHUNNED or OFFLINE_HARD)."""
        for conns in list(self.idle.values()):
            for conn in list(conns):
                self._forget(conn, reason)

    def idle_count(self) -> int:
        return sum(len(conns) for conns in self.idle.values())

    async def maintain(self, now: float) -> None:
        """Recycle old and long-idle connections; open idle ones up to the wanted number
        for each login seen lately (raises nothing: failures are reported and counted)."""
        settings = self.settings
        for conns in list(self.idle.values()):
            for conn in list(conns):
                if now - conn.born > settings.max_age_s:
                    self._forget(conn, "max_age_s")
                elif now - conn.last_used > settings.max_idle_s:
                    self._forget(conn, "max_idle_s")
        if not self.accepting:
            return
        for key, seen in list(self.keys_seen.items()):
            if now - seen > settings.max_idle_s:
                del self.keys_seen[key]
                continue
            if key.user not in self.credentials.sha1:
                continue
            while (
                len(self.idle.get(key, ())) < settings.idle
                and self.total < settings.max_per_server
                and self.accepting
            ):
                try:
                    conn = await self._open(key, self.connect_s)
                except ConnectFailed:
                    return
                self.idle.setdefault(key, deque()).append(conn)

    def close(self) -> None:
        self.accepting = False
        self.empty("shutting down")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiters = [w for queue in self._waiters.values() for w in queue if w.waiting]
        self._waiters.clear()
        for waiter in waiters:
            waiter.waiting = False
            self.waiting -= 1
            waiter.hand(None)  # the server is gone: they look elsewhere


Waiters = deque[Waiter]


def _has_live(queue: Waiters) -> bool:
    return any(waiter.waiting for waiter in queue)
