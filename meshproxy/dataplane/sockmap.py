"""The kernel fast path for passthrough sessions: a BPF sockmap splices the two sockets.

Once a passthrough session is linked, its bytes need not enter Python at all. Both of its
sockets go into a ``SOCKHASH`` keyed by their socket cookies, and a ``sk_skb`` stream
verdict program attached to it redirects whatever arrives on one straight to the other's
send path, counting bytes per socket as it goes. Python keeps the transports open and
still sees what matters: end of file and errors (so half-close, idle timeouts, drain and
``close_sessions_on_down`` work as before), and a byte count it samples from a map
instead of counting in ``data_received``.

A socket joins the map only at a quiet point of its protocol: the server's greeting has
come in and has not been passed on yet, so the server waits for the client, and the client,
which has not seen the greeting, has sent nothing. Nothing is then in flight in user space
that redirected bytes could overtake. MySQL guarantees that point; a protocol where the
client speaks first is never spliced.

The program is compiled and loaded with BCC (Debian's ``python3-bpfcc``), the maintained
loader, which needs clang at run time and kernel headers. BCC with its compiler takes some
120 MB of memory, so a short-lived loader process (``python -m meshproxy.dataplane.sockmap
--reply-fd N``) compiles the program, attaches it to the socket map and passes the maps'
descriptors back (SCM_RIGHTS); the data plane keeps only those and updates the maps
through BCC's small libbpf part (``libbcc_bpf``). The attached program lives as long as
the map does. Loading is tried at start and a failure (no BCC, no headers, no CAP_BPF in
a container, another kernel) is one log line: sessions then use the Python pump.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import importlib.machinery
import importlib.util
import os
import socket
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

SO_COOKIE = 57  # linux/asm-generic/socket.h; Python's socket module lacks it
LOAD_S = 30.0  # the loader: an interpreter, BCC's import, clang
LIBBPF = "libbcc_bpf.so.0"  # BCC's libbpf part: map updates without the compiler
TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in struct tcp_info, a stable ABI
FLUSH_POLL_S = 0.002
FLUSH_S = 2.0  # at most this long an EOF or a close waits for the kernel to pass bytes on
MAX_SOCKETS = 65536  # per process: 32768 spliced sessions, then the pump takes the rest
# Where Debian's python3-bpfcc lives: it is a system package, not on PyPI.
SYSTEM_PACKAGES = "/usr/lib/python3/dist-packages"

PROGRAM = f"""
struct link {{
    u64 peer;   /* the other socket's cookie */
    u64 bytes;  /* redirected from this socket so far */
}};
BPF_SOCKHASH(sockets, u64, {MAX_SOCKETS});
BPF_HASH(links, u64, struct link, {MAX_SOCKETS});

int splice(struct __sk_buff *skb) {{
    if (skb->len == 0)
        return SK_PASS;  /* a bare FIN: redirected, it would end the other side early */
    u64 cookie = bpf_get_socket_cookie(skb);
    struct link *link = links.lookup(&cookie);
    if (!link)
        return SK_PASS;  /* not (or no longer) spliced: user space reads it */
    __sync_fetch_and_add(&link->bytes, skb->len);
    return sockets.sk_redirect_hash(skb, &link->peer, 0);
}}
"""


class Link(ctypes.Structure):
    _fields_ = [("peer", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class Unavailable(Exception):
    """The fast path cannot run here; the reason says why, for one log line."""


def _import_bcc() -> ModuleType:
    """BCC from the environment, or else from Debian's system packages (without putting
    that folder on sys.path, where its other packages would shadow ours)."""
    try:
        bcc = importlib.import_module("bcc")
    except Exception:  # not installed here, or its libbcc is missing: try Debian's
        spec = importlib.machinery.PathFinder.find_spec("bcc", [SYSTEM_PACKAGES])
        if spec is None or spec.loader is None:
            raise Unavailable("BCC is not installed (Debian: apt install python3-bpfcc)") from None
        bcc = importlib.util.module_from_spec(spec)
        sys.modules["bcc"] = bcc
        try:
            spec.loader.exec_module(bcc)
        except Exception as exc:
            del sys.modules["bcc"]
            raise Unavailable(f"BCC does not load: {exc}") from None
    return bcc


def cookie_of(transport: Any) -> int:
    """The kernel's unique, never reused id of a transport's socket."""
    sock = transport.get_extra_info("socket")
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


def written(transport: Any) -> int:
    """Bytes that have entered a socket's send path: acknowledged, or still queued."""
    sock = transport.get_extra_info("socket")
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCPI_BYTES_ACKED + 8)
    acked = int.from_bytes(info[TCPI_BYTES_ACKED : TCPI_BYTES_ACKED + 8], "little")
    queued = int.from_bytes(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4)), "little")
    return acked + queued


