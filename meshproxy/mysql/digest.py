"""Query digests: a statement's text with its literal values taken out, and a short id of it.

``normalize`` gives the digest text ProxySQL and performance_schema show: string, number,
hex and bit literals become ``?`` (so do ``X'..'``, ``B'..'`` and ``N'..'``, and a minus
sign that negates a number rather than subtracts), ``NULL`` stays ``NULL``, a list of
literals ``IN (?, ?, ?)`` or ``VALUES (?, ?), (?, ?)`` becomes ``IN (...)`` / ``VALUES
(...)`` whatever its length (a list holding anything else, ``NULL`` or ``NOW()``, stays),
comments go, executable comments (``/*! */``, ``/*M! */``) keep what they hold without
their markers, whitespace runs fold to one space, and trailing semicolons go.
Double-quoted text is a string, as in MariaDB's default sql_mode (not ANSI_QUOTES), and
backslashes escape, as in the default sql_mode (not NO_BACKSLASH_ESCAPES). ``digest``
gives the id of a digest text: the first 8 bytes of its BLAKE2b hash, in hex.

Choices made for speed or plainness, all stable for a given statement text:

* Case is kept, keywords included: ``select`` and ``SELECT`` give two digests, as in
  ProxySQL with its default ``mysql-query_digests_lowercase=false``. Folding keywords
  alone needs a keyword lookup per word (a Python call per word, about doubling the cost),
  and folding every word would merge tables whose names differ only in case. An
  application sends each statement from one call site, spelled one way.
* Spacing is kept apart from folding runs: ``id=1`` and ``id = 1`` give two digests.
* Optimizer hints ``/*+ ... */`` are kept whole, literals inside included: they change
  the plan, so a hinted statement is another digest, and what they hold is not SQL.
* A character set introducer stays: ``_utf8mb4'a'`` gives ``_utf8mb4?``.
* Whitespace is what ``str.split`` splits at (Unicode whitespace, wider than MySQL's),
  also inside backquoted names: two names that differ only in their inner spacing share a
  digest text.

The scan is one regex pass with a callback per match (literal, comment, run of backquoted
names), then ``str.split`` for the whitespace, and a second regex pass only when there is
a list to collapse. Results are cached (``functools.lru_cache``, 4096 texts of at most 4096
characters): applications repeat short statements. ``normalize`` is idempotent on the
texts it returns for everyday SQL; ``tests/unit/test_digest.py`` shows where it is not.
"""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Final

# What a match becomes: ``?``, a space, the negated or subtracted number, itself, or a
# mark that takes the letter before it along (``X'0A'``: see _PREFIXED).
_LITERAL, _GAP, _MINUS, _KEEP, _PREFIX = range(5)

_NUMBER = (
    r"(?:0[xX][0-9a-fA-F]+|0[bB][01]+|(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)"
    r"(?![\w$])"  # a number glued to a letter is a name (``1st``)
)
_DIGITS_REST = r"[0-9]*(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?"  # after the first digit
_SINGLE = r"[^'\\]*(?:(?:\\.|'')[^'\\]*)*'?"  # after the quote; unterminated: to the end
_DOUBLE = r'[^"\\]*(?:(?:\\.|"")[^"\\]*)*"?'
_QUOTED_NAME = r"[^`]*(?:``[^`]*)*`?"
# Text after a backquoted name where no lexeme can start, up to the next name: ORMs quote
# every name, and one match for `t`.`a`, `t`.`b` FROM `t` is cheaper than one per name.
_PLAIN = r"""[^-'"`/*#.0-9]*+"""
_INERT = rf"{_PLAIN}(?:(?:\.(?![0-9])|\*(?!/)|/(?!\*)|-(?![-0-9.\s])){_PLAIN})*+"

