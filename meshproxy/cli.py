"""The ``meshproxy`` command: run, check-config, members, ctl, demo, topology."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from meshproxy import __version__, config, ctl, log, topology
from meshproxy.errors import ConfigError

EXIT_CONFIG = 2


def install_event_loop_policy() -> str:
    """Use uvloop when it can be imported; stock asyncio otherwise."""
    try:
        import uvloop  # optional at run time
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def _start(args: argparse.Namespace, role: str) -> config.Config:
    cfg = config.load(args.config)
    log.setup(cfg.node.log_level, cfg.node.log_format, cfg.node.name, role)
    install_event_loop_policy()
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    if args.no_angel:
        from meshproxy.processes import run_single

        cfg = _start(args, "")
        return asyncio.run(run_single(cfg))
    from meshproxy.angel import Angel

    cfg = _start(args, "angel")
    return Angel(args.config, cfg).run()


def cmd_control(args: argparse.Namespace) -> int:
    from meshproxy.processes import run_control

    cfg = _start(args, "control")
    return asyncio.run(run_control(cfg, args.channel, args.heartbeat_fd))


def cmd_worker(args: argparse.Namespace) -> int:
    from meshproxy.processes import run_worker

    cfg = _start(args, f"worker-{args.index}")
    return asyncio.run(run_worker(cfg, args.channel, args.index, args.heartbeat_fd))


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    print(f"{args.config}: ok ({cfg.node.role} {cfg.node.name!r})")
    return 0


def cmd_members(args: argparse.Namespace) -> int:
    from meshproxy import meshview

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
    from meshproxy.demo import run_demo  # pulls in client libraries

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
    run.set_defaults(func=cmd_run)

    # The angel's children; not for people.
    for name, func in (("_control", cmd_control), ("_worker", cmd_worker)):
        child = sub.add_parser(name)
        child.add_argument("-c", "--config", required=True)
        child.add_argument("--channel", required=True)
        child.add_argument("--heartbeat-fd", type=int)
        child.add_argument("--index", type=int, default=0)
        child.set_defaults(func=func)

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
