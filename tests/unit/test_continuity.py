"""The journal an edge keeps of a session's open transaction, and which statements in
flight may run again after a replay."""

from __future__ import annotations

import hashlib

from meshproxy.config import Address
from meshproxy.dataplane import continuity
from meshproxy.dataplane.backend import BackendConnection, LoginKey
from meshproxy.dataplane.continuity import AnswerBudget, Journal
from meshproxy.dataplane.moving import may_run_again, middle_failed
from meshproxy.dataplane.session import ClientStatement, Flight
from meshproxy.mysql.constants import Command
from meshproxy.mysql.packets import err_payload, frame
from meshproxy.mysql.state import Values
from meshproxy.mysql.statements import classify_bytes

VALUES: Values = {"autocommit": b"1"}


def query(sql: bytes) -> bytes:
    return bytes((Command.QUERY,)) + sql


def run(
    journal: Journal, sql: bytes, answer: list[bytes], in_trans_before: bool, after: bool
) -> None:
    journal.sending(Command.QUERY, query(sql), None, True, in_trans_before, True, VALUES, "shop")
    for chunk in answer:
        journal.chunk(chunk)
    journal.answered(after)


def test_a_transaction_is_kept_from_the_statement_that_opened_it_until_it_ends() -> None:
    """Statements outside a transaction are not kept; the one whose answer opens it and
    those after it are, with the state from before it; the end of the transaction clears."""
    journal = Journal(AnswerBudget(1 << 20))
    run(journal, b"SELECT 1", [b"a"], False, False)
    assert journal.entries == []
    run(journal, b"BEGIN", [b"ok"], False, True)
    run(journal, b"UPDATE t SET v = 1", [b"ok2"], True, True)
    assert [e.payload for e in journal.entries] == [query(b"BEGIN"), query(b"UPDATE t SET v = 1")]
    assert journal.start_values is VALUES
    assert journal.start_schema == "shop"
    run(journal, b"COMMIT", [b"ok3"], True, False)
    assert journal.entries == []
    assert journal.replayable


def test_the_checksum_is_of_every_answer_in_order_however_they_were_chunked() -> None:
    """The transaction's checksum covers its answers in order as the client received them,
    whatever their chunks; each statement keeps where its answer ended; a prepare's answer
    is in neither."""
    one, two = Journal(AnswerBudget(1 << 20)), Journal(AnswerBudget(1 << 20))
    run(one, b"BEGIN", [b"ok"], False, True)
    run(one, b"SELECT v FROM t", [b"header+rows+eof"], True, True)
    run(two, b"BEGIN", [b"o", b"k"], False, True)
    two.sending(Command.STMT_PREPARE, b"\x16SELECT ?", None, False, True, False, VALUES, "")
    two.chunk(b"prepared")
    two.answered(True)
    run(two, b"SELECT v FROM t", [b"header", b"+rows", b"+eof"], True, True)
    assert one.checksum() == two.checksum()
    assert one.checksum() == hashlib.sha1(b"okheader+rows+eof", usedforsecurity=False).digest()
    assert [e.answered_to for e in two.entries] == [2, 17]


def test_statements_outside_a_transaction_leave_no_checksum() -> None:
    """The checksum starts with the statement that opens a transaction: what autocommit
    statements before it were answered is not in it."""
    journal = Journal(AnswerBudget(1 << 20))
    run(journal, b"SELECT 1", [b"before"], False, False)
    run(journal, b"BEGIN", [b"ok"], False, True)
    assert journal.checksum() == hashlib.sha1(b"ok", usedforsecurity=False).digest()


def test_answers_beyond_what_may_be_kept_are_hashed_with_the_same_checksum() -> None:
    """A transaction keeps its answers while they fit its own limit and the process's
    budget, and hashes them beyond; the checksum is the same either way, and what was kept
    goes back to the budget when the transaction ends."""
    answers = [b"a" * 30_000, b"b" * 30_000, b"c" * 10]
    expected = hashlib.sha1(b"ok" + b"".join(answers), usedforsecurity=False).digest()
    roomy, tight = AnswerBudget(1 << 20), AnswerBudget(100)
    kept, hashed = Journal(roomy), Journal(tight)
    for journal in (kept, hashed):
        run(journal, b"BEGIN", [b"ok"], False, True)
        for answer in answers:
            run(journal, b"SELECT 1", [answer], True, True)
        assert journal.checksum() == expected
    assert (roomy.used, tight.used) == (60_012, 0)
    assert [e.answered_to for e in kept.entries] == [e.answered_to for e in hashed.entries]
    run(kept, b"COMMIT", [b"ok"], True, False)
    assert roomy.used == 0
    long = Journal(roomy)
    run(long, b"BEGIN", [b"ok"], False, True)
    run(long, b"SELECT 1", [b"x" * (continuity.KEEP_PER_TRANSACTION + 1)], True, True)
    assert roomy.used == 0
    long_answers = b"ok" + b"x" * (continuity.KEEP_PER_TRANSACTION + 1)
    assert long.checksum() == hashlib.sha1(long_answers, usedforsecurity=False).digest()


