"""Questions the chaos scenarios ask of a timeline. Pure functions of a :class:`Timeline`."""

from __future__ import annotations

from meshproxy.chaos.timeline import BUCKET_S, ClientEvent, Timeline

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


# -- the transactions load (persistent sessions on a session-mode chain) ---------------

OUTCOME_UNKNOWN = 9004  # meshproxy: a COMMIT (or write) cut off; it may have been applied
NOT_REPLAYED = 9005  # meshproxy: the transaction was rolled back; the session carries on
DOCUMENTED = frozenset({OUTCOME_UNKNOWN, NOT_REPLAYED})


def _errors(timeline: Timeline, after: float) -> list[ClientEvent]:
    return [e for e in timeline.client_events if e.kind.endswith("_error") and e.t >= after]


def undocumented_errors(timeline: Timeline, after: float = 0.0) -> int:
    """Errors a moved session must never show: failed connects, broken sessions, and any
    error code but 9004 and 9005."""
    return sum(1 for e in _errors(timeline, after) if e.broken or e.code not in DOCUMENTED)


def errors_outside_writes(timeline: Timeline, after: float = 0.0) -> int:
    """Errors of statements between transactions or in read-only transactions: what a
    moved session always runs again or replays, so a client never sees."""
    return sum(
        1
        for e in _errors(timeline, after)
        if e.kind == "session_error" and e.transaction in ("", "ro")
    )


def errors_with(
    timeline: Timeline, code: int, statement: str | None = None, after: float = 0.0
) -> int:
    """Errors with MySQL code ``code`` (on ``statement`` only, when given)."""
    return sum(
        1
        for e in _errors(timeline, after)
        if e.code == code and (statement is None or e.statement == statement)
    )


def counter_mismatches(timeline: Timeline) -> list[str]:
    """Clients whose counter row is not what their commits explain: it must equal the
    read-write COMMITs they saw succeed, plus at most one per COMMIT that answered 9004
    (its outcome unknown). A client that never reported, or could not read its row back,
    is a mismatch too."""
    wrong = []
    for client in timeline.clients:
        seen, counter = client.get("seen", 0), client.get("counter")
        unknown = client.get("unknown_commits", 0)
        if counter is None or not seen <= counter <= seen + unknown:
            wrong.append(f"{client.get('client')}: counter {counter}, seen {seen} (+{unknown})")
    return wrong


def longest_statement_wait(timeline: Timeline) -> float:
    """The longest any statement of the transactions load waited for its answer."""
    return round(max((c.get("longest_wait", 0.0) for c in timeline.clients), default=0.0), 3)


def transactions(timeline: Timeline, start: float, end: float = float("inf")) -> int:
    """Transactions committed (both kinds, every middle) in the buckets between ``start``
    and ``end`` (the transactions load counts them per middle in ``middles``)."""
    return sum(
        n
        for counts in timeline.middles.values()
        for i, n in enumerate(counts)
        if start <= i * BUCKET_S and (i + 1) * BUCKET_S <= end
    )
