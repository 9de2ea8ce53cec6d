"""Query rules: static filtering per session, matching, actions, chains and the prefilter."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.config import QueryRuleConfig
from meshproxy.routing.rules import NO_DECISION, Decision, RuleSet, SessionRules, required_word


def decide(rules: RuleSet, sql: str, digest: str = "", schema: str = "app") -> Decision:
    session = rules.for_session("u", "10.1.2.3", "l")
    return session.decide(sql, digest or sql, schema) if session else NO_DECISION


def test_no_rules_means_no_session_rules() -> None:
    """A config without rules gives sessions nothing to evaluate at all."""
    assert RuleSet().for_session("u", "10.0.0.1", "l") is None


def test_first_matching_rule_wins_and_stops() -> None:
    """The first rule that matches decides; later matching rules are not applied."""
    rules = RuleSet(
        [
            QueryRuleConfig(name="reads", match_pattern=r"^SELECT", pool="replicas"),
            QueryRuleConfig(name="all", match_pattern=r".", pool="other"),
        ]
    )
    decision = decide(rules, "select 1")
    assert decision.pool == "replicas"
    assert decision.rules == ("reads",)


def test_continue_lets_later_rules_add_actions() -> None:
    """A rule with then = "continue" keeps its actions and lets later rules add theirs."""
    rules = RuleSet(
        [
            QueryRuleConfig(name="tag", match_pattern="sbtest", cache_ttl_ms=500, then="continue"),
            QueryRuleConfig(name="route", match_pattern="^SELECT", route="reader"),
        ]
    )
    decision = decide(rules, "SELECT c FROM sbtest1")
    assert (decision.cache_ttl_s, decision.route, decision.rules) == (
        0.5,
        "reader",
        ("tag", "route"),
    )


def test_static_keys_filter_sessions() -> None:
    """User, client network and listener keys decide once per session whether a rule applies."""
    rules = RuleSet(
        [QueryRuleConfig(name="net", client="192.168.0.0/16", user="app", error="blocked")]
    )
    assert rules.for_session("app", "192.168.4.5", "l") is not None
    assert rules.for_session("app", "10.0.0.1", "l") is None
    assert rules.for_session("other", "192.168.4.5", "l") is None
    assert rules.for_session("app", "not-an-ip", "l") is None


def test_schema_and_digest_are_matched_per_statement() -> None:
    """Schema and digest keys are checked for every statement."""
    rules = RuleSet([QueryRuleConfig(match_digest=r"WHERE id = \?$", schema="shop", error="no")])
    assert decide(rules, "x", digest="SELECT c FROM t WHERE id = ?", schema="shop").error == "no"
    assert not decide(rules, "x", digest="SELECT c FROM t WHERE id = ?", schema="app").matched
    assert not decide(rules, "x", digest="SELECT c FROM t", schema="shop").matched


def test_negate_matches_what_the_regex_does_not() -> None:
    """negate = true turns a rule into "everything but" its regex."""
    rules = RuleSet([QueryRuleConfig(match_pattern="^SELECT", negate=True, route="writer")])
    assert decide(rules, "UPDATE t SET a = 1").route == "writer"
    assert not decide(rules, "SELECT 1").matched


def test_rewrite_replaces_and_later_rules_see_the_new_text() -> None:
    """A rewrite substitutes the pattern's matches, and later rules match the rewritten text."""
    rules = RuleSet(
        [
            QueryRuleConfig(
                match_pattern=r"FROM orders_old\b", rewrite="FROM orders", then="continue"
            ),
            QueryRuleConfig(match_pattern="FROM orders WHERE", statement_timeout_ms=250),
        ]
    )
    decision = decide(rules, "SELECT * FROM orders_old WHERE id = 1")
    assert decision.sql == "SELECT * FROM orders WHERE id = 1"
    assert decision.timeout_s == 0.25


def test_matching_is_case_insensitive_like_proxysql() -> None:
    """Regexes match regardless of case, as ProxySQL's default CASELESS modifier does."""
    rules = RuleSet([QueryRuleConfig(match_pattern="^select .* for update", multiplex=False)])
    assert decide(rules, "SELECT a FROM t FOR UPDATE").multiplex is False


