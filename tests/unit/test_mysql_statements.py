"""Classifying SQL: pins, tracked variables, locks, KILL and LOCAL INFILE."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.mysql.digest import normalize
from meshproxy.mysql.statements import (
    TRACKED,
    Effects,
    blank,
    classify,
    classify_bytes,
    shape,
    split,
)


def pins(sql: str) -> set[str]:
    return classify(sql).pins


# ----------------------------------------------------------------- blanking


def test_blank_keeps_length_and_sql() -> None:
    """Strings, quoted names and comments become spaces; the rest stays where it was."""
    sql = "SELECT 'a;b', \"c@d\", `e``f` /* @x; */ FROM t -- @y;\n# @z\nWHERE 1"
    text = blank(sql)
    assert len(text) == len(sql)
    assert "@" not in text
    assert ";" not in text
    assert text.split() == ["SELECT", ",", ",", "FROM", "t", "WHERE", "1"]


def test_blank_handles_escapes_and_doubled_quotes() -> None:
    """Backslash escapes and doubled quotes stay inside their string."""
    assert blank(r"'it\'s; @x' ; @y").strip() == "; @y"
    assert blank("'it''s; @x' ; @y").strip() == "; @y"
    assert blank("'unterminated; @x").strip() == ""


def test_blank_opens_executable_comments() -> None:
    """An executable comment's markers are blanked and what it holds is kept as SQL."""
    assert blank("/*!40101 SET NAMES utf8 */").split() == ["SET", "NAMES", "utf8"]
    assert blank("/*M!100100 SET @x = 1 */").split() == ["SET", "@x", "=", "1"]
    assert blank("/*!40101 SET NAMES 'a;b' */").split() == ["SET", "NAMES"]


@settings(max_examples=300, deadline=None)
@given(sql=st.text(max_size=200))
def test_blank_never_changes_length(sql: str) -> None:
    """Blanking keeps every offset in place, for any text."""
    assert len(blank(sql)) == len(sql)


def test_split_ignores_empty_statements() -> None:
    """Only statements with something in them count."""
    assert split("SELECT 1; ;SELECT 2;  ") == ["SELECT 1", "SELECT 2"]
    assert split("  ") == []


# ----------------------------------------------------------------- user variables


@pytest.mark.parametrize(
    "sql",
    [
        "SET @x = 1",
        "SELECT @x",
        "SELECT a INTO @x FROM t",
        "select 1, @`quoted name`",
        "SELECT @x:=1",
        "/*!40101 SET @OLD_CHARACTER_SET_CLIENT=@@CHARACTER_SET_CLIENT */",
        "SELECT 1; SELECT @x",
    ],
)
def test_user_variables_pin(sql: str) -> None:
    """A user variable anywhere in the SQL pins the session."""
    assert "user variable" in pins(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 'me@example.com'",
        'SELECT "@x"',
        "SELECT `a@b` FROM t",
        "SELECT 1 /* @x */",
        "SELECT 1 -- @x",
        "SELECT 1 # @x",
        "SELECT @@version",
        "SELECT @@session.sql_mode, @@global.max_connections",
    ],
)
def test_no_user_variable_in_strings_comments_or_system_variables(sql: str) -> None:
    """An '@' in a string, name or comment, or of a system variable, does not pin."""
    assert classify(sql) == Effects(read=True)


# ----------------------------------------------------------------- SET


@pytest.mark.parametrize(
    "sql",
    [
        "SET autocommit = 0",
        "SET autocommit=1",
        "set @@autocommit := 1",
        "SET SESSION sql_mode = 'ANSI'",
        "SET LOCAL time_zone = '+00:00'",
        "SET @@session.time_zone = 'UTC'",
        "SET @@local.wait_timeout = 10",
        "SET NAMES utf8mb4",
        "SET NAMES utf8mb4 COLLATE utf8mb4_bin",
        "SET CHARACTER SET latin1",
        "SET CHARSET latin1",
        "SET tx_isolation = 'READ-COMMITTED'",
        "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
        "SET SESSION TRANSACTION READ ONLY",
        "SET autocommit = 0, sql_mode = CONCAT(@@sql_mode, ',STRICT_ALL_TABLES')",
        "/*!40101 SET NAMES utf8 */",
        "/*!40014 SET FOREIGN_KEY_CHECKS=0 */",
        "SET sql_mode = ''; SET time_zone = 'UTC'",
        "USE shop",
    ],
)
def test_tracked_settings_are_read_back(sql: str) -> None:
    """SET of tracked session variables (or USE) reads state back and pins nothing."""
    effects = classify(sql)
    assert effects.read_back
    assert effects.pins == set()


