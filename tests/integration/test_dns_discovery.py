"""Gossip seeds from DNS with real processes: nodes with no static seeds find each other
through a name a real dnsmasq answers, follow its records as they change, and keep running
when the resolver does not answer."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import dns.exception
import dns.nameserver
import dns.resolver
import pytest

from tests.integration.harness import (
    HOST,
    Doc,
    NodeFactory,
    NodeProcess,
    free_port,
    wait_until,
)
from tests.integration.test_gossip import TOKEN, api, member_states, with_gossip

pytestmark = pytest.mark.integration

INTERVAL_S = 1.0
# Every wait for discovery allows a few intervals, plus slack for a busy 2-core machine.
FOUND_WITHIN_S = 4 * INTERVAL_S + 6.0
READY_NAME = "dnsmasq-ready.test"


def dnsmasq_path() -> str:
    """dnsmasq's binary; fails (never skips) with how to get it."""
    path = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail(
            "dnsmasq is not installed: `./dev setup` installs it (Debian package dnsmasq-base)"
        )
    return path


def udp_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def tcp_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def shared_port(hosts: Sequence[str]) -> int:
    """A port free for UDP and TCP on every one of ``hosts`` (nodes gossiping on one port)."""
    for _ in range(50):
        port = free_port()
        if all(udp_free(h, port) and tcp_free(h, port) for h in hosts):
            return port
    raise AssertionError(f"no port free on all of {hosts}")


