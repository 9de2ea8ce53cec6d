"""Mutual TLS on mesh hops with real processes: who a middle lets in, whom an edge dials,
and certificates rotated under load."""

from __future__ import annotations

import datetime
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

from meshproxy.security import pki
from meshproxy.testbed import mariadb
from tests.integration.harness import (
    HOST,
    Doc,
    Load,
    LogEvent,
    NodeFactory,
    NodeProcess,
    addr,
    close_quietly,
    closed_by_peer,
    connect,
    edge_config,
    free_port,
    middle_config,
    wait_until,
)

pytestmark = pytest.mark.integration

TOKEN = "mesh-tls-test-token-0123"


class Pki:
    """A mesh CA with certificates for the test's nodes, and a second, foreign CA."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "mesh"
        self.foreign = root / "foreign"
        pki.init_ca(self.dir)
        pki.init_ca(self.foreign, "some other CA")

    def tls(self, node: str, role: str) -> dict[str, str]:
        files = pki.issue(self.dir, node, role)
        return {"ca": str(self.dir / pki.CA_CERT), "cert": str(files.cert), "key": str(files.key)}

    def client_context(self, files: pki.NodeFiles | None) -> ssl.SSLContext:
        """A TLS client that trusts the mesh CA and presents ``files`` (or nothing)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(self.dir / pki.CA_CERT)
        if files is not None:
            context.load_cert_chain(files.cert, files.key)
        return context


@pytest.fixture
def mesh_pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def secured_middle(name: str, backend: int, tls: dict[str, str]) -> tuple[Doc, int, int]:
    """A middle with mesh TLS and an admin API: (doc, mesh port, admin port)."""
    mesh_port, admin_port = free_port(), free_port()
    doc = middle_config(name, mesh_port, servers=[backend])
    doc["mesh_tls"] = tls
    doc["admin"] = {"bind": addr(admin_port), "token": TOKEN}
    return doc, mesh_port, admin_port


def refused(admin_port: int) -> dict[str, int]:
    """The middle's mesh_tls_refused counters, by reason."""
    request = urllib.request.Request(f"http://{HOST}:{admin_port}/status")
    request.add_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        counters = json.loads(response.read())["counters"]
    found: dict[str, int] = {}
    for entry in counters.get("mesh_tls_refused", []):
        reason = entry["labels"]["reason"]
        found[reason] = found.get(reason, 0) + int(entry["value"])
    return found


