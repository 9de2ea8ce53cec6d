"""Session mode of one process: logins, backend pools, and the client sessions open.

The data plane hands a client to ``accept`` when its entrance's route is in session mode;
everything a ``ClientSession`` needs from its surroundings (accounts, pools, the server to
use, counters) it asks this object for. It learns configs and server states from the data
plane host, like the rest of the data plane.
"""

from __future__ import annotations

import asyncio
import os
import random
import ssl
import time
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from meshproxy import log
from meshproxy.config import (
    Address,
    Config,
    ConnectionsConfig,
    ListenerConfig,
    ReplicationConfig,
    ServiceConfig,
    UpstreamKind,
    UpstreamRef,
)
from meshproxy.counters import Counters
from meshproxy.dataplane import upstream
from meshproxy.dataplane.backend import BackendConnection, LoginKey
from meshproxy.dataplane.backendpool import Credentials, Dial, Report, ServerPool
from meshproxy.dataplane.continuity import KEEP_PER_PROCESS, AnswerBudget
from meshproxy.dataplane.hop import HopHeader
from meshproxy.dataplane.mirror import mirror
from meshproxy.dataplane.moving import Mover
from meshproxy.dataplane.router import Member, Role, choose
from meshproxy.dataplane.routing import Plan
from meshproxy.dataplane.session import ClientSession
from meshproxy.dataplane.upstream import ConnectReport
from meshproxy.health.state import ServerState
from meshproxy.mysql import auth
from meshproxy.mysql.constants import Command
from meshproxy.mysql.digest import digest
from meshproxy.mysql.login import SERVER_VERSION, Account, ServerLogin
from meshproxy.mysql.response import Response
from meshproxy.mysql.state import Values
from meshproxy.mysql.statements import Effects
from meshproxy.routing.digests import DigestStats
from meshproxy.routing.querycache import QueryCache
from meshproxy.routing.rules import RuleSet
from meshproxy.security.meshtls import MeshTls

UNKNOWN_USER: Final = "(unknown)"  # the counter label of a login refused for a name we do not have

_INTERNED_MAX: Final = 4096
_BACKGROUND_MAX: Final = 256  # mirrors and statement kills in flight; more are dropped, counted
ER_TOO_MANY_USER_CONNECTIONS: Final = 1203

K = TypeVar("K")
V = TypeVar("V")


def _one_of(table: dict[K, V], key: K, value: V) -> V:
    """The value ``table`` keeps for ``key``, or ``value``, kept from now on while the
    table has room (bounded: a client cannot grow it without end)."""
    found = table.get(key)
    if found is not None:
        return found
    if len(table) < _INTERNED_MAX:
        table[key] = value
    return value


def counts_digests(config: Config) -> bool:
    """Whether this node keeps digest statistics: ``[digests] enabled``, or when unset,
    whether any of its session-mode entrances runs statements on servers. An edge whose
    statements all go to middles leaves the counting to them: each statement is counted
    once, where it runs, and the edge saves the work on every statement."""
    enabled = config.digests.enabled
    if enabled is not None:
        return enabled
    entrances: tuple[ListenerConfig | ServiceConfig, ...] = (*config.listener, *config.service)
    return any(e.mode == "session" and e.upstream.kind != UpstreamKind.TIER for e in entrances)


@dataclass(frozen=True)
class User:
    account: Account
    pool: str
    default_schema: str
    max_connections: int
    backend_user: str
    backend_sha1: bytes | None  # None: learned from the first native login


