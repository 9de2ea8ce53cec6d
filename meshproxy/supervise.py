"""Supervised background loops: a crash is logged and the loop restarted, never lost."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from meshproxy import log

Loop = Callable[..., Coroutine[Any, Any, None]]


class Supervisor:
    """Named background tasks; spawning a name again replaces the task of that name."""

    def __init__(self, restart_delay_s: float = 1.0) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._restart_delay_s = restart_delay_s
        self._reapers: set[asyncio.Task[None]] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._tasks

    def spawn(self, name: str, fn: Loop, *args: Any) -> None:
        self.cancel(name)
        loop = asyncio.get_running_loop()
        self._tasks[name] = loop.create_task(self._run(name, fn, *args), name=name)

    def cancel(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            reaper = asyncio.get_running_loop().create_task(_cancel_until_done({task}))
            self._reapers.add(reaper)
            reaper.add_done_callback(self._reapers.discard)

    def keep_only(self, prefix: str, names: set[str]) -> None:
        """Cancel the tasks whose name starts with ``prefix`` and is not in ``names``."""
        for name in [n for n in self._tasks if n.startswith(prefix) and n not in names]:
            self.cancel(name)

    async def stop(self) -> None:
        pending = set(self._tasks.values()) | self._reapers
        self._tasks.clear()
        await _cancel_until_done(pending)

    async def _run(self, name: str, fn: Loop, *args: Any) -> None:
        while True:
            try:
                await fn(*args)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a crashed loop must never end the process
                log.warning("task_crashed", task=name, error=repr(exc))
                await asyncio.sleep(self._restart_delay_s)
            else:
                return


async def _cancel_until_done(tasks: set[asyncio.Task[None]]) -> None:
    """Cancel until each task has ended: on Python 3.11, asyncio.wait_for (which aiomysql's
    connect uses) swallows a cancel that arrives as its inner future completes, and a
    health check loop cancelled only once would then run on (and hang a shutdown)."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.2)
