"""The ``meshproxy`` command: run, check-config, members, ctl, certs, demo, topology."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from meshproxy import __version__, config, topology
from meshproxy.cli import certs, ctl
from meshproxy.errors import ConfigError
from meshproxy.runtime.child import start

EXIT_CONFIG = 2


def cmd_run(args: argparse.Namespace) -> int:
    if args.no_angel:
        from meshproxy.runtime.modes import run_single

        cfg = start(args.config, "")
        return asyncio.run(run_single(cfg))
    from meshproxy.runtime import systemd
    from meshproxy.runtime.angel import Angel
    from meshproxy.runtime.upgrade import Predecessor

    cfg = start(args.config, "angel")
    if args.takeover_fd is None:
        return Angel(args.config, cfg, systemd.inherited_listeners()).run()
    predecessor = Predecessor(args.takeover_fd)
    try:
        sockets = predecessor.take_sockets()
    except OSError as exc:
        print(f"meshproxy: cannot take over: {exc}", file=sys.stderr)
        return 1
    return Angel(args.config, cfg, sockets, predecessor).run()


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    print(f"{args.config}: ok ({cfg.node.role} {cfg.node.name!r})")
    return 0


def cmd_members(args: argparse.Namespace) -> int:
    from meshproxy.control import meshview

    client = ctl.client(args)
    try:
        document = client.call("GET", "/members")
    except ctl.ApiError as exc:
        print(f"meshproxy members: {exc}", file=sys.stderr)
        return ctl.EXIT_API_ERROR
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(meshview.format_members(document["members"]), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from meshproxy.cli.demo import run_demo  # pulls in client libraries

    spec = topology.load_spec(args.spec) if args.spec else None
    return run_demo(duration_s=args.duration, clients=args.clients, spec=spec)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshproxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"meshproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a node in the foreground, under its angel")
    run.add_argument("-c", "--config", required=True, help="node config file (TOML)")
    run.add_argument(
        "--no-angel", action="store_true", help="one process: no supervisor, no workers"
    )
    # An upgrade: the old angel's end of the pair it sends its sockets over.
    run.add_argument("--takeover-fd", type=int, help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config", help="node config file (TOML)")
    check.set_defaults(func=cmd_check_config)

    demo = sub.add_parser("demo", help="an edge, three middles, two MySQL servers, under load")
    demo.add_argument("--duration", type=float, default=20.0, help="seconds of load (20)")
    demo.add_argument("--clients", type=int, default=8, help="concurrent clients (8)")
    demo.add_argument(
        "--spec", help="topology spec file or shipped name (default: the shipped chain spec)"
    )
    demo.set_defaults(func=cmd_demo)

    members = sub.add_parser("members", help="the gossip membership as a running node sees it")
    ctl.add_connection_args(members)
    members.add_argument("--json", action="store_true", help="the admin API's JSON document")
    members.set_defaults(func=cmd_members)

    ctl.add_parser(sub)
    certs.add_parser(sub)
    topology.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"meshproxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    return code
