"""Topology specs: precise spec errors, valid rendered node configs, committed output in sync."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshproxy import config, topology
from meshproxy.cli import main as cli
from meshproxy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "topology").glob("*.toml"))
# Kubernetes, swarm and local processes render passthrough specs only.
PASSTHROUGH_SPECS = [p for p in SPECS if not topology.load(p).session_mode()]


def _chain() -> dict[str, Any]:
    return tomllib.loads((ROOT / "topology" / "chain.toml").read_text())


def _error(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        topology.parse(data, "spec.toml")
    return info.value


def test_the_three_issue_topologies_exist() -> None:
    """topology/ holds at least the chain, cascade and two-edges specs."""
    assert {p.stem for p in SPECS} >= {"chain", "cascade", "two-edges"}


@pytest.mark.parametrize(
    ("edit", "key", "reason"),
    [
        (lambda d: d["node"][1].update(tier="midle"), "node[1].tier", "no tier named 'midle'"),
        (lambda d: d["node"][0].update(edge="p2"), "node[0].edge", "no edge named 'p2'"),
        (lambda d: d["node"][2].update(colour="red"), "node[2].colour", "unknown key"),
        (lambda d: d["node"][2].pop("role"), "node[2].role", "required key is missing"),
        (lambda d: d["node"][2].update(role="sidecar"), "node[2].role", "must be one of"),
        (lambda d: d["node"][0].update(tier="middle"), "node[0].tier", "not allowed"),
        (lambda d: d["node"][2].update(networks=["mesh"]), "node[2].networks", "backend 'b1'"),
        (lambda d: d["node"][1].update(networks=["front"]), "node[1].networks", "mesh network"),
        (lambda d: d["node"][3].update(name="p2"), "node[3].name", "duplicate name 'p2'"),
        (lambda d: d["backend"][0].update(name="p2"), "backend[0].name", "duplicate name"),
        (lambda d: d["service"][0].update(backends=["b9"]), "service[0].backends[0]", "b9"),
        (lambda d: d["service"][0].update(port=0), "service[0].port", "1-65535"),
        (lambda d: d["tier"][0].update(upstream="middle"), "tier[0].upstream", "loop"),
        (lambda d: d["tier"][0].update(upstream="deep"), "tier[0].upstream", "'deep'"),
        (lambda d: d["network"][1].update(subnet="10.0.0.0/29"), "network[1].subnet", "small"),
        (lambda d: d["network"][1].update(subnet="10.231.1.0/25"), "network[1].subnet", "overlap"),
        (lambda d: d["network"][0].update(subnet="nope"), "network[0].subnet", "IPv4"),
        (lambda d: d["topology"].update(admin_token="x" * 20), "topology.admin_token", "secrets"),
        (lambda d: d["topology"].update(gossip_key="a2V5"), "topology.gossip_key", "secrets/"),
        (lambda d: d["topology"].update(mesh_network="x"), "topology.mesh_network", "no network"),
        (lambda d: d["topology"]["monitor"].pop("user"), "topology.monitor.user", "missing"),
        (lambda d: d["node"][1].update(name="P1"), "node[1].name", "lower-case"),
        (lambda d: d["service"][0].update(mode="pooled"), "service[0].mode", "session"),
        (lambda d: d["service"][0].update(mode=1), "service[0].mode", "a string"),
    ],
)
def test_spec_errors_name_the_key(edit: Any, key: str, reason: str) -> None:
    """Each mistake in a spec is refused with the file, the key path that holds it and why."""
    data = _chain()
    edit(data)
    error = _error(data)
    assert (error.source, error.key) == ("spec.toml", key)
    assert reason in error.reason


def test_spec_file_errors_name_the_file(tmp_path: Path) -> None:
    """An unreadable or malformed spec file is refused with its path."""
    broken = tmp_path / "broken.toml"
    broken.write_text("[topology\n")
    with pytest.raises(ConfigError, match=r"broken\.toml: invalid TOML"):
        topology.load(broken)
    with pytest.raises(ConfigError, match="cannot read file"):
        topology.load(tmp_path / "missing.toml")


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_every_rendered_node_config_parses(spec_path: Path) -> None:
    """Every proxy node's rendered config is a valid meshproxy config with gossip, admin, angel."""
    spec = topology.load(spec_path)
    files = topology.render(spec)
    proxies = spec.proxies()
    assert sorted(files) == sorted(
        ["docker-compose.yml", *(f"configs/{n.name}.toml" for n in proxies)]
    )
    for node in proxies:
        path = f"configs/{node.name}.toml"
        cfg = config.parse(tomllib.loads(files[path]), path, files=False)
        assert (cfg.node.name, cfg.node.role) == (node.name, node.role)
        assert cfg.gossip is not None
        assert cfg.admin is not None
        assert cfg.mesh_tls is not None
        assert len(cfg.gossip.seeds) == len(proxies) - 1


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_rendered_topologies_hold_no_secret_and_mount_every_one_they_name(
    spec_path: Path,
) -> None:
    """Rendered configs carry no token or key, only secret files, keyed gossip and mesh TLS;
    each secret a node's config names is mounted into its container and made in secrets/."""
    spec = topology.load(spec_path)
    files = topology.render(spec)
    document = yaml.safe_load(files["docker-compose.yml"])
    for node in spec.proxies():
        cfg = config.parse(tomllib.loads(files[f"configs/{node.name}.toml"]), "x", files=False)
        assert cfg.admin is not None
        assert cfg.gossip is not None
        assert cfg.mesh_tls is not None
        assert (cfg.admin.token, cfg.gossip.keys, cfg.gossip.allow_plaintext) == ("", (), False)
        named = [cfg.admin.token_file, cfg.gossip.keys_file, cfg.mesh_tls.ca]
        named += [cfg.mesh_tls.cert, cfg.mesh_tls.key]
        mounted = document["services"][node.name]["secrets"]
        assert sorted(p.removeprefix("/run/secrets/") for p in named) == sorted(mounted)
        for name in mounted:
            assert document["secrets"][name]["file"].startswith("./secrets/")


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_compose_file_runs_every_node(spec_path: Path) -> None:
    """The compose file runs each proxy with its config, backends from ${BACKEND_IMAGE}."""
    spec = topology.load(spec_path)
    document = yaml.safe_load(topology.render(spec)["docker-compose.yml"])
    services = document["services"]
    assert set(services) == {c.name for c in spec.containers()}
    assert set(document["networks"]) == {n.name for n in spec.networks}
    for node in spec.proxies():
        entry = services[node.name]
        assert entry["command"] == ["meshproxy", "run", "-c", f"/etc/meshproxy/{node.name}.toml"]
        assert entry["build"]["args"]["BASE_IMAGE"] == "${BASE_IMAGE:-python:3.12-slim}"
    for backend in spec.backends:
        assert services[backend.name]["image"] == "${BACKEND_IMAGE:-mariadb:11}"


