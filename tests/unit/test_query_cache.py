"""The query cache: TTL expiry, the byte bound, LRU eviction and its counters."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meshproxy.routing.querycache import QueryCache


def test_hit_within_ttl_and_miss_after() -> None:
    """An answer is served until its TTL has passed, then it is a miss and is dropped."""
    cache = QueryCache(1000, 100)
    cache.put("k", b"answer", 1.0, now=10.0)
    assert cache.get("k", 10.5) == b"answer"
    assert cache.get("k", 11.0) is None
    assert (cache.stats.hits, cache.stats.misses, cache.stats.expirations) == (1, 1, 1)
    assert cache.bytes == 0


def test_least_recently_used_goes_first() -> None:
    """Past the byte budget the entry used longest ago is evicted, not the one just read."""
    cache = QueryCache(30, 30)
    cache.put("a", b"x" * 10, 60, 0)
    cache.put("b", b"x" * 10, 60, 0)
    cache.get("a", 1)
    cache.put("c", b"x" * 15, 60, 2)
    assert cache.get("b", 3) is None
    assert cache.get("a", 3) is not None
    assert cache.stats.evictions == 1


def test_too_large_answers_are_not_kept() -> None:
    """An answer (with its statement) larger than the entry bound is refused and counted."""
    cache = QueryCache(1000, 100)
    assert not cache.put("k", b"x" * 90, 60, 0, key_size=20)
    assert cache.stats.too_large == 1
    assert len(cache) == 0


def test_replacing_a_key_keeps_the_byte_count_right() -> None:
    """Storing a key again replaces its entry and its bytes."""
    cache = QueryCache(1000, 1000)
    cache.put("k", b"x" * 100, 60, 0)
    cache.put("k", b"y" * 50, 60, 0)
    assert (cache.bytes, cache.get("k", 1)) == (50, b"y" * 50)


def test_shrinking_evicts_at_once() -> None:
    """Resizing below what is held evicts down to the new bound."""
    cache = QueryCache(1000, 1000)
    for i in range(10):
        cache.put(i, b"x" * 100, 60, 0)
    cache.resize(300, 100)
    assert cache.bytes <= 300


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 200), st.floats(0, 5))))
def test_bound_holds_under_any_sequence(ops: list[tuple[int, int, float]]) -> None:
    """Whatever is stored, the cache never holds more bytes than its bound."""
    cache = QueryCache(500, 250)
    for now, (key, size, ttl) in enumerate(ops):
        cache.put(key, b"x" * size, ttl, float(now))
        cache.get((key + 1) % 21, float(now))
        assert cache.bytes <= 500
        assert cache.bytes == sum(len(e.answer) for e in cache._entries.values())
