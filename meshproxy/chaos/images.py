"""The images a rendered topology runs on, built with no registry in reach.

``meshproxy:local`` comes from ``compose/Dockerfile`` and a wheelhouse made on this host.
Its base image and the MariaDB image default to ``python:3.12-slim`` and ``mariadb:11`` in
the compose files; the chaos suite uses them when ``BASE_IMAGE`` and ``BACKEND_IMAGE`` say
so. Otherwise, as here where no registry answers, one Debian image is made from Debian
packages with debootstrap, and a MariaDB image with the official one's contract is built on
it (``compose/mariadb-local/``). The Debian image stays in the engine between runs, so only
the first run pays for debootstrap (about 90 s).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import docker

log = logging.getLogger(__name__)

DEBIAN_IMAGE = "meshproxy-debian:local"
MESHPROXY_IMAGE = "meshproxy:local"
MARIADB_IMAGE = "meshproxy-mariadb:local"
DEBIAN_PACKAGES = (
    "python3",
    "python3-venv",
    "ca-certificates",
    "procps",
    "iproute2",
    "mariadb-server",
    "mariadb-client",
)
SUITE = "bookworm"  # its python3 is 3.11, the Python the wheelhouse is built with here


@dataclass(frozen=True)
class Images:
    """What the compose files get as ``BASE_IMAGE`` and ``BACKEND_IMAGE``."""

    base: str
    backend: str

    def environment(self) -> dict[str, str]:
        return {"BASE_IMAGE": self.base, "BACKEND_IMAGE": self.backend}


def _exists(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def build_debian(client: docker.DockerClient) -> None:
    """debootstrap a minimal Debian with Python and MariaDB, and import it as an image."""
    with tempfile.TemporaryDirectory(prefix="meshproxy-rootfs-") as tmp:
        root = Path(tmp) / "root"
        log.info("debootstrap %s into %s (once per engine)", SUITE, root)
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(DEBIAN_PACKAGES)}",
                SUITE,
                str(root),
                "http://deb.debian.org/debian",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        with subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE) as tar:
            subprocess.run(["docker", "import", "-", DEBIAN_IMAGE], stdin=tar.stdout, check=True)
        if tar.returncode != 0:
            raise RuntimeError(f"tar of {root} failed with status {tar.returncode}")


def build_wheelhouse(repo: Path, wheels: Path) -> None:
    """Wheels of meshproxy and everything it needs, for an image with no network.

    meshproxy's own wheel is pure Python (MESHPROXY_PURE): a module compiled here, against
    this host's CPython, need not load in the image's.
    """
    for old in wheels.glob("meshproxy-*.whl"):
        old.unlink()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), str(repo)],
        check=True,
        env={**os.environ, "MESHPROXY_PURE": "1"},
    )


def _build(client: docker.DockerClient, path: Path, tag: str, base: str) -> None:
    log.info("building %s from %s", tag, path)
    client.images.build(path=str(path), tag=tag, buildargs={"BASE_IMAGE": base}, rm=True)


def prepare(client: docker.DockerClient, repo: Path) -> Images:
    """Build ``meshproxy:local`` (always: the code changes) and whatever base it needs."""
    compose = repo / "compose"
    base = os.environ.get("BASE_IMAGE", "")
    backend = os.environ.get("BACKEND_IMAGE", "")
    if not base or not backend:
        if not shutil.which("debootstrap"):
            raise RuntimeError("set BASE_IMAGE and BACKEND_IMAGE, or install debootstrap")
        if not _exists(client, DEBIAN_IMAGE):
            build_debian(client)
        base = base or DEBIAN_IMAGE
        if not backend:
            _build(client, compose / "mariadb-local", MARIADB_IMAGE, DEBIAN_IMAGE)
            backend = MARIADB_IMAGE
    build_wheelhouse(repo, compose / "wheels")
    _build(client, compose, MESHPROXY_IMAGE, base)
    return Images(base=base, backend=backend)
