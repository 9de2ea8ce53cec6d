"""The chain spec deployed for real as a Docker Swarm stack (``--target swarm``) on a
single-node swarm: served through the edge, a middle's task killed under load, swarm
replacing it, the edge routing around it and taking the new task in.

The engine is left as it was found: the swarm is initialised here only when the engine is
not in one already, and then left again (with the network swarm made for it).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.models.containers import Container

from meshproxy.chaos.images import Images
from meshproxy.testbed.polling import poll
from meshproxy.topology import secrets, swarm
from meshproxy.topology.spec import load
from tests.integration.chaos.conftest import REPO

pytestmark = pytest.mark.chaos

SPEC = REPO / "topology" / "chain.toml"
DEPLOY_TIMEOUT_S = 180.0  # images are local; MariaDB's first start takes the most
REPLACE_TIMEOUT_S = 60.0
LOAD_S = 40.0
ARTIFACTS = REPO / "artifacts" / "swarm"  # the figures of the last run


def run(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    done = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=300, env=env, cwd=cwd, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


@pytest.fixture(scope="module")
def engine() -> Iterator[docker.DockerClient]:
    """The Docker engine as a swarm manager, for this module only if it was not one."""
    client = docker.from_env()
    networks_before = {n.name for n in client.networks.list()}
    joined_here = client.info()["Swarm"]["LocalNodeState"] != "active"
    if joined_here:
        client.swarm.init(advertise_addr="127.0.0.1")
    try:
        yield client
    finally:
        if joined_here:
            client.swarm.leave(force=True)
            # Swarm makes a bridge for its tasks' way out and leaves it behind.
            for network in client.networks.list(names=["docker_gwbridge"]):
                if network.name not in networks_before:
                    network.remove()
        client.close()


class Deployed:
    """The rendered chain stack, deployed; its tasks' containers by service."""

    def __init__(self, client: docker.DockerClient, out: Path, images: Images) -> None:
        self.client = client
        self.spec = load(SPEC)
        self.name = swarm.stack_name(self.spec)
        self.out = out
        swarm.write(self.spec, out)
        self.token = secrets.admin_token(out / secrets.DIR)
        self.env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **images.environment()}

    def deploy(self) -> None:
        run(
            "docker", "stack", "deploy", "--resolve-image", "never",
            "-c", swarm.STACK_FILE, self.name,
            env=self.env, cwd=self.out,
        )  # fmt: skip

    def remove(self) -> None:
        run("docker", "stack", "rm", self.name)

        def gone() -> bool:
            label = f"com.docker.stack.namespace={self.name}"
            return not self.client.containers.list(filters={"label": label}) and not (
                self.client.networks.list(filters={"label": label})
            )

        poll(gone, 60, lambda: f"stack {self.name} to go", 0.5)

    def containers(self, service: str) -> list[Container]:
        label = f"com.docker.swarm.service.name={self.name}_{service}"
        found: list[Container] = self.client.containers.list(
            filters={"label": label, "status": "running"}
        )
        return found

    def app(self) -> Container:
        (container,) = self.containers("a1")
        return container

    def edge_status(self) -> dict[str, Any]:
        """The edge's /status, asked from the app's task as an operator's client would."""
        script = (
            "import json, sys, urllib.request\n"
            "request = urllib.request.Request('http://p1:6032/status')\n"
            "request.add_header('Authorization', 'Bearer ' + sys.argv[1])\n"
            "print(urllib.request.urlopen(request, timeout=5).read().decode())\n"
        )
        code, output = self.app().exec_run(["python", "-c", script, self.token])
        if code != 0:
            raise ConnectionError(output.decode(errors="replace"))
        status: dict[str, Any] = json.loads(output)
        return status

    def tier(self) -> dict[str, str]:
        """The edge's tier: middle address -> state ({} while the edge cannot be asked)."""
        try:
            rows = self.edge_status()["upstreams"]["tier:middle"]
        except (ConnectionError, ValueError, KeyError, docker.errors.APIError):
            return {}
        return {row["server"]: row["state"] for row in rows}

    def logs(self) -> str:
        parts = []
        for service in ("p1", "middle"):
            for container in self.containers(service):
                text = container.logs(tail=60).decode(errors="replace")
                parts.append(f"----- {container.name}\n{text}")
        return "\n".join(parts)