class Dnsmasq:
    """A dnsmasq answering A/AAAA queries on loopback from one hosts file, nothing else."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.hosts = workdir / "dns-hosts"
        self.log = workdir / "dnsmasq.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.records: dict[str, tuple[str, ...]] = {}
        self._stderr: IO[bytes] | None = None

    def start(self, records: Mapping[str, Sequence[str]]) -> None:
        self._write(records)
        binary = dnsmasq_path()
        for _ in range(5):  # a port taken between our check and dnsmasq's bind: next one
            port = free_port()
            if not udp_free(HOST, port):
                continue
            self.port = port
            self._stderr = (self.workdir / "dnsmasq.stderr").open("ab")
            self.process = subprocess.Popen(
                [
                    binary,
                    "--keep-in-foreground",  # not a daemon, but not -d's debug mode either
                    "--conf-file=/dev/null",  # no /etc/dnsmasq.conf, /etc/dnsmasq.d
                    f"--port={port}",
                    f"--listen-address={HOST}",
                    "--bind-interfaces",
                    "--no-resolv",
                    "--no-hosts",
                    "--no-negcache",
                    "--local=/#/",  # every name is ours: NXDOMAIN, never a forward (REFUSED)
                    f"--addn-hosts={self.hosts}",
                    f"--pid-file={self.workdir / 'dnsmasq.pid'}",
                    f"--log-facility={self.log}",
                    # Stay this user: the test's files are not readable by dnsmasq's "nobody".
                    f"--user={_user()}",
                    f"--group={_group()}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
            )
            try:
                wait_until(self._answers, 10, "dnsmasq to answer")
            except AssertionError:
                self.stop()
                continue
            return
        raise AssertionError(f"dnsmasq did not start:\n{self.output()}")

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"dnsmasq exited with {self.process.returncode}")
        return all(self.lookup(name) == set(addrs) for name, addrs in self.records.items())

    def set_records(self, records: Mapping[str, Sequence[str]]) -> None:
        """Rewrite the hosts file, SIGHUP, and return once dnsmasq answers the new records."""
        self._write(records)
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)
        wait_until(self._answers, 10, f"dnsmasq to answer {records} after SIGHUP")

    def lookup(self, name: str) -> set[str]:
        """The A records dnsmasq has for ``name`` now (none if the query fails)."""
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(HOST, self.port)]
        try:
            answer = resolver.resolve(name, "A", lifetime=1.0, raise_on_no_answer=False)
        except (dns.exception.DNSException, OSError):
            return set()
        return {str(getattr(rr, "address", "")) for rr in answer.rrset or ()}

    def _write(self, records: Mapping[str, Sequence[str]]) -> None:
        # A name always there, so that "dnsmasq answers these records" never holds vacuously.
        self.records = {READY_NAME: (HOST,)} | {n: tuple(a) for n, a in records.items()}
        lines = [f"{a} {name}" for name, addrs in self.records.items() for a in addrs]
        partial = self.hosts.with_suffix(".tmp")
        partial.write_text("".join(f"{line}\n" for line in lines))
        partial.replace(self.hosts)  # dnsmasq never reads a half-written file

    def output(self) -> str:
        parts = [self.workdir / "dnsmasq.stderr", self.log]
        return "\n".join(p.read_text(errors="replace") for p in parts if p.exists())

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _group() -> str:
    import grp

    return grp.getgrgid(os.getgid()).gr_name


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Dnsmasq]:
    """A dnsmasq on 127.0.0.1 and a free port, answering from a hosts file the test writes."""
    server = Dnsmasq(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def dns_node(
    name: str,
    host: str,
    gossip_port: int,
    dns_names: Sequence[str],
    dns_servers: Sequence[str],
) -> tuple[Doc, int]:
    """A gossip-only node on ``host`` with no static seeds and discovery = "dns"; returns the
    config and its admin port."""
    doc, admin_port = with_gossip({"node": {"name": name, "role": "edge"}}, gossip_port, [])
    doc["gossip"] |= {
        "bind": f"{host}:{gossip_port}",
        "discovery": "dns",
        "dns_names": list(dns_names),
        "dns_servers": list(dns_servers),
        "dns_interval_s": INTERVAL_S,
        "dns_timeout_ms": 500,
    }
    return doc, admin_port


def one_cluster(admins: Sequence[int], expected: set[str]) -> bool:
    """Whether every node sees exactly ``expected`` as its members, all alive."""
    want = dict.fromkeys(expected, "alive")
    return all(member_states(admin) == want for admin in admins)


def test_three_nodes_without_seeds_find_each_other_through_one_name(
    dnsmasq: Dnsmasq, nodes: NodeFactory
) -> None:
    """Three nodes on 127.0.0.2-4 with no static seeds become one cluster through the A
    records of one short name (as a headless Service's), each joining the other two and
    never itself; a reload that changes the DNS settings is refused without harm."""
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    port = shared_port(hosts)
    dnsmasq.start({"chain-gossip": hosts})
    server = f"{HOST}:{dnsmasq.port}"
    admins: list[int] = []
    started: list[NodeProcess] = []
    docs: list[Doc] = []
    for i, host in enumerate(hosts, 1):
        doc, admin = dns_node(f"d{i}", host, port, ["chain-gossip"], [server])
        started.append(nodes.start(doc))
        admins.append(admin)
        docs.append(doc)

    wait_until(
        lambda: one_cluster(admins, {"d1", "d2", "d3"}),
        FOUND_WITHIN_S,
        "three nodes to be one cluster through DNS",
    )
    for node, host in zip(started, hosts, strict=True):
        assert node.wait_for_event("gossip_started").fields["seeds"] == "none"
        seeds = node.wait_for_event("dns_seeds").fields["added"].split(",")
        assert sorted(seeds) == sorted(f"{h}:{port}" for h in hosts if h != host)
        assert not node.events("dns_failed")

    # [gossip] does not change at runtime: a reload that tries is refused, nothing stops.
    docs[0]["gossip"]["dns_names"] = ["other-name"]
    started[0].reload(docs[0])
    refused = started[0].wait_for_event("reload_failed")
    assert "[gossip] section cannot change at runtime" in refused.fields["error"]
    assert one_cluster(admins, {"d1", "d2", "d3"})


def test_a_record_added_later_is_found_and_a_removed_one_is_logged(
    dnsmasq: Dnsmasq, nodes: NodeFactory
) -> None:
    """A fourth node that knows nobody joins the cluster within a few intervals once its
    address is added to the name's records; a record removed later is logged as removed."""
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    port = shared_port(hosts)
    dnsmasq.start({"tasks.middle": hosts[:3]})
    server = f"{HOST}:{dnsmasq.port}"
    admins: list[int] = []
    started: list[NodeProcess] = []
    for i, host in enumerate(hosts[:3], 1):
        doc, admin = dns_node(f"d{i}", host, port, ["tasks.middle"], [server])
        started.append(nodes.start(doc))
        admins.append(admin)
    # The fourth gossips on the same port but neither has seeds nor looks anything up.
    lone_doc, lone_admin = with_gossip({"node": {"name": "d4", "role": "edge"}}, port, [])
    lone_doc["gossip"]["bind"] = f"{hosts[3]}:{port}"
    nodes.start(lone_doc)
    wait_until(lambda: one_cluster(admins, {"d1", "d2", "d3"}), FOUND_WITHIN_S, "three nodes")
    assert member_states(lone_admin) == {"d4": "alive"}

    dnsmasq.set_records({"tasks.middle": hosts})
    wait_until(
        lambda: one_cluster([*admins, lone_admin], {"d1", "d2", "d3", "d4"}),
        FOUND_WITHIN_S,
        "the added record's node to be found by the others",
    )
    fourth = f"{hosts[3]}:{port}"
    assert started[0].wait_for_event("dns_seeds", added=fourth).fields["removed"] == "-"

    # (A node whose round fell between the two changes never saw d4's record: d3's it saw.)
    dnsmasq.set_records({"tasks.middle": hosts[:2]})
    for node in started[:2]:
        node.wait_for_event("dns_seeds", FOUND_WITHIN_S, removed=f"{hosts[2]}:{port}")
    # Gossip, not DNS, decides membership: d3 and d4 are still alive members.
    assert member_states(admins[0]) == dict.fromkeys(["d1", "d2", "d3", "d4"], "alive")


@contextlib.contextmanager
def silent_resolver() -> Iterator[int]:
    """A UDP port on loopback that receives DNS queries and never answers them."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        yield sock.getsockname()[1]


def metrics(admin_port: int) -> str:
    request = urllib.request.Request(f"http://{HOST}:{admin_port}/metrics")
    request.add_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        return str(response.read().decode())


def test_a_resolver_that_never_answers_is_counted_and_the_node_keeps_serving(
    nodes: NodeFactory,
) -> None:
    """With a resolver that never answers, every timed-out lookup is counted in
    gossip_dns_failures{reason="timeout"} (admin /status and /metrics), the failure is logged
    once, not per round, and the node keeps serving its admin API and gossip."""
    hosts = ["127.0.0.2", "127.0.0.3"]
    port = shared_port(hosts)
    with silent_resolver() as silent:
        doc, admin = dns_node("d1", hosts[0], port, ["chain-gossip"], [f"{HOST}:{silent}"])
        doc["gossip"]["dns_timeout_ms"] = 200
        node = nodes.start(doc)

        def timeouts() -> int:
            rows = api(admin, "/status")["counters"].get("gossip_dns_failures", [])
            return sum(r["value"] for r in rows if r["labels"] == {"reason": "timeout"})

        wait_until(lambda: timeouts() >= 3, 10 * INTERVAL_S, "three rounds of DNS timeouts")
        assert len(node.events("dns_failed", reason="timeout")) == 1
        text = metrics(admin)
        assert 'meshproxy_gossip_dns_failures_total{reason="timeout"}' in text, text

        # Gossip still works: a node seeded with d1's address joins it.
        peer_doc, peer_admin = with_gossip({"node": {"name": "d2", "role": "edge"}}, port, [])
        peer_doc["gossip"] |= {"bind": f"{hosts[1]}:{port}", "seeds": [f"{hosts[0]}:{port}"]}
        nodes.start(peer_doc)
        wait_until(
            lambda: one_cluster([admin, peer_admin], {"d1", "d2"}),
            FOUND_WITHIN_S,
            "a statically seeded node to join the node whose DNS fails",
        )
        failures = timeouts()
        wait_until(lambda: timeouts() > failures, 10 * INTERVAL_S, "DNS rounds to go on")
        assert api(admin, "/status")["node"] == "d1"
