"""Pure health state of one server: rise/fall, passive ejection, admin overrides."""

from __future__ import annotations

import pytest

from meshproxy.config import AdminState, CheckConfig, EjectConfig
from meshproxy.health.state import ServerHealth, ServerState, Transition

ONLINE = ServerState.ONLINE
SHUNNED = ServerState.SHUNNED
OFFLINE_SOFT = ServerState.OFFLINE_SOFT
OFFLINE_HARD = ServerState.OFFLINE_HARD


def health(
    *,
    admin: AdminState = AdminState.ONLINE,
    rise: int = 2,
    fall: int = 3,
    failures: int = 3,
    backoff_s: float = 10.0,
) -> ServerHealth:
    check = CheckConfig(type="tcp", interval_ms=1000, timeout_ms=500, rise=rise, fall=fall)
    return ServerHealth(admin, check, EjectConfig(failures, backoff_s))


def fail_checks(h: ServerHealth, n: int, now: float = 0.0) -> list[Transition | None]:
    return [h.check_result(False, "connection refused", now) for _ in range(n)]


def pass_checks(h: ServerHealth, n: int, now: float = 0.0) -> list[Transition | None]:
    return [h.check_result(True, "ok", now) for _ in range(n)]


def eject(h: ServerHealth, now: float) -> Transition | None:
    """Fail connects until the server is ejected; return the last transition."""
    results = [h.connect_failed("timed out", now) for _ in range(3)]
    assert results[:-1] == [None, None]
    return results[-1]


@pytest.mark.parametrize("admin", list(AdminState))
def test_starts_in_its_admin_state_with_checks_up(admin: AdminState) -> None:
    """A new server is ONLINE unless the operator configured it offline."""
    assert health(admin=admin).state == ServerState(admin.value)


def test_fall_consecutive_failures_shun_the_server() -> None:
    """Exactly `fall` failed checks in a row move ONLINE to SHUNNED, with the reason."""
    h = health(fall=3)
    results = fail_checks(h, 3)
    assert results[:2] == [None, None]
    transition = results[2]
    assert transition is not None
    assert (transition.old, transition.new) == (ONLINE, SHUNNED)
    assert "3 checks failed" in transition.reason
    assert "connection refused" in transition.reason
    assert h.state is SHUNNED


def test_a_success_between_failures_resets_the_fall_streak() -> None:
    """A passing check between failures restarts the count towards `fall`."""
    h = health(fall=3)
    for _ in range(5):
        assert fail_checks(h, 2) == [None, None]
        assert pass_checks(h, 1) == [None]
    assert h.state is ONLINE
    assert fail_checks(h, 2) == [None, None]
    assert fail_checks(h, 1)[0] == Transition(
        ONLINE, SHUNNED, "3 checks failed: connection refused"
    )


def test_rise_consecutive_successes_bring_the_server_back() -> None:
    """After being shunned, exactly `rise` passing checks in a row make it ONLINE again."""
    h = health(rise=2, fall=1)
    fail_checks(h, 1)
    assert h.state is SHUNNED
    results = pass_checks(h, 2)
    assert results[0] is None
    transition = results[1]
    assert transition is not None
    assert (transition.old, transition.new) == (SHUNNED, ONLINE)
    assert "2 checks passed" in transition.reason


def test_a_failure_between_successes_resets_the_rise_streak() -> None:
    """While shunned, a failing check restarts the count towards `rise`."""
    h = health(rise=3, fall=1)
    fail_checks(h, 1)
    for _ in range(4):
        assert pass_checks(h, 2) == [None, None]
        assert fail_checks(h, 1) == [None]
    assert h.state is SHUNNED
    assert pass_checks(h, 3)[2] is not None
    assert h.state is ONLINE


def test_repeated_failures_after_shunning_report_nothing_more() -> None:
    """Once shunned, further failed checks cause no further transitions."""
    h = health(fall=2)
    fail_checks(h, 2)
    assert fail_checks(h, 10) == [None] * 10
    assert h.state is SHUNNED


def test_passive_ejection_after_consecutive_connect_failures() -> None:
    """N connect failures in a row eject the server for the back-off, with the reason."""
    h = health(failures=3, backoff_s=10.0)
    transition = eject(h, now=100.0)
    assert transition is not None
    assert (transition.old, transition.new) == (ONLINE, SHUNNED)
    assert "ejected for 10s after 3 connect failures" in transition.reason
    assert "timed out" in transition.reason
    assert h.state is SHUNNED


def test_ejection_lasts_until_the_back_off_expires() -> None:
    """A tick before the back-off ends keeps the server SHUNNED; at expiry it is ONLINE."""
    h = health(backoff_s=10.0)
    eject(h, now=100.0)
    assert h.tick(100.0) is None
    assert h.tick(109.999) is None
    assert h.state is SHUNNED
    transition = h.tick(110.0)
    assert transition == Transition(SHUNNED, ONLINE, "ejection back-off over")
    assert h.state is ONLINE
    assert h.tick(200.0) is None


def test_tick_without_ejection_does_nothing() -> None:
    """Ticking a server that was never ejected changes nothing."""
    h = health()
    assert h.tick(1e9) is None
    assert h.state is ONLINE


