"""The questions chaos scenarios ask of a timeline, on hand-made timelines."""

from __future__ import annotations

import math

from meshproxy.chaos import analysis
from meshproxy.chaos.analysis import IN_SERVICE, RULED_OUT
from meshproxy.chaos.load import middle_of
from meshproxy.chaos.timeline import Change, Check, ClientEvent, Timeline


def _timeline() -> Timeline:
    t = Timeline(scenario="kill-middle", topology="chain", t0=1000.0, duration_s=3.0)
    t.queries = [10] * 30
    t.middles = {"p2": [1] * 30, "p3": [1] * 25 + [0] * 5}
    t.changes = [
        Change(0.0, "p1", "p3", "route", "ONLINE"),
        Change(0.0, "p1", "p3", "member", "alive"),
        Change(1.2, "p1", "p3", "route", "SHUNNED"),
        Change(1.6, "p1", "p3", "member", "suspect"),
        Change(2.0, "p1", "p3", "member", "dead"),
    ]
    t.client_events = [
        ClientEvent(0.5, 1, "connect_error", "", "refused before the fault"),
        ClientEvent(1.05, 2, "session_error", "p3", "lost"),
        ClientEvent(1.06, 3, "session_error", "", "lost during login"),
        ClientEvent(1.1, 4, "session_error", "p2", "unrelated"),
        ClientEvent(1.3, 5, "connect_error", "", "refused"),
        ClientEvent(1.45, 2, "reconnected", "p4"),
        ClientEvent(1.9, 3, "reconnected", "p3"),
    ]
    return t


def test_first_change_finds_the_first_matching_state_after_a_time() -> None:
    """The first change into a ruled-out state after the fault is found, by kind if asked."""
    t = _timeline()
    assert analysis.first_change(t, "p1", "p3", RULED_OUT, 1.0) == 1.2
    assert analysis.first_change(t, "p1", "p3", RULED_OUT, 1.0, "member") == 1.6
    assert analysis.first_change(t, "p1", "p3", IN_SERVICE, 0.5) is None
    assert analysis.first_change(t, "p2", "p3", RULED_OUT, 0.0) is None


def test_errors_are_counted_by_kind_and_middle_after_a_time() -> None:
    """Connect errors, session errors (all or one middle's) count only after the given time."""
    t = _timeline()
    assert analysis.connect_errors(t, 0.0) == 2
    assert analysis.connect_errors(t, 1.0) == 1
    assert analysis.session_errors(t, 1.0) == 3
    assert analysis.session_errors(t, 1.0, on="p3") == 1


def test_errors_elsewhere_leave_out_the_victim_and_unattributed_login_breaks() -> None:
    """Errors not explained by the victim: connect errors and other middles' broken sessions."""
    assert analysis.errors_elsewhere(_timeline(), 1.0, "p3") == 2


def test_reconnects_pair_each_broken_session_with_its_workers_next_session() -> None:
    """Each broken session gets its worker's next session: delay and middle; inf if none."""
    t = _timeline()
    assert analysis.reconnects(t, "p3", 1.0) == [(t.client_events[5].t - 1.05, "p4")]
    pairs = analysis.reconnects(t, None, 1.0)
    assert [middle for _, middle in pairs] == ["p4", "p3", ""]
    assert math.isinf(pairs[2][0])


def test_first_connect_and_sessions_per_middle_read_the_load() -> None:
    """The first new session after a time, and sessions a middle took in a window."""
    t = _timeline()
    assert analysis.first_connect(t, 1.0) == 1.45
    assert analysis.sessions_on(t, "p3", 2.0) == 5
    assert analysis.sessions_on(t, "p3", 2.5) == 0
    assert analysis.sessions_on(t, "p4", 0.0) == 0
    assert analysis.queries_between(t, 1.0, 2.0) == 100


def test_checks_hold_upper_and_lower_bounds_and_fail_when_nothing_was_measured() -> None:
    """A check passes within its bound (a maximum, or a minimum), never without a value."""
    assert Check("detect", 0.4, 1.0).ok
    assert not Check("detect", 1.4, 1.0).ok
    assert not Check("detect", None, 1.0).ok
    assert Check("sessions", 3, 1, "", at_least=True).ok
    assert not Check("sessions", 0, 1, "", at_least=True).ok


def test_a_sessions_middle_is_named_by_the_address_the_backend_saw() -> None:
    """``USER()``'s host part maps to the node that dialled from it; unknown stays as is."""
    middles = {"10.231.3.12": "p2"}
    assert middle_of("monitor@10.231.3.12", middles) == "p2"
    assert middle_of("monitor@10.9.9.9", middles) == "10.9.9.9"


def test_broken_sessions_tell_a_closed_session_from_a_client_timeout() -> None:
    """Each session through the victim that broke after the fault is reported with its delay
    and whether the client gave up on its own read timeout."""
    t = _timeline()
    t.client_events.append(
        ClientEvent(
            4.0, 6, "session_error", "p3", "(2013, 'Lost ... (The read operation timed out)')"
        )
    )
    broken = analysis.broken_sessions(t, "p3", 1.0)
    assert [(round(d, 3), timed_out) for d, timed_out in broken] == [(0.05, False), (3.0, True)]


def test_longest_wait_counts_breaks_and_stalls_after_the_fault() -> None:
    """A query through the victim counts for as long as it waited after the fault, whether
    its session broke or it was answered late (a middle that woke up); other middles' and
    earlier stalls do not count."""
    t = _timeline()
    t.client_events += [
        ClientEvent(0.2, 7, "stalled", "p3", "0.6"),  # over before the fault
        ClientEvent(0.9, 8, "stalled", "p3", "3.1"),  # 3.0 s of it after the fault at 1.0
        ClientEvent(1.5, 9, "stalled", "p2", "9.0"),  # another middle
    ]
    assert analysis.longest_wait(t, "p3", 1.0) == 3.0
    assert t.error_count() == 5  # the five errors of the base timeline; stalls are none
