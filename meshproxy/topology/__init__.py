"""Topologies: declarative specs (``topology/*.toml``) rendered to node configs and compose
files or Kubernetes manifests, or run as local processes (:mod:`meshproxy.topology.local`)."""

from __future__ import annotations

import argparse
import importlib.resources
import sys
from collections.abc import Callable
from pathlib import Path

from meshproxy.topology import kubernetes, swarm
from meshproxy.topology.render import render, write
from meshproxy.topology.spec import Spec, load, parse

__all__ = ["Spec", "add_parser", "load", "load_spec", "packaged_spec", "parse", "render", "write"]

# The specs of topology/ ship in the package: meshproxy/topology/specs links to topology/
# in the repository and is a copy in a built wheel (MANIFEST.in).
_PACKAGED = importlib.resources.files(__name__) / "specs"


def packaged_spec(name: str) -> Spec:
    """A spec shipped with meshproxy, by name: ``chain``, ``cascade`` or ``two-edges``."""
    with importlib.resources.as_file(_PACKAGED / f"{name}.toml") as path:
        return load(path)


def load_spec(arg: str) -> Spec:
    """A spec file, or, when no such file exists, the shipped spec of that name."""
    if not Path(arg).exists() and (_PACKAGED / f"{arg}.toml").is_file():
        return packaged_spec(arg)
    return load(arg)


# ``topology render --target NAME``: how each target writes a spec's files into a folder.
TARGETS: dict[str, Callable[[Spec, str | Path], list[Path]]] = {
    "compose": write,
    "kubernetes": kubernetes.write,
    "swarm": swarm.write,
}


def cmd_render(args: argparse.Namespace) -> int:
    spec = load(args.spec)
    for path in TARGETS[args.target](spec, args.output):
        print(path)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    if not args.local:
        print(
            "meshproxy topology up: only --local is supported; for containers, render the spec"
            " (meshproxy topology render) and run docker compose up in the output directory",
            file=sys.stderr,
        )
        return 2
    from meshproxy.topology.local import run_local

    return run_local(load_spec(args.spec))


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``meshproxy topology render SPEC -o DIR`` and ``meshproxy topology up SPEC --local``."""
    topology = sub.add_parser(
        "topology", help="render topology specs to configs and compose, or run them locally"
    )
    actions = topology.add_subparsers(dest="topology_command", required=True)
    render_cmd = actions.add_parser(
        "render",
        help="write a spec's configs with docker-compose.yml, Kubernetes manifests or a"
        " swarm stack",
    )
    render_cmd.add_argument("spec", help="topology spec (TOML), e.g. topology/chain.toml")
    render_cmd.add_argument(
        "-o", "--output", required=True, help="directory, e.g. compose/chain/ or k8s/chain/"
    )
    render_cmd.add_argument(
        "--target",
        choices=sorted(TARGETS),
        default="compose",
        help="compose: docker-compose.yml and configs/<node>.toml (default); kubernetes:"
        " manifests and a kustomization.yaml for kubectl apply -k; swarm: stack.yml and"
        " configs/<workload>.toml for docker stack deploy",
    )
    render_cmd.set_defaults(func=cmd_render)
    up = actions.add_parser(
        "up", help="run a spec's backends, middles and edges until SIGINT or SIGTERM"
    )
    up.add_argument(
        "spec", help="topology spec (TOML), e.g. topology/chain.toml, or a shipped one: chain"
    )
    up.add_argument(
        "--local", action="store_true", help="as processes on loopback (the only way so far)"
    )
    up.set_defaults(func=cmd_up)
