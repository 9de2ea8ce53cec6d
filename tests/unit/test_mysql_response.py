"""Where a server's answer ends: every kind of answer, however its bytes are chunked."""

from __future__ import annotations

import functools
import itertools
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.mysql.constants import MAX_PAYLOAD, Command, Status
from meshproxy.mysql.packets import (
    eof_payload,
    err_payload,
    frame,
    lenenc,
    lenenc_bytes,
    ok_payload,
)
from meshproxy.mysql.response import NO_RESPONSE, Kind, Response, kind_of

MORE = Status.MORE_RESULTS_EXISTS
AC = Status.AUTOCOMMIT
TRAILER = b"\x05\x00\x00\x09after"  # bytes of whatever comes next: never part of the answer
STATUSES = st.sampled_from(
    [0, int(AC), int(AC | Status.IN_TRANS), int(Status.NO_INDEX_USED), int(AC | Status.DB_DROPPED)]
)
FILL = st.sampled_from([0x00, 0x41, 0xFB, 0xFE, 0xFF])


# ----------------------------------------------------------------- building answers


class Wire:
    """A server's answer under construction: payloads framed with running sequence ids."""

    def __init__(self, seq: int = 1) -> None:
        self.parts: list[bytes] = []
        self.seq = seq

    def add(self, *payloads: bytes) -> Wire:
        for payload in payloads:
            self.parts.append(frame(self.seq, payload))
            self.seq += len(payload) // MAX_PAYLOAD + 1
        return self

    def data(self) -> bytes:
        if len(self.parts) != 1:
            self.parts = [b"".join(self.parts)]
        return self.parts[0] if self.parts else b""

    def boundaries(self) -> list[int]:
        """Offsets where each physical packet starts, and the end."""
        out, pos = [], 0
        data = self.data()
        while pos < len(data):
            out.append(pos)
            pos += 4 + int.from_bytes(data[pos : pos + 3], "little")
        return [*out, pos]


def column_def(name: bytes = b"c") -> bytes:
    """A Protocol::ColumnDefinition41 of a VARCHAR column."""
    names = b"".join(lenenc_bytes(s) for s in (b"def", b"db", b"t", b"t", name, name))
    return names + b"\x0c" + struct.pack("<HIBHB", 45, 1020, 253, 0, 0) + b"\x00\x00"


def text_row(values: list[bytes | None]) -> bytes:
    return b"".join(b"\xfb" if v is None else lenenc_bytes(v) for v in values)


