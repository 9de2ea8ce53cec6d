"""A chaos scenario's timeline: what the load saw, what the nodes saw, what was injected.

Pure data and arithmetic; times are seconds since the scenario started (``t0``, an epoch
time shared by every container, which all read the host's clock). Written as JSON next to
its PNG plot, and read back by the summary table.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BUCKET_S = 0.1


@dataclass(frozen=True)
class Fault:
    """One injected fault or repair: ``kill p3``, ``unpause p4``..."""

    t: float
    action: str


@dataclass(frozen=True)
class Change:
    """One node's view of another changed: gossip state or routing state."""

    t: float
    observer: str
    subject: str
    kind: str  # "member" (gossip: alive/suspect/dead/left) or "route" (ONLINE/SHUNNED/...)
    state: str


@dataclass(frozen=True)
class ClientEvent:
    """A load worker's error, its first successful connect after one, or a query that was
    answered only after a stall."""

    t: float
    worker: int
    kind: str  # "connect_error", "session_error", "reconnected" or "stalled"
    middle: str  # the middle that carried the session ("" when unknown)
    detail: str = ""  # the error; for "stalled", the seconds the query waited
    started: float | None = None  # a connect error's: when that connect began
    # Transactions load (persistent sessions): the error's MySQL code, the statement it
    # answered (BEGIN, UPDATE, SELECT, COMMIT, USER...), the transaction kind (ro/rw/""),
    # and whether the session broke (the worker had to open a new one).
    code: int | None = None
    statement: str = ""
    transaction: str = ""
    broken: bool = False


@dataclass(frozen=True)
class Check:
    """One asserted bound of a scenario."""

    name: str
    value: float | None  # None: the awaited thing never happened
    bound: float
    unit: str = "s"
    at_least: bool = False  # the bound is a minimum ("took new sessions: >= 1")

    @property
    def ok(self) -> bool:
        if self.value is None:
            return False
        return self.value >= self.bound if self.at_least else self.value <= self.bound


@dataclass
class Timeline:
    scenario: str
    topology: str
    t0: float
    duration_s: float = 0.0
    queries: list[int] = field(default_factory=list)  # per BUCKET_S
    errors: list[int] = field(default_factory=list)  # per BUCKET_S, both kinds
    connects: list[int] = field(default_factory=list)  # per BUCKET_S
    middles: dict[str, list[int]] = field(default_factory=dict)  # new sessions per BUCKET_S
    faults: list[Fault] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    client_events: list[ClientEvent] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    # Transactions load: each worker's closing tally (commits seen, its counter row, ...).
    clients: list[dict[str, Any]] = field(default_factory=list)
    detect_s: float | None = None
    recover_s: float | None = None

    @property
    def passed(self) -> bool:
        return all(check.ok for check in self.checks)

    def error_count(self) -> int:
        return sum(1 for e in self.client_events if e.kind.endswith("_error"))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["bucket_s"] = BUCKET_S
        data["errors_total"] = self.error_count()
        data["passed"] = self.passed
        for check, raw in zip(self.checks, data["checks"], strict=True):
            raw["ok"] = check.ok
        return data

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")


def from_json(data: dict[str, Any]) -> Timeline:
    """The inverse of :meth:`Timeline.to_json` (derived keys are recomputed, not trusted)."""
    return Timeline(
        scenario=data["scenario"],
        topology=data["topology"],
        t0=data["t0"],
        duration_s=data["duration_s"],
        queries=list(data["queries"]),
        errors=list(data["errors"]),
        connects=list(data["connects"]),
        middles={name: list(counts) for name, counts in data.get("middles", {}).items()},
        faults=[Fault(**f) for f in data["faults"]],
        changes=[Change(**c) for c in data["changes"]],
        client_events=[ClientEvent(**e) for e in data["client_events"]],
        checks=[
            Check(c["name"], c["value"], c["bound"], c["unit"], c.get("at_least", False))
            for c in data["checks"]
        ],
        clients=list(data.get("clients", [])),
        detect_s=data["detect_s"],
        recover_s=data["recover_s"],
    )


def read(path: Path) -> Timeline:
    return from_json(json.loads(path.read_text(encoding="utf-8")))
