"""Refuse to test stale compiled modules: a module compiled by mypyc (setup.py) is imported
in place of its source, so an edit would otherwise go untested until the next build."""

from __future__ import annotations

from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "meshproxy"


def stale_native_modules(package: Path = PACKAGE) -> list[Path]:
    """Sources edited after the extension module compiled from them."""
    stale = []
    for extension in sorted(package.rglob("*.cpython-*.so")):
        source = extension.with_name(extension.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > extension.stat().st_mtime:
            stale.append(source)
    return stale


def pytest_sessionstart(session: pytest.Session) -> None:
    stale = stale_native_modules()
    if stale:
        names = ", ".join(str(p.relative_to(PACKAGE.parent)) for p in sorted(stale))
        pytest.exit(f"compiled modules older than their sources ({names}): run ./dev setup", 2)
