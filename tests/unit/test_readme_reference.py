"""The README's configuration reference names every key a node config accepts."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

from meshproxy import config

README = Path(__file__).resolve().parents[2] / "README.md"
# Types that hold their own keys (the loader builds them from tables).
LEAVES = (config.Address, config.UpstreamRef)


def _tables(tp: Any) -> list[type[Any]]:
    """The config dataclasses a field of type ``tp`` is built from."""
    args = typing.get_args(tp) or (tp,)
    found = []
    for arg in args:
        if dataclasses.is_dataclass(arg) and arg not in LEAVES:
            found.append(typing.cast(type[Any], arg))
        elif typing.get_args(arg):
            found.extend(_tables(arg))
    return found


def keys(cls: type[Any], seen: set[type[Any]] | None = None) -> set[str]:
    """Every key name of a config table and the tables below it."""
    seen = set() if seen is None else seen
    seen.add(cls)
    names: set[str] = set()
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name == "source":
            continue
        tables = _tables(hints[field.name])
        if not tables:
            names.add(field.name)
        for table in tables:
            if table not in seen:
                names |= keys(table, seen)
    return names


def test_every_config_key_is_in_the_readme_reference() -> None:
    """Each key of every config section appears in the README's configuration reference,
    so the reference cannot fall behind the loader."""
    reference = README.read_text()
    start = reference.index("## Configuration reference")
    reference = reference[start : reference.index("\n## ", start + 1)]
    # A key is named as `key`, or shown in an inline table: `{ address = "h:p", ... }`.
    missing = sorted(
        k
        for k in keys(config.Config)
        if f"`{k}`" not in reference and not re.search(rf"[{{,] {k} = ", reference)
    )
    assert missing == [], f"not in the README's configuration reference: {missing}"
