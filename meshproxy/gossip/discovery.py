"""Seed discovery on a LAN with zeroconf: ``discovery = "mdns"``.

Each node registers its gossip address as ``<name>._meshproxy._udp.local.`` and browses for
the others; every address it finds is handed to ``join`` (a push-pull with it), which is
harmless for a node that is already a member. Static seeds keep working beside it.
mDNS only reaches the local link; it complements seeds, it does not replace anti-entropy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import Any

from meshproxy import log
from meshproxy.gossip.messages import Addr

SERVICE_TYPE = "_meshproxy._udp.local."
RESOLVE_TIMEOUT_MS = 3000

Join = Callable[[Sequence[Addr]], None]


class MdnsDiscovery:
    """Announce this node's gossip address and join every peer that announces its own."""

    def __init__(self, name: str, advertise: tuple[str, int], join: Join) -> None:
        self.name = name
        self.advertise = advertise
        self.join = join
        self._zc: Any = None
        self._browser: Any = None
        self._info: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.found = 0  # peers announced so far

    async def start(self) -> None:
        from zeroconf import IPVersion, ServiceInfo
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

        ip = ipaddress.ip_address(self.advertise[0])
        interfaces = [str(ip)] if not ip.is_loopback else ["127.0.0.1"]
        version = IPVersion.V6Only if ip.version == 6 else IPVersion.V4Only
        self._zc = AsyncZeroconf(interfaces=interfaces, ip_version=version)
        self._info = ServiceInfo(
            SERVICE_TYPE,
            f"{self.name}.{SERVICE_TYPE}",
            addresses=[ip.packed],
            port=self.advertise[1],
            properties={"node": self.name},
        )
        await self._zc.async_register_service(self._info, allow_name_change=False)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_service_state_change]
        )
        log.event("mdns_started", service=f"{self.name}.{SERVICE_TYPE}")

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            if self._info is not None:
                await self._zc.async_unregister_service(self._info)
            await self._zc.async_close()

    def _on_service_state_change(self, **kwargs: Any) -> None:
        from zeroconf import ServiceStateChange

        state, name = kwargs.get("state_change"), kwargs.get("name")
        if state not in (ServiceStateChange.Added, ServiceStateChange.Updated):
            return
        if not isinstance(name, str) or name == f"{self.name}.{SERVICE_TYPE}":
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(SERVICE_TYPE, name)
        try:
            found = await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS)
        except Exception as exc:  # a malformed answer from the LAN must not stop discovery
            log.warning("mdns_resolve_failed", service=name, error=repr(exc))
            return
        if not found or not info.port:
            return
        seeds: list[Addr] = []
        for raw in info.addresses:
            family = socket.AF_INET6 if len(raw) == 16 else socket.AF_INET
            seeds.append((socket.inet_ntop(family, raw), int(info.port)))
        if seeds:
            self.found += 1
            log.event("mdns_found", service=name, addresses=",".join(f"{h}:{p}" for h, p in seeds))
            self.join(seeds)
