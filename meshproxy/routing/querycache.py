"""The query cache: whole answers of statements that a rule gave a TTL, bounded in bytes.

Keys are whatever identifies an answer exactly (the session mode uses the login, its
capabilities, the schema and the statement's bytes, literals included). Entries expire
by their TTL and, past the byte budget, the least recently used go first. Pure: every
call takes ``now`` (monotonic seconds).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(slots=True)
class _Entry:
    answer: bytes
    expires: float
    size: int  # the answer's bytes and the key's statement text


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0  # pushed out by the byte budget
    expirations: int = 0
    too_large: int = 0  # answers larger than max_entry_bytes, passed on uncached


class QueryCache:
    def __init__(self, max_bytes: int, max_entry_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self.bytes = 0
        self.stats = CacheStats()
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def resize(self, max_bytes: int, max_entry_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self._evict()

    def get(self, key: Hashable, now: float) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        if entry.expires <= now:
            self._drop(key, entry)
            self.stats.expirations += 1
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry.answer

    def put(
        self, key: Hashable, answer: bytes, ttl_s: float, now: float, key_size: int = 0
    ) -> bool:
        """Keep ``answer`` for ``ttl_s``; False when it is too large to keep."""
        size = len(answer) + key_size
        if size > self.max_entry_bytes or ttl_s <= 0:
            self.stats.too_large += size > self.max_entry_bytes
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        self._entries[key] = _Entry(answer, now + ttl_s, size)
        self.bytes += size
        self.stats.stores += 1
        self._evict()
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._entries:
            _, entry = self._entries.popitem(last=False)
            self.bytes -= entry.size
            self.stats.evictions += 1

    def _drop(self, key: Hashable, entry: _Entry) -> None:
        del self._entries[key]
        self.bytes -= entry.size
