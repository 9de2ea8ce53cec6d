"""glibc's allocator, asked now and then to give free memory back: what keeps a
long-running node's RSS flat under connection churn.

Every TLS connection under uvloop (and asyncio) has a 256 KiB read buffer. glibc serves a
block that large with ``mmap`` at first, but raises its mmap threshold each time such a
block is freed, and from then on serves them from the heap, between the small objects of
other connections that outlive them. Freed, those pages stay resident: the heap only
shrinks from its top. Nothing leaks, yet RSS grows with churn. ``malloc_trim`` returns
every free page of the heap, not only its top, so each process calls it periodically.
Fixing the mmap threshold instead would keep those buffers mapped, but would also make
every large read of a bulk transfer an mmap and munmap.

Elsewhere than glibc (musl, macOS) it is a no-op.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import sys
from typing import Any

TRIM_EVERY_S = 30.0


def _glibc() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # only glibc has it  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def trim() -> bool:
    """Return the heap's free pages to the kernel; True when there were some."""
    return _LIBC is not None and _LIBC.malloc_trim(0) == 1


async def trim_loop(every_s: float = TRIM_EVERY_S) -> None:
    """Trim every ``every_s`` for as long as the process runs (a supervised task)."""
    while True:
        await asyncio.sleep(every_s)
        trim()
