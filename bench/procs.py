"""Child processes of the benchmark: started with their logs in a file, all stopped on exit.

Every child is started with PR_SET_PDEATHSIG, so even if the harness itself is killed with
SIGKILL the kernel takes its children down with it; normally ``Processes.stop_all`` stops
them (SIGTERM, then SIGKILL after a grace period) in the reverse order of their start.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meshproxy.runtime.children import die_with_parent

# SIGTERM makes a meshproxy angel drain its workers (up to node.drain_timeout_s, 30 s by
# default) before it exits; only then do we resort to SIGKILL.
STOP_GRACE_S = 45.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def warnings(self) -> list[str]:
        """The warning and error lines the process has logged so far."""
        if not self.log.exists():
            return []
        lines = self.log.read_text(errors="replace").splitlines()
        return [line for line in lines if " warning " in line or " error " in line]

    def log_tail(self, limit: int = 2000) -> str:
        if not self.log.exists():
            return "(no log)"
        return self.log.read_text(errors="replace")[-limit:] or "(empty log)"

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with status {code}:\n{self.log_tail()}")


class Processes:
    """The children we started, so that each is stopped exactly once."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.children: list[Child] = []

    def spawn(self, name: str, argv: Sequence[str]) -> Child:
        """Start a daemon in a session of its own, as a service manager would.

        Its own session also means its own scheduler autogroup where the kernel has them
        (``/proc/sys/kernel/sched_autogroup_enabled``): every proxy then competes for CPU
        on the same footing, whether or not it starts children in sessions of their own
        (as meshproxy's angel does), instead of sharing a group with sysbench and MariaDB.
        Ctrl-C therefore reaches only the harness, which stops its children itself.
        """
        log = self.logdir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
                start_new_session=True,
            )
        child = Child(name, process, log)
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        while self.children:
            _stop(self.children.pop().process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_port(child: Child, port: int, timeout_s: float = 15.0) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while True:
        child.check_alive()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{child.name} does not listen on {port}:\n{child.log_tail()}")
        time.sleep(0.05)


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def with_descendants(pids: Sequence[int]) -> set[int]:
    """The processes and all their descendants (a node may run an angel and workers)."""
    parent_of: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                parent_of[int(entry.name)] = int(fields[1])
    found = set(pids)
    grew = True
    while grew:
        children = {pid for pid, ppid in parent_of.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found


def cpu_seconds(pids: Sequence[int]) -> tuple[float, float]:
    """User and system CPU seconds used so far by the processes and their descendants."""
    user = system = 0.0
    for pid in with_descendants(pids):
        fields = _stat_fields(pid)
        if fields is not None:  # utime and stime are fields 14 and 15 of the whole line
            user += int(fields[11]) / CLOCK_TICKS
            system += int(fields[12]) / CLOCK_TICKS
    return user, system


# sock_diag (netlink): the kernel lists TCP sockets by state, so counting a proxy's
# connections to the server does not mean reading /proc/net/tcp, which on a busy test
# machine can hold tens of thousands of TIME_WAIT lines.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_DONE = 3
_NLMSG_ERROR = 2
_TCP_ESTABLISHED = 1


def established_to(port: int) -> set[int]:
    """Socket inodes of the established TCP (IPv4) connections to ``port``."""
    request = struct.pack("=BBBBI48x", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 1 << 1)
    header = struct.pack(
        "=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, 1, 0
    )
    found: set[int] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as sock:
        sock.sendall(header + request)
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind in (_NLMSG_DONE, _NLMSG_ERROR) or length < 16:
                    return found
                body = offset + 16
                state = data[body + 1]
                (dport,) = struct.unpack_from("!H", data, body + 6)
                (inode,) = struct.unpack_from("=I", data, body + 68)
                if state == _TCP_ESTABLISHED and dport == port:
                    found.add(inode)
                offset += (length + 3) & ~3


def socket_inodes(pids: Sequence[int]) -> set[int]:
    """Inodes of the sockets the processes hold open."""
    found: set[int] = set()
    for pid in pids:
        directory = f"/proc/{pid}/fd"
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            with contextlib.suppress(OSError):
                target = os.readlink(f"{directory}/{name}")
                if target.startswith("socket:["):
                    found.add(int(target[8:-1]))
    return found


def host_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (user, system, interrupts) since boot.

    The kernel fast path moves bytes in softirq context and kernel worker threads, which
    no proxy process is charged for; this is where that work shows.
    """
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
