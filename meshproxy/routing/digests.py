"""Per-digest statistics in bounded memory, as ProxySQL's stats_mysql_query_digest.

One entry per (digest id, user, schema) with its count, times, rows and errors. At most
``max_tracked`` entries are kept: a new key arriving when the table is full pushes out the
entry with the least total time, whose numbers are added to one "other" bucket, so the
totals over all rows stay exact. ``top(n)`` adds the entries past ``n`` to its "other" row
too, so its sums are exact as well. Each worker process keeps its own ``DigestStats``; the
control process merges their ``snapshot()`` (or ``top(n)``) rows into one with ``merge``.

Finding the least total cheaply: a heap of (total at the time it was pushed, key), one
item per entry, checked lazily. Totals only grow, so an item's total is at most its
entry's: the smallest item whose total is still current is the true minimum. Items found
out of date on the way are pushed back with the current total; each such push needs a
``record`` since the item's last push, so eviction costs amortized O(log n) per record,
never a scan of the table, however fast new keys arrive (a scan would cost a thousand
entries per new key in a workload of ever new statements). A table full of hot keys never
touches the heap: ``record`` of a known key is a dict lookup and a few attribute updates.

Pure: every call takes ``now`` (wall-clock seconds), no clocks inside.
"""

from __future__ import annotations

import heapq
import math
from operator import attrgetter
from typing import TypedDict

OTHER = "other"  # the digest id of the bucket of pushed-out entries (real ids are hex)
OTHER_TEXT = "(other digests)"
MAX_TEXT = 1024  # characters of a digest text kept
ORDERS = ("total_s", "count", "max_s", "errors", "rows")

Key = tuple[str, str, str]  # digest id, user, schema


class DigestRow(TypedDict):
    digest_id: str
    text: str
    user: str
    schema: str
    count: int
    total_s: float
    min_s: float
    max_s: float
    rows: int
    errors: int
    first_seen: float
    last_seen: float


class _Entry:
    __slots__ = (
        "count",
        "errors",
        "first_seen",
        "last_seen",
        "max_s",
        "min_s",
        "rows",
        "text",
        "total_s",
    )

    def __init__(self, text: str) -> None:
        self.text = text
        self.count = 0
        self.total_s = 0.0
        self.min_s = math.inf
        self.max_s = 0.0
        self.rows = 0
        self.errors = 0
        self.first_seen = math.inf
        self.last_seen = -math.inf

    def add(self, other: _Entry) -> None:
        self.count += other.count
        self.total_s += other.total_s
        self.min_s = min(self.min_s, other.min_s)
        self.max_s = max(self.max_s, other.max_s)
        self.rows += other.rows
        self.errors += other.errors
        self.first_seen = min(self.first_seen, other.first_seen)
        self.last_seen = max(self.last_seen, other.last_seen)

    @classmethod
    def from_row(cls, row: DigestRow) -> _Entry:
        entry = cls(row["text"][:MAX_TEXT])
        entry.count = int(row["count"])
        entry.total_s = _duration(row["total_s"])
        entry.min_s = _duration(row["min_s"])
        entry.max_s = _duration(row["max_s"])
        entry.rows = int(row["rows"])
        entry.errors = int(row["errors"])
        entry.first_seen = float(row["first_seen"])
        entry.last_seen = float(row["last_seen"])
        return entry

    def row(self, key: Key) -> DigestRow:
        return DigestRow(
            digest_id=key[0],
            text=self.text,
            user=key[1],
            schema=key[2],
            count=self.count,
            total_s=self.total_s,
            min_s=self.min_s,
            max_s=self.max_s,
            rows=self.rows,
            errors=self.errors,
            first_seen=self.first_seen,
            last_seen=self.last_seen,
        )


def _duration(seconds: float) -> float:
    # The heap needs totals that never shrink and compare equal to themselves: no
    # negative or NaN durations (a clock stepped back) get in.
    return float(seconds) if seconds >= 0.0 else 0.0