@pytest.mark.parametrize(
    "pattern",
    [r"(a)\1", r"(?i)select", r"^SELECT x"],
)
def test_prefilter_never_hides_a_match(pattern: str) -> None:
    """The joined prefilter only rules out statements no rule matches, whatever the regexes."""
    configs = [QueryRuleConfig(match_pattern=f"^nothing{i}$", pool="p") for i in range(50)]
    configs.append(QueryRuleConfig(name="hit", match_pattern=pattern, pool="q"))
    rules = RuleSet(configs)
    sql = {"(a)\\1": "aa", "(?i)select": "SELECT 1", "^SELECT x": "SELECT x"}[pattern]
    assert decide(rules, sql).rules == ("hit",)
    assert not decide(rules, "DELETE FROM t").matched


def test_fifty_rules_that_do_not_match_decide_nothing() -> None:
    """A statement no rule matches gets the shared empty decision (no allocation)."""
    rules = RuleSet(
        [
            QueryRuleConfig(match_pattern=f"^SELECT .* FROM table_{i}\\b", pool="p")
            for i in range(50)
        ]
    )
    assert decide(rules, "SELECT c FROM sbtest1 WHERE id=1") is NO_DECISION


def test_inactive_rules_are_skipped() -> None:
    """A rule with active = false never applies."""
    rules = RuleSet([QueryRuleConfig(match_pattern=".", error="x", active=False)])
    assert rules.for_session("u", "10.0.0.1", "l") is None


def test_a_rewrite_that_cannot_apply_refuses_the_statement() -> None:
    """A rewrite naming a group its pattern lacks refuses the statement with why, and
    raises nothing (the session carries on)."""
    rules = RuleSet([QueryRuleConfig(name="bad", match_pattern="(SELECT)", rewrite="\\2")])
    decision = decide(rules, "SELECT 1")
    assert decision.error.startswith("meshproxy: query rule 'bad' cannot rewrite")


@pytest.mark.parametrize(
    ("pattern", "word"),
    [
        (r"^SELECT .* FROM no_such_table_3\b", "no_such_table_3"),
        (r"FROM\s+orders\b", "orders"),
        (r"WHERE id = \?$", "id"),
        (r"/\* writer \*/", "writer"),
        (r"^SELECT", ""),  # "SELECT" may be the start of "SELECTED"
        (r"xFROM orders", ""),  # nothing bounds "orders" on the right
        (r"a|b", ""),
        (r"\bsbtest\d+\b", ""),
    ],
)
def test_required_words(pattern: str, word: str) -> None:
    """A rule is keyed by the longest word every match must hold as a whole token."""
    assert required_word(pattern) == word


def test_a_rewrite_lets_rules_keyed_on_the_new_text_match() -> None:
    """Rules after a rewrite are tried on the rewritten text, whatever words it has."""
    rules = RuleSet(
        [
            QueryRuleConfig(match_pattern=r"\bold_t\b", rewrite="new_t", then="continue"),
            QueryRuleConfig(name="new", match_pattern=r"FROM new_t\b", pool="p"),
        ]
    )
    assert decide(rules, "SELECT * FROM old_t").pool == "p"


_PIECES = ["select", "from", "orders", "t1", "id", " ", "  ", ",", "=", "?", "1", "x_y"]
_REGEX_PIECES = [re.escape(p) for p in _PIECES] + [
    r"\s+",
    ".*",
    r"\b",
    "^",
    "$",
    r"\d+",
    "(?:a|orders)",
]


@settings(max_examples=300, deadline=None)
@given(
    patterns=st.lists(st.lists(st.sampled_from(_REGEX_PIECES), min_size=1, max_size=6), max_size=6),
    statement=st.lists(st.sampled_from(_PIECES), max_size=10),
)
def test_the_word_index_decides_as_trying_every_rule(
    patterns: list[list[str]], statement: list[str]
) -> None:
    """Skipping rules whose required word is absent never changes a decision."""
    configs = [
        QueryRuleConfig(name=f"r{i}", match_pattern="".join(p), pool="p", then="continue")
        for i, p in enumerate(patterns)
    ]
    rules = RuleSet(configs)
    session = rules.for_session("u", "10.0.0.1", "l")
    sql = "".join(statement)
    if session is None:
        return
    every = SessionRules(session.rules, False, {}, {}, tuple(range(len(session.rules))))
    assert session.decide(sql, sql, "s") == every.decide(sql, sql, "s")
