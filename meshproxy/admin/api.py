"""HTTP + JSON admin API (aiohttp): three config views, runtime changes, status, metrics.

The views are ProxySQL's: what is *running*, what the config file on *disk* says, and a
*save* of the running config to disk. Every change goes through ``admin.edits`` and then
``config.parse``: it is validated exactly as the file is, and rejected whole.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import tomli_w
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from meshproxy import config, log
from meshproxy.admin import edits
from meshproxy.admin.metrics import NodeCollector
from meshproxy.config import Config
from meshproxy.control.node import ApplyError
from meshproxy.counters import Counters
from meshproxy.dataplane.sessionmode import counts_digests
from meshproxy.errors import ConfigError
from meshproxy.routing.digests import ORDERS as DIGEST_ORDERS
from meshproxy.routing.digests import DigestRow, DigestStats

MAX_BODY = 1 << 20
SOURCE = "admin API"
# Probes answer without the token: a kubelet or a load balancer cannot hold a secret, and
# they tell nothing beyond serving or not.
PROBES = frozenset({"/ready", "/live"})


class Control(Protocol):
    """What the API needs of the process that runs the control plane."""

    @property
    def config(self) -> Config: ...

    @property
    def counters(self) -> Counters: ...

    def total_counters(self) -> Counters: ...

    def status(self) -> dict[str, Any]: ...

    def members(self) -> dict[str, Any] | None: ...

    def digests(self) -> DigestStats: ...

    def reset_digests(self) -> None: ...

    def readiness(self) -> dict[str, bool]: ...

    def set_draining(self) -> None: ...

    def upgrade(self) -> int: ...

    async def apply(self, new: Config) -> list[str]: ...


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str, **extra: str) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


class AdminAPI:
    def __init__(self, control: Control, token: str) -> None:
        self.control = control
        self._token = token.encode()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(
            NodeCollector(control.total_counters, control.status, self._top_digests)
        )

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY)
        r = app.router
        r.add_get("/ready", self.ready)
        r.add_get("/live", self.live)
        r.add_post("/drain", self.drain)
        r.add_post("/upgrade", self.upgrade)
        r.add_get("/status", self.status)
        r.add_get("/metrics", self.metrics)
        r.add_get("/members", self.members)
        r.add_get("/config", self.get_config)
        r.add_put("/config", self.put_config)
        r.add_patch("/config", self.patch_config)
        r.add_post("/config/save", self.save)
        r.add_post("/config/reload", self.reload)
        # Listeners; session mode's logins (new logins see a change at once, open sessions
        # keep theirs); query rules, an ordered list: PUT replaces it whole, POST appends.
        for plural, section in (
            ("listeners", "listener"),
            ("users", "user"),
            ("query_rules", "query_rule"),
        ):
            r.add_get(f"/{plural}", self.list_section(section))
            r.add_post(f"/{plural}", self.add_item(section))
            r.add_patch(f"/{plural}/{{name}}", self.patch_item(section))
            r.add_delete(f"/{plural}/{{name}}", self.remove_item(section))
        r.add_put("/query_rules", self.replace_section("query_rule"))
        r.add_get("/digests", self.digests)
        r.add_delete("/digests", self.reset_digests)
        for plural, section in (("pools", "pool"), ("tiers", "tier")):
            r.add_get(f"/{plural}", self.list_section(section))
            r.add_post(f"/{plural}", self.add_item(section))
            r.add_patch(f"/{plural}/{{name}}", self.patch_item(section))
            r.add_delete(f"/{plural}/{{name}}", self.remove_item(section))
            r.add_post(f"/{plural}/{{name}}/servers", self.add_member(section))
            r.add_patch(f"/{plural}/{{name}}/servers/{{address}}", self.patch_member(section))
            r.add_delete(f"/{plural}/{{name}}/servers/{{address}}", self.remove_member(section))
        return app

    def _top_digests(self) -> list[DigestRow]:
        return self.control.digests().top(self.control.config.digests.top_n)

    # ------------------------------------------------------------ guard

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PROBES and request.method == "GET":
            return await handler(request)
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        # compare_digest takes the same time wherever the first difference is.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self._token):
            self._reject("unauthorized")
            return _error(401, "missing or wrong bearer token")
        try:
            return await handler(request)
        except web.HTTPException as exc:
            self._reject(exc.reason)
            return _error(exc.status, exc.reason)
        except edits.NotFound as exc:
            self._reject("not_found")
            return _error(404, str(exc))
        except edits.BadEdit as exc:
            self._reject("bad_request")
            return _error(400, str(exc))
        except ConfigError as exc:
            self._reject("invalid_config")
            return _error(422, str(exc), key=exc.key, reason=exc.reason)
        except ApplyError as exc:
            self._reject("apply_failed")
            return _error(409, str(exc))

    def _reject(self, reason: str) -> None:
        self.control.counters.inc("admin_requests_rejected", reason=reason)

    # ------------------------------------------------------------ views

    async def ready(self, request: web.Request) -> web.Response:
        checks = self.control.readiness()
        return web.json_response(checks, status=200 if checks["ready"] else 503)

    async def live(self, request: web.Request) -> web.Response:
        # Answered by the control process's event loop: that it answers is the check. The
        # angel watches the workers' loops itself (heartbeats).
        return web.json_response({"live": True})

    async def drain(self, request: web.Request) -> web.Response:
        """Tell the mesh this node drains (edges send it no new sessions) and stop reporting
        ready; open sessions carry on until they end or the node is stopped."""
        self.control.set_draining()
        return web.json_response({"draining": True, "sessions": self.control.status()["sessions"]})

    async def upgrade(self, request: web.Request) -> web.Response:
        """Start a hitless upgrade: a new angel takes the node over. Answered before it
        happens; ``angel_pid`` in GET /status changes when it is done."""
        try:
            angel = self.control.upgrade()
        except ApplyError as exc:
            return _error(409, str(exc))
        return web.json_response({"upgrading": True, "angel_pid": angel}, status=202)

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.control.status())

    async def members(self, request: web.Request) -> web.Response:
        document = self.control.members()
        if document is None:
            raise edits.NotFound("this node has no [gossip] section: it keeps no membership")
        return web.json_response(document)

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    async def digests(self, request: web.Request) -> web.Response:
        """Per-digest statistics of every data plane, merged: ?by=total_s|count|max_s|
        errors|rows and ?limit=N (default: digests.top_n)."""
        by = request.query.get("by", "total_s")
        if by not in DIGEST_ORDERS:
            raise edits.BadEdit(f"by must be one of {', '.join(DIGEST_ORDERS)}, got {by!r}")
        limit_text = request.query.get("limit", str(self.control.config.digests.top_n))
        if not limit_text.isdigit() or int(limit_text) < 1:
            raise edits.BadEdit(f"limit must be a positive integer, got {limit_text!r}")
        rows = self.control.digests().top(int(limit_text), by)
        # False: this node leaves the counting to its middles (see [digests] enabled).
        counted = counts_digests(self.control.config)
        return web.json_response({"by": by, "digests": rows, "counted_here": counted})

    async def reset_digests(self, request: web.Request) -> web.Response:
        self.control.reset_digests()
        return web.json_response({"reset": True})

    async def get_config(self, request: web.Request) -> web.Response:
        view = request.query.get("view", "running")
        if view == "running":
            return web.json_response(config.to_dict(self.control.config))
        if view == "disk":
            return web.json_response(config.to_dict(config.load(self.control.config.source)))
        raise edits.BadEdit(f"view must be 'running' or 'disk', got {view!r}")

    # ------------------------------------------------------------ changes

    async def _change(self, document: Any, what: str) -> web.Response:
        if not isinstance(document, dict):
            raise edits.BadEdit("the config must be a JSON object")
        new = config.parse(document, SOURCE)
        new = _with_source(new, self.control.config.source)
        changes = await self.control.apply(new)
        log.event("admin_change", what=what, changes="; ".join(changes) or "none")
        return web.json_response({"changes": changes})

    def _running(self) -> edits.Document:
        document: edits.Document = config.to_dict(self.control.config)
        return document

    async def put_config(self, request: web.Request) -> web.Response:
        return await self._change(await _json(request), "replace config")

    async def patch_config(self, request: web.Request) -> web.Response:
        patch = await _json_object(request)
        return await self._change(edits.merge_patch(self._running(), patch), "patch config")

    async def reload(self, request: web.Request) -> web.Response:
        disk = config.load(self.control.config.source)
        changes = await self.control.apply(disk)
        log.event("admin_change", what="reload", changes="; ".join(changes) or "none")
        return web.json_response({"changes": changes})

    async def save(self, request: web.Request) -> web.Response:
        path = Path(self.control.config.source)
        backup = save_config(self.control.config, path)
        log.event("config_saved", path=str(path), backup=str(backup))
        return web.json_response({"saved": str(path), "backup": str(backup)})

    def list_section(self, section: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            return web.json_response(self._running().get(section, []))

        return handler

    def replace_section(self, section: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            document = edits.replace_section(self._running(), section, await _json(request))
            return await self._change(document, f"replace {section}")

        return handler

    def add_item(self, section: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            item = await _json_object(request)
            document = edits.add_item(self._running(), section, item)
            return await self._change(document, f"add {section}")

        return handler

    def patch_item(self, section: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            patch = await _json_object(request)
            document = edits.patch_item(self._running(), section, name, patch)
            return await self._change(document, f"change {section} {name}")

        return handler

    def remove_item(self, section: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            document = edits.remove_item(self._running(), section, name)
            return await self._change(document, f"remove {section} {name}")

        return handler

    def add_member(self, section: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            server = await _json_object(request)
            document = edits.add_member(self._running(), section, name, server)
            return await self._change(document, f"add server to {section} {name}")

        return handler

    def patch_member(self, section: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            name, address = request.match_info["name"], request.match_info["address"]
            patch = await _json_object(request)
            document = edits.patch_member(self._running(), section, name, address, patch)
            return await self._change(document, f"change server {address} in {section} {name}")

        return handler

    def remove_member(self, section: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            name, address = request.match_info["name"], request.match_info["address"]
            document = edits.remove_member(self._running(), section, name, address)
            return await self._change(document, f"remove server {address} from {section} {name}")

        return handler


async def _json(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise edits.BadEdit("send a JSON body with Content-Type: application/json")
    try:
        return json.loads(await request.text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise edits.BadEdit(f"malformed JSON: {exc}") from None


async def _json_object(request: web.Request) -> dict[str, Any]:
    body = await _json(request)
    if not isinstance(body, dict):
        raise edits.BadEdit("the body must be a JSON object")
    return body


def _with_source(new: config.Config, source: str) -> config.Config:
    return dataclasses.replace(new, source=source)


def save_config(cfg: config.Config, path: Path) -> Path:
    """Write ``cfg`` to ``path`` atomically, keeping the previous file as ``path.bak``."""
    text = tomli_w.dumps(config.to_dict(cfg))
    backup = path.with_name(path.name + ".bak")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            shutil.copy2(path, backup)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return backup
