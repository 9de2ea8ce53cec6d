"""Hitless upgrade: ``meshproxy ctl upgrade`` has a new angel take the node over.

Under a connect-query-disconnect load (PyMySQL, real MariaDB) and with a session held
open, the new angel takes the listening sockets, its workers accept beside the old ones,
the old control process hands over its ports, and the old angel drains and exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from meshproxy.testbed import mariadb
from tests.integration.harness import (
    Load,
    NodeFactory,
    NodeProcess,
    close_quietly,
    connect,
    free_port,
    query,
    wait_until,
)
from tests.integration.test_uptime import (
    TOKEN,
    Api,
    alive,
    control_pids,
    processes_with,
    start_node,
    uptime_config,
    worker_pids,
)

pytestmark = pytest.mark.integration


def ctl(admin_port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``meshproxy ctl`` against a node's admin API (by URL: its config file may be bad)."""
    url = f"http://127.0.0.1:{admin_port}"
    return subprocess.run(
        [sys.executable, "-m", "meshproxy", "ctl", "--url", url, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "MESHPROXY_ADMIN_TOKEN": TOKEN},
    )


@contextlib.contextmanager
def successor_stopped(node: NodeProcess) -> Iterator[None]:
    """At the end, stop whatever angel took the node over (it is not the test's child: it
    outlived the process the test started) and wait for all its processes to be gone."""
    try:
        yield
    finally:
        for event in node.events("angel_upgrading"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(event.fields["new_pid"]), signal.SIGTERM)
        wait_until(lambda: not processes_with(str(node.config_path)), 30, "the new angel to stop")


def test_upgrade_under_load_refuses_nothing(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """During an upgrade under load no connect or query fails, a session open before it
    keeps working until its client closes it, the old angel exits 0 once that session has
    ended, and the new angel serves with a control process of its own."""
    port, admin_port = free_port(), free_port()
    doc = uptime_config("up", [shared_mariadb.port], port, admin_port, node={"drain_timeout_s": 30})
    node = start_node(nodes, doc)
    old_angel = node.pid
    held = connect(port)
    with successor_stopped(node):
        with Load(port, threads=3) as load:
            wait_until(lambda: len(load.snapshot()) >= 30, 30, "the load to run")
            done = ctl(admin_port, "upgrade", "--wait-s", "60")
            assert done.returncode == 0, done.stderr
            answer = json.loads(done.stdout)
            assert answer["upgraded"] is True
            new_angel = int(node.wait_for_event("angel_upgrading").fields["new_pid"])
            assert answer["angel_pid"] == new_angel
            node.wait_for_event("angel_took_over", timeout_s=30)
            served = len(load.snapshot())
            wait_until(lambda: len(load.snapshot()) >= served + 30, 30, "load after it")
        errors = [o for o in load.snapshot() if o.error is not None]
        assert not errors, f"{len(errors)} of {len(load.snapshot())} failed: {errors[:3]}"
        # The held session is on an old worker, which drains: it works until closed.
        with held.cursor() as cursor:
            cursor.execute("SELECT 1")
            assert cursor.fetchall() == ((1,),)
        assert alive(old_angel), "the old angel did not wait for its session to end"
        close_quietly(held)
        assert node.process is not None
        assert node.process.wait(30) == 0
        assert [row[0] for row in query(port, "SELECT 1")] == [1]
        status = Api(admin_port).ok("GET", "/status")
        assert status["angel_pid"] == new_angel
        assert status["data_planes"] == 2
        assert node.events("node_stopped", handover="yes"), "old control left the mesh"


def test_upgrade_with_a_broken_config_file_is_refused(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """An upgrade asked for while the config file on disk does not load is refused with
    the file's error; the running node carries on unchanged."""
    port, admin_port = free_port(), free_port()
    node = start_node(nodes, uptime_config("ub", [shared_mariadb.port], port, admin_port))
    node.config_path.write_text(node.config_path.read_text() + "\n[nonsense]\n")
    done = ctl(admin_port, "upgrade")
    assert done.returncode == 0, done.stderr
    refused = node.wait_for_event("angel_upgrade_refused")
    assert "nonsense" in refused.fields["reason"]
    assert not node.events("angel_upgrading")
    assert Api(admin_port).ok("GET", "/status")["angel_pid"] == node.pid
    assert [row[0] for row in query(port, "SELECT 1")] == [1]


def test_stray_sigusr2_kills_no_worker_and_stops_no_node(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """SIGUSR2 sent to every process but the angel (as `systemctl kill` of a whole unit
    would) leaves the workers serving, gets the control process restarted, and upgrades
    nothing."""
    port, admin_port = free_port(), free_port()
    node = start_node(nodes, uptime_config("us", [shared_mariadb.port], port, admin_port))
    workers = worker_pids(node)
    (control,) = control_pids(node)
    for pid in (*workers, control):
        os.kill(pid, signal.SIGUSR2)
    node.wait_for_event("angel_restarting", child="control", timeout_s=30)
    wait_until(lambda: len(node.events("node_started")) >= 2, 30, "a new control process")
    assert worker_pids(node) == workers
    assert [row[0] for row in query(port, "SELECT 1")] == [1]
    assert Api(admin_port).ok("GET", "/status")["angel_pid"] == node.pid
    assert not node.events("angel_upgrading")