# Where each render target's output of the shipped specs is committed.
RENDERED = {"compose": "compose", "kubernetes": "k8s", "swarm": "swarm"}


@pytest.mark.parametrize("target", sorted(RENDERED))
@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_committed_renders_match_their_specs(target: str, spec_path: Path, tmp_path: Path) -> None:
    """Rendering a spec for each target yields exactly the files committed under
    <target folder>/<name>/ (no drift), and makes the secrets (git-ignored) beside them."""
    if target != "compose" and topology.load(spec_path).session_mode():
        pytest.skip(f"{target} renders passthrough specs only")
    out = tmp_path / spec_path.stem
    argv = ["topology", "render", str(spec_path), "--target", target, "-o", str(out)]
    assert cli.main(argv) == 0
    folder = f"{RENDERED[target]}/{spec_path.stem}"

    def tracked(root: Path) -> set[Path]:  # secrets/ is made per render and never committed
        files = {p.relative_to(root) for p in root.rglob("*") if p.is_file()}
        return {p for p in files if p.parts[0] != "secrets"}

    rendered, committed = tracked(out), tracked(ROOT / folder)
    assert (out / "secrets" / "ca.pem").exists(), "render makes the topology's secrets"
    assert (out / "secrets" / ".gitignore").read_text().splitlines()[-1] == "*"
    rerender = f"meshproxy topology render topology/{spec_path.name} --target {target} -o {folder}/"
    assert committed == rendered, f"re-render: {rerender}"
    for relative in sorted(rendered):
        assert (out / relative).read_bytes() == (ROOT / folder / relative).read_bytes(), (
            f"{folder}/{relative} drifted from topology/{spec_path.name}; run: {rerender}"
        )


