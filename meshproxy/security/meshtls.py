"""TLS on mesh hops: a node's contexts from its ``[mesh_tls]`` files, and whom a peer is.

Every hop between mesh nodes is mutual TLS: the middle's mesh port requires a client
certificate from the mesh CA, and a node dialling a tier verifies the middle's. A peer is
who its certificate's subject says (CN: the node, OU: its role); an edge accepts only a
``middle`` upstream, a mesh port only ``edge`` and ``middle`` clients. Peers are dialled by
address, so host names are not checked: the CA and the role are the identity.

Only ``ssl`` is imported here: workers build these contexts, and stay light.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MESH_ROLES = frozenset({"edge", "middle"})
HANDSHAKE_TIMEOUT_S = 10.0  # a peer that has not finished its handshake by then is dropped


@dataclass(frozen=True)
class Peer:
    node: str
    role: str


Refused = Callable[[str, str], None]  # (a short reason for a counter label, the detail)


class MeshTls:
    """The server and client contexts of one node.

    ``load`` reads the files into the same contexts again, since a listening server keeps
    the context it was created with: a new certificate and key apply to every handshake
    from then on, and a CA added to the bundle is trusted at once (one removed stays
    trusted until the node restarts). The mesh port reports its failed handshakes to
    ``refused``.
    """

    def __init__(self, ca: str, cert: str, key: str, on_refused: Refused) -> None:
        self._on_refused = on_refused
        self.server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server.verify_mode = ssl.CERT_REQUIRED
        self.server.num_tickets = 0  # hops never resume a session: tickets are waste
        self.client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.client.check_hostname = False  # dialled by address: CA and role identify a peer
        for context in (self.server, self.client):
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            # With no renegotiation a write never has to wait for a read (TLS 1.3 has
            # none anyway): the hop's TLS layer (dataplane/tlslayer.py) relies on it.
            context.options |= ssl.OP_NO_RENEGOTIATION
        self.load(ca, cert, key)

    def load(self, ca: str, cert: str, key: str) -> None:
        """Read the files (raises ssl.SSLError or OSError; a failure leaves the contexts
        as they were, as the config check loaded the same files first)."""
        for context in (self.server, self.client):
            context.load_cert_chain(cert, key)
            context.load_verify_locations(ca)

    def refused(self, exc: BaseException) -> None:
        """Count a failed server-side handshake, unless the peer only went away (a port
        probe, or a node dropping a warm socket it had not finished: routine, not a peer
        refused)."""
        if isinstance(exc, ssl.SSLEOFError | ConnectionError):
            return
        self._on_refused(refusal(exc), describe_failure(exc))


# ``SSLObject.getpeercert()`` builds its dict with ``PyDict_SetItemString``, which interns
# each key. A key nothing else holds is added to the interpreter's table of interned
# strings by every call and removed when the dict dies, leaving a dead slot each time; in
# a node ``serialNumber``, ``notBefore`` and ``notAfter`` are such keys, and every mesh hop
# reads its peer (``peer_of``), so three dead slots per hop. CPython 3.11 rebuilds
# the table when its free slots run out, sized for the strings alive then, and a worker's
# 11,000-odd strings make the first rebuild double it, from 32768 slots to 65536: +532 KiB
# of RSS after a few thousand hops (the one step a 30-minute soak found in the middle
# workers), then a 940 KiB rebuild every 11,000 hops or so. Held here, every call finds its
# keys already interned and the table is left alone.
CERTIFICATE_KEYS = frozenset(
    sys.intern(key)
    for key in (
        "subject",
        "issuer",
        "version",
        "serialNumber",
        "notBefore",
        "notAfter",
        "subjectAltName",
        "OCSP",
        "caIssuers",
        "crlDistributionPoints",
    )
)


def peer_of(transport: Any) -> Peer | None:
    """The peer of a TLS transport, from its verified certificate; None without one."""
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    subject = {name: value for rdn in cert.get("subject", ()) for name, value in rdn}
    return Peer(subject.get("commonName", ""), subject.get("organizationalUnitName", ""))


def refusal(exc: BaseException) -> str:
    """A short, bounded reason for a failed handshake (a counter label)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "certificate not trusted"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if "NO_CERTIFICATE" in reason or "DID_NOT_RETURN_A_CERTIFICATE" in reason:
            return "no certificate"
        if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason:
            return "certificate not trusted"
        if "WRONG_VERSION" in reason or "HTTP" in reason or "RECORD" in reason:
            return "not tls"
        return "handshake failed"
    if isinstance(exc, TimeoutError):
        return "handshake timeout"
    return "closed during handshake"


def describe_failure(exc: BaseException) -> str:
    """What a log line says about a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return type(exc).__name__ if not str(exc) else str(exc)
