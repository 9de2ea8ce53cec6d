"""Digest texts and ids: sysbench's statements, the lexical corners, and properties."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.mysql.digest import digest, normalize

# Values as sysbench 1.0.20 makes them: c is 10 groups of 11 digits, pad 5 groups.
C = (
    "46803424218-46301832290-84879914938-85522552349-87468768150-"
    "97143164338-17423314421-62620456861-28508937339-86595998527"
)
PAD = "91156376392-50866454447-60224167789-95100786075-22930605189"


def sysbench_bulk_insert(rows: int) -> str:
    """The statement ``sysbench prepare`` fills a table with (oltp_common.lua, auto_inc)."""
    values = ",".join(f"({500 + i % 7}, '{C}', '{PAD}')" for i in range(rows))
    return "INSERT INTO sbtest1(k, c, pad) VALUES" + values


# Every statement sysbench 1.0.20 sends with --db-ps-mode=disable, as a MariaDB general
# log recorded them (oltp_read_write, _read_only, _write_only, _point_select, _insert,
# _delete, _update_index, _update_non_index, select_random_points, select_random_ranges,
# prepare, prewarm and cleanup), with the digest text each must have.
SYSBENCH = [
    ("SET NAMES utf8mb4", "SET NAMES utf8mb4"),
    ("SET AUTOCOMMIT = 0", "SET AUTOCOMMIT = ?"),
    (
        "CREATE TABLE sbtest1(\n  id INTEGER NOT NULL AUTO_INCREMENT,\n"
        "  k INTEGER DEFAULT '0' NOT NULL,\n  c CHAR(120) DEFAULT '' NOT NULL,\n"
        "  pad CHAR(60) DEFAULT '' NOT NULL,\n  PRIMARY KEY (id)\n) /*! ENGINE = innodb */",
        "CREATE TABLE sbtest1( id INTEGER NOT NULL AUTO_INCREMENT, k INTEGER DEFAULT ? NOT "
        "NULL, c CHAR(?) DEFAULT ? NOT NULL, pad CHAR(?) DEFAULT ? NOT NULL, PRIMARY KEY (id) "
        ") ENGINE = innodb",
    ),
    (sysbench_bulk_insert(3), "INSERT INTO sbtest1(k, c, pad) VALUES (...)"),
    ("CREATE INDEX k_1 ON sbtest1(k)", "CREATE INDEX k_1 ON sbtest1(k)"),
    ("BEGIN", "BEGIN"),
    ("SELECT c FROM sbtest1 WHERE id=503", "SELECT c FROM sbtest1 WHERE id=?"),
    (
        "SELECT c FROM sbtest1 WHERE id BETWEEN 500 AND 599",
        "SELECT c FROM sbtest1 WHERE id BETWEEN ? AND ?",
    ),
    (
        "SELECT SUM(k) FROM sbtest1 WHERE id BETWEEN 503 AND 602",
        "SELECT SUM(k) FROM sbtest1 WHERE id BETWEEN ? AND ?",
    ),
    (
        "SELECT c FROM sbtest1 WHERE id BETWEEN 504 AND 603 ORDER BY c",
        "SELECT c FROM sbtest1 WHERE id BETWEEN ? AND ? ORDER BY c",
    ),
    (
        "SELECT DISTINCT c FROM sbtest1 WHERE id BETWEEN 504 AND 603 ORDER BY c",
        "SELECT DISTINCT c FROM sbtest1 WHERE id BETWEEN ? AND ? ORDER BY c",
    ),
    ("UPDATE sbtest1 SET k=k+1 WHERE id=498", "UPDATE sbtest1 SET k=k+? WHERE id=?"),
    (f"UPDATE sbtest1 SET c='{C}' WHERE id=498", "UPDATE sbtest1 SET c=? WHERE id=?"),
    ("DELETE FROM sbtest1 WHERE id=498", "DELETE FROM sbtest1 WHERE id=?"),
    (
        f"INSERT INTO sbtest1 (id, k, c, pad) VALUES (498, 502, '{C}', '{PAD}')",
        "INSERT INTO sbtest1 (id, k, c, pad) VALUES (...)",
    ),
    # oltp_insert with --auto-inc=off: a unique uint32 less 2^31, often negative.
    (
        f"INSERT INTO sbtest1 (id, k, c, pad) VALUES (-2147482612, 503, '{C}', '{PAD}')",
        "INSERT INTO sbtest1 (id, k, c, pad) VALUES (...)",
    ),
    ("COMMIT", "COMMIT"),
    (
        "SELECT id, k, c, pad\n          FROM sbtest1\n"
        "          WHERE k IN (499, 502, 501, 445, 500, 501, 503, 499, 448, 502)",
        "SELECT id, k, c, pad FROM sbtest1 WHERE k IN (...)",
    ),
    (
        "SELECT count(k)\n          FROM sbtest1\n          WHERE "
        + " OR ".join(f"k BETWEEN {k} AND {k + 5}" for k in (497, 515, 409, 500, 499)),
        "SELECT count(k) FROM sbtest1 WHERE " + " OR ".join(["k BETWEEN ? AND ?"] * 5),
    ),
    ("SET tmp_table_size=2*1024*1024*1024", "SET tmp_table_size=?*?*?*?"),
    ("SET max_heap_table_size=2*1024*1024*1024", "SET max_heap_table_size=?*?*?*?"),
    ("ANALYZE TABLE sbtest1", "ANALYZE TABLE sbtest1"),
    (
        "SELECT AVG(id) FROM (SELECT * FROM sbtest1 FORCE KEY (PRIMARY) LIMIT 1000) t",
        "SELECT AVG(id) FROM (SELECT * FROM sbtest1 FORCE KEY (PRIMARY) LIMIT ?) t",
    ),
    (
        "SELECT COUNT(*) FROM (SELECT * FROM sbtest1 WHERE k LIKE '%0%' LIMIT 1000) t",
        "SELECT COUNT(*) FROM (SELECT * FROM sbtest1 WHERE k LIKE ? LIMIT ?) t",
    ),
    ("DROP TABLE IF EXISTS sbtest1", "DROP TABLE IF EXISTS sbtest1"),
    # The same statements with prepared statements (--db-ps-mode=auto): placeholders.
    ("SELECT c FROM sbtest1 WHERE id=?", "SELECT c FROM sbtest1 WHERE id=?"),
    (
        "INSERT INTO sbtest1 (id, k, c, pad) VALUES (?, ?, ?, ?)",
        "INSERT INTO sbtest1 (id, k, c, pad) VALUES (...)",
    ),
]

CORNERS = [
    # comments, multi-line
    (
        "/* app=shop */ SELECT a, -- the first\n  b # the second\n FROM t /* where */ WHERE a=1",
        "SELECT a, b FROM t WHERE a=?",
    ),
    ("SELECT 1 /* unterminated", "SELECT ?"),
    ("SELECT 1 -- to the end", "SELECT ?"),
    ("SELECT a--1 FROM t", "SELECT a-? FROM t"),  # no space after --: a minus -1
    ("SELECT '-- not a comment', \"/* nor this */\"", "SELECT ?, ?"),
    # executable comments keep what they hold; hints stay whole
    ("/*!40101 SET NAMES utf8 */", "SET NAMES utf8"),
    ("CREATE TABLE t (a INT) /*M!100100 ENGINE=Aria */", "CREATE TABLE t (a INT) ENGINE=Aria"),
    (
        "SELECT /*+ MAX_EXECUTION_TIME(1000)   BKA(t1) */ a FROM t1 WHERE b=2",
        "SELECT /*+ MAX_EXECUTION_TIME(1000) BKA(t1) */ a FROM t1 WHERE b=?",
    ),
    # strings: escapes, doubled quotes, double quotes, unterminated, introducers
    (r"SELECT 'it\'s', 'it''s', 'a\\', 'x' FROM t", "SELECT ?, ?, ?, ? FROM t"),
    ('SELECT "say \\"hi\\"", "a""b"', "SELECT ?, ?"),
    ("SELECT 'unterminated, 1, 2", "SELECT ?"),
    ("SELECT N'abc', X'0A1B', x'', B'0101', b'1'", "SELECT ?, ?, ?, ?, ?"),
    ("SELECT _utf8mb4'abc'", "SELECT _utf8mb4?"),  # the character set stays
    # numbers
    ("SELECT 1, 2.5, .5, 3., 1e10, 1.5E-3, 0x1F, 0b101, 1e+9", "SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?"),
    (
        "SELECT -1, - 2, a-3, a - 4, a -5, (-6), x=-7, x = - 8",
        "SELECT ?, ?, a-?, a - ?, a -?, (?), x=?, x = ?",
    ),
    (
        "SELECT a FROM t WHERE b BETWEEN -10 AND -1 LIMIT 5",
        "SELECT a FROM t WHERE b BETWEEN ? AND ? LIMIT ?",
    ),
    ("SELECT 5-3, 5--3, 5 - -3", "SELECT ?-?, ?-?, ? - ?"),
    ("SELECT 1abc, abc1, t2.c3, t.5, $1, @a1, @@max_connections", None),
    ("SELECT 0xZZ, 12e, 1_000", None),  # names, not numbers
    # names
    (
        "SELECT `sbtest1`.`c2` FROM `db 1`.`t``1` WHERE `x`=1",
        "SELECT `sbtest1`.`c2` FROM `db 1`.`t``1` WHERE `x`=?",
    ),
    ("SELECT `a` = 5 AND `b`=X'0A' OR `c`.5", "SELECT `a` = ? AND `b`=? OR `c`.5"),
    ("SELECT `unterminated 1", "SELECT `unterminated 1"),
    (
        "SELECT `t0`.`id`, `t0`.`name` FROM `users` AS `t0` WHERE `t0`.`id` IN (17, 18) LIMIT 21",
        "SELECT `t0`.`id`, `t0`.`name` FROM `users` AS `t0` WHERE `t0`.`id` IN (...) LIMIT ?",
    ),
    # placeholders, NULL, keywords' case, trailing semicolons
    ("SELECT ?", "SELECT ?"),
    ("SELECT a FROM t WHERE b IS NULL AND c = NULL", None),
    ("select C from T where ID = 1", "select C from T where ID = ?"),
    ("SELECT 1;", "SELECT ?"),
    ("SELECT 1 ; ;\n", "SELECT ?"),
    ("SELECT 1; SELECT 'a'", "SELECT ?; SELECT ?"),
    # lists
    ("SELECT * FROM t WHERE a IN (1)", "SELECT * FROM t WHERE a IN (...)"),
    ("SELECT * FROM t WHERE a in( 'x' , -2 ,?)", "SELECT * FROM t WHERE a in (...)"),
    (
        "SELECT * FROM t WHERE a NOT IN (1, 2) AND b IN (SELECT c FROM u)",
        "SELECT * FROM t WHERE a NOT IN (...) AND b IN (SELECT c FROM u)",
    ),
    ("SELECT * FROM t WHERE a IN (1, NULL)", "SELECT * FROM t WHERE a IN (?, NULL)"),
    ("SELECT a IN (1), (2) FROM t", "SELECT a IN (...), (?) FROM t"),
    ("INSERT INTO t VALUES (1,'a'),(2,'b'), ( 3 , 'c' )", "INSERT INTO t VALUES (...)"),
    ("INSERT INTO t VALUE (1)", "INSERT INTO t VALUE (...)"),
    ("insert into t values (1, now()), (2, now())", "insert into t values (?, now()), (?, now())"),
    (
        "INSERT INTO t (a) VALUES (1),(2) ON DUPLICATE KEY UPDATE a=VALUES(a)+1",
        "INSERT INTO t (a) VALUES (...) ON DUPLICATE KEY UPDATE a=VALUES(a)+?",
    ),
    # whitespace
    ("  SELECT\t1,\r\n\n  2  ", "SELECT ?, ?"),
    ("", ""),
    (" \n ", ""),
]


@pytest.mark.parametrize(("sql", "expected"), SYSBENCH)
def test_sysbench_statements(sql: str, expected: str) -> None:
    """Every statement sysbench sends has the digest text ProxySQL would show."""
    assert normalize(sql) == expected


def test_sysbench_values_share_digests() -> None:
    """Two runs of each sysbench statement, with other values, share one digest."""
    pairs = [
        ("SELECT c FROM sbtest1 WHERE id=503", "SELECT c FROM sbtest1 WHERE id=49"),
        (
            f"INSERT INTO sbtest1 (id, k, c, pad) VALUES (0, 503, '{C}', '{PAD}')",
            f"INSERT INTO sbtest1 (id, k, c, pad) VALUES (-7, 1, '{PAD}', '{C}')",
        ),
        (sysbench_bulk_insert(2), sysbench_bulk_insert(1000)),
        (
            "SELECT id FROM sbtest1 WHERE k IN (499, 502)",
            "SELECT id FROM sbtest1 WHERE k IN (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)",
        ),
    ]
    for one, other in pairs:
        assert digest(normalize(one)) == digest(normalize(other))


@pytest.mark.parametrize(("sql", "expected"), CORNERS)
def test_corners(sql: str, expected: str | None) -> None:
    """Each corner of the lexer gives its digest text (None: the statement is unchanged)."""
    assert normalize(sql) == (sql if expected is None else expected)


def test_in_lists_of_any_length_share_a_digest() -> None:
    """IN lists of 1 to 50 values, of any kind, give one digest text."""
    kinds = ["7", "'x'", "-1.5", "?", "0x1F"]
    lists = [", ".join(kinds[i % len(kinds)] for i in range(n)) for n in range(1, 51)]
    texts = {normalize(f"SELECT * FROM t WHERE a IN ({values})") for values in lists}
    assert texts == {"SELECT * FROM t WHERE a IN (...)"}


def test_long_statements_are_normalized_uncached() -> None:
    """A statement past the cache's length limit is normalized the same way."""
    sql = sysbench_bulk_insert(1000)
    assert len(sql) > 100_000
    assert normalize(sql) == "INSERT INTO sbtest1(k, c, pad) VALUES (...)"
    assert normalize("SELECT " + "a + " * 2000 + "1") == "SELECT " + "a + " * 2000 + "?"


