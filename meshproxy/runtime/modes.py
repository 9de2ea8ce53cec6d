"""The processes a node runs as: one alone (``--no-angel``), or a control process and
workers under the angel.

- single: control plane and data plane in one process.
- control: health checks, admin API, runtime changes; pushes configs and member snapshots
  to the workers over the control channel and sums their counters.
- worker: a data plane; accepts on the node's ports, from sockets the angel binds and hands
  to every worker (one accept queue for all), and pumps bytes.

Each of them heartbeats to the angel from its event loop, so a stuck loop is noticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any

from meshproxy import config, log
from meshproxy.config import Address, Config, UpstreamRef
from meshproxy.control.node import LocalLink, Node
from meshproxy.counters import Counters
from meshproxy.dataplane.host import PlaneHost
from meshproxy.dataplane.router import Member
from meshproxy.errors import ConfigError, describe
from meshproxy.runtime import allocator, channel, handoff
from meshproxy.runtime.channel import Message, Peer
from meshproxy.supervise import Supervisor

HEARTBEAT_S = 0.25
EXIT_HANDED_OVER = 3  # the control process stopped for a new angel's
STATS_S = 1.0
CONTROL_ANSWER_S = 0.05  # a live control process accepts a worker's connect well within this


def start_heartbeat(fd: int | None) -> None:
    """Write a byte to the angel's pipe every HEARTBEAT_S, from the event loop itself."""
    if fd is None:
        return
    os.set_blocking(fd, False)
    loop = asyncio.get_running_loop()

    def beat() -> None:
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(fd, b".")
        loop.call_later(HEARTBEAT_S, beat)

    beat()


def _signals(stop: asyncio.Event, reload: Any) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload("SIGHUP")))


# --------------------------------------------------------------------- single process


async def run_single(cfg: Config) -> int:
    # Imported here: aiohttp takes a while to import, and workers never need it.
    from meshproxy.admin.server import AdminServer

    node = Node(cfg)
    host = PlaneHost(cfg, Counters(), node.connect_report)
    node.add_link(LocalLink(host))
    admin = AdminServer(node)
    await node.start()
    node.tasks.spawn("allocator trim", allocator.trim_loop)
    try:
        await host.start()
        await admin.start()
        await node.start_gossip()
    except OSError as exc:
        log.warning("bind_failed", error=describe(exc))
        await admin.stop()
        await host.stop()
        await node.stop()
        return 1
    stop = asyncio.Event()
    _signals(stop, admin.reload)
    asyncio.get_running_loop().add_signal_handler(
        signal.SIGUSR2, lambda: log.warning("upgrade_refused", reason="no angel (--no-angel)")
    )
    log.event("node_started", role=cfg.node.role, mode="single")
    await stop.wait()
    node.set_draining()
    left = await host.drain(node.config.node.drain_timeout_s)
    log.event("node_stopping", sessions_cut=left)
    await admin.stop()
    await host.stop()
    await node.stop()
    log.event("node_stopped")
    return 0


# --------------------------------------------------------------------- control process


