"""The ``meshproxy`` command: run, check-config, demo."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from meshproxy import __version__, config, ctl, log
from meshproxy.errors import ConfigError, describe

EXIT_CONFIG = 2


def install_event_loop_policy() -> str:
    """Use uvloop when it can be imported; stock asyncio otherwise."""
    try:
        import uvloop  # optional at run time
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def _run_node(cfg: config.Config) -> int:
    from meshproxy.admin.server import AdminServer  # keeps check-config light
    from meshproxy.node import Node

    node = Node(cfg)
    admin = AdminServer(node)
    try:
        await node.start()
        await admin.start()
    except OSError as exc:
        log.warning("bind_failed", error=describe(exc))
        await node.stop()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(admin.reload("SIGHUP")))
    log.event("node_started", role=cfg.node.role)
    await stop.wait()
    log.event("node_stopping")
    await admin.stop()
    await node.stop()
    log.event("node_stopped")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    log.setup(cfg.node.log_level, cfg.node.log_format, cfg.node.name)
    flavour = install_event_loop_policy()
    log.event("event_loop", kind=flavour)
    return asyncio.run(_run_node(cfg))


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    print(f"{args.config}: ok ({cfg.node.role} {cfg.node.name!r})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from meshproxy.demo import run_demo  # pulls in client libraries

    return run_demo(duration_s=args.duration, clients=args.clients)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshproxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"meshproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a node in the foreground")
    run.add_argument("-c", "--config", required=True, help="node config file (TOML)")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config", help="node config file (TOML)")
    check.set_defaults(func=cmd_check_config)

    demo = sub.add_parser("demo", help="an edge, three middles, two MySQL servers, under load")
    demo.add_argument("--duration", type=float, default=20.0, help="seconds of load (20)")
    demo.add_argument("--clients", type=int, default=8, help="concurrent clients (8)")
    demo.set_defaults(func=cmd_demo)

    ctl.add_parser(sub)
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
