"""``meshproxy certs``: a working mesh PKI in two commands.

meshproxy certs init DIR                       # DIR/ca.pem, DIR/ca.key
meshproxy certs issue NODE --role ROLE --dir DIR [--days N]   # DIR/NODE.pem, .key
meshproxy certs show FILE                      # node, role, expiry of a certificate
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from meshproxy.errors import ConfigError
from meshproxy.security import pki


def run(args: argparse.Namespace) -> int:
    if args.certs_action == "init":
        path = pki.init_ca(Path(args.dir))
        print(f"CA in {path} (key {path.with_name(pki.CA_KEY)}: keep it off the nodes)")
        return 0
    if args.certs_action == "issue":
        directory = Path(args.dir)
        if not (directory / pki.CA_CERT).exists():
            raise ConfigError(str(directory), "", "no CA here: run `meshproxy certs init` first")
        files = pki.issue(directory, args.node, args.role, args.days)
        print(f"{args.role} {args.node}: {files.cert} and {files.key}")
        print(
            "[mesh_tls] in its config: ca = "
            f'"{directory / pki.CA_CERT}", cert = "{files.cert}", key = "{files.key}"'
        )
        return 0
    info = pki.describe(Path(args.file))
    left = info.not_after - datetime.datetime.now(datetime.UTC)
    print(f"{info.subject}: node {info.node!r}, role {info.role!r}, serial {info.serial:x}")
    print(f"valid until {info.not_after:%Y-%m-%d %H:%M} UTC ({left.days} days left)")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = sub.add_parser("certs", help="a mesh CA and node certificates for mesh TLS")
    certs.set_defaults(func=run)
    actions = certs.add_subparsers(dest="certs_action", required=True)
    init = actions.add_parser("init", help="create a mesh CA in DIR (kept if there already)")
    init.add_argument("dir")
    issue = actions.add_parser("issue", help="sign a certificate for a node")
    issue.add_argument("node", help="the node's name (node.name)")
    issue.add_argument("--role", required=True, choices=pki.ROLES)
    issue.add_argument("--dir", required=True, help="where the CA is; the files go there too")
    issue.add_argument("--days", type=int, default=pki.NODE_DAYS, help="validity (365)")
    show = actions.add_parser("show", help="node, role and expiry of a certificate file")
    show.add_argument("file")
