"""Session state: reading it back from a server and restoring it on another connection."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.mysql.state import (
    CHARSET,
    Flavor,
    SessionState,
    Values,
    from_row,
    read_back_sql,
    restore_sql,
)
from meshproxy.mysql.statements import TRACKED

MYSQL = Flavor.of("8.0.36")
MARIADB = Flavor.of("5.5.5-10.11.6-MariaDB-log")
SAME = Flavor({name: name for name in TRACKED})  # names as ours, to read SETs back

BASE: Values = {
    "autocommit": b"1",
    "sql_mode": b"STRICT_TRANS_TABLES",
    "time_zone": b"SYSTEM",
    "character_set_client": b"utf8mb4",
    "character_set_connection": b"utf8mb4",
    "character_set_results": b"utf8mb4",
    "collation_connection": b"utf8mb4_general_ci",
    "wait_timeout": b"28800",
}


def assignments(sql: bytes | None) -> dict[str, str]:
    """The ``name = value`` pairs of a restore SET, in order."""
    assert sql is not None
    text = sql.decode()
    assert text.startswith("SET ")
    pairs = (part.split(" = ", 1) for part in text[4:].split(", "))
    return {name.removeprefix("@@session."): value for name, value in pairs}


def test_flavors_name_variables_their_way() -> None:
    """MariaDB calls the transaction variables tx_*; MySQL has max_execution_time."""
    assert MARIADB.names["transaction_isolation"] == "tx_isolation"
    assert MARIADB.names["transaction_read_only"] == "tx_read_only"
    assert MARIADB.names["max_statement_time"] == "max_statement_time"
    assert MYSQL.names["transaction_isolation"] == "transaction_isolation"
    assert MYSQL.names["max_statement_time"] == "max_execution_time"
    assert set(MYSQL.names) == set(MARIADB.names) == set(TRACKED)


def test_read_back_sql_reads_schema_then_every_tracked_variable() -> None:
    """The read-back SELECT asks for DATABASE() and each tracked variable in TRACKED order."""
    sql = read_back_sql(MARIADB).decode()
    assert sql.startswith("SELECT DATABASE(), @@session.autocommit, @@session.sql_mode, ")
    names = re.findall(r"@@session\.(\w+)", sql)
    assert names == [MARIADB.names[name] for name in TRACKED]
    assert "@@session.tx_isolation" in sql


def test_from_row_maps_columns_to_variables() -> None:
    """A read-back row gives the schema and each value (None for NULL) under our names."""
    row: list[bytes | None] = [b"shop", *(name.encode() for name in TRACKED)]
    row[2] = None
    state = from_row(row)
    assert state.schema == "shop"
    assert state.values["autocommit"] == b"autocommit"
    assert state.values["sql_mode"] is None
    assert list(state.values) == list(TRACKED)
    assert state.last_insert_id == 0


def test_from_row_without_schema_or_short() -> None:
    """No schema (NULL) is the empty one; a short row gives only the values it has."""
    state = from_row([None, b"1"])
    assert state == SessionState("", {"autocommit": b"1"})
    assert from_row([]) == SessionState()


def test_copy_is_independent() -> None:
    """A copied state's values can change without changing the original."""
    state = SessionState("db", dict(BASE), 5)
    other = state.copy()
    other.values["autocommit"] = b"0"
    assert state.values["autocommit"] == b"1"
    assert other.schema == "db"
    assert other.last_insert_id == 5


def test_restore_nothing_when_states_agree() -> None:
    """Equal states need no SET."""
    assert restore_sql(BASE, dict(BASE), MYSQL) is None
    assert restore_sql(BASE, {}, MYSQL) is None


def test_restore_only_differing_variables() -> None:
    """Only variables whose wanted value differs are set."""
    want = dict(BASE, autocommit=b"0", time_zone=b"+00:00")
    assert assignments(restore_sql(BASE, want, MYSQL)) == {
        "autocommit": "0",
        "time_zone": "X'2b30303a3030'",
    }


def test_restore_sets_every_charset_variable_if_one_differs() -> None:
    """Changing one charset variable resets others, so all of them are set, collation last."""
    want = dict(BASE, character_set_results=None)
    got = assignments(restore_sql(BASE, want, MYSQL))
    assert set(got) == set(CHARSET)
    assert got["character_set_results"] == "NULL"
    assert got["character_set_client"] == "X'" + b"utf8mb4".hex() + "'"
    assert list(got)[-1] == "collation_connection"


def test_restore_of_charsets_only_names_wanted_ones() -> None:
    """A charset variable the wanted state does not hold is left alone."""
    want: Values = {"character_set_client": b"latin1"}
    assert assignments(restore_sql(BASE, want, MYSQL)) == {
        "character_set_client": "X'" + b"latin1".hex() + "'"
    }


def test_restore_uses_hex_for_strings_numbers_as_is_and_null() -> None:
    """Text becomes a hex literal, an integer is written plainly, and None is NULL."""
    want: Values = {
        "sql_mode": b"ANSI_QUOTES,NO_BACKSLASH_ESCAPES",
        "wait_timeout": b"-5",
        "sql_select_limit": b"18446744073709551615",
        "lc_time_names": None,
        "div_precision_increment": b"4.5",
        "time_zone": b"x' OR 1; --",
    }
    got = assignments(restore_sql({"lc_time_names": b"en_US"}, want, MYSQL))
    assert got == {
        "sql_mode": "X'" + b"ANSI_QUOTES,NO_BACKSLASH_ESCAPES".hex() + "'",
        "wait_timeout": "-5",
        "sql_select_limit": "18446744073709551615",
        "lc_time_names": "NULL",
        "div_precision_increment": "X'" + b"4.5".hex() + "'",
        "time_zone": "X'" + b"x' OR 1; --".hex() + "'",
    }


def test_restore_uses_the_flavor_names_in_tracked_order() -> None:
    """The SET names each variable as the server does, in TRACKED's order."""
    want: Values = {"transaction_isolation": b"SERIALIZABLE", "autocommit": b"0"}
    sql = restore_sql({}, want, MARIADB)
    assert sql == b"SET @@session.autocommit = 0, @@session.tx_isolation = X'" + (
        b"SERIALIZABLE".hex().encode() + b"'"
    )
    mysql = restore_sql({}, {"max_statement_time": b"100"}, MYSQL)
    assert mysql == b"SET @@session.max_execution_time = 100"


def test_restore_ignores_variables_it_does_not_track() -> None:
    """Values under names outside TRACKED are never written."""
    assert restore_sql({}, {"sort_buffer_size": b"1"}, MYSQL) is None


VALUES = st.dictionaries(
    st.sampled_from(TRACKED),
    st.one_of(st.none(), st.binary(max_size=12), st.integers(-(10**6), 10**6).map(
        lambda n: str(n).encode()
    )),
    max_size=len(TRACKED),
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(have=VALUES, want=VALUES)
def test_restore_sets_exactly_what_differs(have: Values, want: Values) -> None:
    """The SET names each wanted variable that differs (all wanted charsets if one does)."""
    sql = restore_sql(have, want, SAME)
    differ = {n for n in want if have.get(n) != want[n]}
    if differ & CHARSET:
        differ |= CHARSET & set(want)
    if not differ:
        assert sql is None
        return
    got = assignments(sql)
    assert list(got) == [n for n in TRACKED if n in differ]
    for name, value in got.items():
        wanted = want[name]
        if wanted is None:
            assert value == "NULL"
        elif value.startswith("X'"):
            assert bytes.fromhex(value[2:-1]) == wanted
        else:
            assert value.encode() == wanted
            assert int(value) == int(wanted)
