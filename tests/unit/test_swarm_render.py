"""Swarm stacks rendered from the topology specs: valid shared configs, secrets mounted and
never inlined, services per workload, committed output in sync."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshproxy import config
from meshproxy.topology import cluster, spec, swarm
from tests.unit.test_topology import PASSTHROUGH_SPECS as SPECS


def stack_of(spec_path: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(swarm.render(spec.load(spec_path))[swarm.STACK_FILE])
    return document


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_every_workload_config_loads_as_its_tasks_load_it(
    spec_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each workload's config, with the task's name from the environment as swarm sets it,
    is a valid node config that finds its gossip peers by DNS under swarm's ``tasks.NAME``
    and advertises its address on the mesh network."""
    topology = spec.load(spec_path)
    files = swarm.render(topology)
    monkeypatch.setenv(cluster.NODE_ENV, "meshproxy-x_middle-2")
    names = tuple(f"tasks.{w.name}" for w in cluster.workloads(topology))
    mesh = next(n.subnet for n in topology.networks if n.name == topology.mesh_network)
    for workload in cluster.workloads(topology):
        path = f"configs/{workload.name}.toml"
        data = config.expand_environment(tomllib.loads(files[path]), path)
        cfg = config.parse(data, path, files=False)
        assert (cfg.node.name, cfg.node.role) == ("meshproxy-x_middle-2", workload.role)
        assert cfg.node.advertise_network == str(mesh)
        assert cfg.gossip is not None
        assert (cfg.gossip.discovery, cfg.gossip.dns_names) == ("dns", names)
        assert cfg.mesh_tls is not None
        assert cfg.mesh_tls.name == workload.name


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_services_run_each_workload_with_its_config_and_secrets(spec_path: Path) -> None:
    """Middles are one replicated service per tier with a task per middle, edges global
    services; each proxy service mounts its config and exactly the secrets its config
    names, from files in secrets/, and drains within its stop grace period."""
    topology = spec.load(spec_path)
    document = stack_of(spec_path)
    files = swarm.render(topology)
    services = document["services"]
    for workload in cluster.workloads(topology):
        entry = services[workload.name]
        deploy = entry["deploy"]
        if workload.role == "edge":
            assert deploy["mode"] == "global"
        else:
            assert deploy["replicas"] == len(workload.nodes) >= 1
        assert entry["configs"] == [
            {"source": f"{workload.name}-config", "target": swarm.CONFIG_PATH}
        ]
        path = f"configs/{workload.name}.toml"
        cfg = config.parse(
            tomllib.loads(files[path].replace("${MESHPROXY_NODE}", "n")), path, False
        )
        assert cfg.admin is not None
        assert cfg.gossip is not None
        assert cfg.mesh_tls is not None
        named = [cfg.admin.token_file, cfg.gossip.keys_file, cfg.mesh_tls.ca]
        named += [cfg.mesh_tls.cert, cfg.mesh_tls.key]
        assert sorted(p.removeprefix("/run/secrets/") for p in named) == sorted(entry["secrets"])
        for name in entry["secrets"]:
            assert document["secrets"][name]["file"].startswith("./secrets/")
        grace_s = int(entry["stop_grace_period"].removesuffix("s"))
        assert grace_s > cfg.node.drain_timeout_s
        assert "/live" in entry["healthcheck"]["test"][-1]
    apps = [n.name for n in topology.nodes if n.role == "app"]
    backends = [b.name for b in topology.backends]
    assert set(services) == {w.name for w in cluster.workloads(topology)} | {*apps, *backends}
    assert {n["driver"] for n in document["networks"].values()} == {"overlay"}
