"""``just bench-gossip``: failure detection of meshproxy's gossip against Serf's, side by side.

For each cluster size N it starts N gossip-only meshproxy nodes (``meshproxy run
--no-angel``, a ``[node]`` and a ``[gossip]`` section and an admin API each) as real
processes on loopback, then N Serf agents per profile (``local``, ``lan``), and for each:

* measures the traffic at rest: messages, UDP packets and bytes per node per second (UDP
  packets and loopback bytes from the kernel's counters, which count Serf the same way;
  meshproxy's message and payload counts from its own agent);
* kills one member with SIGKILL, ``--trials`` times (a different member each time, restarted
  afterwards), and times until the first other member and until every other member reports
  it dead (meshproxy: the ``gossip_member ... new=dead`` line each node logs, with its
  millisecond time stamp; Serf: its RPC ``members`` polled every 50 ms until ``failed``);
* counts false alarms: any member other than the victims suspected or declared dead.

Run as root it re-executes itself in a private network namespace (``unshare --net``): the
kernel's counters then see only these processes, and no port can clash with anything else
running on the machine. ``--soak-s 600 --busy`` keeps one 5-node meshproxy cluster running
that long with one CPU core kept busy, and counts false alarms.

Results: a table on stdout, JSON in ``bench/results/gossip-<stamp>.json`` (and
``gossip-latest.json``).
"""

from __future__ import annotations

import argparse
import base64
import calendar
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from bench.procs import Child, Processes, wait_port

RESULTS = Path(__file__).parent / "results"
TOKEN = "bench-gossip-token-0123456789"  # noqa: S105 - a throwaway local admin API
KEY = base64.b64encode(os.urandom(32)).decode()
SERF_POLL_S = 0.05
DETECT_TIMEOUT_S = 60.0
_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z \w+\s+(\S+)(.*)$")
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


# ----------------------------------------------------------------------------- plumbing


class Ports:
    """Free loopback ports (TCP and UDP), handed out once each."""

    def __init__(self) -> None:
        self._used: set[int] = set()
        self._next = 21000

    def take(self) -> int:
        while True:
            port, self._next = self._next, self._next + 1
            if port in self._used:
                continue
            try:
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(socket.AF_INET, kind) as sock:
                        sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            self._used.add(port)
            return port


def kernel_counters() -> tuple[int, int]:
    """(UDP datagrams sent, loopback bytes sent) in this network namespace."""
    lines = Path("/proc/net/snmp").read_text().splitlines()
    udp = [line.split() for line in lines if line.startswith("Udp:")]
    datagrams = int(udp[1][udp[0].index("OutDatagrams")])
    lo_bytes = 0
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            lo_bytes = int(rest.split()[8])
    return datagrams, lo_bytes


def parse_line(line: str) -> tuple[float, str, dict[str, str]] | None:
    match = _LINE.match(line)
    if match is None:
        return None
    stamp, millis, event, rest = match.groups()
    ts = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) + int(millis) / 1000
    fields = {k: (json.loads(v) if v.startswith('"') else v) for k, v in _FIELD.findall(rest)}
    return ts, event, fields


def median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(step)


@dataclass
class Trial:
    victim: str
    first_dead_s: float | None
    all_dead_s: float | None
    first_suspect_s: float | None
    observers: int
    saw_dead: int


@dataclass
class Result:
    impl: str
    n: int
    trials: list[Trial] = field(default_factory=list)
    rest: dict[str, float] = field(default_factory=dict)
    false_suspicions: int = 0
    false_deaths: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        firsts = [t.first_dead_s for t in self.trials if t.first_dead_s is not None]
        alls = [t.all_dead_s for t in self.trials if t.all_dead_s is not None]
        suspects = [t.first_suspect_s for t in self.trials if t.first_suspect_s is not None]
        return {
            "impl": self.impl,
            "n": self.n,
            "trials": len(self.trials),
            "first_dead_median_s": median(firsts),
            "all_dead_median_s": median(alls),
            "all_dead_max_s": round(max(alls), 3) if alls else None,
            "first_suspect_median_s": median(suspects),
            "false_suspicions": self.false_suspicions,
            "false_deaths": self.false_deaths,
            **self.rest,
        }


# ----------------------------------------------------------------------------- meshproxy


