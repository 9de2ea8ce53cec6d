"""Gossip on loopback with real processes: edges route around middles that die, hang or lose
their backends; middles re-check a backend another middle saw fail; the members CLI."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pymysql
import pytest

from meshproxy.gossip.settings import GossipSettings
from meshproxy.testbed import mariadb
from tests.integration.harness import (
    HOST,
    MYSQL_CHECK,
    Doc,
    Load,
    NodeFactory,
    NodeProcess,
    Outcome,
    addr,
    close_quietly,
    connect,
    edge_config,
    free_port,
    middle_config,
    query,
    wait_until,
)

pytestmark = pytest.mark.integration

MariaDBFactory = Callable[..., mariadb.MariaDB]

KEY = base64.b64encode(bytes(range(32))).decode()
TOKEN = "gossip-test-token-0123456789"
# What the edge's view must do within the detection bound we claim for this cluster size
# (defaults: 200 ms probes), plus slack for a shared, busy 2-core machine.
SLACK_S = 4.0
FAST_CHECK = {**MYSQL_CHECK, "interval_ms": 200, "timeout_ms": 150, "fall": 2, "rise": 2}


def with_gossip(doc: Doc, gossip_port: int, seeds: list[int]) -> tuple[Doc, int]:
    """``doc`` with a [gossip] section and an admin API; returns it and the admin port."""
    admin_port = free_port()
    doc["admin"] = {"bind": addr(admin_port), "token": TOKEN}
    doc["gossip"] = {
        "bind": addr(gossip_port),
        "seeds": [addr(seed) for seed in seeds],
        "keys": [KEY],
    }
    return doc, admin_port


def api(admin_port: int, path: str) -> Any:
    request = urllib.request.Request(f"http://{HOST}:{admin_port}{path}")
    request.add_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        return json.loads(response.read())


def tier_states(admin_port: int) -> dict[str, str]:
    """The edge's routing view of its tier: mesh address -> state."""
    rows = api(admin_port, "/status")["upstreams"]["tier:middle"]
    return {row["server"]: row["state"] for row in rows}


def member_states(admin_port: int) -> dict[str, str]:
    return {row["name"]: row["state"] for row in api(admin_port, "/members")["members"]}


def signal_family(node: NodeProcess, signum: int, *, children_first: bool) -> None:
    """Send ``signum`` to the node's angel and its children.

    The angel is stopped first and resumed last (half a second after its children, time for
    them to heartbeat), so that it never mistakes their pause for hung event loops.
    """
    pids = node.pids()
    children = [pid for pid in pids if pid != node.pid]
    angel = [node.pid] if node.pid in pids else []
    if children_first:
        for pid in children:
            os.kill(pid, signum)
        time.sleep(0.5)
        for pid in angel:
            os.kill(pid, signum)
    else:
        for pid in angel + children:
            os.kill(pid, signum)


@pytest.fixture
def middle_gossip_doc() -> Callable[..., tuple[Doc, int, int, int]]:
    """Build a middle's config: (doc, mesh port, gossip port, admin port)."""

    def build(
        name: str, servers: list[int], seeds: list[int], check: dict[str, object] | None = None
    ) -> tuple[Doc, int, int, int]:
        mesh_port, gossip_port = free_port(), free_port()
        doc = middle_config(name, mesh_port, servers=servers, check=check, node={"tier": "middle"})
        doc, admin_port = with_gossip(doc, gossip_port, seeds or [gossip_port])
        return doc, mesh_port, gossip_port, admin_port

    return build


