"""One accept queue for all of a node's workers: the angel holds the listening sockets.

A connection the kernel has queued waits there whatever happens to the workers: one that
is stopped leaves it to the others, and when every worker dies their replacements accept
what queued up meanwhile. Clients are PyMySQL, the servers real MariaDB.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pymysql
import pytest

from meshproxy.testbed import mariadb
from tests.integration.harness import NodeFactory, free_port, query, wait_until
from tests.integration.test_uptime import alive, start_node, uptime_config, worker_pids

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def stopped(pids: set[int]) -> Iterator[None]:
    """Processes SIGSTOPped for the block, and continued after it if still alive."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def test_stopped_worker_leaves_its_share_to_the_others(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """With one of two workers SIGSTOPped (and the angel's watchdog too slow to notice),
    every one of 40 new sessions is served at once by the other worker: none waits in a
    queue of the stopped one."""
    port, admin_port = free_port(), free_port()
    doc = uptime_config("aq", [shared_mariadb.port], port, admin_port, angel={"watchdog_s": 120})
    node = start_node(nodes, doc)
    victim = min(worker_pids(node))
    with stopped({victim}):
        for _ in range(40):
            rows = query(port, "SELECT 1", connect_timeout=2, read_timeout=2, write_timeout=2)
            assert rows == [(1,)]
    assert victim in worker_pids(node), "the stopped worker was replaced meanwhile"


def test_connections_queued_while_every_worker_restarts_are_served(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """Sessions that connect while no worker runs (both stopped, then killed) wait in the
    angel's queue and are all served by the workers that replace them: a restart of the
    node's workers refuses no connection."""
    port, admin_port = free_port(), free_port()
    doc = uptime_config(
        "ar",
        [shared_mariadb.port],
        port,
        admin_port,
        angel={"watchdog_s": 120, "standby_workers": False},
    )
    node = start_node(nodes, doc)
    victims = worker_pids(node)
    clients = 12
    with ThreadPoolExecutor(clients) as pool, stopped(victims):
        answers = [
            pool.submit(query, port, "SELECT 1", connect_timeout=5, read_timeout=20)
            for _ in range(clients)
        ]
        # Every client's TCP handshake is done by the kernel into the queue; none is
        # accepted, as no worker runs. Then the workers die, and the angel replaces them.
        wait_until(lambda: queued(port) >= clients, 10, f"{clients} connections in the queue")
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not any(alive(pid) for pid in victims), 10, "the workers to die")
        results = []
        for answer in answers:
            try:
                results.append(answer.result(timeout=30))
            except pymysql.err.MySQLError as exc:
                results.append([("error", str(exc))])
    assert results == [[(1,)]] * clients
    assert len(node.events("angel_restarting", why="killed by signal 9")) == 2


def queued(port: int) -> int:
    """Connections waiting in the accept queue of the listener on ``port`` (``ss``'s Recv-Q
    of a listening socket)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if state == "0A" and int(local.split(":")[1], 16) == port:  # 0A: LISTEN
            return int(queues.split(":")[1], 16)
    return 0
