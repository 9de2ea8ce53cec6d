"""Query rules, compiled once per config: which rules a session's statements can meet, and
what a statement's matching rules decide.

A rule's static keys (user, client network, listener) are settled once per session by
``RuleSet.for_session``; per statement only the schema and the regexes are left. The
regexes of a session's rules are also joined into one alternation, searched once: when it
finds nothing, no rule that needs a match can apply, and 50 rules that do not match cost
one regex search instead of 50 (the hot path of a proxy with a firewall list).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from meshproxy.config import QueryRuleConfig

# ProxySQL matches case-insensitively by default (re_modifiers = CASELESS): so do we.
_FLAGS = re.IGNORECASE
# A back-reference counts groups: it would mean another group inside a joined regex.
_BACKREF = re.compile(r"\\[1-9]|\(\?P=")


@dataclass(frozen=True, slots=True)
class Decision:
    """What the matching rules of one statement say; the defaults change nothing."""

    pool: str = ""
    route: str = ""  # "writer" or "reader"
    sql: str | None = None  # rewritten text
    cache_ttl_s: float = 0.0
    mirror: str = ""
    error: str = ""
    timeout_s: float = 0.0
    multiplex: bool = True
    rules: tuple[str, ...] = ()  # the names of the rules that matched, in order

    @property
    def matched(self) -> bool:
        return bool(self.rules)


NO_DECISION = Decision()


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    config: QueryRuleConfig
    digest: re.Pattern[str] | None
    pattern: re.Pattern[str] | None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None

    def applies_to(self, user: str, client: str, listener: str) -> bool:
        """Whether the rule's static keys admit a session of this login and entrance."""
        c = self.config
        if not c.active or (c.user and c.user != user) or (c.listener and c.listener != listener):
            return False
        if self.network is None:
            return True
        try:
            return ipaddress.ip_address(client) in self.network
        except ValueError:
            return False

    def matches(self, sql: str, digest_text: str, schema: str) -> bool:
        c = self.config
        if c.schema and c.schema != schema:
            return False
        hit = (self.pattern is None or self.pattern.search(sql) is not None) and (
            self.digest is None or self.digest.search(digest_text) is not None
        )
        return hit != c.negate


@dataclass(slots=True)
class SessionRules:
    """The rules one session's statements can meet, with their joined prefilter."""

    rules: tuple[Rule, ...]
    needs_digest: bool
    # Rules without a regex, or negated ones, leave no shortcut; otherwise the joined
    # alternations of the rules' regexes rule out, in one search each, that any matches.
    _shortcut: bool = False
    _pattern_filter: re.Pattern[str] | None = None
    _digest_filter: re.Pattern[str] | None = None

    @classmethod
    def of(cls, rules: tuple[Rule, ...]) -> SessionRules:
        session = cls(rules, any(r.digest is not None for r in rules))
        always = any(r.config.negate or (r.pattern is None and r.digest is None) for r in rules)
        both = any(r.pattern is not None and r.digest is not None for r in rules)
        patterns = [r.pattern for r in rules if r.digest is None and r.pattern is not None]
        digests = [r.digest for r in rules if r.pattern is None and r.digest is not None]
        session._pattern_filter = _joined(patterns)
        session._digest_filter = _joined(digests)
        session._shortcut = (
            not always
            and not both
            and (not patterns or session._pattern_filter is not None)
            and (not digests or session._digest_filter is not None)
        )
        return session

    def decide(self, sql: str, digest_text: str, schema: str) -> Decision:
        """The decision of the session's rules for one statement (``sql`` as sent)."""
        if (
            self._shortcut
            and (self._pattern_filter is None or self._pattern_filter.search(sql) is None)
            and (self._digest_filter is None or self._digest_filter.search(digest_text) is None)
        ):
            return NO_DECISION
        decision: dict[str, object] = {}
        names: list[str] = []
        text = sql
        for rule in self.rules:
            if not rule.matches(text, digest_text, schema):
                continue
            names.append(rule.name)
            try:
                _apply(rule, text, decision)
            except (re.error, IndexError) as exc:  # a rewrite naming a group it lacks
                decision["error"] = f"meshproxy: query rule {rule.name!r} cannot rewrite: {exc}"
                break
            rewritten = decision.get("sql")
            if isinstance(rewritten, str):
                text = rewritten  # later rules see the rewritten text, as in ProxySQL
            if rule.config.then == "stop":
                break
        if not names:
            return NO_DECISION
        return Decision(rules=tuple(names), **decision)  # type: ignore[arg-type]


def _apply(rule: Rule, sql: str, decision: dict[str, object]) -> None:
    c = rule.config
    if c.pool:
        decision["pool"] = c.pool
    if c.route:
        decision["route"] = c.route
    if c.rewrite and rule.pattern is not None:
        decision["sql"] = rule.pattern.sub(c.rewrite, sql)
    if c.cache_ttl_ms:
        decision["cache_ttl_s"] = c.cache_ttl_ms / 1000
    if c.mirror:
        decision["mirror"] = c.mirror
    if c.error:
        decision["error"] = c.error
    if c.statement_timeout_ms:
        decision["timeout_s"] = c.statement_timeout_ms / 1000
    if not c.multiplex:
        decision["multiplex"] = False


def _joined(patterns: Sequence[re.Pattern[str] | None]) -> re.Pattern[str] | None:
    """One regex that finds something wherever one of ``patterns`` does (None: none)."""
    sources = [p.pattern for p in patterns if p is not None]
    if not sources or any(_BACKREF.search(s) for s in sources):
        return None
    try:
        return re.compile("|".join(f"(?:{s})" for s in sources), _FLAGS)
    except re.error:  # e.g. inline global flags, valid alone but not inside a group
        return None


class RuleSet:
    """Every ``[[query_rule]]``, compiled; sessions ask it for their own subset."""

    def __init__(self, configs: Sequence[QueryRuleConfig] = ()) -> None:
        self.configs = tuple(configs)
        self.rules = tuple(compile_rule(i, c) for i, c in enumerate(configs))
        self._sessions: dict[tuple[str, str, str], SessionRules | None] = {}

    def for_session(self, user: str, client: str, listener: str) -> SessionRules | None:
        """The rules a session can meet (None: none, the common case costs nothing)."""
        key = (user, client, listener)
        found = self._sessions.get(key, False)
        if found is not False:
            return found  # type: ignore[return-value]
        rules = tuple(r for r in self.rules if r.applies_to(user, client, listener))
        session = SessionRules.of(rules) if rules else None
        if len(self._sessions) < 4096:  # one entry per login x client x entrance
            self._sessions[key] = session
        return session


def compile_rule(index: int, config: QueryRuleConfig) -> Rule:
    """A rule ready to match (raises re.error or ValueError on a bad regex or network)."""
    network = ipaddress.ip_network(config.client, strict=False) if config.client else None
    return Rule(
        config.name or f"rule {index}",
        config,
        re.compile(config.match_digest, _FLAGS) if config.match_digest else None,
        re.compile(config.match_pattern, _FLAGS) if config.match_pattern else None,
        network,
    )