@pytest.mark.parametrize(
    ("start", "backoff_s"),
    [(100.0, 10.0), (0.0, 10.0), (-10.0, 10.0), (0.0, 0.0)],
    ids=["positive-clock", "clock-at-zero", "expiry-at-zero", "no-back-off"],
)
def test_failures_during_an_ejection_do_not_extend_it(start: float, backoff_s: float) -> None:
    """Connect failures while ejected neither report a transition nor push back the expiry."""
    h = health(backoff_s=backoff_s)
    eject(h, now=start)
    assert [h.connect_failed("refused", start + backoff_s / 2) for _ in range(5)] == [None] * 5
    assert h.tick(start + backoff_s) == Transition(SHUNNED, ONLINE, "ejection back-off over")


def test_ejected_server_needs_n_fresh_failures_to_be_ejected_again() -> None:
    """After the back-off the failure count starts over: one more failure does not re-eject."""
    h = health(failures=3)
    eject(h, now=0.0)
    assert h.tick(10.0) is not None
    assert h.connect_failed("refused", 12.0) is None
    assert h.connect_failed("refused", 12.0) is None
    assert h.state is ONLINE
    transition = h.connect_failed("refused", 12.0)
    assert transition is not None
    assert (transition.old, transition.new) == (ONLINE, SHUNNED)
    assert h.tick(21.999) is None, "the new ejection runs from the new failure"
    assert h.tick(22.0) is not None


def test_connect_success_resets_the_failure_count() -> None:
    """A successful connect between failures restarts the count towards ejection."""
    h = health(failures=3)
    for _ in range(5):
        assert h.connect_failed("refused", 0.0) is None
        assert h.connect_failed("refused", 0.0) is None
        h.connect_succeeded()
    assert h.state is ONLINE
    assert eject(h, now=0.0) is not None


def test_rise_ends_an_ejection_early() -> None:
    """A server shunned by checks and also ejected is ONLINE as soon as `rise` checks pass."""
    h = health(rise=2, fall=1)
    fail_checks(h, 1)
    assert eject(h, now=0.0) is None, "already SHUNNED: no new transition"
    assert pass_checks(h, 2)[1] == Transition(SHUNNED, ONLINE, "2 checks passed")
    assert h.tick(1000.0) is None


def test_expiry_while_checks_are_failing_keeps_the_server_shunned() -> None:
    """An ejection that expires while active checks still fail does not bring the server back."""
    h = health(fall=1)
    eject(h, now=0.0)
    assert fail_checks(h, 1) == [None]
    assert h.tick(10.0) is None
    assert h.state is SHUNNED


@pytest.mark.parametrize(
    ("admin", "state"),
    [(AdminState.OFFLINE_SOFT, OFFLINE_SOFT), (AdminState.OFFLINE_HARD, OFFLINE_HARD)],
)
def test_admin_offline_overrides_health(admin: AdminState, state: ServerState) -> None:
    """An operator's OFFLINE state wins over healthy and failing checks alike."""
    h = health(fall=1, rise=1)
    assert h.set_admin(admin) == Transition(ONLINE, state, f"admin set {admin}")
    assert h.state is state
    assert fail_checks(h, 3) == [None] * 3, "health changes under an override are not reported"
    assert h.state is state
    assert eject(h, now=0.0) is None
    assert h.state is state


@pytest.mark.parametrize("admin", [AdminState.OFFLINE_SOFT, AdminState.OFFLINE_HARD])
def test_back_to_online_reports_the_health_state(admin: AdminState) -> None:
    """Setting ONLINE again reports a transition to what health says: ONLINE or SHUNNED."""
    healthy = health()
    healthy.set_admin(admin)
    assert healthy.set_admin(AdminState.ONLINE) == Transition(
        ServerState(admin.value), ONLINE, "admin set ONLINE"
    )

    failing = health(fall=1)
    failing.set_admin(admin)
    fail_checks(failing, 1)
    assert failing.set_admin(AdminState.ONLINE) == Transition(
        ServerState(admin.value), SHUNNED, "admin set ONLINE"
    )


def test_soft_to_hard_is_a_transition() -> None:
    """Escalating a drain to a hard stop is reported as its own transition."""
    h = health(admin=AdminState.OFFLINE_SOFT)
    assert h.set_admin(AdminState.OFFLINE_HARD) == Transition(
        OFFLINE_SOFT, OFFLINE_HARD, "admin set OFFLINE_HARD"
    )


@pytest.mark.parametrize("admin", list(AdminState))
def test_setting_the_same_admin_state_reports_nothing(admin: AdminState) -> None:
    """Setting the admin state a server already has is not a transition."""
    h = health(admin=admin)
    assert h.set_admin(admin) is None


def test_setting_online_on_a_shunned_server_reports_nothing() -> None:
    """Admin ONLINE on a server that is SHUNNED by health changes nothing routing sees."""
    h = health(fall=1)
    fail_checks(h, 1)
    assert h.set_admin(AdminState.ONLINE) is None
    assert h.state is SHUNNED
