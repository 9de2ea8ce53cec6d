"""Serving the admin API next to a node, and reloading the config file on request."""

from __future__ import annotations

import ssl

from aiohttp import web

from meshproxy import config, log
from meshproxy.admin.api import AdminAPI
from meshproxy.control.node import Node
from meshproxy.errors import MeshproxyError


class AdminServer:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        admin = self.node.config.admin
        if admin is None:
            return
        api = AdminAPI(self.node, admin.bearer_token())
        self._runner = web.AppRunner(api.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        context = None
        if admin.tls_cert:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(admin.tls_cert, admin.tls_key)
        site = web.TCPSite(
            self._runner,
            admin.bind.host,
            admin.bind.port,
            reuse_address=True,
            ssl_context=context,
        )
        await site.start()
        log.event("admin_listening", bind=str(admin.bind), tls="yes" if context else "no")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def reload(self, why: str) -> None:
        """Re-read the config file and apply the difference, as the admin API would."""
        try:
            new = config.load(self.node.config.source)
            changes = await self.node.apply(new)
        except MeshproxyError as exc:
            self.node.counters.inc("reloads_failed")
            log.warning("reload_failed", trigger=why, error=exc)
            return
        log.event("reloaded", trigger=why, changes="; ".join(changes) or "none")
