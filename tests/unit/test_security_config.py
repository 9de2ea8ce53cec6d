"""Secrets and certificates in a node's config, the mesh PKI, and certificate warnings."""

from __future__ import annotations

import base64
import datetime
from pathlib import Path

import pytest

from meshproxy import config
from meshproxy.control import certwatch
from meshproxy.errors import ConfigError
from meshproxy.security import pki
from tests.unit.test_config import EDGE

KEY = base64.b64encode(bytes(range(32))).decode()


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    pki.init_ca(directory)
    return directory


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def mesh_tls(ca: Path, node: str = "p1", role: str = "edge") -> str:
    files = pki.issue(ca, node, role)
    cert, key = f"pki/{files.cert.name}", f"pki/{files.key.name}"
    return f'\n[mesh_tls]\nca = "pki/ca.pem"\ncert = "{cert}"\nkey = "{key}"\n'


def test_mesh_tls_paths_are_taken_from_the_config_folder(tmp_path: Path, ca: Path) -> None:
    """Relative [mesh_tls] paths resolve against the config file's folder, and the files load."""
    cfg = config.load(write(tmp_path, EDGE + mesh_tls(ca)))
    assert cfg.mesh_tls is not None
    assert cfg.mesh_tls.ca == str(tmp_path / "pki" / "ca.pem")
    assert cfg.mesh_tls.expiry_warning_days == 14


@pytest.mark.parametrize(
    ("damage", "key", "reason"),
    [
        ("missing cert", "mesh_tls.cert", "cannot read"),
        ("key of another node", "mesh_tls.key", "does not load with mesh_tls.cert"),
        ("CA not PEM", "mesh_tls.ca", "not a PEM CA bundle"),
    ],
)
def test_bad_mesh_tls_files_name_the_key(
    tmp_path: Path, ca: Path, damage: str, key: str, reason: str
) -> None:
    """A certificate, key or CA file that cannot be used is a config error naming its key."""
    text = EDGE + mesh_tls(ca)
    if damage == "missing cert":
        (ca / "p1.pem").unlink()
    elif damage == "key of another node":
        other = pki.issue(ca, "p9", "edge")
        (ca / "p1.key").write_bytes(other.key.read_bytes())
    else:
        (ca / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text))
    assert info.value.key == key
    assert reason in info.value.reason


def test_a_container_config_loads_without_its_mounted_files(tmp_path: Path) -> None:
    """With files=False a config naming files that exist only elsewhere (a container's
    secrets) still loads, for tools that read it on the host."""
    text = EDGE + '\n[mesh_tls]\nca = "/run/secrets/ca"\ncert = "/run/secrets/c"\nkey = "/k"\n'
    with pytest.raises(ConfigError):
        config.load(write(tmp_path, text))
    assert config.load(write(tmp_path, text), files=False).mesh_tls is not None


def test_admin_token_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admin token can come from a file or an environment variable instead of the
    config; exactly one source is allowed, and a short token is refused where it is read."""
    (tmp_path / "token").write_text("file-token-0123456789\n")
    cfg = config.load(write(tmp_path, EDGE + '\n[admin]\ntoken_file = "token"\n'))
    assert cfg.admin is not None
    assert cfg.admin.bearer_token() == "file-token-0123456789"
    monkeypatch.setenv("NODE_TOKEN", "env-token-0123456789")
    cfg = config.load(write(tmp_path, EDGE + '\n[admin]\ntoken_env = "NODE_TOKEN"\n'))
    assert cfg.admin is not None
    assert cfg.admin.bearer_token() == "env-token-0123456789"
    monkeypatch.setenv("NODE_TOKEN", "short")
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, EDGE + '\n[admin]\ntoken_env = "NODE_TOKEN"\n'))
    assert info.value.key == "admin.token_env"
    both = '\n[admin]\ntoken = "inline-token-0123456789"\ntoken_file = "token"\n'
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, EDGE + both))
    assert "exactly one of token, token_file and token_env" in info.value.reason


def test_gossip_keys_from_a_file(tmp_path: Path) -> None:
    """Gossip keys can come from a file, one per line; a bad key there names the file's key."""
    gossip = '\n[gossip]\nbind = "127.0.0.1:7946"\nkeys_file = "gossip.keys"\n'
    (tmp_path / "gossip.keys").write_text(KEY + "\n")
    cfg = config.load(write(tmp_path, EDGE + gossip))
    assert cfg.gossip is not None
    assert cfg.gossip.key_bytes() == (bytes(range(32)),)
    (tmp_path / "gossip.keys").write_text("bm90IGEga2V5\n")
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, EDGE + gossip))
    assert info.value.key == "gossip.keys_file (key 1)"
    assert "16, 24 or 32 bytes" in info.value.reason


def test_issued_certificates_name_node_and_role(ca: Path) -> None:
    """A node certificate carries the node (CN) and its role (OU), signed by the mesh CA,
    and its key is readable by its owner only."""
    files = pki.issue(ca, "p3", "middle", days=30)
    info = pki.describe(files.cert)
    assert (info.node, info.role) == ("p3", "middle")
    assert files.key.stat().st_mode & 0o077 == 0
    with pytest.raises(ValueError, match="role must be one of"):
        pki.issue(ca, "p4", "app")


def test_certificate_status_warns_ahead_of_expiry_and_on_a_wrong_name(
    tmp_path: Path, ca: Path
) -> None:
    """The status says when the certificate expires, flags it inside the warning window,
    and flags a certificate that names another node or role."""
    cfg = config.load(write(tmp_path, EDGE + mesh_tls(ca)))
    status = certwatch.cert_status(cfg)
    assert status is not None
    assert status["role_matches"]
    assert not status["expiring"]
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=360)
    status = certwatch.cert_status(cfg, now=later)
    assert status is not None
    assert status["expiring"]
    cfg = config.load(write(tmp_path, EDGE + mesh_tls(ca, "p7", "middle")))
    status = certwatch.cert_status(cfg)
    assert status is not None
    assert not status["role_matches"]


def test_a_workload_certificate_matches_nodes_that_name_it(tmp_path: Path, ca: Path) -> None:
    """A certificate issued to a workload (shared by its pods) matches a node whose
    mesh_tls.name names the workload, and still has to carry the node's role."""
    workload = mesh_tls(ca, "edges", "edge") + 'name = "edges"\n'
    status = certwatch.cert_status(config.load(write(tmp_path, EDGE + workload)))
    assert status is not None
    assert status["role_matches"]
    wrong_role = mesh_tls(ca, "edges", "middle") + 'name = "edges"\n'
    status = certwatch.cert_status(config.load(write(tmp_path, EDGE + wrong_role)))
    assert status is not None
    assert not status["role_matches"]
