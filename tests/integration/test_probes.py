"""Orchestrator probes and drains on loopback: /ready, /live and ``meshproxy ctl drain``
on real node processes (an angel, its control process and a worker) gossiping."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from typing import Any

import pytest

from meshproxy.testbed import mariadb
from tests.integration.harness import (
    HOST,
    NodeFactory,
    addr,
    close_quietly,
    connect,
    edge_config,
    free_port,
    middle_config,
    wait_until,
)
from tests.integration.test_gossip import TOKEN, api, tier_states, with_gossip

pytestmark = pytest.mark.integration


def probe(admin_port: int, path: str) -> tuple[int, dict[str, Any]]:
    """A probe as a kubelet sends it: no token."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{admin_port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def ctl(admin_port: int, *args: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "meshproxy", "ctl", "--url", f"http://{HOST}:{admin_port}"]
    done = subprocess.run(
        [*argv, "--token", TOKEN, *args], capture_output=True, text=True, check=True, timeout=60
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def middle(name: str, backend: int, seeds: list[int]) -> tuple[dict[str, Any], int, int, int]:
    mesh_port, gossip_port = free_port(), free_port()
    doc = middle_config(name, mesh_port, servers=[backend], node={"tier": "middle"})
    doc, admin_port = with_gossip(doc, gossip_port, seeds)
    return doc, mesh_port, gossip_port, admin_port


def test_ready_waits_for_the_mesh_and_live_answers_without_a_token(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """/live answers 200 without a token as soon as the node runs; /ready answers 503 while
    the node's seed is not up (gossip not joined) and 200 once it has joined; every other
    path still needs the token."""
    edge_gossip = free_port()
    doc, _, middle_gossip, middle_admin = middle("p2", shared_mariadb.port, [edge_gossip])
    nodes.start(doc)
    assert probe(middle_admin, "/live") == (200, {"live": True})
    # The worker reports its bound listeners to the control process just after binding.
    wait_until(lambda: probe(middle_admin, "/ready")[1]["listening"], 10, "the worker's report")
    status, checks = probe(middle_admin, "/ready")
    assert status == 503
    assert checks == {
        "listening": True,
        "gossip_joined": False,
        "draining": False,
        "ready": False,
    }
    assert probe(middle_admin, "/status")[0] == 401

    edge_doc, edge_admin = with_gossip(edge_config("p1", free_port(), []), edge_gossip, [])
    edge_doc["gossip"]["seeds"] = [addr(middle_gossip)]
    nodes.start(edge_doc)
    wait_until(
        lambda: probe(middle_admin, "/ready")[0] == 200 and probe(edge_admin, "/ready")[0] == 200,
        15,
        "both nodes to report ready once they gossip",
    )


def test_drain_moves_new_sessions_away_and_waits_for_the_open_ones(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB
) -> None:
    """``meshproxy ctl drain --wait-s`` on a middle makes it report not ready, the edge sends
    it no new session while its open session carries on, and the command returns as soon
    as that session ends, with none left."""
    first, first_mesh, seed, first_admin = middle("p2", shared_mariadb.port, [])
    first["gossip"]["seeds"] = [addr(seed)]
    nodes.start(first)
    edge_port = free_port()
    edge_doc, edge_admin = with_gossip(edge_config("p1", edge_port, []), free_port(), [seed])
    nodes.start(edge_doc)

    def routes_to(middles: set[str]) -> bool:
        states = tier_states(edge_admin)
        return set(states) == middles and set(states.values()) == {"ONLINE"}

    def sessions(admin_port: int) -> int:
        return int(api(admin_port, "/status")["sessions"])

    # While p2 is the only middle, the session to keep open can only land on it.
    wait_until(lambda: routes_to({addr(first_mesh)}), 15, "the edge to route to p2")
    kept = connect(edge_port)
    try:
        wait_until(lambda: sessions(first_admin) == 1, 10, "the session on p2")
        second, second_mesh, _, second_admin = middle("p3", shared_mariadb.port, [seed])
        nodes.start(second)
        both = {addr(first_mesh), addr(second_mesh)}
        wait_until(lambda: routes_to(both), 15, "the edge to route to both middles")
    except BaseException:
        close_quietly(kept)  # else the edge's drain would wait for it at the test's end
        raise

    result: dict[str, Any] = {}
    waiting = threading.Thread(
        target=lambda: result.update(ctl(first_admin, "drain", "--wait-s", "60"))
    )
    waiting.start()
    try:
        wait_until(lambda: probe(first_admin, "/ready")[0] == 503, 10, "the drain to begin")
        assert probe(first_admin, "/ready")[1]["draining"] is True
        wait_until(
            lambda: any(
                row["server"] == addr(first_mesh) and row["gossip"] == "gossip: p2 draining"
                for row in api(edge_admin, "/status")["upstreams"]["tier:middle"]
            ),
            10,
            "the edge to hear of the drain",
        )
        before = sessions(second_admin)
        for _ in range(10):
            conn = connect(edge_port)
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1")
            close_quietly(conn)
        assert sessions(first_admin) == 1, "a new session went to the draining middle"
        # Workers report their sessions every second: the last one may still be counted.
        wait_until(lambda: sessions(second_admin) == before, 10, "p3's sessions to end")
        with kept.cursor() as cursor:  # the open session is untouched by the drain
            cursor.execute("SELECT 2")
            assert cursor.fetchone() == (2,)
        assert waiting.is_alive(), "ctl drain returned while a session was open"
    finally:
        close_quietly(kept)
        waiting.join(60)
    assert result == {"draining": True, "sessions_left": 0}
