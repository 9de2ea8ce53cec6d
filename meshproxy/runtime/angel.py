"""The angel: a small supervisor that keeps a node's processes running.

It starts the control process and the workers, and restarts any of them that exits
non-zero, is killed, or stops heartbeating (a hung event loop, SIGSTOP). A restart is
immediate; only crashes that repeat within ``angel.fast_crash_s`` of a start back off
exponentially, and after ``angel.max_fast_crashes`` of those in a row the angel gives up,
says so and stops the node. A child that exits 0 on its own stops the angel. On SIGTERM or
SIGINT it drains: workers first (they stop accepting and let sessions finish), then the
control process. SIGHUP goes to the control process, which reloads the config file.

Each worker has a standby (``angel.standby_workers``): a process that has already started
Python and imported the data plane, and waits on a pipe. A worker that dies is replaced by
its standby, which only has to read the config and bind, in tens of milliseconds instead
of the half second (more on a busy host) a fresh interpreter needs; a new standby is then
started once the new worker heartbeats, so the two do not compete for the CPU.

The angel also holds the node's listening sockets (:mod:`meshproxy.runtime.handoff`):
it binds each once and hands every worker a duplicate, so all workers accept from one
queue and a worker's death or restart refuses no connection.

It is deliberately synchronous and tiny: no event loop of its own to get stuck.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from meshproxy import config, log
from meshproxy.config import Config
from meshproxy.errors import ConfigError
from meshproxy.runtime import handoff, systemd, upgrade
from meshproxy.runtime.channel import new_name as new_channel_name
from meshproxy.runtime.children import stop, stop_with_parent

TICK_S = 0.1
# A gap this long between two of the angel's own rounds means it was stopped or starved
# itself (SIGSTOP of the whole node): its children were too, so their silence proves nothing.
STALL_S = 1.0
CONTROL = "control"
CONTROL_REAP_S = 0.05
STANDBY_AFTER_S = 1.0
CONTROL_DEFER_S = 1.0  # at most this long a restarting control process lets workers start first
STARTUP_GRACE_S = 15.0  # first heartbeat: interpreter start-up plus imports, on a busy host
MAX_BACKOFF_S = 5.0


@dataclass
class Started:
    """A child process just started, and the angel's ends of its pipes."""

    process: subprocess.Popen[bytes]
    beats: int  # read end of its heartbeat pipe
    sockets: socket.socket | None  # where a worker asks for its listening sockets


@dataclass
class Standby:
    """A started, waiting replacement for one worker."""

    started: Started  # its pipes are watched once it takes over
    go: int  # write end of its start pipe: a byte starts it, closing it stops it


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    beats: int = -1  # read end of the heartbeat pipe
    sockets: socket.socket | None = None
    last_beat: float = 0.0
    beat_seen: bool = False
    started: float = 0.0
    fast_crashes: int = 0
    restart_at: float | None = None
    restarts: int = 0
    stopping: bool = field(default=False)
    standby: Standby | None = None
    standby_failed_at: float | None = None