@dataclass
class Spliced:
    """A session's two sockets in the map, client's first, by cookie.

    The program hands redirected bytes to a kernel work queue, so they may still be on
    their way when user space sees the EOF that followed them: a ``write_eof`` or a close
    then would cut them off. Both wait until the socket they act on has taken every byte
    meant for it (what the kernel redirected and what user space wrote), at most FLUSH_S.
    """

    client: int
    upstream: int
    sockmap: Sockmap
    transports: tuple[Any, Any]
    base: tuple[int, int] = (0, 0)  # written() of each socket when it was spliced
    eofs: set[bool] = field(default_factory=set)  # directions an EOF was passed on to

    def nbytes(self) -> tuple[int, int]:
        """Bytes the kernel moved from the client and from the upstream so far."""
        return self.sockmap.count(self.client), self.sockmap.count(self.upstream)

    def flushed(self, to_upstream: bool, from_user_space: int) -> bool:
        """Whether the socket toward one side has taken all that was meant for it."""
        source = self.client if to_upstream else self.upstream
        target = self.transports[1 if to_upstream else 0]
        expected = self.base[1 if to_upstream else 0] + from_user_space + self.sockmap.count(source)
        if target.is_closing():
            return True  # closed meanwhile: nothing left to wait for
        try:
            return written(target) >= expected
        except (OSError, ValueError):  # the socket went with its peer's reset
            return True

    def after_flush(
        self, to_upstream: bool, from_user_space: Callable[[], int], then: Callable[[], None]
    ) -> None:
        """Run ``then`` once the socket toward one side has taken its bytes (or FLUSH_S)."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + FLUSH_S

        def check() -> None:
            if self.flushed(to_upstream, from_user_space()) or time.monotonic() > deadline:
                then()
            else:
                loop.call_later(FLUSH_POLL_S, check)

        check()

    def write_eof(self, to_upstream: bool, from_user_space: Callable[[], int]) -> None:
        """Pass an EOF on toward one side, once, after the bytes that came before it."""
        if to_upstream in self.eofs:
            return
        self.eofs.add(to_upstream)
        target = self.transports[1 if to_upstream else 0]
        self.after_flush(
            to_upstream, from_user_space, lambda: target.is_closing() or target.write_eof()
        )

    def forget(self) -> None:
        """Drop the session's entries (a closed socket leaves the socket map by itself)."""
        self.sockmap.forget(self.client, self.upstream)