def test_digest_is_16_hex_and_stable() -> None:
    """A digest id is 16 hex digits and does not change across processes or releases."""
    assert digest("SELECT c FROM sbtest1 WHERE id=?") == "5ea8cc1fbf35be09"
    assert re.fullmatch(r"[0-9a-f]{16}", digest(""))
    assert digest("SELECT ?") != digest("SELECT ? ")
    long = "SELECT " + "?," * 5000 + "?"
    assert digest(long) == digest(long[:-1] + "?")


# ----------------------------------------------------------------- properties

# Text built from what the lexer cares about, glued in any order.
LEXICAL = st.lists(
    st.sampled_from(
        [*"ab1 0x.-'\"`/*#\n\\?(),=;N$@\x00é", "IN", "VALUES", "--", "/*", "*/", "/*!", "/*+"]
    ),
    max_size=30,
).map("".join)
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()))


@settings(max_examples=500)
@given(st.one_of(ANY_TEXT, LEXICAL))
def test_never_raises(sql: str) -> None:
    """Any text, unterminated strings and comments and lone surrogates included, gives a
    digest text with single spaces and no ends of blanks, and a digest id."""
    text = normalize(sql)
    assert " ".join(text.split()) == text
    assert len(digest(text)) == 16


def _string(body: str) -> str:
    return "'" + body.replace("\\", "\\\\").replace("'", "''") + "'"


