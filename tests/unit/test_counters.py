"""Process-wide counters: labelled increments, keys made once, per-label and summed reads,
export."""

from __future__ import annotations

from meshproxy.counters import Counters, key


def test_unknown_counter_reads_zero() -> None:
    """A counter never incremented reads 0, with or without labels."""
    counters = Counters()
    assert counters.get("connections") == 0
    assert counters.get("connections", listener="mysql") == 0
    assert list(counters.items()) == []
    assert counters.as_dict() == {}


def test_increments_are_kept_per_label_set() -> None:
    """Increments add up per label set, and label order does not matter."""
    counters = Counters()
    counters.inc("bytes", 100, direction="in", listener="mysql")
    counters.inc("bytes", 50, listener="mysql", direction="in")
    counters.inc("bytes", 7, direction="out", listener="mysql")
    assert counters.get("bytes", direction="in", listener="mysql") == 150
    assert counters.get("bytes", listener="mysql", direction="out") == 7


def test_get_without_labels_sums_over_all_labels() -> None:
    """Reading a counter without labels gives the total over every label set, and only its own."""
    counters = Counters()
    counters.inc("connect_failures", upstream="a")
    counters.inc("connect_failures", 2, upstream="b")
    counters.inc("connect_failures")
    counters.inc("retries", 10)
    assert counters.get("connect_failures") == 4
    assert counters.get("connect_failures", upstream="b") == 2


def test_items_and_as_dict_export_every_counter_sorted() -> None:
    """Export lists every counter with its labels and value, in a stable order."""
    counters = Counters()
    counters.inc("retries")
    counters.inc("connections", listener="b")
    counters.inc("connections", 3, listener="a")
    assert list(counters.items()) == [
        ("connections", {"listener": "a"}, 3),
        ("connections", {"listener": "b"}, 1),
        ("retries", {}, 1),
    ]
    assert counters.as_dict() == {
        "connections": [
            {"labels": {"listener": "a"}, "value": 3},
            {"labels": {"listener": "b"}, "value": 1},
        ],
        "retries": [{"labels": {}, "value": 1}],
    }


def test_a_key_made_once_counts_as_the_same_labels_given_each_time() -> None:
    """``add`` with a key from ``key`` counts into the same counter as ``inc`` with the
    same name and labels, in any order."""
    counters = Counters()
    accepted = key("connections_accepted", entrance="mysql", side="edge")
    counters.add(accepted)
    counters.add(accepted, 2)
    counters.inc("connections_accepted", side="edge", entrance="mysql")
    assert counters.get("connections_accepted", entrance="mysql", side="edge") == 4
    counters.add(key("bytes"), 10)
    assert counters.get("bytes") == 10
