"""Where one session's statements go: query rules, the read/write split, read-your-writes
and the query cache, decided per statement before the session runs it.

The session (``dataplane.session``) asks ``plan`` for each statement and runs what it
gets back; this module never touches a socket. What it keeps per session is small: the
rules the session can meet, and what it knows of the session's last write.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass

from meshproxy.dataplane.router import Role
from meshproxy.mysql.constants import Command
from meshproxy.mysql.digest import normalize
from meshproxy.mysql.packets import err_payload
from meshproxy.mysql.statements import Effects, classify_bytes, shape
from meshproxy.routing.rules import NO_DECISION, Decision, SessionRules

if typing.TYPE_CHECKING:
    from meshproxy.dataplane.sessionmode import SessionMode

ER_NOT_ALLOWED_COMMAND: typing.Final = 1148  # what ProxySQL answers a refusing rule with
DIGEST_MAX_BYTES: typing.Final = 65536


class Plan:
    """One statement, ready to run: its bytes (maybe rewritten) and where they go. (A
    plain class, not a dataclass: mypyc compiles its ``__init__``; one runs per
    statement.)"""

    def __init__(
        self,
        payload: bytes,
        effects: Effects,
        pool: str,
        side: str = Role.ANY,
        reads: bool = False,
        digest_text: str = "",
        decision: Decision = NO_DECISION,
    ) -> None:
        self.payload = payload
        self.effects = effects
        self.pool = pool
        self.side = side
        self.reads = reads
        self.digest_text = digest_text
        self.digest_id = ""  # of digest_text: known from a prepared statement, else worked out
        self.decision = decision
        self.cache_key: tuple[object, ...] | None = None
        # An ERR payload to answer with instead of running it.
        self.refusal: bytes | None = None


@dataclass(frozen=True, slots=True)
class Gtid:
    """A MariaDB GTID (domain-server-sequence), ordered by sequence within a domain."""

    text: str
    domain: int
    sequence: int

    @classmethod
    def parse(cls, text: str) -> Gtid | None:
        parts = text.strip().split("-")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            return None
        return cls(text.strip(), int(parts[0]), int(parts[2]))


class SessionRouter:
    """The routing state of one client session."""

    __slots__ = (
        "_rules",
        "_rules_version",
        "gtid",
        "gtid_pending",
        "gtid_unknown",
        "mode",
        "wrote_at",
    )

    def __init__(self, mode: SessionMode) -> None:
        self.mode = mode
        self._rules: SessionRules | None = None
        self._rules_version = -1
        self.gtid: Gtid | None = None  # the session's last write, as the writer numbered it
        self.wrote_at = -1e18  # monotonic time of the session's last write
        self.gtid_unknown = False  # the last write's server has no MariaDB GTIDs
        self.gtid_pending = False  # a write whose GTID is still to learn (at its commit)

    def rules(self, user: str, client: str, entrance: str) -> SessionRules | None:
        mode = self.mode
        if self._rules_version != mode.rules_version:  # a config change since the last look
            host = client.rpartition(":")[0].strip("[]") or client
            self._rules = mode.rules.for_session(user, host, entrance)
            self._rules_version = mode.rules_version
        return self._rules

    def plan(
        self,
        payload: bytes,
        effects: Effects,
        reads: bool,
        pool: str,
        schema: str,
        rules: SessionRules | None,
        free_to_move: bool,
        state: Callable[[], tuple[object, ...]],
    ) -> Plan:
        """Decide a COM_QUERY's or COM_STMT_PREPARE's fate. ``free_to_move``: the session
        holds no backend connection, is in no transaction and autocommits, so a read may
        go to a reader. ``state``: what else an answer depends on (login, schema,
        session variables), for a query cache key."""
        mode = self.mode
        text = payload[1:].decode("utf-8", "replace") if rules is not None else None
        digest_text = ""
        if mode.digests is not None or (rules is not None and rules.needs_digest):
            # As ProxySQL's query_digests_max_query_length: a 20 MiB INSERT is digested by
            # its head, not scanned whole for every statement.
            head_bytes = payload[1 : 1 + DIGEST_MAX_BYTES]
            if b"`" not in head_bytes and b"/*" not in head_bytes:
                # By shape: the same digest, and normalize's cache then serves statements
                # that differ only in numbers (a quoted name or a versioned comment may
                # hold digits the digest keeps).
                head_bytes = shape(head_bytes)
            digest_text = normalize(head_bytes.decode("utf-8", "replace"))
        plan = Plan(payload, effects, pool, reads=reads, digest_text=digest_text)
        if rules is not None and text is not None:
            decision = rules.decide(text, digest_text, schema)
            if decision.matched:
                self._apply(plan, decision, state)
                if plan.refusal is not None:
                    return plan
        plan.side = self.side_of(plan.pool, plan.reads, plan.decision, free_to_move)
        return plan

    def _apply(
        self, plan: Plan, decision: Decision, state: Callable[[], tuple[object, ...]]
    ) -> None:
        mode = self.mode
        plan.decision = decision
        for name in decision.rules:
            mode.counters.inc("query_rule_hits", rule=name)
        if decision.error:
            plan.refusal = err_payload(ER_NOT_ALLOWED_COMMAND, decision.error, "42000")
            return
        if decision.sql is not None:
            plan.payload = bytes((plan.payload[0],)) + decision.sql.encode()
            plan.effects = classify_bytes(plan.payload[1:])
            plan.reads = plan.effects.read
        if decision.pool:
            plan.pool = decision.pool
        if not decision.multiplex:
            pins = plan.effects.pins | {"query rule"}
            plan.effects = dataclasses.replace(plan.effects, pins=pins, read=False).settle()
        if decision.cache_ttl_s and plan.payload[0] == Command.QUERY and plan.reads:
            plan.cache_key = (*state(), plan.pool, plan.payload)

    def side_of(self, pool: str, reads: bool, decision: Decision, free_to_move: bool) -> str:
        """The side of a replication pool a statement goes to (any other pool: ANY)."""
        replication = self.mode.replication.get(pool)
        if replication is None:
            return Role.ANY
        if decision.route:
            return decision.route
        if not (reads and free_to_move):
            return Role.WRITER
        if replication.read_your_writes == "writer" or self.gtid_unknown:
            window_s = replication.writer_window_ms / 1000
            if time.monotonic() - self.wrote_at < window_s:
                return Role.WRITER
        return Role.READER

    def wrote(self) -> None:
        self.wrote_at = time.monotonic()
        self.gtid_pending = True

    def without_gtid(self) -> None:
        """The write went to a server without MariaDB GTIDs: "gtid" acts as "writer"."""
        self.gtid_unknown = True

    def learned(self, text: str) -> None:
        """The writer's number for the session's last write (``@@last_gtid``)."""
        gtid = Gtid.parse(text)
        if gtid is None:
            return
        known = self.gtid
        if known is None or known.domain != gtid.domain or known.sequence < gtid.sequence:
            self.gtid = gtid