LITERAL = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(max_size=20).map(_string),
    st.text(max_size=20).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    st.binary(max_size=8).map(lambda b: f"X'{b.hex()}'"),
    st.integers(min_value=0, max_value=2**64).map(hex),
    st.just("?"),
)
# Statements with slots for literals, each after an operator, comma, paren or keyword
# (comments hold no literals: what they hold is not SQL).
TEMPLATES = [
    "SELECT c FROM sbtest1 WHERE id={}",
    "SELECT {} , a-{} FROM t2 WHERE b BETWEEN {} AND {} LIMIT {}",
    "UPDATE `t 1` SET c={}, d = {} WHERE e IN ({}, {}, {}) -- a note\n",
    "INSERT INTO t VALUES ({}, {}),({}, {}) /* rows */",
    "SELECT /*!40101 {} + */ f({}) # done",
]


@settings(max_examples=300)
@given(st.sampled_from(TEMPLATES), st.data())
def test_literals_do_not_change_the_digest(template: str, data: st.DataObject) -> None:
    """Statements that differ only in their literal values share their digest text."""
    slots = template.count("{}")
    one = template.format(*data.draw(st.lists(LITERAL, min_size=slots, max_size=slots)))
    other = template.format(*data.draw(st.lists(LITERAL, min_size=slots, max_size=slots)))
    assert normalize(one) == normalize(other)


