"""Per-digest statistics: what is counted, eviction into "other", ordering and merging."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.routing.digests import MAX_TEXT, OTHER, OTHER_TEXT, DigestRow, DigestStats


def run(
    stats: DigestStats,
    digest_id: str,
    elapsed_s: float,
    *,
    user: str = "app",
    schema: str = "sbtest",
    rows: int = 1,
    error: bool = False,
    now: float = 1000.0,
) -> None:
    stats.record(digest_id, f"text of {digest_id}", user, schema, elapsed_s, rows, error, now)


def by_id(rows: list[DigestRow]) -> dict[str, DigestRow]:
    return {row["digest_id"]: row for row in rows}


def test_record_accumulates_per_key() -> None:
    """Count, times, rows, errors and first and last seen add up per key."""
    stats = DigestStats()
    run(stats, "a1", 0.5, rows=3, now=10.0)
    run(stats, "a1", 0.25, rows=0, error=True, now=11.0)
    run(stats, "a1", 1.0, rows=2, now=12.0)
    [row] = stats.top()
    assert row == DigestRow(
        digest_id="a1",
        text="text of a1",
        user="app",
        schema="sbtest",
        count=3,
        total_s=1.75,
        min_s=0.25,
        max_s=1.0,
        rows=5,
        errors=1,
        first_seen=10.0,
        last_seen=12.0,
    )


def test_user_and_schema_are_part_of_the_key() -> None:
    """One digest run by two users or in two schemas makes separate entries."""
    stats = DigestStats()
    run(stats, "a1", 1.0, user="app")
    run(stats, "a1", 1.0, user="report")
    run(stats, "a1", 1.0, schema="other_db")
    assert len(stats) == 3
    assert {(r["user"], r["schema"]) for r in stats.top()} == {
        ("app", "sbtest"),
        ("report", "sbtest"),
        ("app", "other_db"),
    }


def test_text_is_truncated() -> None:
    """Digest texts are kept to their first MAX_TEXT characters."""
    stats = DigestStats()
    stats.record("a1", "x" * 5000, "app", "db", 0.1, 0, False, 1.0)
    assert stats.top()[0]["text"] == "x" * MAX_TEXT


def test_new_key_evicts_least_total_into_other() -> None:
    """In a full table a new key pushes the least total time into the other bucket."""
    stats = DigestStats(max_tracked=3)
    run(stats, "a", 3.0, rows=1, now=5.0)
    run(stats, "b", 1.0, rows=7, error=True, now=6.0)
    run(stats, "c", 2.0, now=7.0)
    run(stats, "d", 0.5, now=8.0)
    rows = stats.top()
    assert [r["digest_id"] for r in rows] == ["a", "c", "d", OTHER]
    other = rows[-1]
    assert other["text"] == OTHER_TEXT
    assert (other["count"], other["total_s"], other["rows"], other["errors"]) == (1, 1.0, 7, 1)
    assert (other["first_seen"], other["last_seen"]) == (6.0, 6.0)


def test_eviction_sees_totals_that_grew() -> None:
    """The entry evicted is the least total now, not the least when it was first seen."""
    stats = DigestStats(max_tracked=3)
    run(stats, "a", 1.0)
    run(stats, "b", 2.0)
    run(stats, "c", 3.0)
    run(stats, "a", 5.0)  # a: 6.0, now the largest
    run(stats, "d", 0.1)
    run(stats, "e", 0.1)  # d, the newest, has the least total: it goes next
    assert set(by_id(stats.top())) == {"a", "c", "e", OTHER}
    assert by_id(stats.top())[OTHER]["total_s"] == pytest.approx(2.1)


def test_known_keys_in_a_full_table_evict_nothing() -> None:
    """Recording statements already tracked in a full table pushes nothing out."""
    stats = DigestStats(max_tracked=10)
    for i in range(10):
        run(stats, f"k{i}", 0.001 * i)
    for _ in range(50):
        for i in range(10):
            run(stats, f"k{i}", 0.001)
    rows = stats.top(n=20)
    assert len(rows) == 10
    assert OTHER not in by_id(rows)


def test_bad_durations_do_not_break_eviction() -> None:
    """NaN and negative durations count as zero, and eviction still ends."""
    stats = DigestStats(max_tracked=2)
    run(stats, "a", math.nan)
    run(stats, "b", -5.0)
    run(stats, "a", 1.0)
    run(stats, "c", 2.0)
    assert set(by_id(stats.top())) == {"a", "c", OTHER}
    assert by_id(stats.top())["a"]["min_s"] == 0.0


@pytest.mark.parametrize("by", ["total_s", "count", "max_s", "errors", "rows"])
def test_top_orders_by_each_column(by: str) -> None:
    """top() sorts by the column asked for, most first, and keeps n rows before other."""
    stats = DigestStats()
    for i, (elapsed, count, rows, errors) in enumerate(
        [(0.1, 5, 1, 0), (0.9, 1, 4, 1), (0.4, 3, 9, 3), (0.2, 2, 0, 2)]
    ):
        for j in range(count):
            run(stats, f"d{i}", elapsed, rows=rows if j == 0 else 0, error=j < errors)
    rows_out = stats.top(by=by)
    values = [row[by] for row in rows_out]  # type: ignore[literal-required]
    assert values == sorted(values, reverse=True)
    first_two = stats.top(n=2, by=by)
    assert first_two[:2] == rows_out[:2]
    assert [r["digest_id"] for r in first_two[2:]] == [OTHER]


def test_top_folds_the_rest_into_other() -> None:
    """top() gives top_n rows by default, then one other row for the entries past them and
    those pushed out, so that its sums are the sums of everything."""
    stats = DigestStats(top_n=2, max_tracked=4)
    for i in range(6):
        run(stats, f"d{i}", float(i + 1), now=float(i))
    rows = stats.top()
    assert [r["digest_id"] for r in rows] == ["d5", "d4", OTHER]
    other = rows[-1]
    assert (other["count"], other["total_s"], other["min_s"], other["max_s"]) == (4, 10.0, 1.0, 4.0)
    assert (other["first_seen"], other["last_seen"]) == (0.0, 3.0)
    assert [r["digest_id"] for r in stats.top(n=0)] == [OTHER]
    assert stats.top(n=0)[0]["count"] == 6


def test_top_rows_merge_with_exact_sums() -> None:
    """A control process merging each worker's top(n) rows gets the workers' exact sums."""
    workers = [DigestStats(max_tracked=6) for _ in range(2)]
    for w, stats in enumerate(workers):
        for i in range(10):
            run(stats, f"d{i}", 0.5 * (i + w), rows=i)
    merged = DigestStats()
    for stats in workers:
        merged.merge(stats.top(n=2))
    rows = merged.snapshot()
    assert sum(r["count"] for r in rows) == 20
    assert sum(r["total_s"] for r in rows) == sum(0.5 * (i + w) for i in range(10) for w in (0, 1))
    assert sum(r["rows"] for r in rows) == 2 * sum(range(10))


def test_top_refuses_unknown_orders() -> None:
    """Ordering by anything but the listed columns is an error."""
    with pytest.raises(ValueError, match="total_s"):
        DigestStats().top(by="text")


def test_bounds_are_checked() -> None:
    """A table must hold at least one entry."""
    with pytest.raises(ValueError, match="max_tracked"):
        DigestStats(max_tracked=0)


def test_merge_adds_the_same_key() -> None:
    """Merging adds counts and totals, keeps the least min and first seen and the largest
    max and last seen."""
    one, two = DigestStats(), DigestStats()
    run(one, "a", 0.5, rows=2, now=10.0)
    run(one, "a", 2.0, error=True, now=20.0)
    run(two, "a", 0.1, rows=3, now=5.0)
    run(two, "a", 1.0, now=15.0)
    run(two, "b", 1.0, now=15.0)
    merged = DigestStats()
    merged.merge(one.snapshot())
    merged.merge(two.snapshot())
    a = by_id(merged.top())["a"]
    assert (a["count"], a["total_s"], a["rows"], a["errors"]) == (4, 3.6, 7, 1)
    assert (a["min_s"], a["max_s"], a["first_seen"], a["last_seen"]) == (0.1, 2.0, 5.0, 20.0)
    assert by_id(merged.top())["b"]["count"] == 1


def test_merge_keeps_totals_exact_in_a_smaller_table() -> None:
    """Merged into a smaller table, entries spill into other and the sums stay the same."""
    workers = [DigestStats(max_tracked=5) for _ in range(3)]
    for w, stats in enumerate(workers):
        for i in range(8):
            run(stats, f"d{(i + w) % 9}", 0.25 * (i + 1), rows=i)
    merged = DigestStats(max_tracked=4)
    for stats in workers:
        merged.merge(stats.snapshot())
    everything = [r for stats in workers for r in stats.snapshot()]
    rows = merged.snapshot()
    assert len(merged) == 4
    assert rows[-1]["digest_id"] == OTHER
    assert sum(r["count"] for r in rows) == sum(r["count"] for r in everything) == 24
    assert sum(r["total_s"] for r in rows) == sum(r["total_s"] for r in everything)
    assert sum(r["rows"] for r in rows) == sum(r["rows"] for r in everything)


def test_snapshot_round_trips() -> None:
    """A snapshot merged into an empty table gives the same rows back."""
    stats = DigestStats(max_tracked=3)
    for i in range(5):
        run(stats, f"d{i}", 0.5 * (i + 1), user=f"u{i % 2}", error=i % 2 == 0, now=float(i))
    copy = DigestStats(max_tracked=3)
    copy.merge(stats.snapshot())
    assert copy.snapshot() == stats.snapshot()


def test_reset_forgets_everything() -> None:
    """After reset() nothing is tracked, other included."""
    stats = DigestStats(max_tracked=1)
    run(stats, "a", 1.0)
    run(stats, "b", 1.0)
    stats.reset()
    assert stats.top() == []
    assert len(stats) == 0
    run(stats, "c", 1.0)
    assert [r["digest_id"] for r in stats.top()] == ["c"]


# Durations in quarters of a second add up exactly, so sums compare with ==.
EVENTS = st.lists(
    st.tuples(st.integers(0, 12), st.integers(0, 8).map(lambda q: q / 4)), max_size=200
)


@settings(max_examples=200)
@given(EVENTS, st.integers(1, 6))
def test_eviction_matches_a_model(events: list[tuple[int, float]], size: int) -> None:
    """Whatever arrives, the table holds what evicting the least total (then the least
    key) at each new key would hold, and its sums equal everything recorded."""
    stats = DigestStats(max_tracked=size)
    model: dict[str, float] = {}
    other = 0.0
    for n, elapsed in events:
        key = f"d{n:02}"
        run(stats, key, elapsed)
        if key not in model and len(model) >= size:
            victim = min(model, key=lambda k: (model[k], k))
            other += model.pop(victim)
        model[key] = model.get(key, 0.0) + elapsed
    rows = by_id(stats.snapshot())
    assert {k: r["total_s"] for k, r in rows.items() if k != OTHER} == model
    assert (rows[OTHER]["total_s"] if OTHER in rows else 0.0) == other
    assert sum(r["count"] for r in rows.values()) == len(events)
