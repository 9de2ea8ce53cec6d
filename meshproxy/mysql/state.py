"""Session state: what a client expects to find on the backend connection it is given.

Values are kept as the server reports them (text, or None for NULL), read back after a
statement that may change them, so meshproxy never evaluates an expression itself.
Restoring them writes hex literals, which read the same under every ``sql_mode``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from meshproxy.mysql.statements import TRACKED

CHARSET = frozenset(
    {
        "character_set_client",
        "character_set_connection",
        "character_set_results",
        "collation_connection",
    }
)

Values = dict[str, bytes | None]

_NUMBER = re.compile(rb"-?\d+")


@dataclass(frozen=True)
class Flavor:
    """How a server names the tracked variables (MariaDB and MySQL differ in a few)."""

    names: dict[str, str]  # our name -> the server's
    mariadb: bool = False  # MariaDB's GTIDs (@@last_gtid, MASTER_GTID_WAIT) are there

    @classmethod
    def of(cls, server_version: str) -> Flavor:
        mariadb = "mariadb" in server_version.lower()
        if mariadb:
            renames = {
                "transaction_isolation": "tx_isolation",
                "transaction_read_only": "tx_read_only",
            }
        else:
            renames = {"max_statement_time": "max_execution_time"}
        return cls({name: renames.get(name, name) for name in TRACKED}, mariadb)


@dataclass
class SessionState:
    schema: str = ""
    values: Values = field(default_factory=dict)
    last_insert_id: int = 0

    def copy(self) -> SessionState:
        return SessionState(self.schema, dict(self.values), self.last_insert_id)


def read_back_sql(flavor: Flavor) -> bytes:
    """One SELECT that reads the schema and every tracked variable, in TRACKED's order."""
    columns = ", ".join(f"@@session.{flavor.names[name]}" for name in TRACKED)
    return f"SELECT DATABASE(), {columns}".encode()


def from_row(row: list[bytes | None]) -> SessionState:
    """The state a read-back row describes."""
    schema = row[0].decode("utf-8", "replace") if row and row[0] is not None else ""
    return SessionState(schema, dict(zip(TRACKED, row[1:], strict=False)))


def _literal(value: bytes | None) -> str:
    if value is None:
        return "NULL"
    if _NUMBER.fullmatch(value):
        return value.decode()
    return f"X'{value.hex()}'"


def restore_sql(have: Values, want: Values, flavor: Flavor) -> bytes | None:
    """One SET that turns ``have`` into ``want`` (None when they already agree)."""
    differ = {name for name in TRACKED if name in want and have.get(name) != want[name]}
    if differ & CHARSET:  # setting one of them resets the collation: set them all
        differ |= {name for name in CHARSET if name in want}
    assignments = [
        f"@@session.{flavor.names[name]} = {_literal(want[name])}"
        for name in TRACKED
        if name in differ
    ]
    if not assignments:
        return None
    return ("SET " + ", ".join(assignments)).encode()