class Sockmap:
    """One process's handle on the loaded program's maps; raises Unavailable if the
    program cannot be loaded here."""

    def __init__(self) -> None:
        try:
            self._lib = ctypes.CDLL(LIBBPF, use_errno=True)
        except OSError as exc:
            raise Unavailable(f"BCC is not installed ({exc}; Debian: python3-bpfcc)") from None
        # The maps live as long as this process holds them, and the program with them.
        self._sockets, self._links = _load_elsewhere()

    def splice(self, client: Any, upstream: Any) -> Spliced | None:
        """Put a linked session's two sockets into the map; None (and nothing changed)
        when the kernel refuses, e.g. the map is full: the Python pump carries it then."""
        pair = Spliced(
            cookie_of(client),
            cookie_of(upstream),
            self,
            (client, upstream),
            (written(client), written(upstream)),
        )
        ends = ((pair.client, pair.upstream, client), (pair.upstream, pair.client, upstream))
        # Links first: a socket whose bytes the program redirects must find its peer.
        for own, other, _ in ends:
            if not self._put(self._links, own, Link(other, 0)):
                pair.forget()
                return None
        for own, _, transport in ends:
            fileno = transport.get_extra_info("socket").fileno()
            if not self._put(self._sockets, own, ctypes.c_int(fileno)):
                pair.forget()  # with its links gone, both sockets pass again
                return None
        return pair

    def forget(self, *cookies: int) -> None:
        """Drop links: the program passes what still arrives on those sockets to user
        space (a closed socket leaves the socket map by itself)."""
        for cookie in cookies:
            key = ctypes.c_uint64(cookie)
            self._lib.bpf_delete_elem(self._links, ctypes.byref(key))

    def _put(self, fd: int, cookie: int, value: Link | ctypes.c_int) -> bool:
        key = ctypes.c_uint64(cookie)
        return bool(self._lib.bpf_update_elem(fd, ctypes.byref(key), ctypes.byref(value), 0) == 0)

    def count(self, cookie: int) -> int:
        """Bytes the program redirected from a socket."""
        key, value = ctypes.c_uint64(cookie), Link()
        if self._lib.bpf_lookup_elem(self._links, ctypes.byref(key), ctypes.byref(value)) != 0:
            return 0
        return int(value.bytes)


def _load_elsewhere() -> tuple[int, int]:
    """Run the loader in a process of its own; the descriptors of the socket map and the
    link map it passes back."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        argv = [sys.executable, "-m", "meshproxy.dataplane.sockmap"]
        loader = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [*argv, "--reply-fd", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        theirs.close()
        ours.settimeout(LOAD_S)
        try:
            message, fds, _, _ = socket.recv_fds(ours, 4096, 2)
        finally:
            if loader.poll() is None:
                loader.kill()  # done, or hung: either way it has no more to say
            loader.wait()
    except (OSError, subprocess.SubprocessError) as exc:  # TimeoutError is an OSError
        raise Unavailable(f"the loader failed: {exc or type(exc).__name__}") from None
    finally:
        ours.close()
        theirs.close()
    if message != b"ok" or len(fds) != 2:
        for fd in fds:
            os.close(fd)
        raise Unavailable(message.decode(errors="replace") or "the loader died")
    return fds[0], fds[1]


def _compile_and_attach() -> tuple[Any, int, int]:
    """The loader's work: the program compiled, loaded and attached to the socket map."""
    bcc = _import_bcc()
    try:
        bpf = bcc.BPF(text=PROGRAM)
        program = bpf.load_func("splice", bcc.BPF.SK_SKB)
        lib = importlib.import_module("bcc.libbcc").lib
        sockets = lib.bpf_table_fd(bpf.module, b"sockets")
        bcc.BPF.attach_func(program, sockets, bcc.BPFAttachType.SK_SKB_STREAM_VERDICT)
    except Exception as exc:  # BCC raises bare Exceptions, with the compiler's words
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise Unavailable(f"the BPF program does not load: {first_line}") from None
    return bpf, sockets, lib.bpf_table_fd(bpf.module, b"links")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshproxy.dataplane.sockmap")
    parser.add_argument("--reply-fd", type=int, required=True)
    args = parser.parse_args(argv)
    reply = socket.socket(fileno=args.reply_fd)
    try:
        _bpf, sockets, links = _compile_and_attach()  # _bpf: its fds stay open until sent
    except Unavailable as exc:
        reply.send(str(exc).encode()[:4000])
        return 1
    socket.send_fds(reply, [b"ok"], [sockets, links])
    return 0


if __name__ == "__main__":
    sys.exit(main())
