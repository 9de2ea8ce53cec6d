"""The package reads as planes: no import circle between them, and a light worker entry."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import meshproxy

ROOT = Path(meshproxy.__file__).parent


def _room(parts: tuple[str, ...]) -> str:
    """The package a module lives in; a module at the top is a room of its own."""
    if (ROOT / parts[0]).is_dir():
        return parts[0]
    return parts[0].removesuffix(".py") + ".py"


def _package_imports() -> dict[str, set[str]]:
    """Which package imports which, counting imports inside functions too."""
    edges: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        source = _room(path.relative_to(ROOT).parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = tuple(name.split("."))
                if parts[0] != "meshproxy" or len(parts) < 2:
                    continue
                target = _room(parts[1:])
                if target != source and (ROOT / target).exists():
                    edges.setdefault(source, set()).add(target)
    return edges


def test_no_import_circle_between_packages() -> None:
    """No package reaches itself by following imports between packages."""
    edges = _package_imports()

    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = list(edges.get(start, ()))
        while todo:
            room = todo.pop()
            if room not in seen:
                seen.add(room)
                todo += edges.get(room, ())
        return seen

    circles = sorted(room for room in edges if room in reach(room))
    assert circles == [], f"import circles through {circles}: {edges}"


def test_worker_entry_point_stays_light() -> None:
    """Starting a worker imports no CLI, admin server, YAML, client library or gossip crypto."""
    probe = (
        "import sys, meshproxy.runtime.child; from meshproxy.runtime.modes import run_worker; "
        "print('\\n'.join(sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    heavy = ("meshproxy.cli", "meshproxy.admin", "meshproxy.control.meshgossip", "yaml", "aiomysql")
    assert [m for m in loaded if m.startswith(heavy)] == []
