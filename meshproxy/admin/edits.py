"""Pure edits of a TOML-shaped config document, one per admin API resource operation.

Every change the API makes is an edit of the running config's plain-data form followed by
``config.parse`` of the result, so a change is validated exactly as the file would be and
rejected whole when any part of it is wrong.
"""

from __future__ import annotations

import copy
from typing import Any

from meshproxy.config import Address
from meshproxy.errors import MeshproxyError

Document = dict[str, Any]


class NotFound(MeshproxyError):
    """The resource an edit names does not exist."""


class BadEdit(MeshproxyError):
    """The edit itself is malformed (not the config it would produce)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: tables merge key by key, null deletes, the rest replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _section(doc: Document, section: str, name: str) -> dict[str, Any]:
    for item in doc.get(section, []):
        if item.get("name") == name:
            return item  # type: ignore[no-any-return]
    raise NotFound(f"no {section} named {name!r}")


def _canonical(address: str) -> str:
    try:
        return str(Address.parse(address))
    except ValueError as exc:
        raise BadEdit(f"bad address: {exc}") from None


def _members(doc: Document, section: str, name: str) -> list[dict[str, Any]]:
    group = _section(doc, section, name)
    key = "servers" if section == "pool" else "members"
    entries = group.setdefault(key, [])
    # Entries may be plain "host:port" strings in a hand-written document.
    entries[:] = [{"address": e} if isinstance(e, str) else e for e in entries]
    return entries  # type: ignore[no-any-return]


def _find_member(entries: list[dict[str, Any]], address: str) -> dict[str, Any]:
    wanted = _canonical(address)
    for entry in entries:
        if _canonical(str(entry.get("address", ""))) == wanted:
            return entry
    raise NotFound(f"no server {wanted}")


def add_member(doc: Document, section: str, name: str, server: dict[str, Any]) -> Document:
    doc = copy.deepcopy(doc)
    _members(doc, section, name).append(server)
    return doc


def patch_member(
    doc: Document, section: str, name: str, address: str, patch: dict[str, Any]
) -> Document:
    doc = copy.deepcopy(doc)
    entry = _find_member(_members(doc, section, name), address)
    entry.update(merge_patch(entry, patch))
    return doc


def remove_member(doc: Document, section: str, name: str, address: str) -> Document:
    doc = copy.deepcopy(doc)
    entries = _members(doc, section, name)
    entries.remove(_find_member(entries, address))
    return doc


def add_item(doc: Document, section: str, item: dict[str, Any]) -> Document:
    doc = copy.deepcopy(doc)
    doc.setdefault(section, []).append(item)
    return doc


def patch_item(doc: Document, section: str, name: str, patch: dict[str, Any]) -> Document:
    doc = copy.deepcopy(doc)
    item = _section(doc, section, name)
    merged = merge_patch(item, patch)
    item.clear()
    item.update(merged)
    return doc


def replace_section(doc: Document, section: str, items: Any) -> Document:
    """The whole of an ordered section at once (query rules: their order is their meaning)."""
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise BadEdit(f"{section}: expected a JSON array of objects")
    doc = copy.deepcopy(doc)
    doc[section] = items
    return doc


def remove_item(doc: Document, section: str, name: str) -> Document:
    doc = copy.deepcopy(doc)
    items = doc.get(section, [])
    items.remove(_section(doc, section, name))
    return doc
