"""The parts of meshproxy.runtime.systemd that need no systemd: environment rules and no-ops."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshproxy.runtime import systemd


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No systemd variables from whoever runs the tests."""
    for name in (*systemd.LISTEN_ENV, "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def warnings() -> Iterator[list[logging.LogRecord]]:
    """The meshproxy logger's warnings while the test runs."""
    handler = _Records()
    records = handler.records
    logger = logging.getLogger("meshproxy")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_watchdog_off_without_watchdog_usec(clean_env: pytest.MonkeyPatch) -> None:
    """Without WATCHDOG_USEC there is no watchdog to ping."""
    assert systemd.watchdog_interval_s() is None


def test_watchdog_half_of_watchdog_usec(clean_env: pytest.MonkeyPatch) -> None:
    """The ping interval is half of WATCHDOG_USEC when WATCHDOG_PID is unset."""
    clean_env.setenv("WATCHDOG_USEC", "10000000")
    assert systemd.watchdog_interval_s() == 5.0


def test_watchdog_ours_by_pid(clean_env: pytest.MonkeyPatch) -> None:
    """WATCHDOG_PID naming this process keeps the watchdog ours."""
    clean_env.setenv("WATCHDOG_USEC", "3000000")
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval_s() == 1.5


@pytest.mark.parametrize(
    ("usec", "pid"), [("10000000", "1"), ("0", ""), ("-5", ""), ("ten", ""), ("", "")]
)
def test_watchdog_not_ours(clean_env: pytest.MonkeyPatch, usec: str, pid: str) -> None:
    """Another process's watchdog, or a zero, negative or garbled WATCHDOG_USEC, means none."""
    clean_env.setenv("WATCHDOG_USEC", usec)
    if pid:
        clean_env.setenv("WATCHDOG_PID", pid)
    assert systemd.watchdog_interval_s() is None


def test_notifier_no_op_without_notify_socket(clean_env: pytest.MonkeyPatch) -> None:
    """Without NOTIFY_SOCKET every message is a silent no-op that reports nothing sent."""
    notifier = systemd.Notifier()
    sent = [
        notifier.ready("serving"),
        notifier.reloading(),
        notifier.stopping(),
        notifier.status("x"),
        notifier.watchdog(),
        notifier.main_pid(os.getpid()),
    ]
    assert sent == [False] * 6


def test_main_pid_without_notify_socket_leaves_watchdog(clean_env: pytest.MonkeyPatch) -> None:
    """Outside systemd, naming a main PID does not touch WATCHDOG_PID."""
    clean_env.setenv("WATCHDOG_USEC", "1000000")
    systemd.Notifier().main_pid(os.getpid())
    assert "WATCHDOG_PID" not in os.environ


def test_send_failure_logged_once(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, warnings: list[logging.LogRecord]
) -> None:
    """A notify socket that is not there costs one warning, however often the angel sends."""
    clean_env.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    notifier = systemd.Notifier()
    assert not notifier.ready("serving")
    assert not notifier.watchdog()
    assert not notifier.watchdog()
    assert [r.msg for r in warnings] == ["systemd_notify_failed"]
    fields = getattr(warnings[0], "fields", {})
    assert fields["message"] == "READY=1"
    assert fields["reason"] == "No such file or directory"


def test_not_socket_activated(clean_env: pytest.MonkeyPatch) -> None:
    """Without LISTEN_FDS no listener was inherited."""
    assert systemd.inherited_listeners() == []


def test_sockets_for_another_process(clean_env: pytest.MonkeyPatch) -> None:
    """LISTEN_FDS meant for another PID is not ours, and is removed for our children."""
    clean_env.setenv("LISTEN_FDS", "1")
    clean_env.setenv("LISTEN_PID", "1")
    clean_env.setenv("LISTEN_FDNAMES", "mysql")
    assert systemd.inherited_listeners() == []
    assert not {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"} & set(os.environ)


def test_what_udp() -> None:
    """A UDP socket is described as one, with its address."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        assert systemd._what(udp.fileno()) == f"a UDP socket on 127.0.0.1:{port}"
        assert udp.fileno() >= 0  # the probe left it open


def test_what_tcp_not_listening() -> None:
    """A bound TCP socket that does not listen is described as such."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as tcp:
        tcp.bind(("::1", 0))
        port = tcp.getsockname()[1]
        assert systemd._what(tcp.fileno()) == f"a TCP socket on [::1]:{port} that does not listen"


def test_what_unix_and_files(tmp_path: Path) -> None:
    """Unix sockets, FIFOs and regular files are named for what they are."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        unix.bind(str(tmp_path / "s"))
        assert systemd._what(unix.fileno()) == f"a Unix socket (SOCK_STREAM) at {tmp_path / 's'}"
    read_end, write_end = os.pipe()
    try:
        assert systemd._what(read_end) == "a FIFO"
    finally:
        os.close(read_end)
        os.close(write_end)
    with (tmp_path / "f").open("w") as handle:
        assert systemd._what(handle.fileno()) == "a regular file"