# (first character, the rest with one group, what a match becomes). Each lexeme starts
# with a literal character, so the engine skips in C to where one can start, and tries
# only those whose character is there: over twice as fast as lexemes that start with a
# class or a look-behind. A literal may not follow a name character (sbtest1, t2.c3): the
# look-behinds check two characters back, the first one matched.
_LEXEMES = [
    ("0", r"(?<![\w$]0)([xX][0-9a-fA-F]+|[bB][01]+)(?![\w$])", _LITERAL),  # 0x1F, 0b101
    *(
        (d, rf"(?<![\w$]{d})(?<![\w$`]\.{d})({_DIGITS_REST})(?![\w$])", _LITERAL)
        for d in "0123456789"
    ),
    ("'", rf"(?<=[xXbBnN]')(?<![\w$][xXbBnN]')({_SINGLE})", _PREFIX),
    ("'", rf"({_SINGLE})", _LITERAL),
    ('"', rf"({_DOUBLE})", _LITERAL),
    ("`", rf"({_QUOTED_NAME}(?:{_INERT}`{_QUOTED_NAME})*)", _KEEP),
    (".", r"(?<![\w$`]\.)([0-9]+(?:[eE][-+]?[0-9]+)?)(?![\w$])", _LITERAL),
    ("-", r"(-(?=[\x00-\x20]|\Z)[^\n]*)", _GAP),  # -- comment
    ("-", rf"([ \t\n\r\f\v]*{_NUMBER})", _MINUS),
    ("#", r"([^\n]*)", _GAP),
    ("/", r"(\*\+.*?(?:\*/|\Z))", _KEEP),  # /*+ optimizer hints */
    ("/", r"(\*M?!(?:[0-9]{5,6})?)", _GAP),  # an executable comment's opening marker
    ("/", r"(\*.*?(?:\*/|\Z))", _GAP),  # /* comment */
    ("*", r"(/)", _GAP),  # the closing marker of an executable comment
]
_SCAN = re.compile("|".join(re.escape(c) + rest for c, rest, _ in _LEXEMES), re.DOTALL)
_KIND = (None, *(kind for _, _, kind in _LEXEMES))  # by group number
# A hex, bit or national string's letter goes with it. Its quote is where the match starts
# (letters as starts would slow every name down), so the match leaves a mark, and the
# letter and the mark become one ``?`` afterwards. A NUL in the text itself after such a
# letter, outside strings, would too: no SQL has one.
_MARK = "\x00"
_PREFIXED = re.compile(r"[xXbBnN]\x00")
# Lists of values, in a text already scanned: literals are ``?``, spaces single. As in
# _SCAN, each keyword starts with a literal character (IN, in, VALUES, values...).
_ROW = r"\( ?\?(?: ?, ?\?)* ?\)"
_LIST = re.compile(
    "|".join(
        rf"{first}(?<![\w$]{first})({rest}) ?{_ROW}{more}"
        for first, rest, more in (
            ("I", "[Nn]", ""),
            ("i", "[Nn]", ""),
            ("V", "[Aa][Ll][Uu][Ee][Ss]?", rf"(?: ?, ?{_ROW})*"),
            ("v", "[Aa][Ll][Uu][Ee][Ss]?", rf"(?: ?, ?{_ROW})*"),
        )
    )
)

_SPACE = " \t\n\r\f\v"
# After these a minus sign negates the number that follows it.
_OPERATORS = frozenset("-+*/%=<>!,(~^&|:;")
# After these keywords comes an operand: a minus sign there negates too.
_BEFORE_OPERAND = frozenset(
    [
        "SELECT",
        "WHERE",
        "AND",
        "OR",
        "XOR",
        "NOT",
        "BETWEEN",
        "CASE",
        "WHEN",
        "THEN",
        "ELSE",
        "DEFAULT",
        "INTERVAL",
        "LIMIT",
        "OFFSET",
        "BY",
        "DIV",
        "MOD",
        "LIKE",
        "IN",
        "ON",
        "HAVING",
        "RETURN",
        "SET",
        "VALUES",
        "VALUE",
        "DISTINCT",
    ]
)
_LONGEST = max(map(len, _BEFORE_OPERAND))
# Long statements (bulk inserts) are not kept in the caches: each would pin its text.
_CACHE_MAX_TEXT: Final = 4096


def _is_name(c: str) -> bool:
    return c.isalnum() or c in "_$"


def _negative(m: re.Match[str]) -> str:
    """A number after a minus sign: negated (one literal) unless the minus subtracts."""
    s = m.string
    i = m.start()
    while i and s[i - 1] in _SPACE:
        i -= 1
    if not i or s[i - 1] in _OPERATORS:
        return "?"
    j = i
    while j and i - j <= _LONGEST and _is_name(s[j - 1]):
        j -= 1
    if s[j:i].upper() in _BEFORE_OPERAND and not (j and _is_name(s[j - 1])):
        return "?"
    if s.endswith(("/*!", "/*M!"), 0, j):  # /*!40101 -1 */: the version is no operand
        return "?"
    return "- ?" if m.group()[1] in _SPACE else "-?"


def _replace(m: re.Match[str]) -> str:
    kind = _KIND[m.lastindex or 0]
    if kind == _LITERAL:
        return "?"
    if kind == _GAP:
        return " "
    if kind == _KEEP:
        return m.group()
    if kind == _MINUS:
        return _negative(m)
    return _MARK


def _collapse(m: re.Match[str]) -> str:
    return m.group()[0] + m.group(m.lastindex or 0) + " (...)"


def _normalize(sql: str) -> str:
    text = " ".join(_SCAN.sub(_replace, sql).split())
    if _MARK in text:
        text = _PREFIXED.sub("?", text)
    if "(?" in text or "( ?" in text:
        text = _LIST.sub(_collapse, text)
    return text.rstrip("; ")


_normalize_cached: Final = functools.lru_cache(maxsize=4096)(_normalize)


def normalize(sql: str) -> str:
    """The digest text of ``sql``: what stays when its literal values are taken out."""
    if len(sql) <= _CACHE_MAX_TEXT:
        return _normalize_cached(sql)
    return _normalize(sql)


def _digest(text: str) -> str:
    # surrogatepass: a text decoded with errors="surrogateescape" still hashes.
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


_digest_cached: Final = functools.lru_cache(maxsize=4096)(_digest)


def digest(text: str) -> str:
    """The id of a digest text (a ``normalize`` result): 16 hex digits, the same in every
    process and release."""
    if len(text) <= _CACHE_MAX_TEXT:
        return _digest_cached(text)
    return _digest(text)