def binary_row(values: list[bytes | None]) -> bytes:
    """A binary-protocol row of string columns (0x00, NULL bitmap at offset 2, values)."""
    bitmap = bytearray((len(values) + 9) // 8)
    for i, v in enumerate(values):
        if v is None:
            bitmap[(i + 2) // 8] |= 1 << ((i + 2) % 8)
    return b"\x00" + bytes(bitmap) + b"".join(lenenc_bytes(v) for v in values if v is not None)


def ok_fe(status: int, affected: int = 0, insert_id: int = 0) -> bytes:
    """The OK packet that ends a result set under DEPRECATE_EOF."""
    return b"\xfe" + ok_payload(status, affected, insert_id)[1:]


def prepare_ok(stmt_id: int, columns: int, params: int) -> bytes:
    return b"\x00" + struct.pack("<IHHBH", stmt_id, columns, params, 0, 0)


@dataclass
class Expected:
    """What a Response must report once it has seen the whole answer."""

    status: int = 0
    affected_rows: int = 0
    last_insert_id: int = 0
    error: int | None = None
    prepared: tuple[int, int, int] | None = None

    def ok(self, status: int, affected: int, insert_id: int) -> None:
        self.status, self.affected_rows = status, affected
        if insert_id:
            self.last_insert_id = insert_id


@dataclass
class Answer:
    command: int
    deprecate_eof: bool
    wire: Wire
    expected: Expected = field(default_factory=Expected)


def add_result_set(
    answer: Answer,
    rows: list[list[bytes | None]],
    columns: int,
    status: int,
    end: tuple[int, int] | None = (0, 0),
) -> None:
    """Column count, definitions, [EOF], rows and the end: EOF, OK 0xfe, or ERR (end None)."""
    wire, expected = answer.wire, answer.expected
    row = binary_row if answer.command == Command.STMT_EXECUTE else text_row
    wire.add(lenenc(columns), *(column_def(b"c%d" % i) for i in range(columns)))
    if not answer.deprecate_eof:
        wire.add(eof_payload(status & ~Status.CURSOR_EXISTS))
    wire.add(*(row(r) for r in rows))
    if end is None:
        wire.add(err_payload(1317, "Query execution was interrupted", "70100"))
        expected.error = 1317
    elif answer.deprecate_eof:
        wire.add(ok_fe(status, *end))
        expected.ok(status, *end)
    else:
        wire.add(eof_payload(status))
        expected.status = status


# ----------------------------------------------------------------- feeding answers


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def end_of(response: Response, data: bytes, cuts: list[int]) -> int | None:
    """Feed ``data`` cut at ``cuts``: the absolute offset feed reported, None if it did not.

    Every feed before the one that reports must say -1; the one that reports gives an offset
    inside its own chunk.
    """
    start = 0
    for piece in chunked(data, cuts):
        got = response.feed(piece)
        if got >= 0:
            assert 1 <= got <= len(piece)
            return start + got
        start += len(piece)
    return None


def check(answer: Answer, cuts: list[int]) -> Response:
    """The answer, followed by unrelated bytes, ends exactly where it does, with its values."""
    data = answer.wire.data()
    response = Response(answer.command, answer.deprecate_eof)
    assert end_of(response, data + TRAILER, cuts) == len(data)
    assert response.done
    expected = answer.expected
    error = response.error[0] if response.error else None
    assert (
        response.status,
        response.affected_rows,
        response.last_insert_id,
        error,
        response.prepared,
    ) == (
        expected.status,
        expected.affected_rows,
        expected.last_insert_id,
        expected.error,
        expected.prepared,
    )
    assert response.next_seq == answer.wire.seq & 0xFF
    return response


def check_every_split(answer: Answer) -> None:
    """The end is found with the answer cut at any one offset, and fed byte by byte."""
    size = len(answer.wire.data())
    for cut in range(size + len(TRAILER) + 1):
        check(answer, [cut])
    check(answer, list(range(size + len(TRAILER))))


# ----------------------------------------------------------------- fixed answers


def multi_answer(deprecate_eof: bool) -> Answer:
    """OK, then a result set with NULLs and long values, then a final OK: one text."""
    answer = Answer(Command.QUERY, deprecate_eof, Wire())
    answer.wire.add(ok_payload(AC | MORE, 3, 10))
    answer.expected.ok(AC | MORE, 3, 10)
    rows: list[list[bytes | None]] = [[b"a", None], [None, b"x" * 300], [b"\xfe" * 5, b""]]
    add_result_set(answer, rows, 2, AC | MORE, (0, 0))
    answer.wire.add(ok_payload(AC | Status.IN_TRANS, 7, 0))
    answer.expected.ok(AC | Status.IN_TRANS, 7, 0)
    return answer


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_multi_results_end_at_every_split(deprecate_eof: bool) -> None:
    """A chain of results ends at its last OK however it is cut."""
    check_every_split(multi_answer(deprecate_eof))


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_status_counts_and_insert_id_come_from_the_final_ok(deprecate_eof: bool) -> None:
    """Status and affected rows are the final OK's; the insert id the last one not zero."""
    response = check(multi_answer(deprecate_eof), [])
    assert response.status == AC | Status.IN_TRANS
    assert response.affected_rows == 7
    assert response.last_insert_id == 10
    answer = Answer(Command.QUERY, deprecate_eof, Wire())
    answer.wire.add(ok_payload(AC | MORE, 1, 10), ok_payload(AC, 2, 11))
    answer.expected.ok(AC, 2, 11)
    assert check(answer, []).last_insert_id == 11


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_binary_result_set_ends_at_every_split(deprecate_eof: bool) -> None:
    """A COM_STMT_EXECUTE result set of binary rows ends at its EOF or OK."""
    answer = Answer(Command.STMT_EXECUTE, deprecate_eof, Wire())
    add_result_set(answer, [[b"1", None, b"z" * 260], [None, None, None]], 3, AC, (0, 0))
    check_every_split(answer)


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_err_in_the_middle_of_a_chain(deprecate_eof: bool) -> None:
    """An ERR after an OK that promised more results ends the answer there."""
    answer = Answer(Command.QUERY, deprecate_eof, Wire())
    answer.wire.add(ok_payload(AC | MORE, 1, 5))
    answer.expected.ok(AC | MORE, 1, 5)
    answer.wire.add(err_payload(1146, "Table 'db.nope' doesn't exist", "42S02"))
    answer.expected.error = 1146
    response = check(answer, [])
    assert response.error == (1146, "Table 'db.nope' doesn't exist")
    check_every_split(answer)


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_err_in_the_middle_of_rows(deprecate_eof: bool) -> None:
    """An ERR in place of a result set's end (a killed query) ends the answer."""
    answer = Answer(Command.QUERY, deprecate_eof, Wire())
    add_result_set(answer, [[b"1"], [b"2"]], 1, AC, None)
    check_every_split(answer)


@pytest.mark.parametrize("command", [Command.QUERY, Command.STMT_EXECUTE])
def test_plain_ok_and_err(command: int) -> None:
    """An OK or an ERR is the whole answer to a query or an execute."""
    answer = Answer(command, False, Wire())
    answer.wire.add(ok_payload(AC, 42, 9))
    answer.expected.ok(AC, 42, 9)
    check_every_split(answer)
    answer = Answer(command, True, Wire())
    answer.wire.add(err_payload(1064, "You have an error in your SQL syntax", "42000"))
    answer.expected.error = 1064
    check_every_split(answer)


@pytest.mark.parametrize(("params", "columns"), [(0, 0), (2, 0), (0, 3), (2, 3), (1, 1)])
@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_prepare_response_ends_at_every_split(
    params: int, columns: int, deprecate_eof: bool
) -> None:
    """A prepare's OK, parameter and column definitions (with or without EOFs) end right."""
    answer = Answer(Command.STMT_PREPARE, deprecate_eof, Wire())
    answer.wire.add(prepare_ok(0x01020304, columns, params))
    answer.wire.add(*(column_def(b"?") for _ in range(params)))
    if params and not deprecate_eof:
        answer.wire.add(eof_payload(AC))
    answer.wire.add(*(column_def(b"c%d" % i) for i in range(columns)))
    if columns and not deprecate_eof:
        answer.wire.add(eof_payload(AC))
    answer.expected.prepared = (0x01020304, columns, params)
    check_every_split(answer)


def test_prepare_error() -> None:
    """An ERR answering a prepare ends it, with no statement prepared."""
    answer = Answer(Command.STMT_PREPARE, False, Wire())
    answer.wire.add(err_payload(1064, "syntax", "42000"))
    answer.expected.error = 1064
    check_every_split(answer)


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_field_list_ends_at_its_eof(deprecate_eof: bool) -> None:
    """COM_FIELD_LIST's definitions go on until the EOF (or OK 0xfe)."""
    answer = Answer(Command.FIELD_LIST, deprecate_eof, Wire())
    answer.wire.add(*(column_def(b"c%d" % i) for i in range(4)))
    if deprecate_eof:
        answer.wire.add(ok_fe(AC, 0, 0))
        answer.expected.ok(AC, 0, 0)
    else:
        answer.wire.add(eof_payload(AC))
        answer.expected.status = AC
    check_every_split(answer)
    error = Answer(Command.FIELD_LIST, deprecate_eof, Wire())
    error.wire.add(err_payload(1146, "no such table", "42S02"))
    error.expected.error = 1146
    check_every_split(error)


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_fetch_rows_end_at_eof(deprecate_eof: bool) -> None:
    """COM_STMT_FETCH's rows end at EOF (or OK 0xfe), never chaining further results."""
    status = Status.CURSOR_EXISTS | Status.LAST_ROW_SENT | MORE
    answer = Answer(Command.STMT_FETCH, deprecate_eof, Wire())
    answer.wire.add(binary_row([b"1", None]), binary_row([None, b"\xfe" * 10]))
    if deprecate_eof:
        answer.wire.add(ok_fe(status))
        answer.expected.ok(status, 0, 0)
    else:
        answer.wire.add(eof_payload(status))
        answer.expected.status = status
    check_every_split(answer)


def test_cursor_execute_ends_after_the_column_eof() -> None:
    """An execute that opens a cursor ends at the EOF saying CURSOR_EXISTS: rows come later."""
    answer = Answer(Command.STMT_EXECUTE, False, Wire())
    status = AC | Status.CURSOR_EXISTS
    answer.wire.add(lenenc(2), column_def(), column_def(), eof_payload(status))
    answer.expected.status = status
    check_every_split(answer)


@pytest.mark.parametrize(
    ("command", "payload", "expected"),
    [
        (Command.PING, ok_payload(AC), Expected(status=AC)),
        (
            Command.INIT_DB,
            err_payload(1049, "Unknown database 'x'", "42000"),
            Expected(error=1049),
        ),
        (Command.STATISTICS, b"Uptime: 52  Threads: 1  Questions: 10", Expected()),
        (Command.SET_OPTION, eof_payload(AC), Expected(status=AC)),
        (
            Command.REFRESH,
            ok_payload(AC | Status.IN_TRANS, 2, 3),
            Expected(AC | Status.IN_TRANS, 2, 3),
        ),
        (Command.STMT_RESET, b"", Expected()),
    ],
)
def test_single_packet_answers(command: int, payload: bytes, expected: Expected) -> None:
    """Other commands are answered by one packet, whatever it holds."""
    check_every_split(Answer(command, False, Wire().add(payload), expected))


def test_kinds_of_commands() -> None:
    """Commands map to the kind of answer they get; some get none."""
    assert kind_of(Command.QUERY) is kind_of(Command.STMT_EXECUTE) is Kind.RESULT
    assert kind_of(Command.STMT_PREPARE) is Kind.PREPARE
    assert kind_of(Command.STMT_FETCH) is Kind.ROWS
    assert kind_of(Command.FIELD_LIST) is Kind.FIELDS
    assert kind_of(Command.PING) is Kind.SINGLE
    assert {Command.STMT_CLOSE, Command.STMT_SEND_LONG_DATA, Command.QUIT} == NO_RESPONSE


# ----------------------------------------------------------------- LOCAL INFILE


def test_local_infile_request_then_the_result() -> None:
    """The LOCAL INFILE request stops the answer; after the file the OK ends it."""
    response = Response(Command.QUERY, False)
    request = frame(1, b"\xfb/tmp/data.csv")
    assert response.feed(request[:3]) == -1
    assert response.feed(request[3:]) == len(request) - 3
    assert response.infile
    assert not response.done
    assert response.next_seq == 2
    response.expect_infile_result()
    assert not response.infile
    ok = frame(4, ok_payload(AC, 3, 0))
    assert response.feed(ok + TRAILER) == len(ok)
    assert response.done
    assert (response.status, response.affected_rows) == (AC, 3)


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_local_infile_in_a_multi_statement_text(deprecate_eof: bool) -> None:
    """An OK after the file that says MORE_RESULTS_EXISTS is followed by the next result."""
    response = Response(Command.QUERY, deprecate_eof)
    before = Wire().add(ok_payload(AC | MORE, 1, 0), b"\xfbdata.csv").data()
    assert response.feed(before + TRAILER) == len(before)
    assert response.infile
    response.expect_infile_result()
    after = Answer(Command.QUERY, deprecate_eof, Wire(5))
    after.wire.add(ok_payload(AC | MORE, 4, 0))
    add_result_set(after, [[b"1"]], 1, AC, (0, 0))
    data = after.wire.data()
    for cut in range(len(data) + 1):
        copy = Response(Command.QUERY, deprecate_eof)
        copy.feed(before)
        copy.expect_infile_result()
        assert end_of(copy, data + TRAILER, [cut]) == len(data)
    assert end_of(response, data, []) == len(data)
    assert response.affected_rows == (0 if deprecate_eof else 4)


def test_local_infile_refused() -> None:
    """An ERR after the file (say, a bad row) ends the answer."""
    response = Response(Command.QUERY, True)
    response.feed(frame(1, b"\xfbf"))
    response.expect_infile_result()
    err = frame(4, err_payload(1261, "Row 1 doesn't contain data for all columns", "01000"))
    assert response.feed(err) == len(err)
    assert response.error is not None
    assert response.error[0] == 1261


# ----------------------------------------------------------------- malformed answers


@pytest.mark.parametrize(
    ("command", "payload"),
    [
        (Command.QUERY, b""),  # no result header
        (Command.QUERY, b"\x00\x01"),  # an OK cut short
        (Command.QUERY, b"\xff"),  # an ERR cut short
        (Command.STMT_PREPARE, b"\x00\x01\x00\x00\x00"),  # a prepare OK cut short
        (Command.STMT_PREPARE, b"\x05" + b"\x00" * 11),  # not a prepare OK
    ],
)
def test_malformed_first_packets_end_the_answer_with_an_error(command: int, payload: bytes) -> None:
    """A first packet that makes no sense ends the answer there, as an error."""
    wire = frame(1, payload)
    response = Response(command, False)
    assert response.feed(wire + TRAILER) == len(wire)
    assert response.error is not None


def test_malformed_end_of_result_set() -> None:
    """A short 0xfe packet that is neither EOF nor OK ends the result set as an error."""
    wire = Wire().add(lenenc(1), column_def(), eof_payload(AC), b"\xfe\x00").data()
    response = Response(Command.QUERY, False)
    assert response.feed(wire + TRAILER) == len(wire)
    assert response.error == (0, "malformed end of result set")


# ----------------------------------------------------------------- 16 MiB rows


@functools.cache
def long_answer(deprecate_eof: bool) -> Answer:
    """A result set with rows of 16 MiB and more, some of them looking like terminators.

    One row is exactly 0xffffff bytes (its continuation is empty); one starts with 0xfe (a
    value of 2**24 bytes) and its 10-byte continuation reads as an OK 0xfe; one's 5-byte
    continuation reads as an EOF.
    """
    answer = Answer(Command.QUERY, deprecate_eof, Wire(250))  # sequence ids wrap, too
    fake_ok = b"\xfe" + ok_payload(Status.NO_GOOD_INDEX_USED)[1:] + b"\x00" * 3
    fake_eof = eof_payload(Status.NO_GOOD_INDEX_USED)
    add_result_set(answer, [[b"a" * (MAX_PAYLOAD - 4)]], 1, AC | MORE, (0, 0))
    add_result_set(answer, [[b"b" * (2**24 - 10) + fake_ok], [b"s"]], 1, AC | MORE, (1, 0))
    rows: list[list[bytes | None]] = [[b"c" * (MAX_PAYLOAD - 5), fake_eof], [b"s", None]]
    add_result_set(answer, rows, 2, AC, (2, 0))
    return answer


def test_long_rows_are_what_we_think() -> None:
    """The long rows have the lengths and first bytes their tests rely on."""
    assert len(text_row([b"a" * (MAX_PAYLOAD - 4)])) == MAX_PAYLOAD
    row = text_row([b"b" * 2**24])
    assert (row[0], len(row)) == (0xFE, MAX_PAYLOAD + 10)
    assert len(text_row([b"c" * (MAX_PAYLOAD - 5), eof_payload(0)])) == MAX_PAYLOAD + 5


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_long_rows_are_not_terminators(deprecate_eof: bool) -> None:
    """Rows of 16 MiB or more, whatever their first bytes, are skipped, however cut."""
    answer = long_answer(deprecate_eof)
    near = [b + d for b in answer.wire.boundaries() for d in range(-1, 6)]
    check(answer, [])
    check(answer, near)  # headers and first payload bytes fed byte by byte
    check(answer, [b + 4 for b in answer.wire.boundaries()])  # chunks end after a header
    check(answer, [b + 2 for b in answer.wire.boundaries()])  # chunks end inside a header
    check(answer, list(range(0, len(answer.wire.data()), 1 << 20)))


@settings(max_examples=5, deadline=None)
@given(deprecate_eof=st.booleans(), picks=st.lists(st.integers(0, 10**9), max_size=12))
def test_long_rows_at_random_cuts(deprecate_eof: bool, picks: list[int]) -> None:
    """Long rows cut anywhere near their packet headers still end at the right offset."""
    answer = long_answer(deprecate_eof)
    bounds = answer.wire.boundaries()
    cuts = [bounds[p % len(bounds)] + p % 13 - 6 for p in picks]
    check(answer, cuts)


# ----------------------------------------------------------------- random answers


def rows_of(columns: int) -> st.SearchStrategy[list[list[bytes | None]]]:
    value = st.one_of(
        st.none(),
        st.builds(
            lambda size, fill: bytes((fill,)) * size,
            st.one_of(st.integers(0, 20), st.integers(245, 300)),
            FILL,
        ),
    )
    return st.lists(st.lists(value, min_size=columns, max_size=columns), max_size=6)


@st.composite
def query_answers(draw: st.DrawFn) -> Answer:
    """A chain of OKs and result sets, maybe ended by an ERR, for COM_QUERY or an execute."""
    command = draw(st.sampled_from([Command.QUERY, Command.STMT_EXECUTE]))
    answer = Answer(command, draw(st.booleans()), Wire(draw(st.integers(0, 255))))
    results = draw(st.integers(1, 4))
    for i in range(results):
        last = i == results - 1
        status = draw(STATUSES) | (0 if last else MORE)
        if last and draw(st.integers(0, 4)) == 0:
            answer.wire.add(err_payload(1213, "Deadlock found", "40001"))
            answer.expected.error = 1213
        elif draw(st.booleans()):
            affected, insert_id = draw(st.integers(0, 2**40)), draw(st.integers(0, 2**40))
            answer.wire.add(ok_payload(status, affected, insert_id))
            answer.expected.ok(status, affected, insert_id)
        else:
            columns = draw(st.integers(1, 4))
            rows = draw(rows_of(columns))
            end = None if last and draw(st.integers(0, 4)) == 0 else (draw(st.integers(0, 9)), 0)
            add_result_set(answer, rows, columns, status, end)
    return answer


@st.composite
def prepare_answers(draw: st.DrawFn) -> Answer:
    answer = Answer(Command.STMT_PREPARE, draw(st.booleans()), Wire())
    stmt_id = draw(st.integers(0, 2**32 - 1))
    params, columns = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    answer.wire.add(prepare_ok(stmt_id, columns, params))
    for count in (params, columns):
        answer.wire.add(*(column_def(b"x" * draw(st.integers(0, 300))) for _ in range(count)))
        if count and not answer.deprecate_eof:
            answer.wire.add(eof_payload(AC))
    answer.expected.prepared = (stmt_id, columns, params)
    return answer


CUTS = st.lists(st.integers(0, 8000), max_size=20)


@settings(max_examples=100, deadline=None)
@given(answer=query_answers(), cuts=CUTS)
def test_random_result_chains_end_at_the_right_offset(answer: Answer, cuts: list[int]) -> None:
    """Any chain of results, cut anywhere, ends at its last packet with its final values."""
    check(answer, cuts)


@settings(max_examples=100, deadline=None)
@given(answer=prepare_answers(), cuts=CUTS)
def test_random_prepare_answers_end_at_the_right_offset(answer: Answer, cuts: list[int]) -> None:
    """Any prepare response, cut anywhere, ends at its last definition or EOF."""
    check(answer, cuts)


# ----------------------------------------------------------------- hostile answers

COMMANDS = [
    Command.QUERY,
    Command.STMT_EXECUTE,
    Command.STMT_PREPARE,
    Command.STMT_FETCH,
    Command.FIELD_LIST,
    Command.PING,
    Command.STATISTICS,
]


def events(
    command: int, deprecate_eof: bool, data: bytes, cuts: list[int]
) -> tuple[list[tuple[int, bool]], tuple[object, ...]]:
    """Feed anything: where answers (or infile requests) ended, and the final values."""
    response = Response(command, deprecate_eof)
    seen: list[tuple[int, bool]] = []
    start = 0
    done = False
    for piece in chunked(data, cuts):
        offset = 0
        while offset < len(piece) and not done:
            got = response.feed(piece[offset:])
            if got < 0:
                break
            assert 1 <= got <= len(piece) - offset
            offset += got
            seen.append((start + offset, response.infile))
            if response.infile:  # the client would send its file here
                response.expect_infile_result()
            else:
                done = True
        if done:
            break
        start += len(piece)
    values = (
        response.status,
        response.affected_rows,
        response.last_insert_id,
        response.error,
        response.prepared,
        response.done,
    )
    return seen, values


def framed(payloads: list[bytes]) -> bytes:
    return b"".join(frame(i + 1, p) for i, p in enumerate(payloads))


PAYLOADS = st.lists(
    st.builds(
        lambda first, rest: bytes(first) + rest,
        st.lists(st.sampled_from([0x00, 0x01, 0x02, 0xFB, 0xFC, 0xFE, 0xFF]), max_size=1),
        st.binary(max_size=14),
    ),
    max_size=14,
)


@settings(max_examples=200, deadline=None)
@given(
    command=st.sampled_from(COMMANDS),
    deprecate_eof=st.booleans(),
    data=st.binary(max_size=300),
    cuts=CUTS,
)
def test_arbitrary_bytes_never_raise(
    command: int, deprecate_eof: bool, data: bytes, cuts: list[int]
) -> None:
    """Any bytes, for any command, are fed without raising."""
    events(command, deprecate_eof, data, cuts)


@settings(max_examples=200, deadline=None)
@given(
    command=st.sampled_from(COMMANDS),
    deprecate_eof=st.booleans(),
    payloads=PAYLOADS,
    cuts=st.lists(st.integers(0, 400), max_size=20),
)
def test_arbitrary_packets_end_where_they_end_however_cut(
    command: int, deprecate_eof: bool, payloads: list[bytes], cuts: list[int]
) -> None:
    """Well-framed packets of any content give the same ends and values however chunked."""
    data = framed(payloads)
    whole = events(command, deprecate_eof, data, [])
    assert events(command, deprecate_eof, data, cuts) == whole
    assert events(command, deprecate_eof, data, list(range(len(data)))) == whole


def test_nothing_reported_before_the_answer_is_in() -> None:
    """Feeding empty chunks or a lone header reports nothing."""
    response = Response(Command.QUERY, False)
    for piece in (b"", b"\x07", b"", b"\x00\x00", b"\x01"):
        assert response.feed(piece) == -1
    assert response.feed(ok_payload(AC)) == 7