def test_edge_routes_around_killed_and_paused_middles(
    nodes: NodeFactory,
    shared_mariadb: mariadb.MariaDB,
    middle_gossip_doc: Callable[..., tuple[Doc, int, int, int]],
) -> None:
    """With three middles and an edge gossiping, a middle killed with SIGKILL and another
    stopped with SIGSTOP are ruled out by the edge within the claimed detection bound, no
    client connect opened after the faults fails while the third middle is healthy, and the
    paused middle, resumed, refutes and takes traffic again."""
    middles: dict[str, tuple[NodeProcess, int, int]] = {}
    seeds: list[int] = []
    for name in ("p2", "p3", "p4"):
        doc, mesh_port, gossip, admin = middle_gossip_doc(name, [shared_mariadb.port], seeds)
        middles[name] = (nodes.start(doc), mesh_port, admin)
        seeds = seeds or [gossip]
    edge_port = free_port()
    edge_doc, edge_admin = with_gossip(edge_config("p1", edge_port, []), free_port(), seeds)
    edge = nodes.start(edge_doc)
    mesh = {name: addr(port) for name, (_, port, _) in middles.items()}

    wait_until(
        lambda: (
            set(tier_states(edge_admin).values()) == {"ONLINE"}
            and set(tier_states(edge_admin)) == set(mesh.values())
        ),
        15,
        "the edge to learn all three middles from gossip",
    )
    wait_until(
        lambda: all(
            set(member_states(admin).values()) == {"alive"} and len(member_states(admin)) == 4
            for _, _, admin in middles.values()
        ),
        15,
        "every middle to see four live members",
    )

    # The members CLI, as an operator would run it.
    cli = [sys.executable, "-m", "meshproxy", "members", "-c", str(edge.config_path)]
    table = subprocess.run(cli, capture_output=True, text=True, check=True, timeout=30).stdout
    header, *rows = table.splitlines()
    assert header.split() == [
        "NAME",
        "ADDRESS",
        "ROLE",
        "TIER",
        "STATE",
        "INC",
        "BACKENDS",
        "CHANGED",
    ]
    by_name = {row.split()[0]: row.split() for row in rows}
    assert set(by_name) == {"p1", "p2", "p3", "p4"}
    assert by_name["p2"][2:6] == ["middle", "middle", "alive", "0"]
    # Backend health can blip on a loaded machine: the counts' shape is what must hold.
    assert by_name["p2"][6] in ("mysql=1/1", "mysql=0/1")
    document = json.loads(
        subprocess.run(
            [*cli, "--json"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    )
    p3_row = next(r for r in document["members"] if r["name"] == "p3")
    assert p3_row["mesh"] == mesh["p3"]
    assert [(s["name"], s["total"]) for s in p3_row["services"]] == [("mysql", 1)]

    bound_s = GossipSettings().detection_bound_s(4) + SLACK_S
    with Load(edge_port, threads=3) as load:
        wait_until(lambda: len(load.snapshot()) >= 30, 15, "30 client round trips")

        killed, _, _ = middles["p3"]
        killed_at = time.time()
        # Children first: were the angel to die first, they would be told to stop
        # (PR_SET_PDEATHSIG) and could leave gracefully before their own SIGKILL lands.
        for pid in sorted(killed.pids(), key=lambda pid: pid == killed.pid):
            os.kill(pid, signal.SIGKILL)
        assert killed.process is not None
        killed.process.wait(10)
        killed.returncode = 0  # killed on purpose: not a failure of the node

        paused, _, paused_admin = middles["p4"]
        paused_at = time.time()
        signal_family(paused, signal.SIGSTOP, children_first=False)
        try:
            wait_until(
                lambda: mesh["p3"] not in tier_states(edge_admin),
                bound_s,
                "the edge to drop the killed middle p3",
            )
            wait_until(
                lambda: tier_states(edge_admin).get(mesh["p4"], "gone") != "ONLINE",
                bound_s,
                "the edge to rule out the paused middle p4",
            )
            ruled_out = time.time()
            wait_until(
                lambda: len([o for o in load.snapshot() if o.started > ruled_out]) >= 30,
                20,
                "30 client round trips after the faults were noticed",
            )
            assert tier_states(edge_admin)[mesh["p2"]] == "ONLINE"
            assert edge.events("tier_member", server=mesh["p3"], change="removed")
            gossip_lines = edge.events("server_state", server=mesh["p4"], new="SHUNNED")
            gossip_lines += edge.events("tier_member", server=mesh["p4"], change="removed")
            assert any("gossip: p4" in e.fields.get("reason", "") for e in gossip_lines)
        finally:
            signal_family(paused, signal.SIGCONT, children_first=True)
        resumed = time.time()
        wait_until(
            lambda: tier_states(edge_admin).get(mesh["p4"]) == "ONLINE",
            15,
            "the resumed middle p4 to be routed to again",
        )
        wait_until(
            lambda: member_states(paused_admin).get("p4") == "alive",
            15,
            "p4 to see itself alive",
        )
        wait_until(
            lambda: len([o for o in load.snapshot() if o.started > resumed]) >= 30,
            20,
            "30 client round trips after p4 resumed",
        )
    first_fault = min(killed_at, paused_at)
    failed: list[Outcome] = [
        o for o in load.outcomes if o.error is not None and o.started > first_fault
    ]
    assert not failed, failed[:5]
    assert member_states(edge_admin)["p3"] == "dead"


# How an edge runs: its ``meshproxy run`` arguments, [node] and [angel].
PROCESS_MODES: dict[str, tuple[tuple[str, ...], Doc, Doc]] = {
    "one process": (("--no-angel",), {}, {}),
    "workers": ((), {"workers": 2}, {"standby_workers": False}),
    "standbys": ((), {"workers": 1}, {"standby_workers": True}),
}


@pytest.mark.parametrize("mode", list(PROCESS_MODES))
def test_sessions_on_a_paused_middle_end_within_the_detection_bound(
    nodes: NodeFactory,
    shared_mariadb: mariadb.MariaDB,
    middle_gossip_doc: Callable[..., tuple[Doc, int, int, int]],
    mode: str,
) -> None:
    """Sessions open through a middle that is stopped with SIGSTOP (its kernel still ACKs,
    nothing answers) are closed by an edge with ``close_sessions_on_down`` within the gossip
    detection bound (when gossip declares it dead), in every process mode, and each client
    is served by another middle on its next connect; sessions on the other middles carry on."""
    middles: dict[str, NodeProcess] = {}
    seeds: list[int] = []
    for name in ("p2", "p3", "p4"):
        doc, _, gossip, _ = middle_gossip_doc(name, [shared_mariadb.port], seeds)
        # The backend sees each middle from its own address: USER() tells a session's middle.
        doc["pool"][0]["source_ip"] = f"127.0.0.{name[1]}"
        middles[name] = nodes.start(doc)
        seeds = seeds or [gossip]
    edge_port = free_port()
    run_args, node, angel = PROCESS_MODES[mode]
    edge_doc = edge_config("p1", edge_port, [], tier={"close_sessions_on_down": True}, node=node)
    edge_doc["angel"] = angel
    edge_doc, edge_admin = with_gossip(edge_doc, free_port(), seeds)
    nodes.start(edge_doc, run_args)
    wait_until(
        lambda: (
            len(tier_states(edge_admin)) == 3
            and set(tier_states(edge_admin).values()) == {"ONLINE"}
        ),
        15,
        "the edge to learn all three middles from gossip",
    )
    paused = middles["p4"]
    sessions: list[Any] = []
    on_paused = 0
    try:
        while len(sessions) < 30 and (len(sessions) < 6 or not on_paused):
            session = connect(edge_port, read_timeout=30)
            sessions.append(session)
            with session.cursor() as cursor:
                cursor.execute("SELECT USER()")
                on_paused += cursor.fetchone()[0].endswith("@127.0.0.4")
        assert 0 < on_paused < len(sessions), "sessions must be spread over the middles"

        paused_at = time.monotonic()
        signal_family(paused, signal.SIGSTOP, children_first=False)
        try:

            def run(session: Any) -> tuple[str | None, float]:
                try:
                    with session.cursor() as cursor:
                        cursor.execute("SELECT 1")
                        cursor.fetchall()
                except pymysql.MySQLError as exc:
                    return str(exc), time.monotonic() - paused_at
                return None, time.monotonic() - paused_at

            with ThreadPoolExecutor(len(sessions)) as pool:
                outcomes = list(pool.map(run, sessions))
            broken = [(error, took) for error, took in outcomes if error is not None]
            bound_s = GossipSettings().detection_bound_s(4) + SLACK_S
            assert len(broken) == on_paused, outcomes
            assert all("Lost connection" in error for error, _ in broken), broken
            assert max(took for _, took in broken) < bound_s, broken
            reconnected_at = time.monotonic()
            for _ in range(on_paused):
                assert query(edge_port, "SELECT 1", read_timeout=5) == [(1,)]
            assert time.monotonic() - reconnected_at < 1.0 * on_paused
        finally:
            signal_family(paused, signal.SIGCONT, children_first=True)
    finally:
        for session in sessions:
            close_quietly(session)


def test_middle_without_backends_is_avoided_and_peers_recheck(
    nodes: NodeFactory,
    shared_mariadb: mariadb.MariaDB,
    mariadb_factory: MariaDBFactory,
    middle_gossip_doc: Callable[..., tuple[Doc, int, int, int]],
) -> None:
    """When the only backend of middle p2 dies, p2 gossips zero healthy backends and the edge
    stops sending it connections (with the reason logged) while no client connect fails;
    middle p3, which has the same backend on a slow check interval, re-checks it at once on
    p2's report and shuns it long before its own interval would have."""
    doomed = mariadb_factory()
    slow_check = {**MYSQL_CHECK, "interval_ms": 20000, "timeout_ms": 500, "fall": 2, "rise": 2}
    doc2, mesh2, gossip2, _ = middle_gossip_doc("p2", [doomed.port], [], FAST_CHECK)
    p2 = nodes.start(doc2)
    doc3, mesh3, _, admin3 = middle_gossip_doc(
        "p3", [doomed.port, shared_mariadb.port], [gossip2], slow_check
    )
    # Client traffic through p3 must not eject the dead backend first (passive ejection is
    # faster still): the re-check on p2's report is what is under test.
    doc3["pool"][0]["eject"] = {"consecutive_failures": 1000}
    p3 = nodes.start(doc3)
    edge_port = free_port()
    edge_doc, edge_admin = with_gossip(edge_config("p1", edge_port, []), free_port(), [gossip2])
    edge = nodes.start(edge_doc)
    wait_until(
        lambda: tier_states(edge_admin) == {addr(mesh2): "ONLINE", addr(mesh3): "ONLINE"},
        15,
        "the edge to route to both middles",
    )
    with Load(edge_port, threads=3) as load:
        wait_until(lambda: len(load.snapshot()) >= 20, 15, "20 client round trips")
        killed_at = time.time()
        doomed.kill()
        p2.wait_for_event("server_state", timeout_s=10, server=addr(doomed.port), new="SHUNNED")
        avoided = edge.wait_for_event(
            "server_state", timeout_s=10, server=addr(mesh2), new="SHUNNED"
        )
        assert avoided.fields["reason"] == "gossip: p2 has no healthy backend for mysql"
        recheck = p3.wait_for_event("gossip_recheck", timeout_s=10, server=addr(doomed.port))
        assert recheck.fields["reported_by"] == "p2"
        shunned = p3.wait_for_event(
            "server_state", timeout_s=10, server=addr(doomed.port), new="SHUNNED"
        )
        # Its own schedule would take fall x interval = 40 s; the re-check takes a moment.
        assert shunned.ts - killed_at < 8.0, shunned.line
        wait_until(
            lambda: len([o for o in load.snapshot() if o.started > avoided.ts + 0.1]) >= 30,
            20,
            "30 client round trips after the edge ruled p2 out",
        )
        members = api(admin3, "/members")["members"]
        p2_row = next(r for r in members if r["name"] == "p2")
        assert p2_row["services"][0]["healthy"] == 0
        assert p2_row["services"][0]["down"] == [addr(doomed.port)]
    late = [o for o in load.outcomes if o.error is not None and o.started > avoided.ts + 0.1]
    assert not late, late[:5]
    # Before the edge knew, a connect could only cost a retry, never an error: sessions
    # already running on the dead backend are the only ones allowed to fail.
    failed = [o for o in load.outcomes if o.error is not None and o.started > killed_at + 0.05]
    assert all("Lost connection" in (o.error or "") for o in failed), failed[:5]


def test_hostile_gossip_input_is_dropped_and_counted(nodes: NodeFactory) -> None:
    """Garbage, truncated and unauthenticated UDP packets and TCP sync frames sent to a
    node's gossip port are dropped and counted by reason; the node keeps running and its
    log shows no traceback."""
    gossip_port = free_port()
    doc: Doc = {"node": {"name": "solo", "role": "edge"}}
    doc, admin_port = with_gossip(doc, gossip_port, [])
    nodes.start(doc)
    wait_until(lambda: "solo" in member_states(admin_port), 10, "the node's own membership")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for payload in (b"", b"x", b"MG\x01\x01" + os.urandom(60), b"MG\x07\x00", os.urandom(2000)):
            udp.sendto(payload, (HOST, gossip_port))
    for payload in (b"MG\x01\x03\x00\x00\x00\x10" + os.urandom(16), b"junk" * 10, b"MG"):
        with socket.create_connection((HOST, gossip_port), timeout=5) as tcp:
            tcp.sendall(payload)

    def rejected() -> dict[str, int] | None:
        rows = api(admin_port, "/status")["counters"].get("gossip_rejected", [])
        counts = {row["labels"]["reason"]: row["value"] for row in rows}
        expected = {"too_short", "auth_failed", "bad_version", "bad_magic", "too_large"}
        return counts if expected <= set(counts) else None

    wait_until(rejected, 10, "each kind of rejection to be counted")
    assert member_states(admin_port) == {"solo": "alive"}


def test_nodes_find_each_other_by_mdns(nodes: NodeFactory) -> None:
    """Two nodes with discovery = "mdns" and no seeds find each other on loopback through
    zeroconf (service _meshproxy._udp.local.) and become members of one cluster."""
    key = base64.b64encode(os.urandom(32)).decode()  # foreign test runs cannot join ours
    suffix = os.urandom(3).hex()
    admins = []
    for name in (f"a-{suffix}", f"b-{suffix}"):
        doc, admin_port = with_gossip({"node": {"name": name, "role": "edge"}}, free_port(), [])
        doc["gossip"] |= {"keys": [key], "discovery": "mdns"}
        nodes.start(doc)
        admins.append(admin_port)
    expected = {f"a-{suffix}": "alive", f"b-{suffix}": "alive"}

    def one_cluster() -> bool:
        return all(member_states(admin_port) == expected for admin_port in admins)

    wait_until(one_cluster, 20, "both nodes to be members of one cluster through mDNS")


def test_a_promotion_seen_by_one_middle_moves_the_others_at_once(
    nodes: NodeFactory,
    fresh_replication: Any,
    middle_gossip_doc: Callable[..., tuple[Doc, int, int, int]],
) -> None:
    """Middle p2 checks a replicated pool every 200 ms, p3 every 20 s: after a promotion
    p2 gossips its new writer, and p3 re-checks both servers at once and sends its writes
    there too, long before its own interval."""
    replication = fresh_replication
    old, new = replication.primary, replication.replicas[0]
    servers = [old.port, new.port]
    slow_check = {**MYSQL_CHECK, "interval_ms": 20000, "timeout_ms": 500, "rise": 1}
    replicated = {"replication": {"enabled": True}}
    doc2, _, gossip2, _ = middle_gossip_doc("p2", servers, [], {**FAST_CHECK, "rise": 1})
    doc2["pool"][0].update(replicated)
    p2 = nodes.start(doc2)
    doc3, _, _, _ = middle_gossip_doc("p3", servers, [gossip2], slow_check)
    doc3["pool"][0].update(replicated)
    p3 = nodes.start(doc3)
    p2.wait_for_event("replication_state", server=addr(new.port), change="unknown -> reader")
    # p3 knows the replica as a reader before the promotion: its first look (a recheck on
    # p2's word when they meet, or its own check at random within 20 s) must not be the
    # one that finds the new writer, or no gossip would be needed to find it.
    p3.wait_for_event(
        "replication_state", timeout_s=25, server=addr(new.port), change="unknown -> reader"
    )
    replication.promote(new)
    promoted_at = time.time()
    p2.wait_for_event("replication_state", server=addr(new.port), change="reader -> writer")
    recheck = p3.wait_for_event("gossip_recheck", timeout_s=10, server=addr(new.port))
    assert recheck.fields["reported_by"] == "p2"
    moved = wait_until(
        lambda: [
            e
            for e in p3.events("replication_state", server=addr(new.port))
            if e.fields["change"].endswith("-> writer")
        ],
        10,
        "p3 to write to the new primary",
    )[0]
    assert moved.ts - promoted_at < 8.0, moved.line  # its own schedule: up to 20 s