class DigestStats:
    """Statistics per (digest id, user, schema), at most ``max_tracked`` entries."""

    def __init__(self, top_n: int = 100, max_tracked: int = 1000) -> None:
        if max_tracked < 1 or top_n < 0:
            raise ValueError("max_tracked must be at least 1 and top_n at least 0")
        self.top_n = top_n
        self.max_tracked = max_tracked
        self._entries: dict[Key, _Entry] = {}
        self._heap: list[tuple[float, Key]] = []  # (total when pushed, key): one per entry
        self._other = _Entry(OTHER_TEXT)

    def __len__(self) -> int:
        """The number of entries tracked, the "other" bucket not counted."""
        return len(self._entries)

    def record(
        self,
        digest_id: str,
        text: str,
        user: str,
        schema: str,
        elapsed_s: float,
        rows: int,
        error: bool,
        now: float,
    ) -> None:
        """Count one run of a statement."""
        key = (digest_id, user, schema)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._admit(key, text)
            entry.first_seen = now
        if not elapsed_s >= 0.0:  # also NaN: see _duration
            elapsed_s = 0.0
        entry.count += 1
        entry.total_s += elapsed_s
        if elapsed_s < entry.min_s:
            entry.min_s = elapsed_s
        if elapsed_s > entry.max_s:
            entry.max_s = elapsed_s
        entry.rows += rows
        if error:
            entry.errors += 1
        entry.last_seen = now

    def _admit(self, key: Key, text: str) -> _Entry:
        if len(self._entries) >= self.max_tracked:
            self._evict()
        entry = self._entries[key] = _Entry(text[:MAX_TEXT])
        heapq.heappush(self._heap, (0.0, key))
        return entry

    def _evict(self) -> None:
        """Move the entry with the least total time into the "other" bucket."""
        heap = self._heap
        while True:
            total, key = heap[0]
            entry = self._entries[key]
            if entry.total_s == total:
                heapq.heappop(heap)
                del self._entries[key]
                self._other.add(entry)
                return
            heapq.heapreplace(heap, (entry.total_s, key))

    def top(self, n: int | None = None, by: str = "total_s") -> list[DigestRow]:
        """The ``n`` (default ``top_n``) entries with the most ``by``, most first, then one
        "other" row for the rest: the entries past ``n`` and those pushed out. The rows'
        sums are always the sums of everything recorded."""
        if by not in ORDERS:
            raise ValueError(f"cannot order digests by {by!r}: one of {', '.join(ORDERS)}")
        value = attrgetter(by)
        best = heapq.nlargest(
            self.top_n if n is None else n,
            self._entries.items(),
            key=lambda item: value(item[1]),
        )
        rows = [entry.row(key) for key, entry in best]
        rest = _Entry(OTHER_TEXT)
        rest.add(self._other)
        if len(best) < len(self._entries):
            shown = {key for key, _ in best}
            for key, entry in self._entries.items():
                if key not in shown:
                    rest.add(entry)
        if rest.count:
            rows.append(rest.row((OTHER, "", "")))
        return rows

    def snapshot(self) -> list[DigestRow]:
        """Every entry and the "other" bucket, for ``merge`` in another process."""
        return self.top(len(self._entries))

    def merge(self, rows: list[DigestRow]) -> None:
        """Add the rows of other ``DigestStats`` (their ``snapshot``) into this one."""
        for row in rows:
            incoming = _Entry.from_row(row)
            if row["digest_id"] == OTHER:
                self._other.add(incoming)
                continue
            key = (row["digest_id"], row["user"], row["schema"])
            entry = self._entries.get(key)
            if entry is None:
                entry = self._admit(key, incoming.text)
            entry.add(incoming)

    def reset(self) -> None:
        """Forget everything, the "other" bucket included."""
        self._entries.clear()
        self._heap.clear()
        self._other = _Entry(OTHER_TEXT)
