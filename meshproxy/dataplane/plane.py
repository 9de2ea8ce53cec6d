"""The data plane of one process: entrances, routes, the connector and the open sessions.

It reads what the control plane publishes (routes, each group's members) and reports back
only through the connector's ``report`` callback; it never waits on the control plane.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Final

from meshproxy import log
from meshproxy.config import Address, UpstreamKind, UpstreamRef
from meshproxy.counters import Counters, key
from meshproxy.dataplane import tlslayer
from meshproxy.dataplane.callbacks import StreamProtocol, factory_for_loop
from meshproxy.dataplane.hop import HopHeader
from meshproxy.dataplane.listener import Entrance, Inbound
from meshproxy.dataplane.mysql import ER_PROXY_NO_UPSTREAM, error_packet
from meshproxy.dataplane.pump import Session, link
from meshproxy.dataplane.sessionmode import SessionMode
from meshproxy.dataplane.upstream import Connector, ConnectReport, UpstreamView, WarmPool
from meshproxy.errors import UpstreamError
from meshproxy.security.meshtls import HANDSHAKE_TIMEOUT_S

# Added to at every session's end: their keys made once.
_FROM_CLIENTS: Final = key("bytes_from_clients")
_FROM_UPSTREAMS: Final = key("bytes_from_upstreams")


@dataclass(frozen=True)
class Route:
    """What an entrance does with a client: which group, and which service it asks for."""

    ref: UpstreamRef
    service: str
    greeting: bool
    session: bool = False  # session mode: meshproxy is the MySQL server, pools the backends


class DataPlane:
    def __init__(
        self,
        node_name: str,
        counters: Counters,
        groups: Mapping[UpstreamRef, UpstreamView],
        warm: dict[str, WarmPool],
        report: ConnectReport,
        connect_s: float,
        budget_s: float,
        max_hops: int,
    ) -> None:
        self.node_name = node_name
        self.counters = counters
        self.max_hops = max_hops
        self.active: dict[Address, int] = {}
        self.sessions: dict[Address, set[Session]] = {}
        self.open_sessions = 0
        self.no_sessions = asyncio.Event()  # set whenever open_sessions drops to zero
        self.no_sessions.set()
        # Keyed by listener name, and "service:<name>" for what the mesh port serves.
        self.routes: dict[str, Route] = {}
        self.entrances: dict[str, Entrance] = {}
        self.session_mode = SessionMode(node_name, counters, report)
        self.connector = Connector(
            groups=groups,
            active=self.active,
            report=report,
            warm=warm,
            connect_s=connect_s,
            budget_s=budget_s,
            counters=counters,
        )

    # ----------------------------------------------------------------- entrances

    async def bind(
        self, entrance: Entrance, address: Address, sockets: list[socket.socket], backlog: int
    ) -> None:
        """Start accepting for ``entrance`` on ``sockets``, listening at ``address``."""
        loop = asyncio.get_running_loop()
        tls = entrance.tls
        servers = []
        try:
            factory: Callable[[], StreamProtocol] = functools.partial(
                Inbound, entrance, self.serve, self.counters
            )
            if tls is not None:
                factory = tlslayer.accepting(factory, tls, HANDSHAKE_TIMEOUT_S)
            for sock in sockets:
                server = await loop.create_server(
                    factory_for_loop(factory), sock=sock, backlog=backlog
                )
                servers.append(server)
        except OSError:
            for server in servers:
                server.close()
            raise
        previous, entrance.servers = entrance.servers, servers
        self.entrances[entrance.name] = entrance
        for server in previous:
            server.close()  # stop accepting there; sessions it accepted carry on
        log.event("listening", listener=entrance.name, bind=str(address))

    def unbind(self, name: str) -> None:
        """Stop accepting for ``name``; its established sessions carry on."""
        entrance = self.entrances.pop(name, None)
        if entrance is not None and entrance.servers:
            for server in entrance.servers:
                server.close()
            log.event("listener_closed", listener=name)

    # ----------------------------------------------------------------- sessions

    def serve(self, inbound: Inbound, header: HopHeader | None) -> Coroutine[Any, Any, None] | None:
        """Find the route for a new client. A session-mode route takes the client at once;
        a passthrough route returns the job that connects its upstream and starts the pump
        (the caller runs it as a task)."""
        entrance = inbound.entrance
        if header is None:
            route = self.routes.get(entrance.name)
            if route is None:
                self._refuse(inbound, f"listener {entrance.name!r} was removed")
                return None
            client, hops = inbound.peer, 0
        else:
            route = self.routes.get(f"service:{header.service}")
            if route is None:
                self._refuse(inbound, f"unknown service {header.service!r}")
                return None
            if header.hops > self.max_hops:
                self._refuse(inbound, f"hop limit exceeded ({header.hops} hops)")
                return None
            client, hops = header.client, header.hops
        if route.session:
            self._start_session(inbound, route, client, header is not None and header.pooled)
            return None
        return self._connect(inbound, route, client, hops)

    async def _connect(self, inbound: Inbound, route: Route, client: str, hops: int) -> None:
        entrance = inbound.entrance
        next_header = (
            HopHeader(route.service, client, hops + 1)
            if route.ref.kind is UpstreamKind.TIER
            else None
        )
        session = Session(functools.partial(self._closed, entrance))
        transport = inbound.transport
        assert transport is not None
        # Counted from now, not from the link: a drain (an upgrade) must wait for a client
        # whose upstream is still being connected, not end its process under it.
        self._session_opened()
        try:
            await self.connector.open(route.ref, session, transport, next_header, route.greeting)
        except UpstreamError as exc:
            self._session_ended()
            self.counters.inc("connect_failures", upstream=str(route.ref))
            log.warning("upstream_unavailable", client=client, upstream=str(route.ref), error=exc)
            if entrance.speaks_mysql:
                # Only where the client itself connected: on a mesh port, closing without a
                # byte is what tells the previous hop to try another member instead.
                message = (
                    f"meshproxy {self.node_name}: no upstream reachable for service "
                    f"{route.service!r} ({route.ref}) within {self.connector.budget_s:g} s"
                )
                transport.write(error_packet(ER_PROXY_NO_UPSTREAM, message))
            transport.close()
            return None
        except BaseException:  # cancelled (the client went away), or a bug
            self._session_ended()
            raise
        upstream = session.upstream
        assert upstream is not None
        if inbound.lost:  # the client went away while we were connecting
            self._session_ended()
            session.closed = True
            if session.spliced is not None:
                session.spliced.forget()
            if upstream.transport is not None:
                upstream.transport.close()
            return None
        inbound.linked = True
        member = session.member
        assert member is not None
        self.active[member] = self.active.get(member, 0) + 1
        self.sessions.setdefault(member, set()).add(session)
        session.idle_since = time.monotonic()
        link(session, transport, bytes(inbound.pending), inbound.eof)
        return None

    def _start_session(self, inbound: Inbound, route: Route, client: str, pooled: bool) -> None:
        """Session mode: the client logs in to us; its statements run on pooled connections."""
        transport = inbound.transport
        assert transport is not None
        inbound.linked = True  # from here on the session accounts for the entrance's slot
        self._session_opened()
        self.session_mode.accept(
            transport,
            bytes(inbound.pending),
            pool=route.ref.name,
            peer=inbound.peer,
            client=client,
            entrance=inbound.entrance.name,
            on_close=functools.partial(self._session_closed, inbound.entrance),
            pooled=pooled,
        )

    def _session_closed(self, entrance: Entrance, session: object) -> None:
        entrance.active -= 1
        self._session_ended()
        self.counters.add(entrance.closed)

    def _session_opened(self) -> None:
        self.open_sessions += 1
        self.no_sessions.clear()

    def _session_ended(self) -> None:
        self.open_sessions -= 1
        if not self.open_sessions:
            self.no_sessions.set()

    def _refuse(self, inbound: Inbound, reason: str) -> None:
        self.counters.inc("hops_refused", reason=reason.split(" (", maxsplit=1)[0])
        log.warning("hop_refused", peer=inbound.peer, reason=reason)
        if inbound.transport is not None:
            inbound.transport.abort()

    def _closed(self, entrance: Entrance, session: Session) -> None:
        entrance.active -= 1
        member = session.member
        if member is not None:
            self.active[member] -= 1
            self.sessions[member].discard(session)
            self._session_ended()
        self.count_bytes(session)
        if session.spliced is not None:
            session.spliced.forget()
        self.counters.add(entrance.closed)

    def count_bytes(self, session: Session) -> int:
        """Add what the session moved since the last call to the counters; return its total."""
        from_client, from_upstream = session.nbytes()
        swept_client, swept_upstream = session.swept_nbytes
        if from_client != swept_client:
            self.counters.add(_FROM_CLIENTS, from_client - swept_client)
        if from_upstream != swept_upstream:
            self.counters.add(_FROM_UPSTREAMS, from_upstream - swept_upstream)
        session.swept_nbytes = (from_client, from_upstream)
        return from_client + from_upstream

    def close_sessions(self, address: Address) -> int:
        sessions = list(self.sessions.get(address, ()))
        for session in sessions:
            session.close(abort=True)
        # Session mode's own sessions are not closed: their statements move elsewhere.
        moved = self.session_mode.drop_connections(address, "its middle failed")
        return len(sessions) + moved

    def sweep(self, idle_s: float, now: float) -> None:
        """Count bytes moved since the last sweep, and close sessions idle for ``idle_s``."""
        for sessions in list(self.sessions.values()):
            for session in list(sessions):
                total = self.count_bytes(session)
                if total != session.last_nbytes:
                    session.last_nbytes = total
                    session.idle_since = now
                elif now - session.idle_since >= idle_s:
                    self.counters.inc("idle_timeouts")
                    log.event("idle_timeout", server=str(session.member))
                    session.close()

    async def close(self) -> None:
        """Stop accepting everywhere and close every session."""
        servers = [server for e in self.entrances.values() for server in e.servers]
        for server in servers:
            server.close()
        for address in list(self.sessions):
            for session in list(self.sessions[address]):
                session.close()
        self.session_mode.close()
        for server in servers:
            await server.wait_closed()
        self.entrances.clear()
