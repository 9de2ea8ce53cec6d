"""Query routing's figures around a run: what a node counted, and where SELECTs ran.

- From a node's admin API (``GET /status``): its query cache's hits, misses and stores,
  its query rules' hits, and the read-your-writes outcomes of the read/write split (a read
  that first waited on its reader for the session's last write, ``MASTER_GTID_WAIT``, or
  that went to the writer instead).
- From the replication set's servers (as root over their sockets): ``Com_select`` of the
  primary and of the replicas. A replica's count includes the split's
  ``MASTER_GTID_WAIT`` selects (one per read-your-writes outcome), the primary's the
  split's ``SELECT @@last_gtid`` after each write it committed; health checks add a few.

A node's data plane sends its figures to the control process every second
(``meshproxy.runtime.modes.STATS_S``), so a reading waits that long first: it then counts
every statement of the run before it.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from meshproxy.runtime.modes import STATS_S
from meshproxy.testbed.replication import ReplicationSet

ADMIN_TOKEN = "bench-admin-token-0123456789"  # noqa: S105 - loopback, throwaway nodes
SETTLE_S = STATS_S + 0.25
READ_YOUR_WRITES = {"reader waited": "ryw_waited", "writer": "ryw_writer"}


def admin_get(port: int, path: str) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    request.add_header("Authorization", f"Bearer {ADMIN_TOKEN}")
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
        return json.loads(response.read())


def roles(port: int, pool: str = "main") -> dict[int, tuple[str, str]]:
    """Each server's (role, state) by port, as the node routes on them."""
    rows = admin_get(port, "/status")["upstreams"][f"pool:{pool}"]
    return {int(r["server"].rsplit(":", 1)[1]): (r.get("role", ""), r["state"]) for r in rows}


def wait_roles(
    port: int,
    wanted: Mapping[int, tuple[str, str]],
    check_alive: Callable[[], None],
    timeout_s: float = 30.0,
) -> None:
    """Wait until the node's checks have given every server the role and state wanted."""
    deadline = time.monotonic() + timeout_s
    seen: dict[int, tuple[str, str]] | str = {}
    while seen != wanted:
        check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"server roles after {timeout_s:g} s: {seen}, wanted {wanted}")
        time.sleep(0.2)
        try:
            seen = roles(port)
        except (OSError, KeyError) as exc:  # the admin API is not listening yet
            seen = f"admin API: {exc}"


def node_figures(port: int) -> dict[str, int]:
    """The node's cumulative query cache, rule and read-your-writes counts."""
    status = admin_get(port, "/status")
    cache = status["session_mode"]["query_cache"]
    out = {f"cache_{name}": int(cache.get(name, 0)) for name in ("hits", "misses", "stores")}
    counters = status["counters"]
    out["rule_hits"] = sum(int(e["value"]) for e in counters.get("query_rule_hits", []))
    out |= dict.fromkeys(READ_YOUR_WRITES.values(), 0)
    for entry in counters.get("read_your_writes", []):
        key = READ_YOUR_WRITES.get(entry["labels"].get("outcome", ""))
        if key is not None:
            out[key] += int(entry["value"])
    out["statements"] = int(status["session_mode"]["statements"])
    return out


def server_selects(replication: ReplicationSet) -> dict[str, int]:
    """``Com_select`` of the primary, and of the replicas together."""

    def selects(server: Any) -> int:
        rows = replication.sql(server, "SHOW GLOBAL STATUS LIKE 'Com_select'")
        return int(rows[0][1])

    return {
        "selects_primary": selects(replication.primary),
        "selects_replicas": sum(selects(r) for r in replication.replicas),
    }


def reading(admin_port: int | None, replication: ReplicationSet | None) -> dict[str, int]:
    """Everything there is to read for one path (empty for a path with neither)."""
    out: dict[str, int] = {}
    if admin_port is not None:
        time.sleep(SETTLE_S)
        out |= node_figures(admin_port)
    if replication is not None:
        out |= server_selects(replication)
    return out


def delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {name: value - before.get(name, 0) for name, value in after.items()}


def hit_ratio(figures: Mapping[str, int]) -> float | None:
    looked = figures.get("cache_hits", 0) + figures.get("cache_misses", 0)
    return figures.get("cache_hits", 0) / looked if looked else None


def replica_share(figures: Mapping[str, int], reads: int) -> float | None:
    """The share of sysbench's reads that the replicas ran: their SELECTs less the split's
    own waits (one per read-your-writes outcome), over the reads sysbench sent."""
    if "selects_replicas" not in figures or not reads:
        return None
    waits = sum(figures.get(key, 0) for key in READ_YOUR_WRITES.values())
    return max(0, figures["selects_replicas"] - waits) / reads
