"""``meshproxy ctl``: the admin API for people (and shell scripts)."""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from meshproxy import config
from meshproxy.errors import ConfigError

EXIT_API_ERROR = 1


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class Client:
    def __init__(
        self,
        url: str,
        token: str,
        timeout_s: float = 10.0,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.context = context

    def call(self, method: str, path: str, body: object = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - the URL is the operator's admin API
            self.url + path, data=data, method=method
        )
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(  # noqa: S310
                request, timeout=self.timeout_s, context=self.context
            ) as response:
                payload = response.read()
                kind = response.headers.get_content_type()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                message = json.loads(text).get("error", text)
            except json.JSONDecodeError:
                message = text
            raise ApiError(exc.code, message) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ApiError(0, f"cannot reach {self.url}: {getattr(exc, 'reason', exc)}") from None
        return json.loads(payload) if kind == "application/json" else payload.decode()


def client(args: argparse.Namespace) -> Client:
    url = args.url or os.environ.get("MESHPROXY_ADMIN_URL", "")
    token = args.token or os.environ.get("MESHPROXY_ADMIN_TOKEN", "")
    context = None
    if args.cafile:
        context = ssl.create_default_context(cafile=args.cafile)
    if args.config:
        cfg = config.load(args.config)
        admin = cfg.admin
        if admin is None:
            raise ConfigError(args.config, "admin", "this node has no [admin] section")
        url = url or f"{'https' if admin.tls_cert else 'http'}://{admin.bind}"
        token = token or admin.bearer_token()
        if admin.tls_cert and context is None:
            context = pinned(admin.tls_cert)
    if not url or not token:
        raise ConfigError("meshproxy ctl", "", "give -c CONFIG, or --url and --token")
    return Client(url, token, context=context)


def pinned(cert: str) -> ssl.SSLContext:
    """Trust exactly the node's own admin certificate (read from its config): the node we
    were pointed at is the identity, whatever name or address it is reached by."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cert)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def _value(text: str) -> object:
    """A TOML value (``500``, ``true``, ``"x"``); anything else is taken as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _assignments(pairs: list[str]) -> dict[str, Any]:
    """``a.b=1 c=x`` -> ``{"a": {"b": 1}, "c": "x"}``."""
    patch: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError("meshproxy ctl", pair, "expected KEY=VALUE")
        *parents, leaf = key.split(".")
        node = patch
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _value(raw)
    return patch


def _group_path(args: argparse.Namespace) -> str:
    plural = "tiers" if args.tier else "pools"
    return f"/{plural}/{urllib.parse.quote(args.group, safe='')}/servers"


def _server_fields(args: argparse.Namespace) -> dict[str, object]:
    fields: dict[str, object] = {}
    if args.weight is not None:
        fields["weight"] = args.weight
    if args.state is not None:
        fields["state"] = args.state
    return fields


def run(args: argparse.Namespace) -> int:
    api = client(args)
    try:
        result = _dispatch(api, args)
    except ApiError as exc:
        print(f"meshproxy ctl: {exc}", file=sys.stderr)
        return EXIT_API_ERROR
    if isinstance(result, str):
        print(result, end="" if result.endswith("\n") else "\n")
    else:
        print(json.dumps(result, indent=2))
    return 0


def _dispatch(client: Client, args: argparse.Namespace) -> Any:
    action = args.action
    if action in ("status", "metrics"):
        return client.call("GET", f"/{action}")
    if action == "config":
        return client.call("GET", f"/config?view={'disk' if args.disk else 'running'}")
    if action == "apply":
        with open(args.file, "rb") as handle:
            try:
                document = tomllib.load(handle)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(args.file, "", f"invalid TOML: {exc}") from None
        return client.call("PUT", "/config", document)
    if action in ("save", "reload"):
        return client.call("POST", f"/config/{action}")
    if action == "set":
        return client.call("PATCH", "/config", _assignments(args.pairs))
    if action == "server":
        path = _group_path(args)
        address = urllib.parse.quote(args.address, safe="")
        if args.server_action == "add":
            return client.call("POST", path, {"address": args.address, **_server_fields(args)})
        if args.server_action == "set":
            return client.call("PATCH", f"{path}/{address}", _server_fields(args))
        return client.call("DELETE", f"{path}/{address}")
    if action == "top":
        query = urllib.parse.urlencode({"by": args.by, "limit": args.limit})
        answer = client.call("GET", f"/digests?{query}")
        table = top_table(answer["digests"])
        if answer.get("counted_here") is False:
            table += "\n(this edge leaves digests to its middles: run top there)"
        if args.reset:  # as reading ProxySQL's stats_mysql_query_digest_reset does
            client.call("DELETE", "/digests")
        return table
    if action == "rules":
        return client.call("GET", "/query_rules")
    if action == "drain":
        return drain(client, args.wait_s)
    if action == "upgrade":
        return upgrade(client, args.wait_s)
    if action == "listener":
        if args.listener_action == "add":
            item = {"name": args.name, "bind": args.bind, "upstream": args.upstream}
            return client.call("POST", "/listeners", item | _assignments(args.pairs))
        if args.listener_action == "set":
            return client.call("PATCH", f"/listeners/{args.name}", _assignments(args.pairs))
        return client.call("DELETE", f"/listeners/{args.name}")
    raise AssertionError(action)  # pragma: no cover - argparse only offers the above


def drain(client: Client, wait_s: float, poll_s: float = 0.5) -> dict[str, Any]:
    """Start a drain, then wait up to ``wait_s`` for the node's sessions to end (a
    Kubernetes preStop hook runs this before the pod is sent SIGTERM)."""
    answer = client.call("POST", "/drain")
    deadline = time.monotonic() + wait_s
    sessions = int(answer["sessions"])
    while sessions and time.monotonic() < deadline:
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        sessions = int(client.call("GET", "/status")["sessions"])
    return {"draining": True, "sessions_left": sessions}


def upgrade(client: Client, wait_s: float, poll_s: float = 0.5) -> dict[str, Any]:
    """Start a hitless upgrade, then wait up to ``wait_s`` for a new angel to answer (the
    admin API is down for a moment while the control processes change hands)."""
    old = int(client.call("POST", "/upgrade")["angel_pid"])
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        try:
            angel = client.call("GET", "/status")["angel_pid"]
        except ApiError:
            continue
        if angel != old:
            return {"upgraded": True, "angel_pid": angel}
    if wait_s:
        raise ApiError(0, f"no new angel answered within {wait_s:g}s (see the node's log)")
    return {"upgrading": True, "angel_pid": old}


def top_table(rows: list[dict[str, Any]]) -> str:
    """Digest statistics as a table, busiest first (``meshproxy ctl top``)."""
    lines = [
        f"{'count':>9} {'total s':>9} {'avg ms':>8} {'max ms':>8} {'rows':>9} {'err':>5}  "
        "user@schema  digest"
    ]
    for row in rows:
        average_ms = 1000 * row["total_s"] / row["count"] if row["count"] else 0.0
        lines.append(
            f"{row['count']:>9} {row['total_s']:>9.3f} {average_ms:>8.2f}"
            f" {1000 * row['max_s']:>8.2f} {row['rows']:>9} {row['errors']:>5}"
            f"  {row['user']}@{row['schema']}  {row['text'][:100]}"
        )
    return "\n".join(lines)


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """-c CONFIG, or --url and --token: how a command finds a node's admin API."""
    parser.add_argument("-c", "--config", help="the node's config file (for admin.bind and token)")
    parser.add_argument("--url", help="admin API URL, e.g. http://127.0.0.1:6032")
    parser.add_argument("--token", help="bearer token (or MESHPROXY_ADMIN_TOKEN)")
    parser.add_argument("--cafile", help="CA bundle to verify an https admin API with")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ctl = sub.add_parser("ctl", help="talk to a running node's admin API")
    add_connection_args(ctl)
    ctl.set_defaults(func=run)
    actions = ctl.add_subparsers(dest="action", required=True)
    actions.add_parser("status", help="what the node is doing")
    actions.add_parser("metrics", help="Prometheus exposition")
    view = actions.add_parser("config", help="the running config (or --disk)")
    view.add_argument("--disk", action="store_true", help="the config file on disk instead")
    apply = actions.add_parser("apply", help="replace the running config with a TOML file")
    apply.add_argument("file")
    actions.add_parser("save", help="write the running config to disk (old file kept as .bak)")
    actions.add_parser("reload", help="apply the config file on disk, like SIGHUP")
    patch = actions.add_parser("set", help="change keys, e.g. timeouts.connect_ms=500")
    patch.add_argument("pairs", nargs="+", metavar="KEY=VALUE")

    top = actions.add_parser("top", help="the statements that cost the most, by query digest")
    top.add_argument(
        "--by", default="total_s", choices=("total_s", "count", "max_s", "errors", "rows")
    )
    top.add_argument("--limit", type=int, default=20)
    top.add_argument("--reset", action="store_true", help="then start the statistics over")
    actions.add_parser("rules", help="the query rules in force, in order")
    drain_cmd = actions.add_parser(
        "drain", help="stop taking new sessions from the mesh and report not ready"
    )
    drain_cmd.add_argument(
        "--wait-s", type=float, default=0.0, help="then wait this long for sessions to end (0)"
    )

    upgrade_cmd = actions.add_parser(
        "upgrade", help="hitless upgrade: a new angel running the installed code takes over"
    )
    upgrade_cmd.add_argument(
        "--wait-s", type=float, default=0.0, help="then wait this long for it to answer (0)"
    )

    server = actions.add_parser("server", help="add, change or remove a pool's server")
    server_actions = server.add_subparsers(dest="server_action", required=True)
    for name in ("add", "set", "rm"):
        p = server_actions.add_parser(name)
        p.add_argument("group", help="pool name (tier name with --tier)")
        p.add_argument("address", help="host:port")
        p.add_argument("--tier", action="store_true", help="GROUP is a tier, not a pool")
        if name != "rm":
            p.add_argument("--weight", type=int)
            p.add_argument("--state", choices=[s.value for s in config.AdminState])

    listener = actions.add_parser("listener", help="add, change or remove a listener")
    listener_actions = listener.add_subparsers(dest="listener_action", required=True)
    add = listener_actions.add_parser("add")
    add.add_argument("name")
    add.add_argument("bind", help="host:port")
    add.add_argument("upstream", help="pool:NAME or tier:NAME")
    add.add_argument("pairs", nargs="*", metavar="KEY=VALUE", help="other listener keys")
    change = listener_actions.add_parser("set")
    change.add_argument("name")
    change.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    remove = listener_actions.add_parser("rm")
    remove.add_argument("name")
