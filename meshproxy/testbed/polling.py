"""Waiting for a condition by polling it, for testbeds and tests (never a fixed sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(
    predicate: Callable[[], T | None],
    timeout_s: float,
    what: Callable[[], str],
    interval_s: float = 0.02,
    error: type[Exception] = TimeoutError,
) -> T:
    """Call ``predicate`` until it returns something truthy and return that; after
    ``timeout_s``, raise ``error`` naming ``what()`` (computed only then)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout_s:g} s waiting for {what()}")
        time.sleep(interval_s)