@dataclass
class MeshNode:
    name: str
    config: Path
    admin: int
    child: Child | None = None
    lives: int = 0


class MeshCluster:
    """N gossip-only meshproxy nodes, one process each."""

    def __init__(self, n: int, workdir: Path, procs: Processes, ports: Ports, seeds: int = 3):
        self.procs = procs
        self.nodes: list[MeshNode] = []
        gossip = [ports.take() for _ in range(n)]
        seed_list = ", ".join(f'"127.0.0.1:{p}"' for p in gossip[:seeds])
        for i in range(n):
            name = f"m{i:02d}"
            admin = ports.take()
            path = workdir / f"{name}.toml"
            path.write_text(
                f'[node]\nname = "{name}"\nrole = "edge"\n\n'
                f'[admin]\nbind = "127.0.0.1:{admin}"\ntoken = "{TOKEN}"\n\n'
                f'[gossip]\nbind = "127.0.0.1:{gossip[i]}"\nseeds = [{seed_list}]\n'
                f'keys = ["{KEY}"]\n'
            )
            self.nodes.append(MeshNode(name, path, admin))

    def start(self, node: MeshNode) -> None:
        node.lives += 1
        argv = [sys.executable, "-m", "meshproxy", "run", "--no-angel", "-c", str(node.config)]
        suffix = "" if node.lives == 1 else f"-life{node.lives}"
        node.child = self.procs.spawn(f"{node.name}{suffix}", argv)

    def start_all(self) -> None:
        for node in self.nodes:
            self.start(node)
        for node in self.nodes:
            assert node.child is not None
            wait_port(node.child, node.admin, timeout_s=120)

    def api(self, node: MeshNode, path: str) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{node.admin}{path}")
        request.add_header("Authorization", f"Bearer {TOKEN}")
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return json.loads(response.read())

    def converged(self, nodes: Sequence[MeshNode] | None = None) -> bool:
        names = {node.name for node in self.nodes}
        for node in nodes or self.nodes:
            try:
                rows = self.api(node, "/members")["members"]
            except OSError:
                return False
            alive = {r["name"] for r in rows if r["state"] == "alive"}
            if not names <= alive:
                return False
        return True

    def traffic(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for node in self.nodes:
            stats = self.api(node, "/status")["gossip"]["traffic"]
            for key, value in stats.items():
                total[key] = total.get(key, 0) + int(value)
        return total

    def events(self, since: dict[str, int]) -> list[tuple[str, float, str, dict[str, str]]]:
        """(observer, time, event, fields) logged since the given log sizes."""
        found = []
        for node in self.nodes:
            assert node.child is not None
            log = node.child.log
            with log.open("rb") as handle:
                handle.seek(since.get(str(log), 0))
                text = handle.read().decode(errors="replace")
            for line in text.splitlines():
                parsed = parse_line(line)
                if parsed is not None:
                    found.append((node.name, *parsed))
        return found

    def log_sizes(self) -> dict[str, int]:
        sizes = {}
        for node in self.nodes:
            assert node.child is not None
            sizes[str(node.child.log)] = node.child.log.stat().st_size
        return sizes


def member_events(
    events: list[tuple[str, float, str, dict[str, str]]], member: str, state: str
) -> dict[str, float]:
    """The first time each observer logged ``member`` entering ``state``."""
    first: dict[str, float] = {}
    for observer, ts, event, fields in events:
        if (
            event == "gossip_member"
            and fields.get("member") == member
            and fields.get("new") == state
            and observer not in first
        ):
            first[observer] = ts
    return first


def bench_meshproxy(n: int, args: argparse.Namespace, workdir: Path, ports: Ports) -> Result:
    result = Result("meshproxy", n)
    procs = Processes(workdir)
    cluster = MeshCluster(n, workdir, procs, ports)
    try:
        cluster.start_all()
        wait_for(cluster.converged, 120, f"{n} meshproxy nodes to converge", step=0.5)
        time.sleep(args.settle_s)
        start_sizes = cluster.log_sizes()
        result.rest = measure_rest(args.rest_s, n, cluster.traffic)
        victims: list[str] = []
        for t in range(args.trials):
            victim = cluster.nodes[1 + t % (n - 1)]
            victims.append(victim.name)
            observers = [node for node in cluster.nodes if node is not victim]
            sizes = cluster.log_sizes()
            assert victim.child is not None
            killed_at = time.time()
            os.kill(victim.child.process.pid, signal.SIGKILL)
            victim.child.process.wait()

            def everyone_knows(
                victim: MeshNode = victim, sizes: dict[str, int] = sizes, count: int = n - 1
            ) -> bool:
                dead = member_events(cluster.events(sizes), victim.name, "dead")
                return len(dead) >= count

            with contextlib.suppress(TimeoutError):
                wait_for(everyone_knows, DETECT_TIMEOUT_S, f"{victim.name} to be seen dead")
            events = cluster.events(sizes)
            dead = member_events(events, victim.name, "dead")
            suspect = member_events(events, victim.name, "suspect")
            result.trials.append(
                Trial(
                    victim.name,
                    round(min(dead.values()) - killed_at, 3) if dead else None,
                    round(max(dead.values()) - killed_at, 3)
                    if len(dead) >= len(observers)
                    else None,
                    round(min(suspect.values()) - killed_at, 3) if suspect else None,
                    len(observers),
                    len(dead),
                )
            )
            print(f"  meshproxy n={n} trial {t + 1}: {result.trials[-1]}", flush=True)
            cluster.start(victim)
            assert victim.child is not None
            wait_port(victim.child, victim.admin, timeout_s=60)
            wait_for(cluster.converged, 60, f"{victim.name} to rejoin", step=0.2)
        count_false_alarms(result, cluster.events(start_sizes), victims)
        if args.soak_s and n == args.soak_n:
            soak(result, cluster, args)
    finally:
        procs.stop_all()
    return result


def count_false_alarms(
    result: Result, events: list[tuple[str, float, str, dict[str, str]]], victims: list[str]
) -> None:
    for _, _, event, fields in events:
        if event != "gossip_member" or fields.get("member") in victims:
            continue
        if fields.get("new") == "suspect":
            result.false_suspicions += 1
        elif fields.get("new") == "dead":
            result.false_deaths += 1


def soak(result: Result, cluster: MeshCluster, args: argparse.Namespace) -> None:
    """Keep the cluster running with one core busy; every suspicion is a false alarm."""
    burner = None
    if args.busy:
        burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    sizes = cluster.log_sizes()
    try:
        print(f"  soak: {args.soak_s:g} s, one core busy: {bool(burner)}", flush=True)
        time.sleep(args.soak_s)
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
    soaked = Result("soak", result.n)
    count_false_alarms(soaked, cluster.events(sizes), [])
    result.notes.append(
        f"soak {args.soak_s:g} s (busy core: {args.busy}): "
        f"{soaked.false_suspicions} false suspicions, {soaked.false_deaths} false deaths"
    )
    result.rest["soak_s"] = args.soak_s
    result.rest["soak_false_suspicions"] = soaked.false_suspicions
    result.rest["soak_false_deaths"] = soaked.false_deaths


def measure_rest(
    rest_s: float, n: int, own: Callable[[], dict[str, int]] | None
) -> dict[str, float]:
    """Per node per second over ``rest_s``: kernel UDP packets and loopback bytes, and the
    implementation's own counts when it has them."""
    before_own = own() if own is not None else {}
    datagrams0, bytes0 = kernel_counters()
    time.sleep(rest_s)
    datagrams1, bytes1 = kernel_counters()
    after_own = own() if own is not None else {}
    per = n * rest_s
    rest = {
        "udp_packets_per_node_s": round((datagrams1 - datagrams0) / per, 2),
        "lo_bytes_per_node_s": round((bytes1 - bytes0) / per, 1),
    }
    if own is not None:
        for key in ("messages_sent", "packets_sent", "bytes_sent", "sync_bytes_sent"):
            rest[f"own_{key}_per_node_s"] = round(
                (after_own.get(key, 0) - before_own.get(key, 0)) / per, 2
            )
    return rest


# ----------------------------------------------------------------------------- Serf


class SerfRPC:
    """Just enough of Serf's msgpack RPC protocol: handshake and members."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape")
        self.seq = 0
        self._request("handshake", {"Version": 1})
        self._header()

    def _request(self, command: str, body: dict[str, Any] | None = None) -> None:
        self.seq += 1
        data = msgpack.packb({"Command": command, "Seq": self.seq})
        if body is not None:
            data += msgpack.packb(body)
        self.sock.sendall(data)

    def _read(self) -> Any:
        while True:
            with contextlib.suppress(StopIteration):
                return next(self.unpacker)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("serf closed the RPC connection")
            self.unpacker.feed(chunk)

    def _header(self) -> None:
        header = self._read()
        if header.get("Error"):
            raise RuntimeError(f"serf RPC error: {header['Error']}")

    def members(self) -> dict[str, str]:
        self._request("members")
        self._header()
        body = self._read()
        return {m["Name"]: m["Status"] for m in body["Members"]}

    def close(self) -> None:
        self.sock.close()


@dataclass
class SerfAgent:
    name: str
    bind: int
    rpc: int
    child: Child | None = None
    client: SerfRPC | None = None
    lives: int = 0


def bench_serf(
    n: int, profile: str, args: argparse.Namespace, workdir: Path, ports: Ports
) -> Result:
    result = Result(f"serf-{profile}", n)
    serf = shutil.which("serf")
    if serf is None:
        result.notes.append("serf is not installed (apt-get install serf)")
        return result
    procs = Processes(workdir)
    agents = [SerfAgent(f"s{i:02d}", ports.take(), ports.take()) for i in range(n)]

    def start(agent: SerfAgent) -> None:
        agent.lives += 1
        argv = [
            serf,
            "agent",
            f"-node={agent.name}",
            f"-bind=127.0.0.1:{agent.bind}",
            f"-rpc-addr=127.0.0.1:{agent.rpc}",
            f"-profile={profile}",
            "-log-level=warn",
        ]
        if agent is not agents[0]:
            argv.append(f"-join=127.0.0.1:{agents[0].bind}")
        suffix = "" if agent.lives == 1 else f"-life{agent.lives}"
        agent.child = procs.spawn(f"{profile}-{agent.name}{suffix}", argv)
        wait_port(agent.child, agent.rpc, timeout_s=30)
        if agent.client is not None:
            agent.client.close()
        agent.client = SerfRPC(agent.rpc)

    def views(among: Sequence[SerfAgent]) -> dict[str, dict[str, str]]:
        out = {}
        for agent in among:
            assert agent.client is not None
            out[agent.name] = agent.client.members()
        return out

    def converged() -> bool:
        return all(
            sum(1 for s in view.values() if s == "alive") == n for view in views(agents).values()
        )

    try:
        for agent in agents:
            start(agent)
        wait_for(converged, 60, f"{n} serf agents to converge", step=0.2)
        time.sleep(args.settle_s)
        result.rest = measure_rest(args.rest_s, n, None)
        victims = []
        for t in range(args.trials):
            victim = agents[1 + t % (n - 1)]
            victims.append(victim.name)
            observers = [a for a in agents if a is not victim]
            assert victim.child is not None
            killed_at = time.time()
            os.kill(victim.child.process.pid, signal.SIGKILL)
            victim.child.process.wait()
            seen: dict[str, float] = {}
            deadline = time.monotonic() + DETECT_TIMEOUT_S
            while len(seen) < len(observers) and time.monotonic() < deadline:
                for name, view in views([a for a in observers if a.name not in seen]).items():
                    if view.get(victim.name) == "failed":
                        seen[name] = time.time()
                time.sleep(SERF_POLL_S)
            result.trials.append(
                Trial(
                    victim.name,
                    round(min(seen.values()) - killed_at, 3) if seen else None,
                    round(max(seen.values()) - killed_at, 3)
                    if len(seen) >= len(observers)
                    else None,
                    None,
                    len(observers),
                    len(seen),
                )
            )
            print(f"  serf-{profile} n={n} trial {t + 1}: {result.trials[-1]}", flush=True)
            start(victim)
            wait_for(converged, 60, f"{victim.name} to rejoin", step=0.2)
        final = views(agents)
        result.false_deaths = sum(
            1
            for view in final.values()
            for name, status in view.items()
            if name not in victims and status != "alive"
        )
        result.notes.append("serf: false alarms counted from the final views only")
    finally:
        for agent in agents:
            if agent.client is not None:
                agent.client.close()
        procs.stop_all()
    return result


# ----------------------------------------------------------------------------- report


def table(results: list[Result]) -> str:
    rows = [
        (
            "impl",
            "N",
            "trials",
            "first dead",
            "all dead",
            "all max",
            "1st suspect",
            "false+",
            "msgs/node/s",
            "UDP pkts/node/s",
            "lo B/node/s",
        )
    ]

    def f(value: Any, spec: str = ".2f") -> str:
        return "-" if value is None else format(value, spec)

    for result in results:
        s = result.summary()
        rows.append(
            (
                s["impl"],
                str(s["n"]),
                str(s["trials"]),
                f(s["first_dead_median_s"]),
                f(s["all_dead_median_s"]),
                f(s["all_dead_max_s"]),
                f(s["first_suspect_median_s"]),
                f"{s['false_suspicions']}/{s['false_deaths']}",
                f(s.get("own_messages_sent_per_node_s"), ".1f"),
                f(s.get("udp_packets_per_node_s"), ".1f"),
                f(s.get("lo_bytes_per_node_s"), ".0f"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def checks(results: list[Result]) -> list[str]:
    """The issue's targets at N = 5, stated against Serf's local profile in the same run."""
    out = []
    by = {(r.impl, r.n): r.summary() for r in results}
    ours, serf = by.get(("meshproxy", 5)), by.get(("serf-local", 5))
    if ours is not None and ours["all_dead_median_s"] is not None:
        median_all = ours["all_dead_median_s"]
        out.append(
            f"N=5 median detection (all nodes) {median_all:.2f} s <= 1.5 s: "
            f"{'yes' if median_all <= 1.5 else 'NO'}"
        )
        if serf is not None and serf["all_dead_median_s"]:
            ratio = median_all / serf["all_dead_median_s"]
            out.append(
                f"N=5 vs serf local ({serf['all_dead_median_s']:.2f} s): {ratio:.2f}x <= 0.4x: "
                f"{'yes' if ratio <= 0.4 else 'NO'}"
            )
    return out


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.gossip", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="5,20", help="cluster sizes (5,20)")
    parser.add_argument("--trials", type=int, default=5, help="kills per cluster (5)")
    parser.add_argument("--rest-s", type=float, default=10.0, help="traffic window at rest (10)")
    parser.add_argument("--settle-s", type=float, default=3.0, help="wait after convergence (3)")
    parser.add_argument("--profiles", default="local,lan", help="serf profiles (local,lan)")
    parser.add_argument("--no-serf", action="store_true", help="meshproxy only")
    parser.add_argument("--soak-s", type=float, default=0.0, help="false-alarm soak (0: none)")
    parser.add_argument("--soak-n", type=int, default=5, help="cluster size for the soak (5)")
    parser.add_argument("--busy", action="store_true", help="keep one core busy during the soak")
    parser.add_argument("--no-netns", action="store_true", help="do not use a private netns")
    parser.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.in_netns and not args.no_netns and os.geteuid() == 0 and shutil.which("unshare"):
        os.execvp(  # noqa: S606 - our own interpreter, in a namespace of its own
            "unshare",
            ["unshare", "--net", "--", sys.executable, "-m", "bench.gossip", "--in-netns", *argv],
        )
    if args.in_netns:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = [int(s) for s in args.sizes.split(",") if s]
    profiles = [] if args.no_serf else [p for p in args.profiles.split(",") if p]
    ports = Ports()
    results: list[Result] = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-gossip-") as tmp:
        workdir = Path(tmp)
        for n in sizes:
            print(f"N = {n}", flush=True)
            results.append(bench_meshproxy(n, args, workdir, ports))
            for profile in profiles:
                results.append(bench_serf(n, profile, args, workdir, ports))
    text = table(results)
    verdicts = checks(results)
    print()
    print("kill -9 of one member; seconds from the kill (medians over trials); false+ =")
    print("false suspicions/false deaths of members never killed; rates at rest per node")
    print(text)
    for line in verdicts:
        print(line)
    for result in results:
        for note in result.notes:
            print(f"{result.impl} n={result.n}: {note}")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    record = {
        "started": stamp,
        "settings": vars(args),
        "network_namespace": args.in_netns,
        "summary": [r.summary() for r in results],
        "results": [asdict(r) for r in results],
        "checks": verdicts,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"gossip-{stamp}.json"
    for target in (path, RESULTS / "gossip-latest.json"):
        target.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
