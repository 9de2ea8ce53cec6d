"""The compiled hot path: what setup.py compiles is what runs, and stale builds are caught."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import os
import time
import tomllib
from pathlib import Path

import pytest

from tests.conftest import stale_native_modules

ROOT = Path(__file__).resolve().parents[2]


def native_modules() -> list[str]:
    """The module names in setup.py's NATIVE list (read, not run: setup.py builds)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "NATIVE":
            paths = ast.literal_eval(node.value)
            return [p.removesuffix(".py").replace("/", ".") for p in paths]
    raise AssertionError("setup.py has no NATIVE list")


@pytest.mark.skipif(bool(os.environ.get("MESHPROXY_PURE")), reason="a pure build was asked for")
def test_every_module_of_the_hot_path_runs_compiled() -> None:
    """Each module setup.py lists is imported from its C extension, not its source."""
    interpreted = []
    for name in native_modules():
        origin = importlib.import_module(name).__file__ or ""
        if not origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
            interpreted.append(name)
    assert interpreted == [], f"not compiled (run ./dev setup): {interpreted}"


def test_a_source_edited_after_its_build_is_reported_stale(tmp_path: Path) -> None:
    """An extension older than its source is stale; one built after it is not."""
    package = tmp_path / "meshproxy"
    package.mkdir()
    fresh_source, fresh_ext = package / "fresh.py", package / "fresh.cpython-311-x.so"
    stale_source, stale_ext = package / "stale.py", package / "stale.cpython-311-x.so"
    for path in (fresh_source, stale_ext, fresh_ext, stale_source):
        path.write_text("")
    past = time.time() - 60
    os.utime(fresh_source, (past, past))
    os.utime(stale_ext, (past, past))
    assert stale_native_modules(package) == [stale_source]


def test_mypy_warns_of_unreachable_code_in_every_compiled_module() -> None:
    """pyproject.toml's warn_unreachable override names exactly the modules setup.py
    compiles, so that mypy flags the narrowing mypyc would reject at run time."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    overrides = config["tool"]["mypy"]["overrides"]
    guarded = [o["module"] for o in overrides if o.get("warn_unreachable")]
    assert guarded == [native_modules()]
