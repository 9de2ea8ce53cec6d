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
loader, which needs clang at run time and kernel headers; the map updates go through
BCC's libbpf functions. Loading is tried at start and a failure (no BCC, no headers, no
CAP_BPF in a container, another kernel) is one log line: sessions then use the Python pump.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import importlib.machinery
import importlib.util
import socket
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

SO_COOKIE = 57  # linux/asm-generic/socket.h; Python's socket module lacks it
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
    """One process's loaded program and its maps; raises Unavailable if it cannot load."""

    def __init__(self) -> None:
        bcc = _import_bcc()
        try:
            self._bpf = bcc.BPF(text=PROGRAM)
            program = self._bpf.load_func("splice", bcc.BPF.SK_SKB)
            lib = importlib.import_module("bcc.libbcc").lib
            self._sockets = lib.bpf_table_fd(self._bpf.module, b"sockets")
            bcc.BPF.attach_func(program, self._sockets, bcc.BPFAttachType.SK_SKB_STREAM_VERDICT)
        except Exception as exc:  # BCC raises bare Exceptions, with the compiler's words
            raise Unavailable(
                f"the BPF program does not load: {str(exc).splitlines()[0]}"
            ) from None
        self._lib = lib
        self._links = lib.bpf_table_fd(self._bpf.module, b"links")

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