class RemoteLink:
    """The control process's handle on one worker."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.index = -1
        self._stats: dict[str, Any] = {"sessions": 0, "entrances": {}, "active": {}}
        self._counters = Counters()
        self._digest_epoch = 0  # resets asked for: reports from before the last one are stale
        # A worker reports only once its listeners are bound (it starts reporting then).
        self.bound = False

    async def apply_config(self, new: Config) -> None:
        self.peer.send(channel.config_message(new))

    def members(self, ref: UpstreamRef, members: tuple[Member, ...]) -> None:
        self.peer.send(channel.members_message(ref, members))

    def close_sessions(self, address: Address) -> None:
        self.peer.send({"t": "close", "addr": str(address)})

    def reset_digests(self) -> None:
        self._digest_epoch += 1
        self.peer.send({"t": "reset_digests", "epoch": self._digest_epoch})
        self._stats = _without_old_digests(self._stats, self._digest_epoch)

    def stats(self) -> dict[str, Any]:
        return self._stats

    def counters(self) -> Counters:
        return self._counters

    def update(self, message: Message) -> None:
        self.bound = True
        self._stats = _without_old_digests(message["stats"], self._digest_epoch)
        self._counters = channel.counters_from_rows(message["counters"])


def _without_old_digests(stats: dict[str, Any], epoch: int) -> dict[str, Any]:
    """A worker's report, its digests dropped if counted before the last reset (a report
    may cross the reset on the channel)."""
    session_mode = stats.get("session_mode")
    if not session_mode or session_mode.get("digest_epoch", 0) >= epoch:
        return stats
    return {**stats, "session_mode": {**session_mode, "digests": []}}


async def run_control(cfg: Config, channel_path: str, heartbeat_fd: int | None) -> int:
    from meshproxy.admin.server import AdminServer

    node = Node(cfg)
    node.angel_pid = os.getppid()
    admin = AdminServer(node)
    await node.start()
    node.tasks.spawn("allocator trim", allocator.trim_loop)

    handlers: set[asyncio.Task[Any]] = set()

    async def serve_worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        task.add_done_callback(handlers.discard)
        link = RemoteLink(Peer(writer))
        link.peer.send(channel.config_message(node.config))
        node.add_link(link)

        def handle(message: Message) -> None:
            kind = message.get("t")
            if kind == "hello":
                link.index = int(message["index"])
                log.event("worker_connected", worker=link.index, pid=message.get("pid"))
            elif kind == "report":
                ref, address = UpstreamRef.parse(message["ref"]), Address.parse(message["addr"])
                node.connect_report(ref, address, message.get("err"))
            elif kind == "stats":
                link.update(message)
            elif kind == "draining":
                node.set_draining()

        try:
            await channel.read_messages(reader, handle)
        finally:
            node.remove_link(link)
            await channel.close_writer(writer)
            log.event("worker_disconnected", worker=link.index)

    try:
        server = await channel.serve(serve_worker, channel_path)
        await admin.start()
        await node.start_gossip()
    except OSError as exc:
        log.warning("bind_failed", error=describe(exc))
        await admin.stop()
        await node.stop()
        return 1
    start_heartbeat(heartbeat_fd)
    stop, handover = asyncio.Event(), asyncio.Event()
    _signals(stop, admin.reload)
    loop = asyncio.get_running_loop()

    def hand_over() -> None:
        """SIGUSR2: a new angel takes over, and its control process rejoins as us."""
        handover.set()
        stop.set()

    loop.add_signal_handler(signal.SIGUSR2, hand_over)
    log.event("node_started", role=cfg.node.role, mode="control")
    await stop.wait()
    server.close()
    # Workers still connected (they outlive us in a handover) are let go of cleanly.
    for link in list(node.links):
        if isinstance(link, RemoteLink):
            link.peer.close()
    if handlers:
        await asyncio.wait(handlers, timeout=2.0)
    await admin.stop()
    await node.stop(leave=not handover.is_set())
    log.event("node_stopped", handover="yes" if handover.is_set() else "no")
    # Not 0, which would tell the angel that the node is to stop: a SIGUSR2 the angel did
    # not send (its own handover stops this process knowingly) gets it restarted.
    return EXIT_HANDED_OVER if handover.is_set() else 0


# --------------------------------------------------------------------- worker process


class WorkerChannel:
    """A worker's connection to the control process; reconnects, never blocks the pump."""

    def __init__(self, path: str, index: int) -> None:
        self.path = path
        self.index = index
        self.peer: Peer | None = None
        self.host: PlaneHost | None = None
        self.failed: set[Address] = set()  # members whose last connect from here failed
        self.pending_config: Config | None = None
        # Snapshots that arrive before the host exists are kept for it.
        self.members: dict[UpstreamRef, tuple[Member, ...]] = {}
        self.first_config: asyncio.Future[Config] = asyncio.get_running_loop().create_future()
        self.connected = asyncio.Event()

    def report(self, ref: UpstreamRef, address: Address, error: str | None) -> None:
        # A success only matters to the control plane after a failure (it resets the
        # consecutive-failure count); sending every one would cost a message per connect.
        if error is None:
            if address not in self.failed:
                return
            self.failed.discard(address)
        else:
            self.failed.add(address)
        if self.peer is not None:
            self.peer.send({"t": "report", "ref": str(ref), "addr": str(address), "err": error})

    async def run(self) -> None:
        """Stay connected to the control process; on loss, retry every 200 ms."""
        while True:
            try:
                reader, writer = await channel.connect(self.path)
            except OSError:
                await asyncio.sleep(0.2)
                continue
            self.peer = Peer(writer)
            self.peer.send({"t": "hello", "index": self.index, "pid": os.getpid()})
            self.connected.set()
            try:
                await channel.read_messages(reader, self._handle)
            finally:
                self.peer = None
                await channel.close_writer(writer)
            await asyncio.sleep(0.2)

    async def _handle(self, message: Message) -> None:
        kind = message.get("t")
        host = self.host
        if kind == "config":
            try:
                new = config.parse(message["doc"], str(message.get("source", "control")))
            except ConfigError as exc:
                log.warning("config_rejected", error=exc)
                return
            if host is not None:
                await self.apply(new)
                return
            # The host is not built yet: it is built from this config if it comes in time,
            # and takes it right after being built otherwise (it served from the file).
            self.pending_config = new
            if not self.first_config.done():
                self.first_config.set_result(new)
        elif kind == "members":
            ref, members = channel.parse_members(message)
            self.members[ref] = members
            if host is not None:
                host.apply_members(ref, members)
        elif kind == "close" and host is not None:
            closed = host.plane.close_sessions(Address.parse(message["addr"]))
            if closed:
                log.event("sessions_closed", server=message["addr"], count=closed)
        elif kind == "reset_digests" and host is not None:
            host.plane.session_mode.reset_digests(int(message.get("epoch", 0)))

    async def apply(self, new: Config) -> None:
        assert self.host is not None
        try:
            await self.host.apply_config(new)
        except OSError as exc:
            log.warning("bind_failed", error=describe(exc))

    async def send_stats(self) -> None:
        # The first report goes out at once: it tells the control process we are bound.
        while True:
            if self.peer is not None and self.host is not None:
                counters = channel.counters_rows(self.host.counters)
                self.peer.send({"t": "stats", "stats": self.host.stats(), "counters": counters})
            await asyncio.sleep(STATS_S)


