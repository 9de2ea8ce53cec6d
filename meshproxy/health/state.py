"""Pure health state of one upstream server: admin state, active checks, passive ejection.

No clocks and no I/O: every event carries ``now`` (monotonic seconds) and every call returns
the transition it caused, if any, so the scheduler can log it and publish a new snapshot.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from meshproxy.config import AdminState, CheckConfig, EjectConfig


class ServerState(enum.StrEnum):
    """The state routing sees, as ProxySQL names them."""

    ONLINE = "ONLINE"  # takes new connections
    SHUNNED = "SHUNNED"  # failing checks or ejected after connect failures: no new connections
    OFFLINE_SOFT = "OFFLINE_SOFT"  # operator drain: no new connections, existing ones finish
    OFFLINE_HARD = "OFFLINE_HARD"  # operator stop: existing connections are closed too


@dataclass(frozen=True, slots=True)
class Transition:
    old: ServerState
    new: ServerState
    reason: str


class ServerHealth:
    """Rise/fall counting of active checks plus consecutive-failure ejection."""

    __slots__ = (
        "_check",
        "_eject",
        "admin",
        "check_up",
        "ejected_until",
        "last_detail",
        "passive_failures",
        "streak",
    )

    def __init__(self, admin: AdminState, check: CheckConfig, eject: EjectConfig) -> None:
        self._check = check
        self._eject = eject
        self.admin = admin
        # Servers start up, as in HAProxy and ProxySQL: `fall` failed checks take them out.
        self.check_up = True
        self.streak = 0  # consecutive check results contrary to check_up
        self.passive_failures = 0
        self.ejected_until: float | None = None
        self.last_detail = ""

    def reconfigure(self, check: CheckConfig, eject: EjectConfig) -> None:
        self._check = check
        self._eject = eject

    @property
    def state(self) -> ServerState:
        if self.admin is AdminState.OFFLINE_HARD:
            return ServerState.OFFLINE_HARD
        if self.admin is AdminState.OFFLINE_SOFT:
            return ServerState.OFFLINE_SOFT
        if not self.check_up or self.ejected_until is not None:
            return ServerState.SHUNNED
        return ServerState.ONLINE

    def _change(self, before: ServerState, reason: str) -> Transition | None:
        after = self.state
        return Transition(before, after, reason) if after is not before else None

    def check_result(self, ok: bool, detail: str, now: float) -> Transition | None:
        """Feed one active check result."""
        before = self.state
        self.last_detail = detail
        if ok == self.check_up:
            self.streak = 0
            return None
        self.streak += 1
        needed = self._check.rise if ok else self._check.fall
        if self.streak < needed:
            return None
        self.check_up = ok
        self.streak = 0
        if ok:
            # A server that passes `rise` checks is healthy again, whatever ejected it.
            self.ejected_until = None
            self.passive_failures = 0
            reason = f"{self._check.rise} checks passed"
        else:
            reason = f"{self._check.fall} checks failed: {detail}"
        return self._change(before, reason)

    def connect_failed(self, detail: str, now: float) -> Transition | None:
        """Feed one failed data-plane connect; enough in a row eject the server."""
        before = self.state
        self.passive_failures += 1
        if (
            self.passive_failures < self._eject.consecutive_failures
            or self.ejected_until is not None
        ):
            return None
        self.ejected_until = now + self._eject.backoff_s
        reason = (
            f"ejected for {self._eject.backoff_s:g}s after "
            f"{self.passive_failures} connect failures: {detail}"
        )
        return self._change(before, reason)

    def connect_succeeded(self) -> None:
        self.passive_failures = 0

    def tick(self, now: float) -> Transition | None:
        """Let an ejection expire; the server is tried again (and re-ejected if still bad)."""
        if self.ejected_until is None or now < self.ejected_until:
            return None
        before = self.state
        self.ejected_until = None
        self.passive_failures = 0
        return self._change(before, "ejection back-off over")

    def set_admin(self, admin: AdminState) -> Transition | None:
        before = self.state
        self.admin = admin
        return self._change(before, f"admin set {admin}")