def test_a_command_that_cannot_be_replayed_makes_the_transaction_unreplayable() -> None:
    """A command other than a query, an execute or a statement reset leaves the transaction
    unreplayable, says why, and keeps nothing; a prepare is simply not kept."""
    journal = Journal(AnswerBudget(1 << 20))
    run(journal, b"BEGIN", [b"ok"], False, True)
    journal.sending(Command.STMT_PREPARE, b"\x16SELECT ?", None, False, True, False, VALUES, "")
    journal.chunk(b"prepared")
    journal.answered(True)
    assert len(journal.entries) == 1
    assert journal.replayable
    journal.sending(Command.FIELD_LIST, b"\x04t\x00", None, False, True, False, VALUES, "")
    journal.answered(True)
    assert not journal.replayable
    assert journal.entries == []
    assert "0x04" in journal.why_not
    run(journal, b"COMMIT", [b"ok"], True, False)
    assert journal.replayable  # the next transaction starts afresh


def test_a_transaction_too_long_to_keep_is_unreplayable() -> None:
    """Past MAX_ENTRIES statements a transaction is no longer kept: it could only be rolled
    back, and memory stays bounded."""
    journal = Journal(AnswerBudget(1 << 20))
    run(journal, b"BEGIN", [b"ok"], False, True)
    for _ in range(continuity.MAX_ENTRIES):
        run(journal, b"SELECT 1", [b"r"], True, True)
    assert not journal.replayable
    assert journal.entries == []
    assert "too long" in journal.why_not


def flight(sql: bytes, command: int = Command.QUERY) -> Flight:
    conn = BackendConnection(Address("127.0.0.1", 3306), LoginKey("app", 0, 33))
    return Flight(command, classify_bytes(sql), conn, bytes((command,)) + sql)


def test_only_statements_that_cannot_commit_run_again_after_a_replay() -> None:
    """Reads and DML may run again in a replayed transaction; COMMIT, DDL and anything else
    that may have committed it on the failed path never do."""
    for sql in (b"SELECT 1", b"  update t set v = 1", b"(SELECT 1)", b"INSERT INTO t VALUES (1)"):
        assert may_run_again(flight(sql), True), sql
    for sql in (b"COMMIT", b"ROLLBACK", b"CREATE TABLE x (a INT)", b"SET autocommit = 1", b""):
        assert not may_run_again(flight(sql), True), sql
    assert not may_run_again(flight(b"\x01\x00\x00\x00", Command.STMT_FETCH), True)
    assert may_run_again(flight(b"\x01\x00\x00\x00", Command.STMT_RESET), True)
    execute = flight(b"\x01\x00\x00\x00", Command.STMT_EXECUTE)
    execute.statement = ClientStatement(b"UPDATE t SET v = ?", "", 1, 0)
    assert may_run_again(execute, True)
    execute.statement = ClientStatement(b"CREATE TABLE t2 (a INT)", "", 0, 0)
    assert not may_run_again(execute, True)


def test_a_transaction_remembers_whether_it_may_have_written() -> None:
    """Reads leave a transaction read-only; one statement that may write marks it, until
    the next transaction begins."""
    journal = Journal(AnswerBudget(1 << 20))
    journal.sending(Command.QUERY, query(b"BEGIN"), None, False, False, True, VALUES, "")
    journal.answered(True)
    journal.sending(Command.QUERY, query(b"SELECT 1"), None, False, True, False, VALUES, "")
    journal.answered(True)
    assert not journal.wrote
    journal.sending(Command.QUERY, query(b"DELETE FROM t"), None, True, True, False, VALUES, "")
    journal.answered(True)
    assert journal.wrote
    journal.sending(Command.QUERY, query(b"BEGIN"), None, False, False, True, VALUES, "")
    assert not journal.wrote


def test_reads_and_commands_that_change_no_data_may_run_twice() -> None:
    """A read, a schema change, a prepare or a field list may run again elsewhere; a write
    or a command of unknown effect may not."""
    assert may_run_again(flight(b"mydb", Command.INIT_DB), False)
    assert may_run_again(flight(b"SELECT ?", Command.STMT_PREPARE), False)
    assert not may_run_again(flight(b"UPDATE t SET v = 1"), False)  # no plan: not known as a read


def test_answers_outside_a_transaction_are_not_checksummed_unless_one_may_open() -> None:
    """In autocommit mode a statement that cannot open a transaction costs no checksum; if
    its answer opens one after all, the transaction is marked unreplayable, never kept
    without its first statement."""
    journal = Journal(AnswerBudget(1 << 20))
    journal.sending(Command.QUERY, query(b"SELECT 1"), None, False, False, False, VALUES, "")
    journal.chunk(b"rows")
    journal.answered(False)
    journal.sending(Command.QUERY, query(b"CALL opens()"), None, True, False, False, VALUES, "")
    journal.answered(True)
    assert not journal.replayable
    assert journal.entries == []


def test_a_middles_own_failure_is_told_from_a_servers_error() -> None:
    """A whole ERR 9001 or 9003 packet is a middle's own failure; a server's ERR, a result
    set, or an ERR cut short by the read are passed on as they are."""
    ours = frame(1, err_payload(9001, "no server of pool 'main' is available"))
    lost = frame(1, err_payload(9003, "lost the backend connection"))
    assert middle_failed(ours)
    assert middle_failed(lost)
    assert not middle_failed(frame(1, err_payload(1146, "Table 't' doesn't exist")))
    assert not middle_failed(ours[:-3])
    assert not middle_failed(frame(1, b"\x01"))
