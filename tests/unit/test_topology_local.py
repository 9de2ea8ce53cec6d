"""Topologies on loopback: addressing, configs rendered from it, start order, shipped specs."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshproxy import config, topology
from meshproxy.cli import main as cli
from meshproxy.cli.demo import Cast
from meshproxy.errors import ConfigError
from meshproxy.testbed import mariadb
from meshproxy.topology import secrets
from meshproxy.topology.local import LocalTopology, LoopbackAddressing, start_groups
from meshproxy.topology.render import DockerAddressing, node_config
from meshproxy.topology.spec import Spec

ROOT = Path(__file__).resolve().parents[2]
# Passthrough specs only (session mode is rendered for compose).
SPECS = [
    p for p in sorted((ROOT / "topology").glob("*.toml")) if not topology.load(p).session_mode()
]


def _ports(start: int = 20000) -> Callable[[str], int]:
    counter = itertools.count(start)
    return lambda host: next(counter)


def _plan(spec: Spec, secrets_dir: Path = Path("secrets")) -> LoopbackAddressing:
    backends = {b.name: f"127.0.0.1:{3300 + i}" for i, b in enumerate(spec.backends)}
    return LoopbackAddressing.plan(spec, backends, _ports(), secrets_dir)


def _binds(doc: dict[str, Any]) -> list[str]:
    binds = [doc["admin"]["bind"], doc["gossip"]["bind"]]
    binds += [listener["bind"] for listener in doc.get("listener", [])]
    if "mesh_bind" in doc["node"]:
        binds.append(doc["node"]["mesh_bind"])
    return binds


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_loopback_configs_are_valid_and_bind_only_their_own_address(
    spec_path: Path, tmp_path: Path
) -> None:
    """Each proxy's loopback config is a valid node config, whose secrets (certificate, key,
    gossip key, admin token) load, that binds only on the node's own 127.0.0.N; no two
    binds of the topology share an address and port."""
    spec = topology.load(spec_path)
    at = _plan(spec, secrets.ensure(spec, tmp_path / "secrets"))
    seen: list[str] = []
    for node in spec.proxies():
        doc = node_config(spec, node, at)
        cfg = config.parse(doc, f"{node.name}.toml")
        assert (cfg.node.name, cfg.node.role) == (node.name, node.role)
        binds = _binds(doc)
        assert {b.rpartition(":")[0] for b in binds} == {at.hosts[node.name]}
        seen += binds
    assert len(seen) == len(set(seen))
    assert len(set(at.hosts.values())) == len(spec.proxies())


def test_loopback_hosts_mirror_the_container_host_numbers() -> None:
    """A proxy's loopback address ends in the same host number as its container address."""
    spec = topology.load(ROOT / "topology" / "chain.toml")
    at = _plan(spec)
    for node in spec.proxies():
        container = spec.address(node.name, spec.mesh_network)
        assert at.hosts[node.name].split(".")[-1] == container.split(".")[-1]
    assert [at.hosts[n] for n in ("p1", "p2", "p3", "p4")] == [
        "127.0.0.11",
        "127.0.0.12",
        "127.0.0.13",
        "127.0.0.14",
    ]


def test_loopback_middles_dial_the_backends_from_their_own_address() -> None:
    """A middle's pool lists the started backends and dials them from the middle's address,
    so a backend's USER() tells which middle carried a session."""
    spec = topology.load(ROOT / "topology" / "chain.toml")
    at = _plan(spec)
    for name in ("p2", "p3", "p4"):
        node = next(n for n in spec.nodes if n.name == name)
        (pool,) = node_config(spec, node, at)["pool"]
        assert pool["servers"] == ["127.0.0.1:3300", "127.0.0.1:3301"]
        assert pool["source_ip"] == at.hosts[name]


def test_loopback_edge_reaches_middles_and_gossips_with_everyone() -> None:
    """An edge's tier lists the middles' loopback mesh addresses and its gossip seeds are
    every other proxy's gossip address."""
    spec = topology.load(ROOT / "topology" / "chain.toml")
    at = _plan(spec)
    proxies = {n.name: n for n in spec.proxies()}
    doc = node_config(spec, proxies["p1"], at)
    (tier,) = doc["tier"]
    assert tier["members"] == [at.mesh(proxies[n]) for n in ("p2", "p3", "p4")]
    assert doc["gossip"]["seeds"] == [at.gossip(proxies[n]) for n in ("p2", "p3", "p4")]
    assert doc["listener"][0]["bind"] == at.listener(proxies["p1"], spec.services[0])


def test_plan_never_hands_a_node_the_same_port_twice() -> None:
    """Even when the port source repeats itself, one node's ports are all different."""
    spec = topology.load(ROOT / "topology" / "chain.toml")
    repeating = iter([7000, 7000, 7001, 7001, 7002] * 20)
    at = LoopbackAddressing.plan(spec, {"b1": "x:1", "b2": "x:2"}, lambda host: next(repeating))
    for ports in at.ports.values():
        assert len(set(ports.values())) == len(ports)


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_docker_addressing_is_the_default(spec_path: Path) -> None:
    """Without an addressing, node_config renders the containers' addresses, with no
    source address."""
    spec = topology.load(spec_path)
    for node in spec.proxies():
        doc = node_config(spec, node)
        assert doc == node_config(spec, node, DockerAddressing(spec))
        assert all("source_ip" not in t for t in [*doc.get("pool", []), *doc.get("tier", [])])


def test_middles_nearest_the_backends_start_first_and_edges_last() -> None:
    """Start groups go from the tier that dials the backends outwards to the edges."""
    groups = {
        path.stem: [[n.name for n in g] for g in start_groups(topology.load(path))]
        for path in SPECS
    }
    assert groups["chain"] == [["p2", "p3", "p4"], ["p1"]]
    assert groups["cascade"] == [["d1", "d2"], ["m1", "m2"], ["p1"]]
    assert groups["two-edges"] == [["p3", "p4", "p5"], ["p1", "p2"]]


def test_local_topology_refuses_monitor_credentials_its_backends_lack() -> None:
    """A spec whose monitor login the local backends do not create is refused, naming the key."""
    spec = topology.load(ROOT / "topology" / "chain.toml")
    other = dataclasses.replace(spec, monitor_password="secret")
    with pytest.raises(ConfigError) as info:
        LocalTopology(other)
    assert info.value.key == "topology.monitor"
    assert mariadb.MONITOR_USER in info.value.reason


def test_shipped_chain_spec_is_the_repository_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spec shipped in the package is topology/chain.toml, and a bare name finds it
    wherever the command runs."""
    repo = topology.load(ROOT / "topology" / "chain.toml")
    shipped = topology.packaged_spec("chain")
    assert dataclasses.replace(shipped, source="") == dataclasses.replace(repo, source="")
    monkeypatch.chdir(tmp_path)
    assert topology.load_spec("chain").name == "chain"
    (tmp_path / "chain").write_text("[topology\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        topology.load_spec("chain")  # a file of that name wins


def test_demo_cast_of_the_chain() -> None:
    """The demo sends clients through p1, shows p2-p4 and kills p3; in a cascade it shows the
    middles that dial the backends."""
    cast = Cast.of(topology.packaged_spec("chain"))
    assert (cast.edge.name, cast.middles, cast.victim) == ("p1", ["p2", "p3", "p4"], "p3")
    assert Cast.of(topology.packaged_spec("cascade")).middles == ["d1", "d2"]


def test_topology_up_without_local_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """``topology up`` without --local exits 2 and says that only --local exists."""
    assert cli.main(["topology", "up", "chain"]) == 2
    assert "only --local" in capsys.readouterr().err
