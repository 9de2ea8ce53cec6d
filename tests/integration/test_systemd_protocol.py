"""meshproxy.runtime.systemd against the real protocol: a notify socket, systemd-socket-activate."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshproxy.runtime import systemd
from tests.integration.harness import HOST, free_port

pytestmark = pytest.mark.integration

WAIT_S = 20.0
ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(
    ACTIVATE is None, reason="systemd-socket-activate is not installed (Debian package systemd)"
)

# Run under systemd-socket-activate: adopt the passed sockets, show what they are, and take
# the connection that made systemd-socket-activate start us.
ADOPT = """\
import os, select
from meshproxy.errors import ConfigError
from meshproxy.runtime.systemd import inherited_listeners
try:
    listeners = inherited_listeners()
except ConfigError as exc:
    print("error", exc)
    raise SystemExit(0)
for sock in listeners:
    host, port = sock.getsockname()[:2]
    print("listener", host, port, sock.getblocking(), sock.get_inheritable())
print("env", sorted(k for k in os.environ if k.startswith("LISTEN_")))
ready, _, _ = select.select(listeners, [], [], 10)
for sock in ready:
    conn, _ = sock.accept()
    conn.sendall(b"adopted")
    conn.close()
"""


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, named by NOTIFY_SOCKET."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "notify"
    assert len(str(path)) < 100  # sun_path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(WAIT_S)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def _received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_with_status(notify_socket: socket.socket) -> None:
    """ready() sends READY=1 and STATUS= in one datagram, the status folded onto one line."""
    assert systemd.Notifier().ready("4 workers\nserving")
    assert _received(notify_socket) == ["READY=1", "STATUS=4 workers serving"]


def test_watchdog_stopping_status(notify_socket: socket.socket) -> None:
    """watchdog(), stopping() and status() each send their one assignment."""
    notifier = systemd.Notifier()
    assert notifier.watchdog()
    assert notifier.stopping()
    assert notifier.status("draining 12 sessions")
    assert _received(notify_socket) == ["WATCHDOG=1"]
    assert _received(notify_socket) == ["STOPPING=1"]
    assert _received(notify_socket) == ["STATUS=draining 12 sessions"]


def test_reloading_stamped(notify_socket: socket.socket) -> None:
    """reloading() sends RELOADING=1 with MONOTONIC_USEC from CLOCK_MONOTONIC."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.Notifier().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, stamp = _received(notify_socket)
    assert reloading == "RELOADING=1"
    name, _, usec = stamp.partition("=")
    assert name == "MONOTONIC_USEC"
    assert before <= int(usec) <= after


def test_main_pid_takes_the_watchdog(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new angel naming itself MAINPID= then READY=1 also becomes the watchdog's owner."""
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")  # the old angel, as systemd started it
    assert systemd.watchdog_interval_s() is None
    notifier = systemd.Notifier()
    assert notifier.main_pid(os.getpid())
    assert notifier.ready()
    assert _received(notify_socket) == [f"MAINPID={os.getpid()}"]
    assert _received(notify_socket) == ["READY=1"]
    assert systemd.watchdog_interval_s() == 5.0


def test_abstract_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """An abstract NOTIFY_SOCKET (@name), as systemd may hand out, works too."""
    name = f"meshproxy-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(WAIT_S)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.Notifier().watchdog()
        assert _received(sock) == ["WATCHDOG=1"]


def _activate(args: list[str], trigger: Callable[[], None], again: bool = False) -> str:
    """ADOPT's output under systemd-socket-activate ``args``, woken by trigger().

    systemd-socket-activate execs us on the first sign of a client. A connect fails until
    it listens, so a failed one is retried; a datagram is lost silently then, so with
    ``again`` trigger() is repeated until ADOPT has run.
    """
    assert ACTIVATE is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    argv = [ACTIVATE, *args, sys.executable, "-c", ADOPT]
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        try:
            deadline = time.monotonic() + WAIT_S
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    trigger()
                    if not again:
                        break
                except OSError:
                    pass
                time.sleep(0.05)
            out, err = process.communicate(timeout=WAIT_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(WAIT_S)
    assert process.returncode == 0, err
    return out


@needs_activate
def test_listeners_adopted() -> None:
    """Passed TCP listeners come back non-blocking and private, and LISTEN_* leave os.environ."""
    first, second = free_port(), free_port()
    replies: list[bytes] = []

    def connect() -> None:
        with socket.create_connection((HOST, first), timeout=WAIT_S) as client:
            replies.append(client.recv(16))

    out = _activate(
        ["-l", f"{HOST}:{first}", "-l", f"{HOST}:{second}", "--fdname=mysql:admin"], connect
    )
    assert out.splitlines() == [
        f"listener {HOST} {first} False False",
        f"listener {HOST} {second} False False",
        "env []",
    ]
    assert replies == [b"adopted"]


@needs_activate
def test_datagram_socket_refused() -> None:
    """A UDP socket passed for a listener is a ConfigError naming its fd, name and address."""
    port = free_port()

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"wake", (HOST, port))

    out = _activate(["--datagram", "-l", f"{HOST}:{port}", "--fdname=mysql"], send, again=True)
    assert out.strip() == (
        f"error systemd socket activation: fd 3 (mysql): is a UDP socket on {HOST}:{port}, "
        "not a listening TCP socket; only ListenStream= with an IP address and port suits a "
        "listener"
    )


@needs_activate
def test_unix_socket_refused(tmp_path: Path) -> None:
    """A Unix stream socket passed for a listener is a ConfigError naming its path."""
    path = tmp_path / "mysql.sock"

    def connect() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(WAIT_S)
            client.connect(str(path))

    out = _activate(["-l", str(path)], connect)
    assert out.strip().startswith(
        f"error systemd socket activation: fd 3: is a Unix socket (SOCK_STREAM) at {path}, "
    )
