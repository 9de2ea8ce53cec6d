"""Entry point of the angel's children: ``python -m meshproxy.runtime.child _control|_worker ...``.

Kept apart from :mod:`meshproxy.cli`, whose subcommands import the admin client, the
topology renderer and YAML: a worker restarted after a crash serves again sooner when it
imports only what it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

from meshproxy import config, log
from meshproxy.errors import ConfigError
from meshproxy.runtime import memtrace


def install_event_loop_policy() -> str:
    """Use uvloop when it can be imported; stock asyncio otherwise."""
    try:
        import uvloop  # optional at run time
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def start(config_path: str, role: str) -> config.Config:
    """Load the node config, set up logging for ``role`` and pick the event loop."""
    cfg = config.load(config_path)
    log.setup(cfg.node.log_level, cfg.node.log_format, cfg.node.name, role)
    install_event_loop_policy()
    memtrace.start_if_asked(cfg.node.name, role)
    return cfg


def wait_for_turn(fd: int) -> bool:
    """A standby worker, imports done, waits for the angel: True to start, False to exit.

    The config is read only after this, so a standby that waited through a config change
    starts with the file as it is now."""
    install_event_loop_policy()  # imports uvloop now rather than after the wake-up
    woken = os.read(fd, 1)
    os.close(fd)
    return woken != b""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshproxy.runtime.child")
    parser.add_argument("role", choices=("_control", "_worker"))
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--heartbeat-fd", type=int)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--standby-fd", type=int, help="wait for a byte here before starting")
    parser.add_argument("--sockets-fd", type=int, help="where to ask the angel for sockets")
    args = parser.parse_args(argv)
    # Upgrades are the angel's business: a stray SIGUSR2 (say, `systemctl kill` of the whole
    # unit) must not kill a worker or a waiting standby. The control process handles it.
    if args.role == "_worker":
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    # The angel checked the config before starting us; a change on disk since then is
    # reported like any config error (exit 2) and the angel's backoff applies.
    try:
        if args.role == "_control":
            from meshproxy.runtime.modes import run_control

            cfg = start(args.config, "control")
            return asyncio.run(run_control(cfg, args.channel, args.heartbeat_fd))
        from meshproxy.runtime.modes import run_worker

        if args.standby_fd is not None and not wait_for_turn(args.standby_fd):
            return 0
        cfg = start(args.config, f"worker-{args.index}")
        return asyncio.run(
            run_worker(cfg, args.channel, args.index, args.heartbeat_fd, args.sockets_fd)
        )
    except ConfigError as exc:
        print(f"meshproxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