class Angel:
    def __init__(
        self,
        config_path: str,
        cfg: Config,
        adopted: Iterable[socket.socket] = (),
        predecessor: upgrade.Predecessor | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.keeper = handoff.SocketKeeper(adopted)
        self.predecessor = predecessor  # the angel this one takes over from
        self.took_over = predecessor is not None
        self.successor: upgrade.Successor | None = None  # the one taking over from us
        self.notifier = systemd.Notifier()
        self.said_ready = False  # to systemd, if it listens
        self.watchdog_s = systemd.watchdog_interval_s()
        self.next_ping = 0.0
        channel = new_channel_name()
        base = [sys.executable, "-m", "meshproxy.runtime.child"]
        self.children = [
            Child(CONTROL, [*base, "_control", "-c", config_path, "--channel", channel])
        ]
        for index in range(cfg.node.worker_count()):
            argv = [
                *base,
                "_worker",
                "-c",
                config_path,
                "--channel",
                channel,
                "--index",
                str(index),
            ]
            self.children.append(Child(f"worker-{index}", argv))
        self.selector = selectors.DefaultSelector()
        self.signals: list[int] = []
        self.exit_code: int | None = None
        self._last_watch: float | None = None

    # ----------------------------------------------------------------- children

    @staticmethod
    def _start(child: Child, go: int | None = None) -> Started:
        """Start a child, with a heartbeat pipe and, for a worker, a socket channel."""
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        argv = [*child.argv, "--heartbeat-fd", str(write_end)]
        fds = [write_end]
        ours = theirs = None
        if child.name != CONTROL:
            ours, theirs = handoff.pair()
            argv += ["--sockets-fd", str(theirs.fileno())]
            fds.append(theirs.fileno())
        if go is not None:
            argv += ["--standby-fd", str(go)]
            fds.append(go)
        # Children drain when the angel dies, and live in sessions of their own so that a
        # terminal's Ctrl-C reaches only the angel, which then stops them in order.
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            argv, pass_fds=fds, preexec_fn=stop_with_parent, start_new_session=True
        )
        os.close(write_end)
        if theirs is not None:
            theirs.close()
        return Started(process, read_end, ours)

    def spawn(self, child: Child) -> None:
        standby, child.standby = child.standby, None
        if standby is not None and standby.started.process.poll() is None:
            os.write(standby.go, b"!")
            os.close(standby.go)
            started = standby.started
        else:
            if standby is not None:
                self._discard(standby)
            started = self._start(child)
        self._unwatch(child)
        child.process, child.beats, child.sockets = started.process, started.beats, started.sockets
        self._watch_fd(child.beats, lambda: self._read_beat(child))
        if child.sockets is not None:
            conn = child.sockets
            self._watch_fd(conn.fileno(), lambda: self._answer(child, conn))
        child.started = child.last_beat = time.monotonic()
        child.beat_seen = False
        child.restart_at = None
        log.event(
            "angel_started_child",
            child=child.name,
            pid=child.process.pid,
            standby="yes" if standby is not None and started is standby.started else "no",
        )

    def _watch_fd(self, fd: int, handler: Callable[[], None]) -> None:
        self.selector.register(fd, selectors.EVENT_READ, handler)

    def _unwatch(self, child: Child) -> None:
        """Stop watching a child's pipes, and close them."""
        if child.beats >= 0:
            self.selector.unregister(child.beats)
            os.close(child.beats)
            child.beats = -1
        if child.sockets is not None:
            self.selector.unregister(child.sockets.fileno())
            child.sockets.close()
            child.sockets = None

    def _keep_standby(self, child: Child, now: float) -> None:
        """Have a standby ready for a worker, when enabled and the node has settled."""
        if not self.cfg.angel.standby_workers or child.name == CONTROL:
            return
        standby = child.standby
        if standby is not None:
            if standby.started.process.poll() is None:
                return
            code = standby.started.process.returncode
            log.warning("angel_standby_died", child=child.name, status=code)
            self._discard(standby)
            child.standby = None
            if code > 0:  # it failed by itself (killed ones are simply replaced)
                child.standby_failed_at = now
        if not self._settled(now):
            return
        if (
            child.standby_failed_at is not None
            and now - child.standby_failed_at < self.cfg.angel.fast_crash_s
        ):
            return  # a standby that dies at once would otherwise be restarted every round
        go_read, go_write = os.pipe()
        started = self._start(child, go=go_read)
        os.close(go_read)
        child.standby = Standby(started, go_write)
        log.event("angel_standby_started", child=child.name, pid=started.process.pid)

    def _settled(self, now: float) -> bool:
        """Whether every child runs, heartbeats and has for STANDBY_AFTER_S: a standby
        importing while the node recovers would take the CPU from the recovery."""
        return all(
            c.process is not None and c.beat_seen and now - c.started >= STANDBY_AFTER_S
            for c in self.children
        )

    @staticmethod
    def _discard(standby: Standby) -> None:
        """Stop a standby that will not be used (closing its start pipe ends it)."""
        with contextlib.suppress(OSError):
            os.close(standby.go)
        stop(standby.started.process, 5.0)
        os.close(standby.started.beats)
        if standby.started.sockets is not None:
            standby.started.sockets.close()

    def _exited(self, child: Child, how: str, code: int | None) -> None:
        now = time.monotonic()
        child.process = None
        if child.stopping:
            return
        if code == 0:
            log.event("angel_child_exited_cleanly", child=child.name, action="stopping the node")
            self.exit_code = 0
            return
        lived = now - child.started
        child.fast_crashes = child.fast_crashes + 1 if lived < self.cfg.angel.fast_crash_s else 1
        if child.fast_crashes > self.cfg.angel.max_fast_crashes:
            log.warning(
                "angel_giving_up",
                child=child.name,
                reason=f"{child.fast_crashes} crashes in a row, each within "
                f"{self.cfg.angel.fast_crash_s:g}s of its start",
            )
            self.exit_code = 1
            return
        delay = (
            0.0
            if child.fast_crashes <= 1
            else min(0.1 * 2 ** (child.fast_crashes - 2), MAX_BACKOFF_S)
        )
        if child.name == CONTROL:
            # Workers killed with it (the whole node was) are reaped within this, and then
            # start first: see _control_waits.
            delay = max(delay, CONTROL_REAP_S)
        child.restart_at = now + delay
        child.restarts += 1
        log.warning(
            "angel_restarting",
            child=child.name,
            why=how,
            after_s=f"{delay:.2f}",
            lived_s=f"{lived:.1f}",
        )

    def _watch(self, now: float) -> None:
        if self._last_watch is not None and now - self._last_watch > STALL_S:
            log.warning("angel_stalled", gap_s=f"{now - self._last_watch:.1f}")
            for child in self.children:
                child.last_beat = max(child.last_beat, now)
        self._last_watch = now
        for child in self.children:
            process = child.process
            if process is None:
                continue
            code = process.poll()
            if code is not None:
                how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
                self._exited(child, how, code)
                continue
            limit = self.cfg.angel.watchdog_s if child.beat_seen else STARTUP_GRACE_S
            if now - child.last_beat > limit:
                log.warning(
                    "angel_watchdog", child=child.name, silent_s=f"{now - child.last_beat:.1f}"
                )
                process.kill()
                process.wait()
                self._exited(child, "no heartbeat", None)
        # Restarts in the same round as the deaths they answer; workers first, so that a
        # control process due at the same time waits for them.
        for child in sorted(self.children, key=lambda c: c.name == CONTROL):
            if child.process is None:
                due = child.restart_at is not None and now >= child.restart_at
                if due and not self._control_waits(child, now):
                    self.spawn(child)
            else:
                self._keep_standby(child, now)

    def _control_waits(self, child: Child, now: float) -> bool:
        """Whether a control process due for restart should let starting workers go first.

        When both died (the node was killed), the data plane serving again is what clients
        wait for; starting the control process's heavier imports at the same moment would
        halve the CPU the workers start with. It waits for their first heartbeat (their
        imports are done), at most CONTROL_DEFER_S.
        """
        return child.name == CONTROL and any(
            other.process is not None
            and not other.beat_seen
            and now - other.started < CONTROL_DEFER_S
            for other in self.children
            if other is not child
        )

    def _serve_fds(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            key.data()

    def _read_beat(self, child: Child) -> None:
        with contextlib.suppress(BlockingIOError):
            if os.read(child.beats, 4096):
                child.last_beat = time.monotonic()
                child.beat_seen = True
            else:
                # End of file: the child died (its pipe end closed with it). That woke us
                # at once; _watch reaps it now. Unwatched, so a restart backoff does not
                # spin on a pipe that stays readable.
                self._unwatch(child)

    def _answer(self, child: Child, conn: socket.socket) -> None:
        if not self.keeper.answer(child.name, conn) and child.sockets is conn:
            self.selector.unregister(conn.fileno())
            conn.close()
            child.sockets = None

    # ----------------------------------------------------------------- lifecycle

    def run(self) -> int:
        for handled in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
            signal.signal(handled, lambda s, _f: self.signals.append(s))
        try:
            for child in self.children:
                # Taking over, the control process waits until the old one's has stopped.
                if child.name != CONTROL or self.predecessor is None:
                    self.spawn(child)
            while self.exit_code is None:
                self._serve_fds(TICK_S)
                while self.signals:
                    signum = self.signals.pop(0)
                    if signum == signal.SIGHUP and self.predecessor is None:
                        # The control process reloads on its own time: systemd hears of it
                        # as begun and done at once.
                        self.notifier.reloading()
                        self._signal_control(signal.SIGHUP)
                        self.notifier.ready("config reloaded")
                    elif signum == signal.SIGHUP:
                        log.event("angel_reload_ignored", reason="still taking over")
                    elif signum == signal.SIGUSR2:
                        self._begin_upgrade()
                    else:
                        log.event("angel_stopping", signal=signal.Signals(signum).name)
                        self.exit_code = 0
                now = time.monotonic()
                self._watch(now)
                self._follow_upgrade(now)
                self._tell_systemd(now)
        finally:
            self.stop()
        return self.exit_code

    def _tell_systemd(self, now: float) -> None:
        """READY=1 once the node serves, and the watchdog's ping from this loop (so that a
        hung angel is restarted by systemd, as the angel restarts a hung child)."""
        control = self.children[0]
        if (
            not self.said_ready
            and self.predecessor is None
            and self._serving()
            and control.beat_seen  # its loop runs only once the admin API is up
        ):
            self.said_ready = True
            workers = len(self.children) - 1
            self.notifier.ready(f"serving: {workers} worker{'s' if workers > 1 else ''}")
            self._unclaimed()
        if self.watchdog_s is not None and now >= self.next_ping:
            self.notifier.watchdog()
            self.next_ping = now + self.watchdog_s

    def _unclaimed(self) -> None:
        """Passed-in sockets no listener took. systemd's are the unit's (kept, and said);
        an older angel's belonged to listeners this config no longer has, and would queue
        connections nobody accepts: closed."""
        for key, sock in list(self.keeper.adopted.items()):
            where = f"{key[0]}:{key[1]}"
            if self.took_over:
                del self.keeper.adopted[key]
                sock.close()
                log.event("angel_listener_closed", bind=where, reason="no listener binds there")
            else:
                log.warning(
                    "angel_socket_unclaimed",
                    bind=where,
                    reason="passed in, no listener binds there",
                )

    # ----------------------------------------------------------------- upgrade

    def _serving(self) -> bool:
        """Whether every worker runs and has taken its listening sockets (a worker says
        which it keeps once it has bound them all, even when that is none)."""
        return all(
            c.process is not None and c.beat_seen and c.name in self.keeper.wants
            for c in self.children[1:]
        )

    def _begin_upgrade(self) -> None:
        if self.successor is not None or self.predecessor is not None:
            log.warning("angel_upgrade_refused", reason="an upgrade is already under way")
            return
        if os.getpid() == 1:
            # Our exit would end the container: roll it instead.
            log.warning("angel_upgrade_refused", reason="the angel is PID 1 (a container)")
            return
        try:
            config.load(self.config_path)
            successor = upgrade.Successor(self.config_path, self.keeper.all_sockets())
        except (ConfigError, OSError) as exc:
            log.warning("angel_upgrade_refused", reason=str(exc))
            return
        self.successor = successor
        self._watch_fd(successor.link.fileno(), self._successor_said)
        log.event("angel_upgrading", new_pid=successor.process.pid)

    def _successor_said(self) -> None:
        successor = self.successor
        assert successor is not None
        said = successor.said()
        if said == upgrade.READY:
            successor.ready = True
            self.selector.unregister(successor.link.fileno())
            # systemd follows the new angel from now on: said by us, the main process, so
            # that our exit cannot be taken for the service's end.
            self.notifier.main_pid(successor.process.pid)
            # Its workers accept now. Our control process leaves without a gossip leave
            # (the node stays in the mesh), freeing the admin and gossip ports for the new
            # one; then our workers drain and we exit.
            control = [c for c in self.children[:1] if c.process is not None]
            self.notifier.watchdog()  # the wait below is bounded by less than the watchdog
            self._terminate(control, upgrade.HANDOVER_S, signal.SIGUSR2)
            successor.release()
            log.event("angel_handed_over", new_pid=successor.process.pid)
            self.exit_code = 0
        elif not said:
            status = successor.process.poll()
            self._upgrade_failed(f"the new angel exited (status {status})")

    def _upgrade_failed(self, reason: str) -> None:
        successor = self.successor
        assert successor is not None
        self.successor = None
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(successor.link.fileno())
        successor.abandon()
        log.warning("angel_upgrade_failed", reason=reason)

    def _follow_upgrade(self, now: float) -> None:
        successor = self.successor
        if successor is not None and not successor.ready:
            if successor.process.poll() is not None:
                self._upgrade_failed(f"the new angel exited (status {successor.process.poll()})")
            elif now > successor.deadline:
                self._upgrade_failed(f"the new angel was not ready within {upgrade.READY_S:g}s")
        predecessor = self.predecessor
        if predecessor is None:
            return
        if not predecessor.said_ready:
            if self._serving():
                predecessor.say_ready(self.selector, self._predecessor_said)
        elif now > predecessor.released_by:
            log.warning("angel_takeover_unreleased", after_s=f"{upgrade.RELEASE_S:g}")
            self._take_over()

    def _predecessor_said(self) -> None:
        assert self.predecessor is not None
        if self.predecessor.released():
            self._take_over()

    def _take_over(self) -> None:
        assert self.predecessor is not None
        self.predecessor.close(self.selector)
        self.predecessor = None
        self.spawn(self.children[0])
        # systemd (NotifyAccess=all) now follows this process; READY=1 comes next round.
        self.notifier.main_pid(os.getpid())
        self.watchdog_s = systemd.watchdog_interval_s()
        log.event("angel_took_over")

    def _signal_control(self, signum: int) -> None:
        control = self.children[0].process
        if control is not None and control.poll() is None:
            control.send_signal(signum)

    def stop(self) -> None:
        """Workers drain first, then the control process stops; nothing is left behind
        (but an angel we handed over to)."""
        if self.successor is not None and not self.successor.ready:
            self._upgrade_failed("this angel stops")
        if self.successor is None and self.predecessor is None:
            # In charge (not handed over, nor still taking over): the service stops.
            self.notifier.stopping("draining")
        if self.predecessor is not None:
            self.predecessor.close(self.selector)
        # Once the workers have stopped accepting, the ports close and what still waits in
        # their queues is refused, not left to time out. (After a handover the new angel's
        # copies keep them open.)
        self.keeper.close()
        workers = [c for c in self.children[1:] if c.process is not None]
        self._terminate(workers, self.cfg.node.drain_timeout_s + 5.0)
        control = [c for c in self.children[:1] if c.process is not None]
        self._terminate(control, 10.0)
        for child in self.children:
            if child.standby is not None:
                self._discard(child.standby)
                child.standby = None
            self._unwatch(child)
        log.event("angel_stopped")

    @staticmethod
    def _terminate(children: list[Child], timeout_s: float, signum: int = signal.SIGTERM) -> None:
        for child in children:
            child.stopping = True
            assert child.process is not None
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signum)
        deadline = time.monotonic() + timeout_s
        for child in children:
            assert child.process is not None
            try:
                child.process.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                log.warning("angel_killing", child=child.name, reason="did not stop in time")
                child.process.kill()
                child.process.wait()
            child.process = None
