"""Topologies: declarative specs (``topology/*.toml``) rendered to node configs and compose."""

from __future__ import annotations

import argparse

from meshproxy.topology.render import render, write
from meshproxy.topology.spec import Spec, load, parse

__all__ = ["Spec", "add_parser", "load", "parse", "render", "write"]


def cmd_render(args: argparse.Namespace) -> int:
    spec = load(args.spec)
    for path in write(spec, args.output):
        print(path)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``meshproxy topology render SPEC -o DIR``."""
    topology = sub.add_parser("topology", help="render topology specs to configs and compose")
    actions = topology.add_subparsers(dest="topology_command", required=True)
    render_cmd = actions.add_parser(
        "render", help="write docker-compose.yml and configs/<node>.toml for a spec"
    )
    render_cmd.add_argument("spec", help="topology spec (TOML), e.g. topology/chain.toml")
    render_cmd.add_argument("-o", "--output", required=True, help="directory, e.g. compose/chain/")
    render_cmd.set_defaults(func=cmd_render)
