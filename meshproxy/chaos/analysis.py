"""Questions the chaos scenarios ask of a timeline. Pure functions of a :class:`Timeline`."""

from __future__ import annotations

from meshproxy.chaos.timeline import BUCKET_S, Timeline

RULED_OUT = frozenset({"SHUNNED", "OFFLINE_SOFT", "OFFLINE_HARD", "suspect", "dead", "left"})
IN_SERVICE = frozenset({"ONLINE", "alive"})


def first_change(
    timeline: Timeline,
    observer: str,
    subject: str,
    states: frozenset[str],
    after: float,
    kind: str | None = None,
) -> float | None:
    """When ``observer`` first saw ``subject`` in one of ``states`` after ``after``."""
    for change in timeline.changes:
        if (
            change.t >= after
            and change.observer == observer
            and change.subject == subject
            and change.state in states
            and (kind is None or change.kind == kind)
        ):
            return change.t
    return None


def first_connect(timeline: Timeline, after: float) -> float | None:
    """When a worker whose session or connect had failed first got a new session."""
    return next(
        (e.t for e in timeline.client_events if e.kind == "reconnected" and e.t >= after), None
    )


def connect_errors(timeline: Timeline, after: float) -> int:
    """New connections that failed after ``after``."""
    return sum(1 for e in timeline.client_events if e.kind == "connect_error" and e.t >= after)


def later_connect_errors(timeline: Timeline, after: float) -> int:
    """New connections begun after ``after`` that failed (those already in a process's
    hands when it was killed are lost with it, whatever holds the listening socket)."""
    return sum(
        1
        for e in timeline.client_events
        if e.kind == "connect_error" and e.started is not None and e.started >= after
    )


def session_errors(timeline: Timeline, after: float, on: str | None = None) -> int:
    """Open sessions that broke after ``after``: those through ``on``, or all of them."""
    return sum(
        1
        for e in timeline.client_events
        if e.kind == "session_error" and e.t >= after and (on is None or e.middle == on)
    )


def broken_sessions(timeline: Timeline, victim: str, after: float) -> list[tuple[float, bool]]:
    """For each session through ``victim`` that broke after ``after``: (seconds from
    ``after`` to the break, whether the client gave up waiting: its own read timeout)."""
    return [
        (e.t - after, "timed out" in e.detail)
        for e in timeline.client_events
        if e.kind == "session_error" and e.t >= after and e.middle == victim
    ]


def longest_wait(timeline: Timeline, victim: str, after: float) -> float:
    """The longest a query through ``victim`` waited after ``after``: until the session
    broke, or until it was answered after a stall (0 when none was held up)."""
    waits = [d for d, _ in broken_sessions(timeline, victim, after)]
    waits += [
        float(e.detail) - max(0.0, after - e.t)
        for e in timeline.client_events
        if e.kind == "stalled" and e.middle == victim and e.t + float(e.detail) >= after
    ]
    return round(max(waits, default=0.0), 3)


def errors_elsewhere(timeline: Timeline, after: float, victim: str) -> int:
    """Errors after ``after`` that no session through ``victim`` explains. A session that
    broke during its login names no middle yet (``""``) and is not counted: the proxies had
    linked it already, and nothing but the fault breaks logins."""
    return sum(
        1
        for e in timeline.client_events
        if e.t >= after
        and (
            e.kind == "connect_error"
            or (e.kind == "session_error" and e.middle not in (victim, ""))
        )
    )


def reconnects(timeline: Timeline, victim: str | None, after: float) -> list[tuple[float, str]]:
    """For each session that broke after ``after`` (through ``victim``, or any): (seconds
    until its worker's next session started, the middle carrying it); inf when none did."""
    found = []
    events = timeline.client_events
    for i, error in enumerate(events):
        if error.kind != "session_error" or error.t < after:
            continue
        if victim is not None and error.middle != victim:
            continue
        later = (e for e in events[i + 1 :] if e.worker == error.worker)
        nxt = next((e for e in later if e.kind == "reconnected"), None)
        found.append((nxt.t - error.t, nxt.middle) if nxt else (float("inf"), ""))
    return found


def sessions_on(timeline: Timeline, middle: str, start: float, end: float = float("inf")) -> int:
    """New sessions carried by ``middle`` in the buckets wholly between ``start`` and
    ``end`` (a bucket straddling either holds sessions from both sides of it)."""
    counts = timeline.middles.get(middle, [])
    return sum(
        n for i, n in enumerate(counts) if start <= i * BUCKET_S and (i + 1) * BUCKET_S <= end
    )


def queries_between(timeline: Timeline, start: float, end: float) -> int:
    """Queries completed in the buckets between ``start`` and ``end``."""
    return sum(q for i, q in enumerate(timeline.queries) if start <= i * BUCKET_S < end)