async def run_worker(
    cfg: Config, channel_path: str, index: int, heartbeat_fd: int | None, sockets_fd: int | None
) -> int:
    start_heartbeat(heartbeat_fd)
    link = WorkerChannel(channel_path, index)
    tasks = Supervisor()
    tasks.spawn("control channel", link.run)
    # Prefer the running config (it may differ from the file after admin changes) when a
    # control process answers. One that does not answer at once is starting itself (the
    # angel restarted both), and starts from the file too: serve from it without waiting.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CONTROL_ANSWER_S):
            await link.connected.wait()
    if link.connected.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                cfg = await link.first_config
    sockets = handoff.AngelSockets(sockets_fd) if sockets_fd is not None else None
    host = PlaneHost(cfg, Counters(), link.report, sockets)
    for ref, members in link.members.items():
        host.apply_members(ref, members)
    try:
        await host.start()
    except OSError as exc:
        log.warning("bind_failed", error=describe(exc))
        await tasks.stop()
        return 1
    # What arrived while the host was binding (kept by the channel) applies now.
    link.host = host
    for ref, members in link.members.items():
        host.apply_members(ref, members)
    if link.pending_config is not None and link.pending_config is not cfg:
        await link.apply(link.pending_config)
    tasks.spawn("stats", link.send_stats)
    tasks.spawn("allocator trim", allocator.trim_loop)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the control process reloads
    loop.add_signal_handler(signal.SIGUSR2, lambda: None)  # upgrades are the angel's
    log.event("worker_started", worker=index)
    await stop.wait()
    if link.peer is not None:
        link.peer.send({"t": "draining"})  # the control process tells the mesh
    left = await host.drain(host.config.node.drain_timeout_s)
    log.event("worker_stopping", worker=index, sessions_cut=left)
    await tasks.stop()
    await host.stop()
    return 0