class SessionMode:
    def __init__(self, node_name: str, counters: Counters, report: ConnectReport) -> None:
        self.node_name = node_name
        self.counters = counters
        self._report = report
        self.users: dict[str, User] = {}
        self.credentials = Credentials()
        self.pools: dict[str, dict[Address, ServerPool]] = {}
        self.settings: dict[str, ConnectionsConfig] = {}
        self.members: dict[str, tuple[Member, ...]] = {}
        self.sessions: dict[int, ClientSession] = {}
        self.per_user: dict[str, int] = {}
        self.statements = 0
        self.exchange_timeout_s = 5.0
        self.connect_s = 1.0
        self._tls: dict[str, ssl.SSLContext] = {}
        self._rsa: auth.RsaKey | None = None
        self._sha2_cached: set[str] = set()
        self._interned: dict[tuple[tuple[str, bytes | None], ...], Values] = {}
        # What the journals of open transactions keep of their answers (edges on tiers).
        self.answer_budget = AnswerBudget(KEEP_PER_PROCESS)
        self._keys: dict[LoginKey, LoginKey] = {}
        self._texts: dict[bytes, bytes] = {}
        self._prefix = (os.getpid() & 0x7F) << 24
        self._next_id = 1
        self._rng = random.Random()
        self.rules = RuleSet()
        self.rules_version = 0  # sessions re-read their rules when it moves
        self.replication: dict[str, ReplicationConfig] = {}  # the pools split by statement
        self.cache = QueryCache(64 << 20, 1 << 20)
        self.digests: DigestStats | None = DigestStats()
        self._background: set[asyncio.Task[Any]] = set()
        self._member_changes: dict[str, asyncio.Event] = {}
        self.digest_epoch = 0
        # An edge that owns its sessions: the tiers its session entrances use, with the
        # service their hops ask the middles for. Sessions on them move between middles.
        self.tiers: dict[str, str] = {}
        self._tier_source_ip: dict[str, str] = {}
        self.mesh_tls: MeshTls | None = None  # the node's, set by the data plane host
        # Where sessions move when their connection fails: tiers, interchangeable pools.
        self.movable: set[str] = set()

    # ----------------------------------------------------------------- config

    def configure(self, config: Config) -> None:
        """Take the users, pools and timeouts of ``config``; open sessions carry on."""
        self.connect_s = config.timeouts.connect_ms / 1000
        users = {}
        for user in config.user:
            if user.password_env and not user.secret():
                # Unset since the config was checked: refuse the login rather than take an
                # empty password.
                log.warning("login_disabled", user=user.name, reason=f"{user.password_env} unset")
                continue
            secret = auth.Secret.parse(user.secret())
            backend_user = user.backend_user or user.name
            backend_password = user.backend_secret()
            sha1 = None
            if backend_password:
                sha1 = auth.sha1_of(backend_password)
            elif not user.backend_user and secret.clear is not None:
                sha1 = auth.sha1_of(secret.clear)
            account = Account(user.name, secret, user.require_tls, user.auth_plugin)
            users[user.name] = User(
                account, user.pool, user.default_schema, user.max_connections, backend_user, sha1
            )
            if sha1 is not None:
                self.credentials.sha1[backend_user] = sha1
        self.users = users
        wanted = {pool.name: pool for pool in config.pool}
        self.tiers = _session_tiers(config)
        for name in set(self.pools) - set(wanted) - set(self.tiers):
            for server in self.pools.pop(name).values():
                server.close()
        for tier in config.tier:
            if tier.name in self.tiers:
                self.pools.setdefault(tier.name, {})  # members come with the tier's view
                self.settings[tier.name] = tier.connections
                self._tier_source_ip[tier.name] = tier.source_ip
                for server in self.pools[tier.name].values():
                    server.settings = tier.connections
                    server.connect_s = self.connect_s
                    server.source_ip = tier.source_ip
        for name, pool in wanted.items():
            servers = self.pools.setdefault(name, {})
            self.settings[name] = pool.connections
            tls = _backend_context(pool.connections)
            addresses = {s.address for s in pool.servers}
            for address in set(servers) - addresses:
                servers.pop(address).close()
            for address in addresses:
                found = servers.get(address)
                if found is None:
                    found = servers[address] = ServerPool(
                        name,
                        address,
                        pool.connections,
                        self.credentials,
                        self.counters,
                        self._report_for(UpstreamRef(UpstreamKind.POOL, name)),
                        self.connect_s,
                        pool.source_ip,
                    )
                found.settings = pool.connections
                found.connect_s = self.connect_s
                found.source_ip = pool.source_ip
                found.tls = tls
        self.replication = {p.name: p.replication for p in config.pool if p.replication.enabled}
        self.movable = {p.name for p in config.pool if p.interchangeable} | set(self.tiers)
        if self.rules.configs != config.query_rule:
            self.rules = RuleSet(config.query_rule)
            self.rules_version += 1
            self.cache.clear()  # a changed rule may no longer cache what it did
        cache = config.query_cache
        self.cache.resize(cache.max_mib << 20, cache.max_entry_kib << 10)
        digests = config.digests
        if not counts_digests(config):
            self.digests = None
        elif self.digests is None or self.digests.max_tracked != digests.max_tracked:
            self.digests = DigestStats(digests.top_n, digests.max_tracked)
        else:
            self.digests.top_n = digests.top_n
        self._tls = {}
        for listener in config.listener:
            if listener.tls_cert:
                self._tls[listener.name] = _server_context(listener)
        if self._rsa is None and any(u.account.secret.clear for u in users.values()):
            self._rsa = auth.RsaKey()

    def _report_for(self, ref: UpstreamRef) -> Report:
        def report(address: Address, error: str | None) -> None:
            self._report(ref, address, error)

        return report

    def set_members(self, ref: UpstreamRef, members: tuple[Member, ...]) -> None:
        """Server states from the control plane: only ONLINE servers take checkouts. A
        tier's middles come and go with gossip: one that is gone (dead, a hung one declared
        dead, left) has its connections dropped, in use or not, and the sessions on them
        move (``drop_connections`` does the same for a failed one that stays a member)."""
        pool = ref.name
        tier = ref.kind is UpstreamKind.TIER
        if tier != (pool in self.tiers) or pool not in self.pools:
            return  # not a group of session mode
        if tier:
            self._track_members(ref, members)
        self.members[pool] = members
        servers = self.pools.get(pool, {})
        for member in members:
            server = servers.get(member.address)
            if server is None:
                continue
            server.accepting = member.state is ServerState.ONLINE
            server.role = member.role
            if member.state in (ServerState.SHUNNED, ServerState.OFFLINE_HARD):
                server.empty(f"server {member.state}")
        changed = self._member_changes.pop(pool, None)
        if changed is not None:
            changed.set()

    def _track_members(self, ref: UpstreamRef, members: tuple[Member, ...]) -> None:
        servers = self.pools[ref.name]
        addresses = {m.address for m in members}
        for address in set(servers) - addresses:
            server = servers.pop(address)
            server.close()
            self._drop_in_use(server, f"middle {address} is no longer a member")
        for address in addresses - set(servers):
            server = servers[address] = ServerPool(
                ref.name,
                address,
                self.settings[ref.name],
                self.credentials,
                self.counters,
                self._report_for(ref),
                self.connect_s,
                self._tier_source_ip.get(ref.name, ""),
            )
            server.dial = self._dialer(ref.name, address)

    def _dialer(self, tier: str, address: Address) -> Dial:
        """How a session pool reaches one middle: a mesh hop (mutual TLS when the mesh has
        it) whose header asks for the service of the edge's session entrance."""

        async def dial(
            factory: Callable[[], BackendConnection], local: tuple[str, int] | None
        ) -> asyncio.Transport:
            header = HopHeader(self.tiers[tier], self.node_name, 1, pooled=True).encode()
            transport = await upstream.dial(factory, address, self.mesh_tls, local)
            transport.write(header)
            return transport

        return dial

    def drop_connections(self, address: Address, reason: str) -> int:
        """Drop every connection to the middle at ``address`` (the control plane saw it
        fail: nothing on its side will answer); returns how many sessions were moving."""
        moved = 0
        for tier in self.tiers:
            server = self.pools.get(tier, {}).get(address)
            if server is not None:
                server.empty(reason)
                moved += self._drop_in_use(server, reason)
        return moved

    def _drop_in_use(self, server: ServerPool, reason: str) -> int:
        dropped = 0
        for session in list(self.sessions.values()):
            conn = session.conn
            if conn is not None and session.server is server:
                conn.abort(reason)
                dropped += 1
        return dropped

    async def members_change(self, pool: str, timeout_s: float) -> bool:
        """Wait for the next server states of ``pool`` (a writer promoted, a server back);
        False if none came within ``timeout_s``."""
        changed = self._member_changes.setdefault(pool, asyncio.Event())
        try:
            async with asyncio.timeout(timeout_s):
                await changed.wait()
        except TimeoutError:
            return False
        return True

    # ----------------------------------------------------------------- sessions

    def accept(
        self,
        transport: Any,
        pending: bytes,
        pool: str,
        peer: str,
        client: str,
        entrance: str,
        on_close: Callable[[ClientSession], None],
        pooled: bool = False,
    ) -> ClientSession:
        session = ClientSession(self, pool, peer, client, entrance, on_close)
        session.pooled = pooled
        session.start(transport, pending)
        return session

    def new_connection_id(self, session: ClientSession) -> int:
        connection_id = self._prefix | self._next_id
        self._next_id = self._next_id % 0xFFFFFF + 1
        self.sessions[connection_id] = session
        return connection_id

    def session_by_id(self, connection_id: int) -> ClientSession | None:
        return self.sessions.get(connection_id)

    def new_login(self, session: ClientSession) -> ServerLogin:
        host = session.client.rpartition(":")[0] or session.client
        return ServerLogin(
            session.connection_id,
            self._account,
            self._rsa,
            self._sha2_cached,
            tls_offered=self.tls_context(session.entrance) is not None,
            peer_host=host,
            server_version=self._server_version(session.pool_name),
        )

    def _server_version(self, pool: str) -> str:
        """The version the pool's servers greet with (clients choose defaults by it)."""
        for server in self.pools.get(pool, {}).values():
            if server.server_version:
                return f"{server.server_version}-meshproxy"
        return SERVER_VERSION

    def _account(self, name: str) -> Account | None:
        user = self.users.get(name)
        return user.account if user is not None else None

    def tls_context(self, entrance: str) -> ssl.SSLContext | None:
        return self._tls.get(entrance)

    def backend_user_of(self, name: str, sha1_password: bytes | None) -> str:
        """The server login of a user (learning its password hash from a native login)."""
        user = self.users[name]
        if (
            user.backend_sha1 is None
            and sha1_password is not None
            and not user.account.secret.clear
        ):
            self.credentials.sha1.setdefault(user.backend_user, sha1_password)
        return user.backend_user

    def default_schema(self, name: str) -> str:
        return self.users[name].default_schema

    def max_packet(self, pool: str) -> int:
        settings = self.settings.get(pool) or ConnectionsConfig()
        return settings.max_packet_mib * 1024 * 1024

    def login_accepted(self, session: ClientSession) -> None:
        user = self.users[session.user]
        if user.pool:
            session.pool_name = user.pool
        if session.pool_name in self.movable and session.mover is None:
            session.mover = Mover(session)  # it may move to another middle or server
        count = self.per_user.get(session.user, 0)
        if count >= user.max_connections:
            self.counters.inc("logins_refused", user=session.user, reason="max_connections")
            message = (
                f"User {session.user} already has more than 'max_user_connections' active"
                " connections"
            )
            session._fail(ER_TOO_MANY_USER_CONNECTIONS, message, 2, "42000")
            return
        self.per_user[session.user] = count + 1
        session.counted = True
        self.counters.inc("logins", user=session.user)

    def login_refused(self, session: ClientSession, login: ServerLogin, reason: str) -> None:
        # Counted under the name only when it is a login of ours: names a client makes up
        # would grow the counters (and /metrics) without bound. The log line has the name.
        user = login.user_name if login.user_name in self.users else UNKNOWN_USER
        self.counters.inc("logins_refused", user=user, reason=reason)
        log.warning("login_refused", client=session.client, user=login.user_name, reason=reason)

    def session_closed(self, session: ClientSession) -> None:
        self.sessions.pop(session.connection_id, None)
        if session.counted:
            self.per_user[session.user] -= 1
        if session.statement_count:
            self.counters.inc("statements", session.statement_count, user=session.user)
            micros = int(session.statement_time_s * 1e6)
            self.counters.inc("statement_time_us", micros, user=session.user)

    def choose_server(
        self, pool: str, exclude: Collection[Address] = (), side: str = Role.ANY
    ) -> ServerPool | None:
        """A server of ``pool`` for a new checkout; of a replication pool, one of ``side``
        (readers fall back to the writer as ``writer_reads`` says; a server no check has
        seen yet may serve either: its own read_only error protects a write)."""
        servers = self.pools.get(pool, {})
        members = self.members.get(pool, ())
        active = {address: server.stats.in_use for address, server in servers.items()}
        eligible = tuple(
            m for m in members if m.address in servers and servers[m.address].accepting
        )
        replication = self.replication.get(pool)
        if replication is not None and side:
            eligible = _of_side(eligible, side, replication.writer_reads, exclude)
        member = choose(eligible, active, exclude, self._rng)
        return servers.get(member.address) if member is not None else None

    # ----------------------------------------------------------------- routing's work

    def record_digest(
        self, session: ClientSession, plan: Plan, elapsed_s: float, response: Response | None
    ) -> None:
        """A statement's digest statistics (``response`` None: answered from the cache)."""
        digests = self.digests
        if digests is None or not plan.digest_text:
            return
        text = plan.digest_text
        error = response is not None and response.error is not None
        rows = response.rows if response is not None else 0
        digest_id = plan.digest_id or digest(text)
        digests.record(
            digest_id, text, session.user, session.schema, elapsed_s, rows, error, time.time()
        )

    def reset_digests(self, epoch: int = 0) -> None:
        """Start the digest statistics over (``epoch``: the control plane's reset count)."""
        self.digest_epoch = epoch
        if self.digests is not None:
            self.digests.reset()

    def mirror(self, session: ClientSession, plan: Plan) -> None:
        """Run a statement on its rule's mirror pool too, in the background."""
        pool = plan.decision.mirror
        server = self.choose_server(pool)
        if (
            server is None
            or session.key is None
            or not plan.effects.inert
            or plan.effects.multi
            or plan.payload[0] != Command.QUERY
        ):
            self.counters.inc("mirrors", pool=pool, outcome="skipped")
            return
        job = mirror(server, session.key, session.schema, session.values, plan.payload, 10.0)
        self.spawn(f"mirror to {pool}", job, lambda outcome: ("mirrors", pool, outcome))

    def spawn(
        self,
        what: str,
        job: Coroutine[Any, Any, Any],
        count: Callable[[Any], tuple[str, str, str]] | None = None,
    ) -> None:
        """Run a job no client waits for, bounded in number; a failure is logged."""
        if len(self._background) >= _BACKGROUND_MAX:
            job.close()
            self.counters.inc("background_dropped", job=what)
            return
        task = asyncio.get_running_loop().create_task(job)
        self._background.add(task)

        def finished(task: asyncio.Task[Any]) -> None:
            self._background.discard(task)
            if task.cancelled():
                return
            exc = task.exception()
            if exc is not None:
                self.counters.inc("background_failures", job=what)
                log.warning("background_failed", job=what, error=repr(exc))
            elif count is not None:
                name, pool, outcome = count(task.result())
                self.counters.inc(name, pool=pool, outcome=outcome)

        task.add_done_callback(finished)

    def intern(self, values: Values) -> Values:
        """One dict per distinct state, so that most checks are identity checks."""
        return _one_of(self._interned, tuple(values.items()), values)

    def statement_text(self, sql: bytes) -> bytes:
        """One object per prepared statement text, whichever session prepared it: the
        connections' prepared statements are then found by identity at every execute."""
        return _one_of(self._texts, sql, sql)

    def login_key(self, key: LoginKey) -> LoginKey:
        """One object per distinct login key: the pools' dict lookups, at every checkout
        and return, then find their key by identity instead of comparing it field by field."""
        return _one_of(self._keys, key, key)

    def count_pins(self, effects: Effects) -> None:
        for reason in effects.pins:
            self.counters.inc("session_pins", reason=reason)
        if effects.lock:
            self.counters.inc("session_pins", reason="lock tables")

    # ----------------------------------------------------------------- upkeep

    async def maintain(self) -> None:
        """Recycle and refill every server's idle connections (failures are reported)."""
        now = time.monotonic()
        for servers in list(self.pools.values()):
            for server in list(servers.values()):
                await server.maintain(now)

    def sweep(self, idle_s: float, now: float) -> None:
        """Close client sessions that ran no statement for ``idle_s`` (timeouts.idle_s,
        as a server's wait_timeout would); a statement in flight is never idle."""
        for session in list(self.sessions.values()):
            if session.flight is None and now - session.last_active() >= idle_s:
                self.counters.inc("idle_timeouts")
                session.close("idle timeout")

    def close(self) -> None:
        for task in self._background:
            task.cancel()
        for session in list(self.sessions.values()):
            session.close("shutting down")
        for servers in self.pools.values():
            for server in servers.values():
                server.close()

    def stats(self) -> dict[str, Any]:
        pools: dict[str, Any] = {}
        for name, servers in self.pools.items():
            pools[name] = {
                str(address): {
                    "in_use": server.stats.in_use,
                    "idle": server.idle_count(),
                    "open": server.total,
                    "created": server.stats.created,
                    "failed": server.stats.failed,
                    "reused": server.stats.reused,
                    "waits": server.stats.waits,
                    "waiting": server.waiting,
                    "timeouts": server.stats.timeouts,
                }
                for address, server in servers.items()
            }
        cache = self.cache.stats
        return {
            "client_sessions": len(self.sessions),
            "statements": self.statements,
            "users": dict(self.per_user),
            "pools": pools,
            "query_cache": {
                "entries": len(self.cache),
                "bytes": self.cache.bytes,
                "hits": cache.hits,
                "misses": cache.misses,
                "stores": cache.stores,
                "evictions": cache.evictions,
                "expirations": cache.expirations,
                "too_large": cache.too_large,
            },
            # A data plane's busiest digests (the rest folded into "other", so that sums
            # stay exact): the control plane merges every data plane's.
            "digests": self.digests.top(2 * self.digests.top_n) if self.digests else [],
            "digest_epoch": self.digest_epoch,
        }


