"""What a statement does to its session: pins, tracked variables, schema, transactions.

Only what multiplexing needs is read, with one scan over the text with strings, quoted
names and comments blanked out (so an ``@`` in an e-mail address or a ``;`` in a literal
does not count). A statement that might do something we do not understand pins the
session to its backend connection: a false pin costs only multiplexing, a missed one would
let a client see another client's state.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

# Session variables meshproxy tracks: read back after a SET, restored on a backend switch.
TRACKED = (
    "autocommit",
    "sql_mode",
    "time_zone",
    "character_set_client",
    "character_set_connection",
    "character_set_results",
    "collation_connection",
    "transaction_isolation",
    "transaction_read_only",
    "sql_select_limit",
    "sql_auto_is_null",
    "sql_safe_updates",
    "group_concat_max_len",
    "foreign_key_checks",
    "unique_checks",
    "max_statement_time",
    "div_precision_increment",
    "lc_time_names",
    "sql_quote_show_create",
    "big_tables",
    "net_read_timeout",
    "net_write_timeout",
    "wait_timeout",
    "interactive_timeout",
    "lock_wait_timeout",
    "innodb_lock_wait_timeout",
)
_ALIASES = {
    "tx_isolation": "transaction_isolation",
    "tx_read_only": "transaction_read_only",
    "names": "character_set_client",
    "character": "character_set_client",
    "charset": "character_set_client",
}

# Blank out what must not be read as SQL: strings, quoted identifiers, comments.
_OPAQUE = re.compile(
    r"""'(?:[^'\\]|\\.|'')*'?"""  # 'string'
    r"""|"(?:[^"\\]|\\.|"")*"?"""  # "string"
    r"""|`(?:[^`]|``)*`?"""  # `name`
    r"""|/\*(?!!|M!).*?(?:\*/|$)"""  # /* comment */, but not /*! executable */
    r"""|(?:--[ \t]|\#)[^\n]*""",  # -- comment, # comment
    re.DOTALL,
)
# The markers of executable comments: what they hold runs, so it is read as SQL.
_EXECUTABLE = re.compile(r"/\*M?!\d*|\*/")
_USER_VARIABLE = re.compile(r"(?<![@\w$])@(?!@)")
_PIN_PATTERNS = (
    (re.compile(r"\bSQL_CALC_FOUND_ROWS\b", re.I), "sql_calc_found_rows"),
    (re.compile(r"\bGET_LOCK\s*\(", re.I), "get_lock"),
    (re.compile(r"\bCREATE\s+(?:OR\s+REPLACE\s+)?TEMPORARY\s+TABLE\b", re.I), "temporary table"),
    (re.compile(r"^\s*(?:PREPARE|EXECUTE|DEALLOCATE)\b", re.I), "sql prepared statement"),
    (re.compile(r"^\s*HANDLER\b", re.I), "handler"),
    (re.compile(r"^\s*(?:XA|SAVEPOINT)\b", re.I), "transaction"),
    (re.compile(r"^\s*SET\s+(?:ROLE|DEFAULT\s+ROLE)\b", re.I), "set role"),
    (
        re.compile(r"\bSESSION\s+STATUS\b|^\s*SHOW\s+(?:SESSION\s+)?STATUS\b", re.I),
        "session status",
    ),
)
_LOCK = re.compile(
    r"^\s*(?:LOCK\s+TABLES?\b|FLUSH\s+TABLES?\b.*\bWITH\s+READ\s+LOCK\b)", re.I | re.S
)
_UNLOCK = re.compile(r"^\s*UNLOCK\s+TABLES?\b", re.I)
_USE = re.compile(r"^\s*USE\b", re.I)
_SET = re.compile(r"^\s*SET\b", re.I)
_SET_STATEMENT = re.compile(r"^\s*SET\s+STATEMENT\b.*?\bFOR\b(.*)$", re.I | re.S)
# Connection ids are 64-bit: at most 20 ASCII digits (and int() refuses 4300 or more).
_KILL = re.compile(r"^\s*KILL\s+(?:(QUERY|CONNECTION)\s+)?(?:ID\s+)?([0-9]{1,20})\s*;?\s*$", re.I)
# LOAD {DATA | XML} [LOW_PRIORITY | CONCURRENT] [LOCAL] INFILE: not a later "@local" or column.
_LOAD_LOCAL = re.compile(
    r"^\s*LOAD\s+(?:DATA|XML)\s+(?:(?:LOW_PRIORITY|CONCURRENT)\s+)?LOCAL\b", re.I
)
_LAST_STATE = re.compile(r"\b(?:FOUND_ROWS|ROW_COUNT)\s*\(", re.I)
_LAST_INSERT_ID = re.compile(r"\bLAST_INSERT_ID\s*\(\s*\)", re.I)
_TRANSACTION = re.compile(
    r"^\s*(?:(BEGIN|START\s+TRANSACTION)|(COMMIT)|(ROLLBACK)(?!\s+TO\b))\b", re.I
)
# A read, for read/write split: a statement of these kinds that takes no lock, writes no
# file or variable and draws no sequence value. Anything else goes to the writer.
_READ = re.compile(r"^[\s(]*(?:SELECT|SHOW|DESC|DESCRIBE|EXPLAIN|WITH|VALUES|TABLE)\b", re.I)
_NOT_READ = re.compile(
    r"\bFOR\s+(?:UPDATE|SHARE)\b|\bLOCK\s+IN\s+SHARE\s+MODE\b|\bINTO\b"
    r"|\b(?:NEXTVAL|SETVAL|LASTVAL)\s*\(|\bNEXT\s+VALUE\s+FOR\b"
    r"|\b(?:INSERT|UPDATE|DELETE|REPLACE|CREATE|DROP|ALTER|GRANT|CALL)\b",
    re.I,
)