@pytest.mark.parametrize(
    "sql",
    [
        "SET sort_buffer_size = 1 << 20",
        "SET SESSION optimizer_switch = 'index_merge=off'",
        "SET @@session.optimizer_search_depth = 3",
        "SET autocommit = 0, sql_log_bin = 0",
    ],
)
def test_untracked_settings_pin(sql: str) -> None:
    """SET of a session variable meshproxy does not track pins the session."""
    assert "untracked set" in pins(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SET GLOBAL max_connections = 500",
        "SET @@global.sort_buffer_size = 1",
        "SET @@GLOBAL.sort_buffer_size = 1",
        "SET GLOBAL TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    ],
)
def test_global_settings_neither_pin_nor_read_back(sql: str) -> None:
    """SET GLOBAL changes no session state."""
    assert classify(sql) == Effects()


def test_set_transaction_pins_but_set_session_transaction_is_read_back() -> None:
    """SET TRANSACTION lasts one transaction (a pin); SET SESSION TRANSACTION is tracked."""
    plain = classify("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
    assert plain.pins == {"set transaction"}
    assert not plain.read_back
    session = classify("SET SESSION TRANSACTION ISOLATION LEVEL SERIALIZABLE")
    assert session.pins == set()
    assert session.read_back


def test_set_of_a_user_variable_and_a_tracked_one() -> None:
    """Mixed assignments pin for the user variable and read back the tracked one."""
    effects = classify("SET @a = 1, autocommit = 0")
    assert effects.pins == {"user variable"}
    assert effects.read_back


def test_set_statement_for_lasts_one_statement() -> None:
    """SET STATEMENT ... FOR classifies only the inner statement."""
    assert classify("SET STATEMENT max_statement_time=1 FOR SELECT * FROM t") == Effects()
    assert "user variable" in pins("SET STATEMENT sort_buffer_size=1 FOR SELECT @x")


def test_tracked_names_include_the_charset_variables() -> None:
    """SET NAMES's effects are tracked: the charset variables are among TRACKED."""
    assert {"character_set_client", "collation_connection", "autocommit"} <= set(TRACKED)


# ----------------------------------------------------------------- pins


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SELECT SQL_CALC_FOUND_ROWS * FROM t LIMIT 10", "sql_calc_found_rows"),
        ("select sql_calc_found_rows id from t", "sql_calc_found_rows"),
        ("SELECT GET_LOCK('job', 10)", "get_lock"),
        ("SELECT get_lock ('job', 10)", "get_lock"),
        ("CREATE TEMPORARY TABLE tmp (id INT)", "temporary table"),
        ("create temporary table if not exists tmp (id INT)", "temporary table"),
        ("CREATE OR REPLACE TEMPORARY TABLE tmp AS SELECT 1", "temporary table"),
        ("PREPARE s FROM 'SELECT 1'", "sql prepared statement"),
        ("EXECUTE s", "sql prepared statement"),
        ("DEALLOCATE PREPARE s", "sql prepared statement"),
        ("HANDLER t OPEN", "handler"),
        ("XA START 'x'", "transaction"),
        ("SAVEPOINT a", "transaction"),
        ("SET ROLE admin", "set role"),
        ("SHOW STATUS", "session status"),
        ("SHOW SESSION STATUS LIKE 'Bytes%'", "session status"),
    ],
)
def test_session_bound_statements_pin(sql: str, reason: str) -> None:
    """Statements that leave state on their connection pin with their reason."""
    assert reason in pins(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 'GET_LOCK(1)', 'SQL_CALC_FOUND_ROWS'",
        "SELECT 1 /* CREATE TEMPORARY TABLE t */",
        "SELECT get_lock_count FROM t",
        "SELECT * FROM temporary_tables",
        "CREATE TABLE t (id INT)",
        "SELECT * FROM t WHERE a = ? FOR UPDATE",
        "BEGIN",
        "COMMIT",
        "SHOW GLOBAL STATUS",
    ],
)
def test_lookalikes_do_not_pin(sql: str) -> None:
    """The same words in strings, comments or other names do not pin."""
    assert pins(sql) == set()


# ----------------------------------------------------------------- locks, kill, infile


@pytest.mark.parametrize(
    "sql",
    [
        "LOCK TABLES t READ",
        "lock table t write, u read",
        "FLUSH TABLES WITH READ LOCK",
        "FLUSH TABLES t1, t2 WITH READ LOCK",
        "FLUSH TABLES\nWITH READ LOCK",
    ],
)
def test_lock_tables(sql: str) -> None:
    """LOCK TABLES and FLUSH TABLES ... WITH READ LOCK take table locks."""
    effects = classify(sql)
    assert effects.lock
    assert not effects.unlock


