"""Hitless upgrade: a new angel, running the code installed now, takes over from the old.

SIGUSR2 to the angel (``meshproxy ctl upgrade`` sends it through the admin API) starts a
new angel with the same config file and a socket pair to it, over which the old one sends
every listening socket it holds (SCM_RIGHTS). Then, in order:

1. the new angel starts its workers; they accept from those sockets beside the old
   workers, so the queue is never without an acceptor;
2. once every new worker has taken its sockets, the new angel says ``ready``;
3. the old angel stops its control process without a gossip leave (the node does not
   leave the mesh; the new control process rejoins under the same name) and says
   ``released``: the admin and gossip ports are free;
4. the new angel starts its control process; the old angel drains its workers (their
   sessions finish, up to ``node.drain_timeout_s``) and exits.

If the new angel exits or is not ready within READY_S, the old one stops it, logs
``angel_upgrade_failed`` and carries on as before: a release that does not start costs
nothing. Runtime changes not saved (``meshproxy ctl save``) are gone after an upgrade, as
after any restart of the control process.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Callable

READY_S = 30.0  # the new workers: an interpreter each, imports, sockets
HANDOVER_S = 5.0  # the old control process's stop, without a drain (under a second)
RELEASE_S = HANDOVER_S + 5.0  # the new angel's wait for it, with a margin
SOCKETS = b"sockets"
READY = b"ready"
RELEASED = b"released"
MAX_FDS = 253  # SCM_MAX_FD


class Successor:
    """The old angel's handle on the angel taking over from it."""

    def __init__(self, config_path: str, sockets: list[socket.socket]) -> None:
        fds = [s.fileno() for s in sockets]
        if len(fds) > MAX_FDS:
            raise OSError(f"{len(fds)} listening sockets: more than one message carries")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-m", "meshproxy", "run", "-c", config_path]
        argv += ["--takeover-fd", str(theirs.fileno())]
        # Not in a session of its own and without a parent-death signal: it outlives us,
        # in our process group, so a terminal's Ctrl-C still reaches whichever angel runs.
        self.process = subprocess.Popen(argv, pass_fds=[theirs.fileno()])  # noqa: S603
        theirs.close()
        self.link = ours
        self.deadline = time.monotonic() + READY_S
        self.ready = False
        try:
            socket.send_fds(ours, [SOCKETS], fds)
        except OSError:
            self.abandon()
            raise
        ours.setblocking(False)

    def said(self) -> bytes:
        """What it sent (b"" once its end is closed, when it has exited)."""
        try:
            return self.link.recv(64)
        except BlockingIOError:
            return b"-"
        except OSError:
            return b""

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self.link.send(RELEASED)
        self.link.close()

    def abandon(self) -> None:
        """Stop it at once: the upgrade failed, or this node stops before it was ready. (Its
        workers, told by their parent's death, drain on their own.)"""
        self.link.close()
        self.process.kill()
        self.process.wait()


class Predecessor:
    """The new angel's handle on the angel it takes over from."""

    def __init__(self, fd: int) -> None:
        self.link = socket.socket(fileno=fd)
        self.said_ready = False
        self.released_by = 0.0

    def take_sockets(self) -> list[socket.socket]:
        self.link.settimeout(RELEASE_S)
        message, fds, _, _ = socket.recv_fds(self.link, 64, MAX_FDS)
        if message != SOCKETS:
            for fd in fds:
                os.close(fd)
            raise OSError(f"the old angel sent {message!r}, not its sockets")
        self.link.setblocking(False)
        return [socket.socket(fileno=fd) for fd in fds]

    def say_ready(self, selector: selectors.BaseSelector, on_release: Callable[[], None]) -> None:
        with contextlib.suppress(OSError):
            self.link.send(READY)
        self.said_ready = True
        self.released_by = time.monotonic() + RELEASE_S
        selector.register(self.link, selectors.EVENT_READ, on_release)

    def released(self) -> bool:
        """Whether the old angel has let go of its control process's ports (or is gone)."""
        try:
            return self.link.recv(64) in (RELEASED, b"")
        except BlockingIOError:
            return False
        except OSError:
            return True

    def close(self, selector: selectors.BaseSelector) -> None:
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(self.link)
        self.link.close()
