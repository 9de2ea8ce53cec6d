"""An embedded MySQL-protocol server for the demo on machines without MariaDB.

Built on mysql-mimic, which speaks the server side of the MySQL protocol and evaluates
simple queries itself. It knows the same users as :mod:`meshproxy.testbed.mariadb` (native password
auth), reports ``USER()`` as ``user@<client address>`` like MariaDB does, and answers
``SELECT @@read_only`` with 0, which is all the demo's clients and the middles' ``mysql``
health checks ask. It holds no data.

Run it as ``python -m meshproxy.testbed.embedded --port P``; :class:`EmbeddedDB` does that in a
child process that dies with its parent.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mysql_mimic import IdentityProvider, MysqlServer, NativePasswordAuthPlugin, Session, User
from mysql_mimic.variables import SYSTEM_VARIABLES, GlobalVariables, SessionVariables
from sqlglot import exp
from sqlglot.executor.env import ENV

from meshproxy.config import Address
from meshproxy.runtime import children
from meshproxy.runtime.children import die_with_parent
from meshproxy.testbed.mariadb import (
    APP_PASSWORD,
    APP_USER,
    MONITOR_PASSWORD,
    MONITOR_USER,
    free_port,
)

USERS = {APP_USER: APP_PASSWORD, MONITOR_USER: MONITOR_PASSWORD}

# name: (type, default, dynamic), as mysql-mimic declares system variables.
_VARIABLES = {**SYSTEM_VARIABLES, "read_only": (bool, False, False)}


def _substring_index(text: str | None, delimiter: str | None, count: int | None) -> str | None:
    """MySQL's SUBSTRING_INDEX: the part before the count-th delimiter (after, if negative)."""
    if text is None or delimiter is None or count is None:
        return None
    if count == 0 or not delimiter:
        return ""
    parts = text.split(delimiter)
    return delimiter.join(parts[:count] if count > 0 else parts[count:])


# mysql-mimic evaluates table-less SELECTs with sqlglot's Python executor, which lacks this.
ENV.setdefault("SUBSTRINGINDEX", _substring_index)


class _Users(IdentityProvider):  # type: ignore[misc] # mysql-mimic ships no types
    """The fixed demo users, each with its password checked by mysql_native_password."""

    async def get_user(self, username: str) -> User | None:
        password = USERS.get(username)
        if password is None:
            return None
        return User(
            name=username,
            auth_string=NativePasswordAuthPlugin.create_auth_string(password),
            auth_plugin=NativePasswordAuthPlugin.name,
        )


class _Session(Session):  # type: ignore[misc] # mysql-mimic ships no types
    def __init__(self) -> None:
        super().__init__(SessionVariables(GlobalVariables(_VARIABLES)))
        # After the middleware that substitutes USER(), @@variables and the like.
        self.middlewares.insert(1, self._literal_select_middleware)

    async def init(self, connection: Any) -> None:
        await super().init(connection)
        # MariaDB reports the client's address as USER()'s host part; so do we.
        peer = connection.stream.writer.get_extra_info("peername")
        host = peer[0] if peer else "localhost"
        user = self.variables.get("external_user")
        self.variables.set("external_user", f"{user}@{host}", force=True)

    async def _literal_select_middleware(self, q: Any) -> Any:
        """Answer a SELECT of literals only (the demo's ``SELECT 1``) at once: mysql-mimic
        would run sqlglot's executor, which takes milliseconds even for that."""
        select = q.expression
        if (
            isinstance(select, exp.Select)
            and not any(select.args.get(arg) for arg in set(select.arg_types) - {"expressions"})
            and all(isinstance(column, exp.Literal) for column in select.expressions)
        ):
            row = tuple(column.to_py() for column in select.expressions)
            return [row], [column.sql(dialect="mysql") for column in select.expressions]
        return await q.next()


async def serve(host: str, port: int) -> None:
    server = MysqlServer(session_factory=_Session, identity_provider=_Users())
    await server.start_server(host=host, port=port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meshproxy.testbed.embedded", description=__doc__
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    from meshproxy.runtime.child import install_event_loop_policy

    install_event_loop_policy()
    asyncio.run(serve(args.host, args.port))
    return 0


class EmbeddedDB:
    """One embedded server process; its output goes to ``workdir/<name>.log``."""

    def __init__(self, workdir: Path, name: str, port: int | None = None) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> Address:
        return Address("127.0.0.1", self.port)

    def start(self, timeout_s: float = 15.0) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", "meshproxy.testbed.embedded", "--port", str(self.port)],
                stdout=log,
                stderr=log,
                preexec_fn=die_with_parent,
            )
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        import pymysql

        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                log = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"embedded server {self.name} exited at start-up: {log}")
            try:
                conn = pymysql.connect(
                    host="127.0.0.1",
                    port=self.port,
                    user=APP_USER,
                    password=APP_PASSWORD,
                    connect_timeout=1,
                    ssl_disabled=True,
                )
            except pymysql.err.OperationalError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"embedded server {self.name} not ready") from None
                time.sleep(0.05)
            else:
                conn.close()
                return

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is not None:
            children.stop(self.process, timeout_s)


if __name__ == "__main__":
    sys.exit(main())