def test_unlock_tables() -> None:
    """UNLOCK TABLES releases them; neither is mistaken for the other."""
    assert classify("UNLOCK TABLES").unlock
    assert classify("unlock table").unlock
    assert not classify("UNLOCK TABLES").lock
    assert not classify("SELECT 'LOCK TABLES t READ'").lock
    assert not classify("FLUSH TABLES").lock


@pytest.mark.parametrize(
    ("sql", "kill"),
    [
        ("KILL 42", (False, 42)),
        ("KILL CONNECTION 42", (False, 42)),
        ("kill query 42", (True, 42)),
        ("KILL QUERY 7 ", (True, 7)),
        ("  KILL 18446744073709551615", (False, 2**64 - 1)),
    ],
)
def test_kill(sql: str, kill: tuple[bool, int]) -> None:
    """KILL [QUERY | CONNECTION] n gives whether only the query dies, and the id."""
    assert classify(sql).kill == kill


@pytest.mark.parametrize(
    "sql",
    ["KILL @id", "KILL 4 2", "SELECT 'KILL 1'", "KILL " + "9" * 5000, "KILL ٤٢"],
)
def test_not_a_kill_we_translate(sql: str) -> None:
    """KILL of anything but one plain connection id, or no KILL at all, is not translated."""
    assert classify(sql).kill is None


@pytest.mark.parametrize(
    "sql",
    [
        "LOAD DATA LOCAL INFILE '/tmp/x.csv' INTO TABLE t",
        "load data low_priority local infile 'x' into table t",
        "LOAD DATA CONCURRENT LOCAL INFILE 'x' INTO TABLE t",
        "LOAD XML LOCAL INFILE 'x.xml' INTO TABLE t",
    ],
)
def test_load_data_local(sql: str) -> None:
    """LOAD DATA (or XML) LOCAL asks the client for a file."""
    assert classify(sql).local_infile


@pytest.mark.parametrize(
    "sql",
    [
        "LOAD DATA INFILE '/var/lib/mysql-files/x.csv' INTO TABLE t",
        "LOAD DATA INFILE 'x' INTO TABLE t (a, @local) SET b = @local",
        "SELECT 'LOAD DATA LOCAL INFILE'",
        "SELECT local FROM t",
    ],
)
def test_not_load_data_local(sql: str) -> None:
    """A server-side LOAD DATA, or LOCAL anywhere else, does not ask for a file."""
    assert not classify(sql).local_infile


# ----------------------------------------------------------------- other effects


def test_multi_statements() -> None:
    """More than one statement is multi; semicolons in strings or a trailing one are not."""
    assert classify("SELECT 1; SELECT 2").multi
    assert classify("INSERT INTO t VALUES (1);UPDATE t SET a = 2;").multi
    assert not classify("SELECT 1;").multi
    assert not classify("SELECT 'a;b'").multi
    assert not classify("SELECT 1 -- ; SELECT 2").multi


def test_multi_statement_effects_add_up() -> None:
    """Each statement of a multi-statement text contributes its effects."""
    effects = classify("SET autocommit=0; LOCK TABLES t WRITE; SELECT GET_LOCK('a', 1)")
    assert effects.multi
    assert effects.read_back
    assert effects.lock
    assert effects.pins == {"get_lock"}


def test_reads_of_previous_statement_state() -> None:
    """FOUND_ROWS(), ROW_COUNT() and LAST_INSERT_ID() are noticed, not in strings."""
    assert classify("SELECT FOUND_ROWS()").last_state
    assert classify("SELECT row_count ()").last_state
    assert classify("SELECT LAST_INSERT_ID()").last_insert_id
    assert classify("SELECT last_insert_id( )").last_insert_id
    assert not classify("SELECT 'FOUND_ROWS()', 'LAST_INSERT_ID()'").last_state
    assert not classify("SELECT 'LAST_INSERT_ID()'").last_insert_id


def test_plain_statements_have_no_effects() -> None:
    """Ordinary reads and writes leave nothing to track."""
    for sql in ("SELECT * FROM t", "INSERT INTO t VALUES (1)", "BEGIN", "", "   "):
        expected = Effects(read=sql.startswith("SELECT"), transaction="start" * (sql == "BEGIN"))
        assert classify(sql) == expected