def _session_tiers(config: Config) -> dict[str, str]:
    """The tiers that session-mode entrances send to, with the service their hops name."""
    entrances: list[ListenerConfig | ServiceConfig] = [*config.listener, *config.service]
    return {
        e.upstream.name: e.service if isinstance(e, ListenerConfig) else e.name
        for e in entrances
        if e.mode == "session" and e.upstream.kind is UpstreamKind.TIER
    }


def _of_side(
    members: tuple[Member, ...], side: str, writer_reads: str, exclude: Collection[Address]
) -> tuple[Member, ...]:
    """The members a statement for ``side`` may use, best kind first."""
    usable = [
        m
        for m in members
        if m.state is ServerState.ONLINE and m.address not in exclude and m.weight > 0
    ]
    writers = tuple(m for m in usable if m.role == Role.WRITER)
    readers = tuple(m for m in usable if m.role == Role.READER)
    unknown = tuple(m for m in usable if m.role == Role.ANY)
    if side == Role.WRITER:
        return writers or unknown
    if writer_reads == "always":
        return readers + writers or unknown
    if writer_reads == "fallback":
        return readers or writers or unknown
    return readers or unknown


def _backend_context(connections: ConnectionsConfig) -> ssl.SSLContext | None:
    """TLS to a pool's servers, as ``connections.tls`` asks (None: plain TCP)."""
    if connections.tls == "off":
        return None
    context = ssl.create_default_context(cafile=connections.tls_ca or None)
    if connections.tls == "on":  # encrypted, but whoever answers is taken at its word
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _server_context(listener: ListenerConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(listener.tls_cert, listener.tls_key)
    return context


async def maintain_forever(mode: SessionMode, interval_s: float = 1.0) -> None:
    while True:
        await mode.maintain()
        await asyncio.sleep(interval_s)
