"""The session-mode chain's questions of a timeline (the transactions load), on hand-made
timelines, and the new fields' round trip through JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshproxy.chaos import analysis, load
from meshproxy.chaos.analysis import NOT_REPLAYED, OUTCOME_UNKNOWN
from meshproxy.chaos.timeline import ClientEvent, Timeline, read


def _timeline() -> Timeline:
    t = Timeline(scenario="session-kill-middle", topology="chain-session", t0=1000.0)
    t.duration_s = 3.0
    t.middles = {"p2": [2] * 30, "p3": [2] * 10 + [0] * 20}
    t.client_events = [
        ClientEvent(0.5, 1, "stalled", "p3", "0.700", statement="SELECT", transaction="ro"),
        ClientEvent(1.1, 2, "session_error", "p3", "outcome unknown", None, 9004, "COMMIT", "rw"),
        ClientEvent(1.2, 3, "session_error", "p3", "rolled back", None, 9005, "UPDATE", "rw"),
        ClientEvent(1.3, 4, "session_error", "p3", "lost", None, 2013, "SELECT", "ro", True),
        ClientEvent(1.4, 4, "reconnected", ""),
        ClientEvent(1.5, 5, "connect_error", "", "refused", 1.45, 2003),
        ClientEvent(1.6, 6, "session_error", "p3", "unknown", None, 9004, "USER", ""),
    ]
    t.clients = [
        {"client": "a1-0", "seen": 10, "counter": 10, "unknown_commits": 0, "longest_wait": 0.2},
        {"client": "a1-2", "seen": 9, "counter": 10, "unknown_commits": 1, "longest_wait": 1.5},
        {"client": "a1-3", "seen": 9, "counter": 9, "unknown_commits": 1, "longest_wait": 0.1},
        {"client": "a1-4", "seen": 9, "counter": 11, "unknown_commits": 1, "longest_wait": 0.1},
        {"client": "a1-5", "seen": 9, "counter": None, "unknown_commits": 0, "longest_wait": 0.1},
    ]
    return t


def test_only_9004_and_9005_on_usable_sessions_are_documented() -> None:
    """Broken sessions, failed connects and other codes are undocumented; 9004/9005 are not."""
    t = _timeline()
    assert analysis.undocumented_errors(t) == 2
    assert analysis.undocumented_errors(t, after=1.45) == 1


def test_errors_between_or_in_read_only_transactions_are_counted() -> None:
    """Errors of statements outside read-write transactions: a moved session never shows them."""
    assert analysis.errors_outside_writes(_timeline()) == 2  # the ro SELECT, the USER()


def test_errors_by_code_and_statement() -> None:
    t = _timeline()
    assert analysis.errors_with(t, OUTCOME_UNKNOWN) == 2
    assert analysis.errors_with(t, OUTCOME_UNKNOWN, "COMMIT") == 1
    assert analysis.errors_with(t, NOT_REPLAYED) == 1
    assert analysis.errors_with(t, NOT_REPLAYED, after=1.25) == 0


def test_counters_must_equal_commits_seen_plus_at_most_the_9004_commits() -> None:
    """seen, or seen + one per COMMIT that answered 9004, and nothing else (nor no read)."""
    wrong = analysis.counter_mismatches(_timeline())
    assert [w.split(":")[0] for w in wrong] == ["a1-4", "a1-5"]


def test_longest_statement_wait_and_transactions_after_a_time() -> None:
    t = _timeline()
    assert analysis.longest_statement_wait(t) == 1.5
    assert analysis.transactions(t, 0.0) == 80
    assert analysis.transactions(t, 1.0) == 40
    assert analysis.transactions(t, 1.0, 2.0) == 20


def test_new_fields_round_trip_and_old_timelines_still_read(tmp_path: Path) -> None:
    """Error codes, statements and the clients' tallies survive JSON; a timeline written
    before they existed reads with their defaults."""
    t = _timeline()
    path = tmp_path / "t.json"
    t.write(path)
    back = read(path)
    assert back.client_events == t.client_events
    assert back.clients == t.clients
    raw = path.read_text().replace('"clients"', '"unused"')
    path.write_text(raw)
    assert read(path).clients == []


def test_error_code_of_pymysql_errors() -> None:
    import pymysql

    assert load.error_code(pymysql.err.OperationalError(9004, "outcome unknown")) == 9004
    assert load.error_code(pymysql.err.InterfaceError("closed")) == 0


def test_only_a_statement_that_hung_is_reported_stalled(capsys: pytest.CaptureFixture[str]) -> None:
    """A statement answered within STALL_S makes no line; one that hung makes one "stalled"
    line with its wait and whatever the caller adds."""
    out = load.Output()
    out.stalled(100.0, load.STALL_S / 2, 3, "p2")
    out.stalled(100.0, 0.75, 3, "p2", stmt="commit", tx="rw")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        {"ev": "stalled", "t": 100.0, "w": 3, "m": "p2", "d": "0.750", "stmt": "commit", "tx": "rw"}
    ]
