"""A whole node as systemd runs it: socket activation by the real ``systemd-socket-activate``
and sd_notify to a notify socket of the test's, through a reload, an upgrade and a stop."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from meshproxy.testbed import mariadb
from tests.integration.harness import (
    LogEvent,
    close_quietly,
    connect,
    free_port,
    parse_log_line,
    query,
    to_toml,
    wait_until,
)
from tests.integration.test_upgrade import ctl
from tests.integration.test_uptime import alive, processes_with, uptime_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("systemd-socket-activate") is None,
        reason="systemd-socket-activate is not installed (Debian package systemd)",
    ),
]


class NotifyListener:
    """The notify socket systemd would hold: every datagram received, as (pid?, lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[list[str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            with self._lock:
                self.messages.append(data.decode().split("\n"))

    def having(self, line: str) -> list[list[str]]:
        with self._lock:
            return [m for m in self.messages if line in m]

    def wait_for(self, line: str, count: int = 1) -> list[list[str]]:
        return wait_until(
            lambda: found if len(found := self.having(line)) >= count else None,
            30,
            f"{count} x {line!r} on the notify socket",
        )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_socket_activated_node_notifies_systemd(
    tmp_path: Path, shared_mariadb: mariadb.MariaDB
) -> None:
    """Under systemd-socket-activate the first client waits for the node instead of being
    refused and is served on the passed socket; the angel says READY=1 once its workers
    serve, pings the watchdog, says RELOADING=1 then READY=1 on SIGHUP; after an upgrade
    the new angel names itself with MAINPID= and says READY=1; on SIGTERM the angel then
    in charge says STOPPING=1 and exits 0, leaving nothing behind."""
    port, admin_port = free_port(), free_port()
    config_path = tmp_path / "sd.toml"
    config_path.write_text(to_toml(uptime_config("sd", [shared_mariadb.port], port, admin_port)))
    listener = NotifyListener(tmp_path / "notify")
    log_path = tmp_path / "sd.log"
    argv = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}"]
    argv += ["-E", f"NOTIFY_SOCKET={listener.path}", "-E", "WATCHDOG_USEC=400000"]
    argv += [sys.executable, "-m", "meshproxy", "run", "-c", str(config_path)]
    with log_path.open("wb") as log, contextlib.ExitStack() as cleanup:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        cleanup.callback(listener.close)
        cleanup.callback(lambda: stop_all(process, config_path))
        # systemd-socket-activate starts the node when the first client connects: this one.
        first = connect(port, connect_timeout=30, read_timeout=30)
        try:
            with first.cursor() as cursor:
                cursor.execute("SELECT @@port")
                assert cursor.fetchall() == ((shared_mariadb.port,),)
        finally:
            close_quietly(first)
        (ready,) = listener.wait_for("READY=1")
        assert "STATUS=serving: 2 workers" in ready
        listener.wait_for("WATCHDOG=1", count=2)

        process.send_signal(signal.SIGHUP)
        listener.wait_for("RELOADING=1")
        listener.wait_for("READY=1", count=2)

        done = ctl(admin_port, "upgrade", "--wait-s", "60")
        assert done.returncode == 0, done.stderr
        new_angel = int(upgrading(log_path).fields["new_pid"])
        listener.wait_for(f"MAINPID={new_angel}")
        listener.wait_for("READY=1", count=3)
        assert process.wait(30) == 0  # the old angel, its workers drained
        assert not listener.having("STOPPING=1"), "the old angel told systemd it stops"
        assert [row[0] for row in query(port, "SELECT 1")] == [1]

        os.kill(new_angel, signal.SIGTERM)
        listener.wait_for("STOPPING=1")
        wait_until(lambda: not alive(new_angel), 30, "the new angel to exit")
        assert not processes_with(str(config_path))


def upgrading(log_path: Path) -> LogEvent:
    events = map(parse_log_line, log_path.read_text().splitlines())
    return next(e for e in events if e is not None and e.event == "angel_upgrading")


def stop_all(process: subprocess.Popen[bytes], config_path: Path) -> None:
    """Whatever is left of the node, angels of both generations included, is killed."""
    if process.poll() is None:
        process.kill()
        process.wait()
    for pid in processes_with(str(config_path)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
