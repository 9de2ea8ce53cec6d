"""glibc's allocator gives the memory of freed connection buffers back to the kernel."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meshproxy.runtime import allocator

# Connection churn in miniature: 256 KiB buffers (what uvloop gives each TLS connection),
# each followed by a small block that outlives it; then the buffers are freed.
CHURN = """
import os, sys
from meshproxy.runtime import allocator
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
first = bytearray(256 * 1024)
del first  # a freed large block: glibc's dynamic threshold rises past its size
base = rss()
buffers, kept = [], []
for _ in range(200):
    buffers.append(bytearray(256 * 1024))
    kept.append(bytes(1000) + b"x")
del buffers
if sys.argv[1] == "trim":
    allocator.trim()
print(rss() - base)
"""


def retained_after_churn(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True, timeout=60
    )
    return int(done.stdout)


@pytest.mark.skipif(allocator._LIBC is None, reason="glibc only: elsewhere it is a no-op")
def test_freed_connection_buffers_go_back_to_the_kernel() -> None:
    """After a trim, 50 MiB of freed 256 KiB buffers are no longer resident (under 2 MiB
    retained); without one they stay resident, which is what the trim is for."""
    assert retained_after_churn("trim") < 2 << 20
    assert retained_after_churn("no-trim") > 40 << 20
