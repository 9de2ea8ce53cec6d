"""Throwaway MariaDB servers on loopback, for the demo, the tests and the benchmarks.

Each server gets its own data directory (copied from a template made once by
``mariadb-install-db``, which is much faster than installing every time), a free port and
an init file that creates the users meshproxy and its tests expect. Servers are started so
that they die with the process that started them, leaving nothing behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from meshproxy.config import Address
from meshproxy.runtime import children
from meshproxy.runtime.children import die_with_parent

APP_USER = "app"
APP_PASSWORD = "app"  # noqa: S105 - throwaway local servers only
MONITOR_USER = "monitor"
MONITOR_PASSWORD = "monitor"  # noqa: S105 - throwaway local servers only
DATABASE = "sbtest"

# The monitor user's one privilege, SLAVE MONITOR (alias REPLICA MONITOR), is the least
# that SHOW SLAVE STATUS needs since MariaDB 10.5.9; REPLICATION CLIENT, now an alias of
# BINLOG MONITOR, no longer allows it. It allows no reads of data and no writes.
_INIT_SQL = f"""
CREATE DATABASE IF NOT EXISTS {DATABASE};
CREATE USER IF NOT EXISTS '{APP_USER}'@'%' IDENTIFIED BY '{APP_PASSWORD}';
GRANT ALL ON *.* TO '{APP_USER}'@'%';
CREATE USER IF NOT EXISTS '{MONITOR_USER}'@'%' IDENTIFIED BY '{MONITOR_PASSWORD}';
GRANT SLAVE MONITOR ON *.* TO '{MONITOR_USER}'@'%';
"""


def mariadbd_path() -> str | None:
    return shutil.which("mariadbd") or next(
        (p for p in ("/usr/sbin/mariadbd", "/usr/libexec/mariadbd") if os.path.exists(p)), None
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class MariaDB:
    """One mariadbd process with its own data directory under ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        port: int | None = None,
        tls: bool = False,
        extra_args: Sequence[str] = (),
    ):
        self.name = name
        self.dir = workdir / name
        self.port = port or free_port()
        self.tls = tls
        # More mariadbd options, after ours: the last of an option wins (``--log-bin`` here
        # undoes our ``--skip-log-bin``).
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> Address:
        return Address("127.0.0.1", self.port)

    @property
    def socket_path(self) -> Path:
        return self.dir / "mysqld.sock"

    def start(self, template: Path, timeout_s: float = 60.0) -> None:
        binary = mariadbd_path()
        if binary is None:
            raise FileNotFoundError("mariadbd is not installed (apt-get install mariadb-server)")
        data = self.dir / "data"
        if not data.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(template, data, symlinks=True)
        init = self.dir / "init.sql"
        init.write_text(_INIT_SQL)
        args = [
            binary,
            "--no-defaults",
            f"--datadir={data}",
            f"--port={self.port}",
            f"--socket={self.socket_path}",
            f"--pid-file={self.dir / 'mysqld.pid'}",
            f"--log-error={self.dir / 'error.log'}",
            f"--init-file={init}",
            "--bind-address=127.0.0.1",
            # As root, not the mysql user: the kernel forgets the die-with-parent request
            # when a process changes its credentials, and these servers must not outlive us.
            "--user=root",
            "--skip-name-resolve",
            "--max-connections=4000",
            "--max-allowed-packet=1G",
            "--innodb-buffer-pool-size=128M",
            "--innodb-log-file-size=48M",
            "--innodb-flush-log-at-trx-commit=0",
            "--skip-log-bin",
        ]
        if self.tls:
            args += self._tls_args()
        args += self.extra_args
        self.process = subprocess.Popen(  # noqa: S603 - fixed argv
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        self._wait_ready(timeout_s)

    def _tls_args(self) -> list[str]:
        cert, key = self.dir / "cert.pem", self.dir / "key.pem"
        if not cert.exists():
            subprocess.run(  # noqa: S603 - fixed argv
                [  # noqa: S607 - openssl from PATH
                    "openssl",
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=meshproxy-test",
                    "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout",
                    str(key),
                    "-out",
                    str(cert),
                ],
                check=True,
                capture_output=True,
            )
        return [f"--ssl-cert={cert}", f"--ssl-key={key}", "--ssl=ON"]

    def _wait_ready(self, timeout_s: float) -> None:
        import pymysql

        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"mariadbd {self.name} exited at start-up: {self.error_log()}")
            try:
                conn = pymysql.connect(
                    host="127.0.0.1",
                    port=self.port,
                    user=APP_USER,
                    password=APP_PASSWORD,
                    connect_timeout=1,
                )
            except pymysql.err.OperationalError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"mariadbd {self.name} not ready: {self.error_log()}"
                    ) from None
                time.sleep(0.05)
            else:
                conn.close()
                return

    def error_log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else "(no error log)"

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is not None:
            children.stop(self.process, timeout_s)


def make_template(workdir: Path) -> Path:
    """Run mariadb-install-db once into ``workdir/template`` and return its path."""
    template = workdir / "template"
    if (template / "mysql").exists():
        return template
    template.mkdir(parents=True, exist_ok=True)
    installer = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
    process = subprocess.Popen(  # noqa: S603 - fixed argv
        [
            installer,
            "--no-defaults",
            f"--datadir={template}",
            "--user=root",
            "--auth-root-authentication-method=socket",
            "--skip-test-db",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # Its own process group: a script whose bootstrap server must go with it if we stop.
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    try:
        _, stderr = process.communicate()
    except BaseException:  # Ctrl-C or SIGTERM while installing: leave nothing running
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"mariadb-install-db failed: {stderr.decode(errors='replace')}")
    return template


def prepare_workdir(path: Path) -> Path:
    """The directory that will hold the servers' data directories, created if need be."""
    path.mkdir(parents=True, exist_ok=True)
    return path
