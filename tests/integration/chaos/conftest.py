"""Fixtures of the chaos suite: images, one running stack per topology, scenario runs.

The Docker engine must be running (``./dev test`` starts one). Timelines go to
``artifacts/chaos/`` (``MESHPROXY_CHAOS_ARTIFACTS`` overrides), one JSON and one PNG per
scenario; ``just chaos`` prints their summary table.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from meshproxy.chaos import images
from meshproxy.chaos.observe import Observer
from meshproxy.chaos.scenario import Scenario
from meshproxy.chaos.stack import Stack
from meshproxy.topology import spec as topology

REPO = Path(__file__).resolve().parents[3]
READY_TIMEOUT_S = 90.0

RunScenario = Callable[[str, float], Scenario]


@pytest.fixture(scope="session")
def chaos_images() -> images.Images:
    """The meshproxy and backend images, built once per session (the base stays cached)."""
    client = docker.from_env()
    try:
        client.ping()
    except docker.errors.DockerException as exc:
        client.close()
        pytest.fail(f"no Docker engine answers ({exc}); `./dev test` starts one")
    try:
        return images.prepare(client, REPO)
    finally:
        client.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where timelines are written."""
    path = Path(os.environ.get("MESHPROXY_CHAOS_ARTIFACTS", REPO / "artifacts" / "chaos"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait_healthy(stack: Stack, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until every proxy sees every member alive and every upstream server ONLINE."""
    observer = Observer(stack.spec, 0.0, stack.admin_token)
    observer.start()
    try:
        proxies = [n.name for n in stack.spec.proxies()]
        healthy = observer.wait_until(
            lambda views: (
                len(views) == len(proxies)
                and all(
                    state in ("alive", "ONLINE")
                    and len([k for k in view if k[1] == "member"]) == len(proxies)
                    for view in views.values()
                    for state in view.values()
                )
            ),
            timeout_s,
        )
    finally:
        observer.stop()
    if not healthy:
        views = "\n".join(f"  {name}: {view}" for name, view in sorted(observer.views.items()))
        raise AssertionError(f"{stack.project} not healthy after {timeout_s} s:\n{views}")


def running_stack(spec_path: Path, chaos_images: images.Images) -> Iterator[Stack]:
    """A topology up and healthy for a module; taken down (with its networks) after it."""
    spec = topology.load(spec_path)
    stack = Stack(spec, REPO / "compose" / spec.name, chaos_images)
    stack.up()
    try:
        wait_healthy(stack)
        yield stack
    finally:
        stack.down()
        stack.client.close()


@pytest.fixture
def run(stack: Stack, artifacts: Path) -> Iterator[RunScenario]:
    """Start scenarios on the module's healthy ``stack``; each one's timeline is written
    when the test ends, passed or failed."""
    runs: list[Scenario] = []

    def run(name: str, duration_s: float) -> Scenario:
        wait_healthy(stack)
        scenario = Scenario(stack, name, duration_s, artifacts)
        runs.append(scenario)
        return scenario

    yield run
    for scenario in runs:
        scenario.write()
