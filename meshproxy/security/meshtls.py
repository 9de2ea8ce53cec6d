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
from dataclasses import dataclass
from typing import Any

MESH_ROLES = frozenset({"edge", "middle"})
HANDSHAKE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Peer:
    node: str
    role: str


class MeshTls:
    """The server and client contexts of one node, rebuilt from its files on ``load``.

    Each connection takes the context current at its start, so a reload (new certificate,
    key or CA bundle, a CA removed) applies to new hops at once and to none in flight.
    """

    def __init__(self, ca: str, cert: str, key: str) -> None:
        self.files = (ca, cert, key)
        self.server, self.client = _contexts(ca, cert, key)

    def load(self, ca: str, cert: str, key: str) -> None:
        """Read the files again (raises ssl.SSLError or OSError, changing nothing)."""
        self.server, self.client = _contexts(ca, cert, key)
        self.files = (ca, cert, key)


def _contexts(ca: str, cert: str, key: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False  # dialled by address: the CA and the role identify a peer
    for context in (server, client):
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert, key)
        context.load_verify_locations(ca)
    return server, client


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