def _session_chain() -> dict[str, Any]:
    data = _chain()
    data["service"][0]["mode"] = "session"
    return data


def test_session_mode_renders_session_listener_service_and_users(tmp_path: Path) -> None:
    """A session-mode service gives the edge a session-mode listener on its tier and each
    middle a session-mode service on its pool, both with the same [[user]] table: the
    monitor login, its password from the environment (never in a rendered file), which
    compose sets from secrets/session.env."""
    spec = topology.parse(_session_chain(), "spec.toml")
    files = topology.render(spec)
    configs = {
        n.name: config.parse(tomllib.loads(files[f"configs/{n.name}.toml"]), "x", files=False)
        for n in spec.proxies()
    }
    users = {name: cfg.user for name, cfg in configs.items()}
    assert len(set(users.values())) == 1
    (user,) = users["p1"]
    assert (user.name, user.password, user.password_env, user.default_schema) == (
        "monitor",
        "",
        topology.secrets.SESSION_PASSWORD_ENV,
        "app",
    )
    (listener,) = configs["p1"].listener
    assert (listener.mode, str(listener.upstream)) == ("session", "tier:middle")
    for name in ("p2", "p3", "p4"):
        (service,) = configs[name].service
        assert (service.mode, str(service.upstream)) == ("session", "pool:mysql")
    document = yaml.safe_load(files["docker-compose.yml"])
    for node in spec.proxies():
        assert document["services"][node.name]["env_file"] == ["./secrets/session.env"]
    assert "env_file" not in document["services"]["a1"]
    for name, text in files.items():
        assert topology.secrets.SESSION_PASSWORD_ENV + "=" not in text, name
    made = topology.secrets.ensure(spec, tmp_path / "secrets")
    env = (made / "session.env").read_text()
    assert env == f"{topology.secrets.SESSION_PASSWORD_ENV}=monitor\n"
    assert (made / "session.env").stat().st_mode & 0o077 == 0


def test_passthrough_renders_no_users_or_modes() -> None:
    """Without a mode the rendered chain stays passthrough: no [[user]], no mode, no env file."""
    files = topology.render(topology.parse(_chain(), "spec.toml"))
    assert "mode =" not in files["configs/p1.toml"]
    assert "user = [" not in files["configs/p2.toml"]
    assert "env_file" not in files["docker-compose.yml"]


def test_session_mode_is_refused_where_it_is_not_rendered() -> None:
    """Kubernetes and swarm render passthrough only, and a session-mode spec cannot cascade:
    each refusal names the file, the key and why."""
    spec = topology.parse(_session_chain(), "spec.toml")
    for target in ("kubernetes", "swarm"):
        with pytest.raises(ConfigError) as info:
            topology.TARGETS[target](spec, "/nonexistent")
        assert (info.value.source, info.value.key) == ("spec.toml", "service[0].mode")
        assert "compose" in info.value.reason
    cascade = tomllib.loads((ROOT / "topology" / "cascade.toml").read_text())
    cascade["service"][0]["mode"] = "session"
    error = _error(cascade)
    assert error.key.startswith("tier[")
    assert error.key.endswith("].upstream")
    assert "cascade" in error.reason