@settings(max_examples=500, deadline=None)
@given(sql=st.text(max_size=200))
def test_classify_never_raises_on_arbitrary_text(sql: str) -> None:
    """Any text classifies without raising."""
    classify(sql)


SQL_WORDS = st.sampled_from(
    [
        "SET", "SESSION", "GLOBAL", "TRANSACTION", "@x", "@@x", "@@global.", "@@session.",
        "NAMES", "autocommit", "=", ",", ";", "(", ")", "'", '"', "`", "/*", "*/", "/*!40101",
        "--", "#", "\n", "KILL", "QUERY", "42", "LOAD", "DATA", "LOCAL", "LOCK", "TABLES",
        "UNLOCK", "FLUSH", "WITH", "READ", "STATEMENT", "FOR", "GET_LOCK(", "USE", "\\",
    ]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(words=st.lists(SQL_WORDS, max_size=25))
def test_classify_never_raises_on_sql_like_text(words: list[str]) -> None:
    """Text made of SQL's significant words and quotes classifies without raising."""
    classify(" ".join(words))
    classify("".join(words))


@pytest.mark.parametrize(
    ("sql", "read"),
    [
        ("SELECT c FROM sbtest1 WHERE id = 1", True),
        ("  (SELECT 1) UNION (SELECT 2)", True),
        ("WITH a AS (SELECT 1) SELECT * FROM a", True),
        ("SHOW TABLES", True),
        ("EXPLAIN SELECT 1", True),
        ("SELECT 'INSERT INTO t' FROM dual", True),
        ("SELECT * FROM t FOR UPDATE", False),
        ("SELECT * FROM t LOCK IN SHARE MODE", False),
        ("SELECT * FROM t FOR SHARE", False),
        ("SELECT 1 INTO @x", False),
        ("SELECT a INTO OUTFILE '/tmp/x' FROM t", False),
        ("SELECT NEXTVAL(s)", False),
        ("SELECT NEXT VALUE FOR s", False),
        ("SELECT GET_LOCK('a', 1)", False),
        ("SELECT @x := 1", False),
        ("SELECT 1; SELECT 2", False),
        ("INSERT INTO t SELECT * FROM u", False),
        ("BEGIN", False),
        ("SET autocommit = 1", False),
        ("CALL p()", False),
    ],
)
def test_reads_are_told_apart_from_everything_else(sql: str, read: bool) -> None:
    """Only a single statement that reads, locks nothing and writes no file, variable or
    sequence counts as a read (a replica may answer it)."""
    assert classify(sql).read is read


@pytest.mark.parametrize(
    ("sql", "transaction"),
    [
        ("BEGIN", "start"),
        ("begin work", "start"),
        ("START TRANSACTION READ ONLY", "start"),
        ("COMMIT", "commit"),
        ("ROLLBACK", "rollback"),
        ("ROLLBACK TO SAVEPOINT a", ""),
        ("BEGIN; INSERT INTO t VALUES (1)", ""),
        ("INSERT INTO t VALUES (1)", ""),
    ],
)
def test_transaction_control_is_told_apart(sql: str, transaction: str) -> None:
    """BEGIN, COMMIT and ROLLBACK are named (they write nothing themselves); a multi-
    statement or a savepoint rollback is not transaction control."""
    assert classify(sql).transaction == transaction


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT c FROM sbtest1 WHERE id = 5023",
        "SET autocommit = 0",
        "SELECT LAST_INSERT_ID(7)",
        "SELECT SQL_CALC_FOUND_ROWS * FROM t2 LIMIT 10",
        "/*!40101 SET NAMES utf8 */",
        "SET @x1 = 10",
        "SELECT * FROM t3 WHERE a = 1 FOR UPDATE",
    ],
)
def test_classifying_by_shape_changes_nothing(sql: str) -> None:
    """Statements are classified by their shape (numbers as 0): the effects are those of
    the statement itself."""
    assert classify_bytes(sql.encode()) == classify(sql)


def test_kill_keeps_its_connection_id() -> None:
    """KILL is not classified by shape: the id it names is the one it kills."""
    assert classify_bytes(b"KILL QUERY 4242").kill == (True, 4242)
    assert classify_bytes(b"  kill 17").kill == (False, 17)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="SELCT sbte1_23,.()'`@=?;x-", max_size=60))
def test_shape_keeps_the_digest_of_plain_statements(sql: str) -> None:
    """Without quoted names or comments, a statement and its shape share one digest."""
    data = sql.encode()
    if b"`" not in data and b"/*" not in data:
        assert normalize(shape(data).decode()) == normalize(sql)
