"""A rendered topology running in Docker, and the faults the chaos suite injects into it.

Compose brings the stack up and down (``docker compose`` when the plugin is there, else
``docker-compose`` 1.x); the docker SDK does everything in between. Containers are found
by their compose labels, so both compose generations' naming schemes work.

A partition between two containers is a pair of DROP rules in the host's ``DOCKER-USER``
chain: traffic between containers on one bridge crosses the host's FORWARD path, so the
two nodes lose each other while everyone else still reaches both. Rules carry a comment
so that ``down`` removes any a crashed run left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import docker
from docker.models.containers import Container

from meshproxy.chaos.images import Images
from meshproxy.topology import secrets
from meshproxy.topology.spec import Spec

RULE_COMMENT = "meshproxy-chaos"


def compose_command() -> list[str]:
    """The compose CLI on this host: the v2 plugin, or the 1.x program."""
    probe = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, check=False, timeout=30
    )
    if probe.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise RuntimeError("neither `docker compose` nor `docker-compose` is installed")


class Stack:
    """One topology's containers, by the names the spec gives them."""

    def __init__(self, spec: Spec, compose_dir: Path, images: Images) -> None:
        self.spec = spec
        self.project = f"meshproxy-{spec.name}"
        self.compose_file = compose_dir / "docker-compose.yml"
        # The rendered files are committed; their secrets are made here, on first use.
        self.secrets_dir = secrets.ensure(spec, compose_dir / secrets.DIR)
        self.admin_token = secrets.admin_token(self.secrets_dir)
        self.images = images
        self.client = docker.from_env()
        self._partitions: list[list[str]] = []

    def _compose(self, *args: str) -> None:
        command = [*compose_command(), "-p", self.project, "-f", str(self.compose_file), *args]
        env = {**os.environ, **self.images.environment()}
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")

    def up(self) -> None:
        self.down()
        self._compose("up", "-d", "--no-build", "--force-recreate", "--remove-orphans")

    def down(self) -> None:
        self.heal()
        self._delete_stale_rules()
        self._compose("down", "-v", "-t", "2", "--remove-orphans")

    def container(self, name: str) -> Container:
        labels = [
            f"com.docker.compose.project={self.project}",
            f"com.docker.compose.service={name}",
        ]
        found = self.client.containers.list(all=True, filters={"label": labels})
        if not found:
            raise LookupError(f"no container for {name!r} in {self.project}")
        container: Container = found[0]
        return container

    def network(self, name: str) -> str:
        return f"{self.project}_{name}"

    def logs(self, name: str, tail: int = 200) -> str:
        raw: bytes = self.container(name).logs(tail=tail)
        return raw.decode(errors="replace")

    # -- faults and repairs -------------------------------------------------------------

    def kill(self, name: str) -> None:
        self.container(name).kill()

    def start(self, name: str) -> None:
        self.container(name).start()

    def stop(self, name: str, timeout_s: float = 30.0) -> int:
        """SIGTERM the container's main process (a meshproxy node drains, then exits) and
        wait for it to exit; SIGKILL after ``timeout_s``. Returns its exit code (137: it
        had to be killed)."""
        container = self.container(name)
        container.stop(timeout=int(timeout_s))
        container.reload()
        code: int = container.attrs["State"]["ExitCode"]
        return code

    def pause(self, name: str) -> None:
        self.container(name).pause()

    def unpause(self, name: str) -> None:
        self.container(name).unpause()

    def unpause_if_paused(self, name: str) -> None:
        container = self.container(name)
        if container.status == "paused":
            container.unpause()

    def disconnect(self, name: str, network: str) -> None:
        self.client.networks.get(self.network(network)).disconnect(self.container(name))

    def connect(self, name: str, network: str) -> None:
        """Put a container back on a network, at its address from the spec (idempotent)."""
        container = self.container(name)
        if self.network(network) in container.attrs["NetworkSettings"]["Networks"]:
            return
        address = self.spec.address(name, network)
        self.client.networks.get(self.network(network)).connect(container, ipv4_address=address)

    def kill_process(self, name: str, pattern: str) -> float:
        """SIGKILL the processes in a container whose command line matches ``pattern``."""
        return self.run_timed(name, ["pkill", "-KILL", "-f", pattern])

    def kill_pid(self, name: str, pid: int) -> float:
        """SIGKILL one process in a container."""
        return self.run_timed(name, ["kill", "-KILL", str(pid)])

    def run_timed(self, name: str, argv: list[str]) -> float:
        """Run a command in a container; returns when it started (epoch seconds, read in the
        container just before). ``docker exec`` takes a good fraction of a second on a busy
        host: timing a fault from outside would charge that to whoever recovers from it."""
        script = 'date +%s.%N; exec "$@"'
        result = self.container(name).exec_run(["sh", "-c", script, "sh", *argv])
        if result.exit_code != 0:
            raise RuntimeError(f"{' '.join(argv)} failed in {name}: {result.output!r}")
        return float(result.output.split()[0])

    def partition(self, a: str, b: str) -> None:
        """Drop everything between ``a`` and ``b`` on the mesh network, both ways."""
        ip_a = self.spec.address(a, self.spec.mesh_network)
        ip_b = self.spec.address(b, self.spec.mesh_network)
        for source, target in ((ip_a, ip_b), (ip_b, ip_a)):
            rule = ["-s", source, "-d", target, "-m", "comment", "--comment", RULE_COMMENT]
            rule += ["-j", "DROP"]
            subprocess.run(["iptables", "-I", "DOCKER-USER", *rule], check=True, timeout=30)
            self._partitions.append(rule)

    def heal(self) -> None:
        while self._partitions:
            rule = self._partitions.pop()
            subprocess.run(["iptables", "-D", "DOCKER-USER", *rule], check=False, timeout=30)

    def _delete_stale_rules(self) -> None:
        if not shutil.which("iptables"):
            return
        listing = subprocess.run(
            ["iptables", "-S", "DOCKER-USER"], capture_output=True, text=True, check=False
        )
        for line in listing.stdout.splitlines():
            if RULE_COMMENT in line and line.startswith("-A "):
                spec = line.split()[2:]
                with contextlib.suppress(subprocess.SubprocessError):
                    subprocess.run(["iptables", "-D", "DOCKER-USER", *spec], check=False)
