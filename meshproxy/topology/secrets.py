"""The secrets of a rendered topology: made per render, kept out of committed files.

``ensure`` fills a folder (``compose/<name>/secrets/`` next to the compose file, or the
temporary folder of ``topology up --local``) with a mesh CA, a certificate and key per
proxy, a gossip key and an admin token, and keeps what is already there: rendering again
must not rotate a running topology's secrets, and a node added to the spec gets its own.
The folder ignores itself in git (a ``.gitignore`` of ``*``). Configs name each secret by
its compose secret name; :class:`~meshproxy.topology.render.Addressing` says where it is.
"""

from __future__ import annotations

import base64
import os
import secrets as token_source
from pathlib import Path

from meshproxy.security import pki
from meshproxy.topology.spec import Node, Spec

DIR = "secrets"
CA = "mesh-ca"
GOSSIP_KEYS = "gossip-keys"
ADMIN_TOKEN = "admin-token"  # noqa: S105 - the secret's name, not its value
# Session mode: the proxies read the login's password from this variable, which compose
# sets from this env file (made from the spec, so it follows the spec when that changes).
SESSION_PASSWORD_ENV = "MESHPROXY_SESSION_PASSWORD"  # noqa: S105 - a variable's name
SESSION_ENV_FILE = "session.env"


# Who holds a mesh certificate: (name, role). Compose gives each proxy its own; on an
# orchestrator the replicas of a workload share the workload's.
Identity = tuple[str, str]


def cert_of(name: str) -> str:
    return f"{name}-cert"


def key_of(name: str) -> str:
    return f"{name}-key"


def cert(node: Node) -> str:
    return cert_of(node.name)


def key(node: Node) -> str:
    return key_of(node.name)


def proxies(spec: Spec) -> list[Identity]:
    return [(node.name, node.role) for node in spec.proxies()]


def files(spec: Spec, identities: list[Identity] | None = None) -> dict[str, str]:
    """Every secret's name and its file in the folder."""
    table = {CA: pki.CA_CERT, GOSSIP_KEYS: "gossip.keys", ADMIN_TOKEN: "admin.token"}
    for name, _ in proxies(spec) if identities is None else identities:
        table[cert_of(name)] = f"{name}.pem"
        table[key_of(name)] = f"{name}.key"
    return table


def of_identity(name: str) -> list[str]:
    """The secrets a proxy mounts (the CA key stays on the rendering host)."""
    return [CA, cert_of(name), key_of(name), GOSSIP_KEYS, ADMIN_TOKEN]


def of_node(node: Node) -> list[str]:
    return of_identity(node.name)


def ensure(spec: Spec, directory: Path, identities: list[Identity] | None = None) -> Path:
    """Make whatever of the spec's secrets ``directory`` does not hold yet (certificates
    for ``identities``, by default every proxy); returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    ignore = directory / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# secrets of this topology: made by `meshproxy topology render`\n*\n")
    pki.init_ca(directory, f"meshproxy {spec.name} mesh CA")
    for name, role in proxies(spec) if identities is None else identities:
        if not (directory / f"{name}.pem").exists():
            pki.issue(directory, name, role)
    _private(directory / "gossip.keys", base64.b64encode(os.urandom(32)).decode() + "\n")
    _private(directory / "admin.token", token_source.token_urlsafe(24) + "\n")
    if spec.session_mode():
        session_env(spec, directory)
    return directory


def session_env(spec: Spec, directory: Path) -> Path:
    """The env file giving session-mode proxies their login's password (the spec's monitor
    login; rewritten each time, as it is derived from the spec)."""
    path = directory / SESSION_ENV_FILE
    path.unlink(missing_ok=True)
    _private(path, f"{SESSION_PASSWORD_ENV}={spec.monitor_password}\n")
    return path


def admin_token(directory: Path) -> str:
    """The topology's admin token (``ensure`` made it)."""
    return (directory / "admin.token").read_text().strip()


def _private(path: Path, text: str) -> None:
    if path.exists():
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
