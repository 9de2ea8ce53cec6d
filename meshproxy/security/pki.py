"""A mesh PKI with ``cryptography``: one CA, and a certificate per node naming the node
(subject CN and a DNS SAN) and its role (subject OU: ``edge`` or ``middle``).

Keys are EC P-256 (fast handshakes, small certificates) and are written readable by their
owner only. ``meshproxy certs init DIR`` and ``meshproxy certs issue NODE --role ROLE`` are
the people-facing commands; ``topology render`` and ``topology up --local`` call the same
functions for every node of a spec.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("edge", "middle")
CA_CERT, CA_KEY = "ca.pem", "ca.key"
CA_DAYS = 3650
NODE_DAYS = 365


@dataclass(frozen=True)
class NodeFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class CertInfo:
    """What the control plane reports about a node's own certificate."""

    subject: str
    node: str
    role: str
    serial: int
    not_after: datetime.datetime


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def init_ca(directory: Path, name: str = "meshproxy mesh CA", days: int = CA_DAYS) -> Path:
    """Create a CA in ``directory`` (``ca.pem``, ``ca.key``); returns the certificate's path.
    An existing CA is kept: issuing from it again must not orphan the certificates it
    already signed."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() and key_path.exists():
        return cert_path
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path


def issue(
    directory: Path,
    node: str,
    role: str,
    days: int = NODE_DAYS,
    *,
    not_before: datetime.datetime | None = None,
    out: Path | None = None,
) -> NodeFiles:
    """Sign a certificate for ``node`` in ``role`` with the CA in ``directory``; writes
    ``NODE.pem`` and ``NODE.key`` there (or in ``out``). Usable as client and as server."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    ca_cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - datetime.timedelta(minutes=5)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshproxy"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, node),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node)]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    target = out or directory
    files = NodeFiles(target / f"{node}.pem", target / f"{node}.key")
    _write_key(files.key, key)
    _write_cert(files.cert, cert)
    return files


def describe(path: Path) -> CertInfo:
    """Node, role and expiry of the certificate in ``path`` (the first one in the file)."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())

    def attribute(oid: x509.ObjectIdentifier) -> str:
        values = cert.subject.get_attributes_for_oid(oid)
        return str(values[0].value) if values else ""

    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        node=attribute(NameOID.COMMON_NAME),
        role=attribute(NameOID.ORGANIZATIONAL_UNIT_NAME),
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc,
    )
