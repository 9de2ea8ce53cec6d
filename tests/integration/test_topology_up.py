"""``meshproxy topology up SPEC --local`` as a user runs it: it serves, then leaves nothing."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pymysql
import pytest

from meshproxy.config import Address
from meshproxy.testbed import mariadb
from meshproxy.topology import load_spec
from meshproxy.topology.local import LocalTopology, MariaDBBackends
from tests.integration.harness import session_members, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


class _Output:
    """The lines a process writes, collected by a thread so that they can be awaited."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: list[str] = []
        self._stream = stream
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Once the process is gone: wait for the end of its output and close the pipe."""
        self._thread.join(10)
        self._stream.close()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            self._queue.put(raw.decode(errors="replace").rstrip("\n"))
        self._queue.put(None)

    def until(self, pattern: str, timeout_s: float) -> re.Match[str]:
        """The first line (from here on) matching ``pattern``; fails with the output so far."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r}:\n{self.text()}") from None
            if line is None:
                raise AssertionError(f"output ended before {pattern!r}:\n{self.text()}")
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match

    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.mark.parametrize("backend", ["embedded", "mariadb"])
def test_topology_up_local_serves_through_the_edge_and_leaves_nothing(backend: str) -> None:
    """``topology up topology/chain.toml --local`` serves queries through the printed edge
    address via one of the middles, and on SIGTERM exits 0 leaving no process, listening
    port or directory behind."""
    if backend == "mariadb" and mariadb.mariadbd_path() is None:
        pytest.skip("mariadbd is not installed (apt-get install mariadb-server)")
    env = {**os.environ, "MESHPROXY_DEMO_BACKEND": backend}
    process = subprocess.Popen(
        [sys.executable, "-m", "meshproxy", "topology", "up", "topology/chain.toml", "--local"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    assert process.stdout is not None
    output = _Output(process.stdout)
    try:
        workdir = Path(output.until(r" in (/\S+meshproxy-local-\S+)$", 30)[1])
        output.until(r"^ready", 90)
        text = output.text()
        middles = set(re.findall(r"^\s+p[234]\s+middle\s+mesh ([\d.]+):", text, re.MULTILINE))
        edge = re.search(r"^\s+p1\s+edge\s+listens for mysql on ([\d.]+):(\d+)", text, re.M)
        assert edge is not None, text
        assert len(middles) == 3, text
        host, port = edge[1], int(edge[2])

        conn = pymysql.connect(
            host=host,
            port=port,
            user=mariadb.APP_USER,
            password=mariadb.APP_PASSWORD,
            connect_timeout=5,
            read_timeout=5,
            ssl_disabled=True,
        )
        with conn, conn.cursor() as cursor:
            cursor.execute("SELECT SUBSTRING_INDEX(USER(), '@', -1), 6 * 7")
            row = cursor.fetchone()
        assert row is not None
        assert row[0] in middles, (row, middles)
        assert int(row[1]) == 42

        process.send_signal(signal.SIGTERM)
        output.until(r"^stopped$", 30)
        assert process.wait(10) == 0, output.text()
        wait_until(lambda: not session_members(process.pid), 5, "every child to be gone")
        assert not workdir.exists(), output.text()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, port), timeout=2).close()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        output.close()
        for pid in session_members(process.pid):  # don't leak them into the rest of the suite
            os.kill(pid, signal.SIGKILL)


def test_a_killed_node_restarts_with_its_addresses_and_secrets() -> None:
    """A middle of a local topology that is killed and restarted comes back on the same
    addresses with the same certificate, and the edge routes to it again over mesh TLS."""
    spec = load_spec("chain")
    with LocalTopology(spec, MariaDBBackends(), prefix="meshproxy-test-restart-") as topology:
        at = topology.addressing
        p4 = next(n for n in spec.nodes if n.name == "p4")
        edge = next(n for n in spec.nodes if n.role == "edge")
        listener = Address.parse(at.listener(edge, spec.services[0]))
        topology.kill("p4")
        topology.restart("p4")
        assert "p4" not in topology.killed

        def through_p4() -> bool:
            conn = pymysql.connect(
                host=listener.host,
                port=listener.port,
                user=mariadb.APP_USER,
                password=mariadb.APP_PASSWORD,
                database=mariadb.DATABASE,
                connect_timeout=5,
            )
            with conn, conn.cursor() as cursor:
                cursor.execute("SELECT USER()")
                (user,) = cursor.fetchone()
            return bool(user.endswith("@" + at.source_ip(p4)))

        wait_until(through_p4, 20, "a session through the restarted middle p4")
        assert topology.exited() == {}
