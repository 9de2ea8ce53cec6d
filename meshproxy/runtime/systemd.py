"""The node's side of systemd: socket activation and sd_notify, for the angel only.

Under ``deploy/systemd/meshproxy@.service`` systemd may hand the node its client listeners
already bound (socket activation, so a restart never refuses a connection and the unit can
bind ports the node could not), and expects to hear when the node is ready, reloading or
stopping, and a watchdog ping while it is alive. The protocol is libsystemd's, through
its maintained binding ``systemd.daemon``; this module only turns it into what the angel
needs: sockets to adopt, and messages that can never crash the angel.

Only the angel notifies. ``NOTIFY_SOCKET`` stays in the environment, because the angel
needs it for its whole life and so does a new angel that takes over after a hitless
upgrade; the angel's children therefore see it too and must never send. systemd knows the
node by its main process, and a worker saying ``READY=1`` or ``STOPPING=1`` would speak
for the whole node. ``LISTEN_FDS`` and friends, on the contrary, are removed on reading:
the passed sockets belong to the angel, which hands them on itself.
"""

from __future__ import annotations

import os
import socket
import stat
import time

from meshproxy import log
from meshproxy.errors import ConfigError, describe

try:
    from systemd import daemon
except ImportError:  # the "systemd" extra: containers and other systems do without it
    daemon = None

SOURCE = "systemd socket activation"
LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def inherited_listeners() -> list[socket.socket]:
    """The listening TCP sockets systemd passed us, non-blocking; [] if none were passed.

    Any other passed descriptor (a datagram socket, a Unix socket, a socket that does not
    listen, not a socket at all) is a ConfigError naming it: the node cannot serve on it,
    and running without it would leave a port in the unit that nobody answers.
    """
    if daemon is None:
        if "LISTEN_FDS" in os.environ:
            raise ConfigError(
                SOURCE, "LISTEN_FDS", "sockets were passed: install meshproxy[systemd]"
            )
        return []
    # unset_environment: the angel's children must not believe the sockets are theirs.
    passed = daemon.listen_fds_with_names(unset_environment=True)
    # The library unsets the C environment only; os.environ is Python's copy of it, which
    # is what a child started with env= sees.
    for variable in LISTEN_ENV:
        os.environ.pop(variable, None)
    # Every descriptor is checked before any is adopted, so an error leaves nothing half done.
    for fd, name in passed.items():
        if not _listening_tcp(fd):
            raise ConfigError(
                SOURCE,
                f"fd {fd} ({name})" if name and name != "unknown" else f"fd {fd}",
                f"is {_what(fd)}, not a listening TCP socket; "
                "only ListenStream= with an IP address and port suits a listener",
            )
    sockets = [socket.socket(fileno=fd) for fd in passed]
    for sock in sockets:
        sock.setblocking(False)
        # Python's default (PEP 446): only a child the angel hands it to gets a copy.
        sock.set_inheritable(False)
    return sockets


def _listening_tcp(fd: int) -> bool:
    try:
        return bool(daemon.is_socket_inet(fd, socket.AF_UNSPEC, socket.SOCK_STREAM, 1))
    except OSError:
        return False


def _what(fd: int) -> str:
    """What a descriptor is, in words, for an error message."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        return f"not an open descriptor ({describe(exc)})"
    if not stat.S_ISSOCK(mode):
        if stat.S_ISFIFO(mode):
            return "a FIFO"
        return "a regular file" if stat.S_ISREG(mode) else "not a socket"
    # A socket object guesses family and type from the descriptor; detach leaves it open.
    probe = socket.socket(fileno=fd)
    try:
        family, kind = probe.family, probe.type
        listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 0
        where = probe.getsockname()
    finally:
        probe.detach()
    if family == socket.AF_UNIX:
        return f"a Unix socket ({kind.name}) at {where or 'no path'}"
    if family in (socket.AF_INET, socket.AF_INET6):
        at = f"[{where[0]}]:{where[1]}" if family == socket.AF_INET6 else f"{where[0]}:{where[1]}"
        if kind == socket.SOCK_DGRAM:
            return f"a UDP socket on {at}"
        if kind == socket.SOCK_STREAM and not listening:
            return f"a TCP socket on {at} that does not listen"
        return f"a {kind.name} socket on {at}"
    return f"a socket of family {getattr(family, 'name', family)} ({kind.name})"


class Notifier:
    """sd_notify for the angel; every method is a no-op without ``NOTIFY_SOCKET``.

    A failed send is logged once (until one succeeds again) and otherwise ignored: the
    node serving traffic matters more than systemd hearing about it.
    """

    def __init__(self) -> None:
        self._failing = False

    def ready(self, status: str = "") -> bool:
        """READY=1: every worker runs and has taken its sockets (also after a reload)."""
        return self._send("READY=1", status)

    def reloading(self, status: str = "") -> bool:
        """RELOADING=1, stamped as systemd 253+ wants; follow it with :meth:`ready`."""
        # Type=notify-reload (253+) matches the stamp to its own clock; 252 ignores it.
        stamp = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send(f"RELOADING=1\nMONOTONIC_USEC={stamp}", status)

    def stopping(self, status: str = "") -> bool:
        """STOPPING=1: the angel has begun to drain."""
        return self._send("STOPPING=1", status)

    def status(self, text: str) -> bool:
        """STATUS=: one line for ``systemctl status``."""
        return self._send("", text)

    def main_pid(self, pid: int) -> bool:
        """MAINPID=: a new angel taking over (hitless upgrade) names itself; then ready().

        Needs NotifyAccess=all, since the new angel is not yet the main process when it
        says so. When it names itself, it also takes over the watchdog (see
        :func:`watchdog_interval_s`).
        """
        if not os.environ.get("NOTIFY_SOCKET"):
            return False
        if pid == os.getpid() and "WATCHDOG_USEC" in os.environ:
            # systemd set WATCHDOG_PID to the old angel, which is about to go.
            os.environ["WATCHDOG_PID"] = str(pid)
        return self._send(f"MAINPID={pid}", "")

    def watchdog(self) -> bool:
        """WATCHDOG=1: the angel's own loop is alive."""
        return self._send("WATCHDOG=1", "")

    def _send(self, message: str, status: str) -> bool:
        if not os.environ.get("NOTIFY_SOCKET"):
            return False
        if status:
            # A newline would start another assignment: status text is not to say READY=1.
            line = "STATUS=" + " ".join(status.splitlines())
            message = f"{message}\n{line}" if message else line
        try:
            sent = _notify(message)
        except OSError as exc:
            if not self._failing:
                log.warning(
                    "systemd_notify_failed",
                    message=message.split("\n", 1)[0],
                    socket=os.environ.get("NOTIFY_SOCKET", ""),
                    reason=describe(exc),
                )
            self._failing = True
            return False
        self._failing = False
        return sent


def _notify(message: str) -> bool:
    if daemon is None:
        raise OSError(0, "meshproxy[systemd] (systemd-python) is not installed")
    return bool(daemon.notify(message))


def watchdog_interval_s() -> float | None:
    """How often to send WATCHDOG=1: half of WATCHDOG_USEC, if the watchdog is ours.

    systemd's rule (sd_watchdog_enabled): WATCHDOG_USEC is set and positive, and
    WATCHDOG_PID is unset or this process. Children inherit both and so get None.
    """
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    owner = os.environ.get("WATCHDOG_PID", "")
    if usec <= 0 or (owner and owner != str(os.getpid())):
        return None
    return usec / 2 / 1_000_000