@dataclass
class Effects:
    """What running a statement means for its session, before and after it succeeds."""

    pins: set[str] = field(default_factory=set)  # pin reasons that last the session
    lock: bool = False  # LOCK TABLES / FTWRL: pinned until UNLOCK TABLES
    unlock: bool = False
    read_back: bool = False  # tracked variables or the schema may change: read them back
    multi: bool = False  # more than one statement in the text
    local_infile: bool = False
    last_state: bool = False  # reads FOUND_ROWS() or ROW_COUNT() of a previous statement
    last_insert_id: bool = False  # reads LAST_INSERT_ID()
    kill: tuple[bool, int] | None = None  # (query only, connection id the client saw)
    read: bool = False  # only reads: a replica may answer it (read/write split)
    transaction: str = ""  # "start", "commit" or "rollback": it writes nothing itself
    inert: bool = True  # none of the above: nothing to do before or after it

    def settle(self) -> Effects:
        self.inert = not (
            self.pins
            or self.lock
            or self.unlock
            or self.read_back
            or self.local_infile
            or self.last_state
            or self.last_insert_id
            or self.kill
        )
        return self


def blank(sql: str) -> str:
    """``sql`` with strings, quoted names and comments replaced by spaces (same length)."""
    text = _OPAQUE.sub(lambda m: " " * len(m.group()), sql)
    return _EXECUTABLE.sub(lambda m: " " * len(m.group()), text)


def split(sql: str) -> list[str]:
    """The statements of a (blanked) text, split at top-level semicolons."""
    return [part for part in sql.split(";") if part.strip()]


# Applications run the same statements over and over: their effects are computed once.
_CACHE_MAX_TEXT = 4096


@functools.lru_cache(maxsize=4096)
def _classify_cached(text: bytes) -> Effects:
    return classify(text.decode("utf-8", "replace"))


# A number standing alone (not part of a name like sbtest1, nor of 0x1f or 1.5e3's tail).
_NUMBER = re.compile(rb"(?<![\w$.])[0-9]+(?![\w$])")
_KILL_HEAD = re.compile(rb"\s*KILL\b", re.I)


def shape(text: bytes) -> bytes:
    """``text`` with every free-standing number as 0. Statements that differ only in their
    numbers (``WHERE id=5023``) have one shape, and what a statement does to its session
    and its digest are the same for all of them: the caches are keyed by shape."""
    return _NUMBER.sub(b"0", text)


def classify_bytes(text: bytes) -> Effects:
    """``classify`` of a statement as the client sent it. The result may be shared with
    other sessions: callers read it and never change it."""
    if len(text) <= _CACHE_MAX_TEXT:
        if _KILL_HEAD.match(text):  # its number is the connection to kill
            return _classify_cached(text)
        return _classify_cached(shape(text))
    return classify(text.decode("utf-8", "replace"))


def classify(sql: str) -> Effects:
    """The effects of the text of one COM_QUERY (it may hold several statements)."""
    effects = Effects()
    text = blank(sql)
    parts = split(text)
    effects.multi = len(parts) > 1
    for part in parts:
        _one(part, effects)
    if effects.multi:
        effects.transaction = ""  # "BEGIN; INSERT ...": it writes
    effects.read = (
        len(parts) == 1
        and _READ.match(parts[0]) is not None
        and _NOT_READ.search(parts[0]) is None
        and not effects.pins
    )
    return effects.settle()


def _one(text: str, effects: Effects) -> None:
    inner = _SET_STATEMENT.match(text)
    if inner:  # SET STATEMENT var=value FOR stmt: the setting lasts one statement
        text = inner.group(1)
    if _USER_VARIABLE.search(text):
        effects.pins.add("user variable")
    for pattern, reason in _PIN_PATTERNS:
        if pattern.search(text):
            effects.pins.add(reason)
    if _LOCK.match(text):
        effects.lock = True
    elif _UNLOCK.match(text):
        effects.unlock = True
    elif _USE.match(text):
        effects.read_back = True
    elif _SET.match(text) and not inner:
        _set(text, effects)
    if _LOAD_LOCAL.match(text):
        effects.local_infile = True
    if _LAST_STATE.search(text):
        effects.last_state = True
    if _LAST_INSERT_ID.search(text):
        effects.last_insert_id = True
    control = _TRANSACTION.match(text)
    if control and control.lastindex:
        effects.transaction = ("start", "commit", "rollback")[control.lastindex - 1]
    kill = _KILL.match(text)
    if kill:
        effects.kill = ((kill.group(1) or "").upper() == "QUERY", int(kill.group(2)))


def _set(text: str, effects: Effects) -> None:
    """SET assignments: tracked ones are read back, anything else pins."""
    body = text.strip()[3:]
    for assignment in _top_level(body):
        words = assignment.strip().split(None, 2)
        if not words:
            continue
        head = words[0].lower()
        if head in ("global", "@@global") or head.startswith("@@global."):
            continue  # not this session's
        if head == "transaction":
            effects.pins.add("set transaction")  # the next transaction only
            continue
        if head in ("session", "local") and len(words) > 1:
            head = words[1].lower()
            if head.startswith("transaction"):
                effects.read_back = True
                continue
        name = re.split(r"[\s=:]", head.removeprefix("@@session.").removeprefix("@@local."))[0]
        name = name.removeprefix("@@")
        if head.startswith("@") and not head.startswith("@@"):
            continue  # a user variable: already pinned
        name = _ALIASES.get(name, name)
        if name in TRACKED or name == "password":
            effects.read_back = True
        else:
            effects.pins.add("untracked set")


def _top_level(body: str) -> list[str]:
    """Comma-separated parts of a (blanked) text, ignoring commas inside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(body):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    return parts
