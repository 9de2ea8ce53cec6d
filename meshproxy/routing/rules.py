"""Query rules, compiled once per config: which rules a session's statements can meet, and
what a statement's matching rules decide.

A rule's static keys (user, client network, listener) are settled once per session by
``RuleSet.for_session``; per statement only the schema and the regexes are left. Most
rules' regexes need a whole word (``FROM orders\\b`` needs "orders"): such a rule is tried
only on statements that have that word, found in one split of the statement into words,
so 50 rules that do not match cost one ``findall`` and a set intersection rather than 50
regex searches (the hot path of a proxy with a firewall list).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from re import _constants as _c  # type: ignore[attr-defined]
from re import _parser  # type: ignore[attr-defined]  # CPython's own regex parser
from typing import Any

from meshproxy.config import QueryRuleConfig

# ProxySQL matches case-insensitively by default (re_modifiers = CASELESS): so do we.
_FLAGS = re.IGNORECASE
_WORD = re.compile(r"\w+")


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
    pattern_word: str = ""  # a whole word (lower case) every match of ``pattern`` holds
    digest_word: str = ""

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
    """The rules one session's statements can meet, indexed by the words they need."""

    rules: tuple[Rule, ...]
    needs_digest: bool
    # A rule whose regex needs a whole word (``FROM orders\b``: "orders") is tried only on
    # statements that have it; the others (negated, no regex, no such word) always are.
    _by_word: dict[str, tuple[int, ...]]
    _by_digest_word: dict[str, tuple[int, ...]]
    _always: tuple[int, ...]

    @classmethod
    def of(cls, rules: tuple[Rule, ...]) -> SessionRules:
        by_word: dict[str, list[int]] = {}
        by_digest_word: dict[str, list[int]] = {}
        always = []
        for i, rule in enumerate(rules):
            if rule.config.negate:
                always.append(i)
            elif rule.pattern_word:
                by_word.setdefault(rule.pattern_word, []).append(i)
            elif rule.digest_word:
                by_digest_word.setdefault(rule.digest_word, []).append(i)
            else:
                always.append(i)
        return cls(
            rules,
            any(r.digest is not None for r in rules),
            {w: tuple(ix) for w, ix in by_word.items()},
            {w: tuple(ix) for w, ix in by_digest_word.items()},
            tuple(always),
        )

    def _candidates(self, sql: str, digest_text: str) -> list[int]:
        found = set(self._always)
        for index, text in ((self._by_word, sql), (self._by_digest_word, digest_text)):
            if index:
                for word in index.keys() & _WORD.findall(text.lower()):
                    found.update(index[word])
        return sorted(found)

    def decide(self, sql: str, digest_text: str, schema: str) -> Decision:
        """The decision of the session's rules for one statement (``sql`` as sent)."""
        candidates = self._candidates(sql, digest_text)
        if not candidates:
            return NO_DECISION
        decision: dict[str, object] = {}
        names: list[str] = []
        text = sql
        i = 0
        while i < len(candidates):
            rule = self.rules[candidates[i]]
            i += 1
            if not rule.matches(text, digest_text, schema):
                continue
            names.append(rule.name)
            try:
                _apply(rule, text, decision)
            except (re.error, IndexError) as exc:  # a rewrite naming a group it lacks
                decision["error"] = f"meshproxy: query rule {rule.name!r} cannot rewrite: {exc}"
                break
            rewritten = decision.get("sql")
            if isinstance(rewritten, str) and rewritten != text:
                # Later rules see the rewritten text, as in ProxySQL; its words are new.
                text = rewritten
                candidates = candidates[:i] + list(range(candidates[i - 1] + 1, len(self.rules)))
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
        required_word(config.match_pattern),
        required_word(config.match_digest),
    )


def required_word(pattern: str) -> str:
    """The longest whole word (lower case) that every match of ``pattern`` contains, or "".

    Only the regex's top level is read: a run of word characters counts when what comes
    before and after it in the regex can only be a non-word character or an edge (a space,
    ``\\b``, ``^``, ``\\s+``, ...), so the word is a whole token of any matching text."""
    if not pattern:
        return ""
    items = list(_parser.parse(pattern, _FLAGS))
    best, i = "", 0
    while i < len(items):
        j = i
        while j < len(items) and items[j][0] is _c.LITERAL and _is_word(items[j][1]):
            j += 1
        if j > i and _bounds(items, i - 1) and _bounds(items, j):
            word = "".join(chr(code) for _, code in items[i:j]).lower()
            best = max(best, word, key=len)
        i = max(j, i + 1)
    return best


def _is_word(code: int) -> bool:
    return chr(code).isalnum() or code == 0x5F  # what \w matches


def _bounds(items: list[tuple[Any, Any]], k: int) -> bool:
    """Whether regex item ``k`` can only match a non-word character or an edge."""
    if not 0 <= k < len(items):
        return False  # the regex is searched: anything may stand next to what it matches
    op, arg = items[k]
    if op is _c.AT:
        return arg in (
            _c.AT_BEGINNING,
            _c.AT_BEGINNING_STRING,
            _c.AT_END,
            _c.AT_END_STRING,
            _c.AT_BOUNDARY,
        )
    if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
        low, _, inner = arg
        return bool(low >= 1 and len(inner) == 1 and _non_word(*next(iter(inner))))
    return _non_word(op, arg)


def _non_word(op: Any, arg: Any) -> bool:
    if op is _c.LITERAL:
        return not _is_word(arg)
    if op is _c.IN:  # a class of spaces and non-word literals only
        return all(
            (o is _c.CATEGORY and a in (_c.CATEGORY_SPACE, _c.CATEGORY_NOT_WORD))
            or (o is _c.LITERAL and not _is_word(a))
            for o, a in arg
        )
    return False