# Everyday SQL: tokens with a space between them.
WORDS = ["SELECT", "FROM", "WHERE", "AND", "IN", "VALUES", "NULL", "LIMIT", "IN (1, 2)"]
NAMES = ["t1", "c_2", "x", "N", "@v", "?"]
OPERATORS = ["=", "<=", "+", "-", "*", "/", ",", "(", ")", ";"]
TOKEN = st.one_of(
    st.sampled_from(WORDS + NAMES + OPERATORS),
    LITERAL,
    st.text(max_size=10).map(lambda s: "`" + s.replace("`", "``") + "`"),
    st.text(max_size=10).map(lambda s: "/* " + s.replace("*/", "") + " */"),
    st.text(max_size=10).map(lambda s: "-- " + s.replace("\n", "") + "\n"),
    st.text(max_size=10).map(lambda s: "/*+ " + s.replace("*/", "") + " */"),
)
EVERYDAY = st.lists(TOKEN, max_size=25).map(" ".join)


@settings(max_examples=500)
@given(EVERYDAY)
def test_idempotent_on_everyday_sql(sql: str) -> None:
    """A digest text of everyday SQL is its own digest text."""
    text = normalize(sql)
    assert normalize(text) == text


@pytest.mark.parametrize(
    ("sql", "once", "twice"),
    [
        ("a--#\n", "a--", "a"),  # minus signs, then a comment: at the end, -- opens one
        ("a--/**/b", "a-- b", "a"),
        ("SELECT .0.0", "SELECT ?.0", "SELECT ??"),  # not a number MySQL would read
    ],
)
def test_where_idempotence_fails(sql: str, once: str, twice: str) -> None:
    """Removing a comment right after ``--`` makes a comment of it, and dotted digit runs
    read differently once the first number is a ``?``: both only in SQL nobody writes."""
    assert normalize(sql) == once
    assert normalize(once) == twice
