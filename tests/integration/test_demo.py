"""``meshproxy demo`` end to end, as a user runs it, with each kind of MySQL server."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshproxy.testbed import mariadb
from tests.integration.harness import session_members

pytestmark = pytest.mark.integration


def _run_demo(backend: str | None) -> str:
    """Run a short demo in its own session, check that it ended cleanly, return its output."""
    env = {k: v for k, v in os.environ.items() if k != "MESHPROXY_DEMO_BACKEND"}
    if backend is not None:
        env["MESHPROXY_DEMO_BACKEND"] = backend
    process = subprocess.Popen(
        [sys.executable, "-m", "meshproxy", "demo", "--duration", "6", "--clients", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    text = output.decode(errors="replace")
    assert process.returncode == 0, text

    deadline = time.monotonic() + 3
    while (left := session_members(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:  # don't leak them into the rest of the suite, then fail
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}\n{text}"

    workdir = re.search(r" in (/\S*meshproxy-demo-\S+)$", text, re.MULTILINE)
    assert workdir, text
    assert not Path(workdir[1]).exists(), text
    queries = re.search(r"^\s*queries\s+(\d+) in", text, re.MULTILINE)
    assert queries, text
    assert int(queries[1]) > 0, text
    return text


def test_demo_with_embedded_backend() -> None:
    """With MESHPROXY_DEMO_BACKEND=embedded the demo runs on mysql-mimic servers and cleans up."""
    text = _run_demo("embedded")
    assert "embedded MySQL-protocol servers (mysql-mimic)" in text.splitlines()[0], text


def test_demo_with_mariadb() -> None:
    """By default, where mariadbd is installed, the demo runs on MariaDB and cleans up."""
    if mariadb.mariadbd_path() is None:
        pytest.skip("mariadbd is not installed (apt-get install mariadb-server)")
    text = _run_demo(None)
    assert "MariaDB servers" in text.splitlines()[0], text