@pytest.fixture(scope="module")
def chain(
    engine: docker.DockerClient, chaos_images: Images, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployed]:
    """The chain stack up, with every middle ONLINE at the edge; removed afterwards."""
    stack = Deployed(engine, tmp_path_factory.mktemp("swarm-chain"), chaos_images)
    stack.deploy()
    try:
        poll(
            lambda: len(stack.tier()) == 3 and set(stack.tier().values()) == {"ONLINE"},
            DEPLOY_TIMEOUT_S,
            lambda: f"the edge to see three middles ONLINE:\n{stack.logs()}",
            1.0,
        )
        yield stack
    finally:
        stack.remove()


def test_swarm_replaces_a_killed_middle_and_no_new_connection_fails(chain: Deployed) -> None:
    """Under load through the edge, a middle's task killed with SIGKILL is replaced by swarm,
    the edge routes new connections around it (none fails) and takes the replacement's
    address into its tier; only sessions that were open on the killed middle may break."""
    events: list[dict[str, Any]] = []
    load_argv = [
        "python", "-m", "meshproxy.chaos.load", "--host", "p1", "--port", "6033",
        "--workers", "6", "--duration-s", str(LOAD_S),
    ]  # fmt: skip
    # The docker CLI, not the SDK's streamed exec, whose socket outlives the stream.
    load = subprocess.Popen(
        ["docker", "exec", chain.app().id, *load_argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )

    def follow() -> None:
        assert load.stdout is not None
        with load.stdout:
            for line in load.stdout:
                if line.startswith(b"{"):
                    events.append(json.loads(line))

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    poll(lambda: sum(e.get("c", 0) for e in events) >= 30, 20, lambda: "sessions of the load")

    victim = sorted(chain.containers("middle"), key=lambda c: c.name)[1]
    networks = victim.attrs["NetworkSettings"]["Networks"]
    victim_mesh = f"{networks[f'{chain.name}_mesh']['IPAddress']}:7001"
    killed_at = time.time()
    victim.kill()
    poll(
        lambda: chain.tier().get(victim_mesh, "gone") != "ONLINE",
        10,
        lambda: f"the edge to rule out {victim_mesh}: {chain.tier()}",
        0.2,
    )
    ruled_out_s = time.time() - killed_at
    poll(
        lambda: (
            len(chain.containers("middle")) == 3
            and victim.id not in {c.id for c in chain.containers("middle")}
        ),
        REPLACE_TIMEOUT_S,
        lambda: "swarm to replace the killed middle's task",
        0.5,
    )
    poll(
        lambda: len(chain.tier()) == 3 and set(chain.tier().values()) == {"ONLINE"},
        REPLACE_TIMEOUT_S,
        lambda: f"the edge to take the new middle in: {chain.tier()}\n{chain.logs()}",
        0.5,
    )
    back_s = time.time() - killed_at
    reader.join(LOAD_S + 30)
    assert not reader.is_alive(), "the load did not finish"
    assert load.wait(10) == 0

    connect_errors = [e for e in events if e.get("ev") == "connect_error"]
    assert connect_errors == [], f"new connections failed: {connect_errors[:5]}"
    after = [e for e in events if "b" in e and e["b"] >= killed_at + 1.0]
    assert sum(e["c"] for e in after) > 0, "no session was served after the kill"
    broken = [e for e in events if e.get("ev") == "session_error"]
    figures = {
        "connects": sum(e.get("c", 0) for e in events),
        "connect_errors": len(connect_errors),
        "sessions_broken": len(broken),
        "ruled_out_s": round(ruled_out_s, 2),
        "replaced_and_routed_s": round(back_s, 2),
    }
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "kill-middle.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"swarm kill-middle: {figures}")
    assert len(broken) <= 6, f"more sessions broke than the load had open: {broken}"