def tls_hello(port: int, context: ssl.SSLContext) -> bool:
    """Whether a TLS client gets through the handshake and is then left connected: with
    TLS 1.3 a refused client certificate shows only after the handshake, as a close."""
    with socket.create_connection((HOST, port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                tls.settimeout(1.0)
                try:
                    return tls.recv(1) != b""
                except TimeoutError:
                    return True  # still open, waiting for our hop header
        except (ssl.SSLError, ConnectionError):
            return False


def served_cert_serial(port: int, context: ssl.SSLContext) -> int:
    with (
        socket.create_connection((HOST, port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_middle_admits_only_mesh_certificates(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB, mesh_pki: Pki, tmp_path: Path
) -> None:
    """Through an edge and a middle that both speak mutual TLS, client traffic flows; a
    plaintext hop header, a TLS client without a certificate, one with a certificate from
    another CA and one with an expired certificate are each refused and counted by reason,
    while the load through the edge sees no error."""
    doc, mesh_port, admin_port = secured_middle(
        "m1", shared_mariadb.port, mesh_pki.tls("m1", "middle")
    )
    nodes.start(doc)
    edge_port = free_port()
    edge_doc = edge_config("e1", edge_port, [mesh_port])
    edge_doc["mesh_tls"] = mesh_pki.tls("e1", "edge")
    nodes.start(edge_doc)

    foreign = pki.issue(mesh_pki.foreign, "intruder", "edge")
    expired = pki.issue(
        mesh_pki.dir,
        "old",
        "edge",
        days=1,
        not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3),
        out=tmp_path / "expired",
    )
    with Load(edge_port, threads=3) as load:
        wait_until(lambda: len(load.snapshot()) >= 20, 20, "20 round trips through mesh TLS")
        with socket.create_connection((HOST, mesh_port), timeout=5) as plain:
            plain.sendall(b"MSHP\x01\x00\x10" + b"\x00" * 16)  # a forged header, in clear
            assert closed_by_peer(plain, 5)
        assert not tls_hello(mesh_port, mesh_pki.client_context(None))
        foreign_context = mesh_pki.client_context(None)
        foreign_context.load_cert_chain(foreign.cert, foreign.key)
        assert not tls_hello(mesh_port, foreign_context)
        assert not tls_hello(mesh_port, mesh_pki.client_context(expired))
        wait_until(
            lambda: (
                refused(admin_port).keys()
                >= {"not tls", "no certificate", "certificate not trusted"}
            ),
            10,
            "each refusal to be counted",
        )
        assert refused(admin_port)["certificate not trusted"] >= 2  # foreign and expired
        before = len(load.snapshot())
        wait_until(lambda: len(load.snapshot()) >= before + 20, 20, "20 more round trips")
    errors = [o for o in load.outcomes if o.error is not None]
    assert not errors, errors[:3]
    # A legitimate peer is let through (and then waits for its hop header).
    assert tls_hello(mesh_port, mesh_pki.client_context(pki.issue(mesh_pki.dir, "e9", "edge")))


def test_edge_refuses_a_middle_without_a_middle_certificate(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB, mesh_pki: Pki
) -> None:
    """An edge dials only members that prove a middle role: a tier member presenting an
    edge's certificate is a failed connect (and the client is served by the real middle)."""
    good, good_port, _ = secured_middle("m1", shared_mariadb.port, mesh_pki.tls("m1", "middle"))
    fake, fake_port, _ = secured_middle("m2", shared_mariadb.port, mesh_pki.tls("m2", "edge"))
    nodes.start(good)
    nodes.start(fake)
    edge_port = free_port()
    edge_doc = edge_config("e1", edge_port, [good_port, fake_port], tier={"warm_connections": 0})
    edge_doc["mesh_tls"] = mesh_pki.tls("e1", "edge")
    edge = nodes.start(edge_doc)

    def refused() -> list[LogEvent]:
        # Each session picks a member at random: one of them tries the impostor at last.
        close_quietly(connect(edge_port))
        return edge.events("connect_failed", server=addr(fake_port))

    (failed, *_) = wait_until(refused, 30, "a session to try the middle with an edge's certificate")
    assert "role 'edge', not 'middle'" in failed.fields["error"]


def test_certificates_rotate_under_load_without_losing_a_session(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB, mesh_pki: Pki
) -> None:
    """A middle whose certificate is replaced on disk and reloaded with SIGHUP serves the
    new certificate to new hops at once, while a session opened before keeps working and
    the load through the edge sees no error."""
    doc, mesh_port, _ = secured_middle("m1", shared_mariadb.port, mesh_pki.tls("m1", "middle"))
    middle = nodes.start(doc)
    edge_port = free_port()
    edge_doc = edge_config("e1", edge_port, [mesh_port])
    edge_doc["mesh_tls"] = mesh_pki.tls("e1", "edge")
    nodes.start(edge_doc)
    probe = mesh_pki.client_context(pki.issue(mesh_pki.dir, "probe", "edge"))
    old_serial = served_cert_serial(mesh_port, probe)

    held = connect(edge_port)
    try:
        with Load(edge_port, threads=3) as load:
            wait_until(lambda: len(load.snapshot()) >= 20, 20, "20 round trips")
            pki.issue(mesh_pki.dir, "m1", "middle")  # new key and certificate, same paths
            reload_signal(middle)
            wait_until(
                lambda: served_cert_serial(mesh_port, probe) != old_serial,
                10,
                "the middle to serve its new certificate",
            )
            rotated = time.time()
            wait_until(
                lambda: len([o for o in load.snapshot() if o.started > rotated]) >= 20,
                20,
                "20 round trips after the rotation",
            )
            with held.cursor() as cursor:
                cursor.execute("SELECT 1")
                assert cursor.fetchone() == (1,)
    finally:
        close_quietly(held)
    errors = [o for o in load.outcomes if o.error is not None]
    assert not errors, errors[:3]


def reload_signal(node: NodeProcess) -> None:
    """SIGHUP to the node's angel: it re-reads its config and every process applies it."""
    assert node.process is not None
    node.process.send_signal(signal.SIGHUP)


def test_admin_api_over_https_with_the_token_from_a_file(
    nodes: NodeFactory, shared_mariadb: mariadb.MariaDB, mesh_pki: Pki, tmp_path: Path
) -> None:
    """An admin API with a certificate serves HTTPS only, takes its token from a file, and
    ``meshproxy ctl -c`` reaches it by trusting that certificate; the status shows the
    node's mesh certificate and its expiry."""
    doc, _, admin_port = secured_middle("m1", shared_mariadb.port, mesh_pki.tls("m1", "middle"))
    admin_files = pki.issue(mesh_pki.dir, "m1-admin", "middle", out=tmp_path / "admin")
    (tmp_path / "admin.token").write_text("token-from-a-file-0123456789\n")
    doc["admin"] = {
        "bind": addr(admin_port),
        "token_file": str(tmp_path / "admin.token"),
        "tls_cert": str(admin_files.cert),
        "tls_key": str(admin_files.key),
    }
    node = nodes.start(doc)
    status = subprocess.run(
        [sys.executable, "-m", "meshproxy", "ctl", "-c", str(node.config_path), "status"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    document = json.loads(status.stdout)
    assert document["mesh_tls"]["node"] == "m1"
    assert document["mesh_tls"]["role_matches"] is True
    assert document["mesh_tls"]["expires_in_s"] > 300 * 86400
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://{HOST}:{admin_port}/status", timeout=5)
