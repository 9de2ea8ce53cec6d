"""The kernel fast path (``dataplane.accel = "sockmap"``): what it counts, and its fallback.

The traffic suite (test_traffic.py) runs every client and protocol case spliced as well;
these tests cover what only the fast path has: its counters, and a node that cannot load
it (no CAP_BPF, as in a container) serving on the Python pump with one log line.
"""

from __future__ import annotations

import re
import shutil
import urllib.request

import pytest

from meshproxy.testbed import mariadb
from tests.integration.conftest import start_chain
from tests.integration.harness import (
    HOST,
    NodeFactory,
    addr,
    free_port,
    middle_config,
    query,
    wait_until,
)

pytestmark = pytest.mark.integration

TOKEN = "sockmap-admin-token-0123456789"
MiB = 1024 * 1024


def counter(admin_port: int, name: str) -> float:
    """A counter's total across its labels, from the node's /metrics."""
    request = urllib.request.Request(f"http://{HOST}:{admin_port}/metrics")
    request.add_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    pattern = re.compile(rf"^meshproxy_{name}_total(?:{{[^}}]*}})? (\S+)$", re.M)
    return sum(float(value) for value in pattern.findall(text))


def single_hop(port: int, admin_port: int, backend: mariadb.MariaDB) -> dict[str, object]:
    doc = middle_config("fast", free_port(), servers=[backend.port])
    doc["listener"] = [{"name": "app", "bind": addr(port), "upstream": "pool:main"}]
    doc["admin"] = {"bind": addr(admin_port), "token": TOKEN}
    doc["dataplane"] = {"accel": "sockmap"}
    return doc


def test_spliced_sessions_are_counted_with_their_bytes(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """Every session through a fast-path hop is spliced (accel_sessions), none falls back,
    and the bytes the kernel moved reach bytes_from_upstreams when the sessions close."""
    port, admin_port = free_port(), free_port()
    node = nodes.start(single_hop(port, admin_port, shared_mariadb))
    node.wait_for_event("accel_ready", timeout_s=30)
    for _ in range(5):
        assert query(port, "SELECT LENGTH(REPEAT('x', 1048576))") == [(MiB,)]
    (big,) = query(port, "SELECT REPEAT('y', 4194304)")
    assert big == ("y" * 4 * MiB,)
    # Workers report their counters every second.
    wait_until(lambda: counter(admin_port, "accel_sessions") == 6, 10, "6 spliced sessions")
    assert counter(admin_port, "accel_fallbacks") == 0
    # Counted when each session closed: the 4 MiB row came through the kernel.
    assert counter(admin_port, "bytes_from_upstreams") >= 4 * MiB


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
def test_without_cap_bpf_the_node_falls_back_to_the_pump(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """A node whose processes lack CAP_BPF and CAP_SYS_ADMIN (a container's usual lot) logs
    accel_unavailable once per data plane, counts it, and serves every session on the
    Python pump."""
    port, admin_port = free_port(), free_port()
    drop = "-bpf,-sys_admin,-perfmon,-net_admin"
    node = nodes.start(
        single_hop(port, admin_port, shared_mariadb),
        wrapper=["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", "--"],
    )
    # Loaded after the ports are bound: it may come a moment after the node serves.
    unavailable = node.wait_for_event("accel_unavailable", timeout_s=30)
    assert unavailable.fields["using"] == "python pump"
    assert [row[0] for row in query(port, "SELECT 1")] == [1]
    wait_until(lambda: counter(admin_port, "accel_unavailable") == 1, 10, "the counter")
    assert counter(admin_port, "accel_sessions") == 0
    assert len(node.events("accel_unavailable")) == 1
    assert not node.events("accel_ready")


def test_chain_with_the_fast_path_on_both_hops(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """Through an edge and a middle that both splice, many short sessions all answer."""
    chain = start_chain(nodes, shared_mariadb, "sockmap")
    for n in range(50):
        assert query(chain.port, f"SELECT {n}") == [(n,)]
