"""Where a server's answer to a command ends, without re-encoding a byte of it.

The session pump forwards each chunk a backend sends as it arrives; ``Response.feed`` walks
the packet headers in the chunk and says where the answer ended, if it did. Rows are
skipped by their length (only the first byte of a row packet is looked at, to tell a row
from the packet that ends the result set); only packets that decide something (the first
packet of a result, column counts, terminators, a prepare's OK) are collected, and they are
small. One table of states covers every kind of answer:

    COM_QUERY / COM_STMT_EXECUTE: OK | ERR | LOCAL INFILE request | result set, and after
        an OK or a result set whose status says MORE_RESULTS_EXISTS, another result
    result set: column count, column definitions, [EOF], rows, EOF or OK (0xfe) or ERR
    COM_STMT_PREPARE: ERR | prepare-OK, parameter definitions [EOF], column definitions [EOF]
    COM_STMT_FETCH: rows, then EOF | ERR
    COM_FIELD_LIST: column definitions, then EOF (or OK 0xfe) | ERR
    everything else that answers: one packet (COM_STATISTICS's is a bare string)
"""

from __future__ import annotations

import struct
from typing import Final

from meshproxy.mysql.constants import MAX_PAYLOAD, Command, Status
from meshproxy.mysql.packets import parse_eof_status, parse_err, parse_ok, read_lenenc

# Commands a server does not answer at all.
NO_RESPONSE: Final = frozenset({Command.STMT_CLOSE, Command.STMT_SEND_LONG_DATA, Command.QUIT})


# Kinds and states are Final plain ints, not enums: they are read for every packet, and an
# enum member read is a Python-level call (see constants.py).
class Kind:
    RESULT: Final = 0  # OK, ERR, LOCAL INFILE or result sets (COM_QUERY, COM_STMT_EXECUTE)
    PREPARE: Final = 1
    ROWS: Final = 2  # COM_STMT_FETCH
    FIELDS: Final = 3  # COM_FIELD_LIST
    SINGLE: Final = 4


def kind_of(command: int) -> int:
    if command == Command.QUERY or command == Command.STMT_EXECUTE:
        return Kind.RESULT
    if command == Command.STMT_PREPARE:
        return Kind.PREPARE
    if command == Command.STMT_FETCH:
        return Kind.ROWS
    if command == Command.FIELD_LIST:
        return Kind.FIELDS
    return Kind.SINGLE


class _S:
    FIRST: Final = 0  # the first packet of a result
    COLUMNS: Final = 1  # column definitions still to come: ``_count``
    COLUMNS_EOF: Final = 2  # the EOF after column definitions (without DEPRECATE_EOF)
    ROWS: Final = 3
    PREPARE_OK: Final = 4
    PARAMS: Final = 5
    PARAMS_EOF: Final = 6
    PREPARE_COLUMNS: Final = 7
    PREPARE_COLUMNS_EOF: Final = 8
    SINGLE: Final = 9
    DONE: Final = 10


_STATES: Final = range(_S.DONE + 1)
# Packets of these states are looked at whole (they are small); others only by first byte.
_COLLECT: Final = tuple(
    s in (_S.FIRST, _S.COLUMNS_EOF, _S.PREPARE_OK, _S.PARAMS_EOF, _S.PREPARE_COLUMNS_EOF, _S.SINGLE)
    for s in _STATES
)
# States that decide on a packet's first payload byte whether to look at it whole.
_BY_FIRST_BYTE: Final = tuple(s in (_S.ROWS, _S.COLUMNS) for s in _STATES)
# Where the answer to each command starts.
_START: Final = {
    command: (kind_of(command), state)
    for command, state in (
        (Command.QUERY, _S.FIRST),
        (Command.STMT_EXECUTE, _S.FIRST),
        (Command.STMT_PREPARE, _S.PREPARE_OK),
        (Command.STMT_FETCH, _S.ROWS),
        (Command.FIELD_LIST, _S.COLUMNS),
    )
}
_SINGLE_START: Final = (Kind.SINGLE, _S.SINGLE)


class Response:
    """The answer to one command, followed through the chunks it arrives in."""

    __slots__ = (
        "_collect",
        "_continued",
        "_count",
        "_deprecate_eof",
        "_header",
        "_left",
        "_params",
        "_prepare_columns",
        "_state",
        "_undecided",
        "_want",
        "affected_rows",
        "error",
        "infile",
        "kind",
        "last_insert_id",
        "next_seq",
        "prepared",
        "rows",
        "status",
    )

    def __init__(self, command: int, deprecate_eof: bool) -> None:
        self.kind, self._state = _START.get(command, _SINGLE_START)
        self._deprecate_eof = deprecate_eof
        self._count = -1  # FIELDS: unbounded column definitions until EOF
        self._header = b""  # a packet header split across chunks (at most 3 bytes)
        self._left = 0  # payload bytes of the current packet still to come
        self._want = False  # the current packet's payload is being collected
        # A packet looked at whole that a chunk split (a fresh bytearray then: one may be a
        # long row); not allocated for every answer, almost none of which needs it.
        self._collect: bytearray | bytes = b""
        self._continued = False  # the current packet continues a 16 MiB one
        self._undecided = -1  # length of a packet whose first payload byte is still to come
        self._params = 0
        self._prepare_columns = 0
        self.status = 0  # server status flags of the last OK or EOF
        self.error: tuple[int, str] | None = None  # (code, message) of an ERR that ended it
        self.affected_rows = 0
        self.last_insert_id = 0
        self.infile = False  # the server asked for a LOCAL INFILE: the client sends next
        self.prepared: tuple[int, int, int] | None = None  # (statement id, columns, params)
        self.next_seq = 0  # sequence id the next packet of this exchange would carry
        self.rows = 0  # rows of every result set so far

    @property
    def done(self) -> bool:
        return self._state == _S.DONE

    def expect_infile_result(self) -> None:
        """The client has sent its file: the server's OK or ERR comes next."""
        self.infile = False
        self._state = _S.FIRST  # its OK may say MORE_RESULTS_EXISTS (a multi-statement text)

    def feed(self, data: bytes) -> int:
        """Account for ``data``; return the offset just past the answer's end, or -1."""
        pos = 0
        end = len(data)
        while pos < end:
            if self._state == _S.ROWS and not (self._left or self._header or self._continued):
                pos = self._skip_rows(data, pos, end)
                if pos >= end:
                    return -1
            if self._left:
                take = min(self._left, end - pos)
                if self._want:
                    self._collect += data[pos : pos + take]
                pos += take
                self._left -= take
                if self._left:
                    return -1
                if self._want:
                    self._want = False
                    self._packet(bytes(self._collect))
                if self._state == _S.DONE or self.infile:  # a packet, or definitions, ended it
                    return pos
                continue
            if self._undecided >= 0:  # a header whose payload's first byte is here now
                length, self._undecided = self._undecided, -1
            else:
                # A packet header: 4 bytes, maybe split across chunks.
                if self._header or end - pos < 4:
                    take = min(4 - len(self._header), end - pos)
                    self._header += data[pos : pos + take]
                    pos += take
                    if len(self._header) < 4:
                        return -1
                    h = self._header
                    length, seq = h[0] | h[1] << 8 | h[2] << 16, h[3]
                    self._header = b""
                else:
                    length = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
                    seq = data[pos + 3]
                    pos += 4
                self.next_seq = (seq + 1) & 0xFF
                continued = self._continued
                self._continued = length == MAX_PAYLOAD
                if continued:  # the rest of a long packet: payload, not a packet of its own
                    self._left = length
                    continue
                if length and pos >= end and _BY_FIRST_BYTE[self._state]:
                    self._undecided = length
                    return -1
            state = self._state
            if _BY_FIRST_BYTE[state]:  # its first payload byte is here (see _undecided)
                whole = self._ends_here(state, length, data[pos] if length else -1)
            else:
                whole = _COLLECT[state]
            if whole:
                if pos + length <= end:
                    payload = data[pos : pos + length]
                    pos += length
                    self._packet(payload)
                    if self._state == _S.DONE or self.infile:
                        return pos
                    continue
                self._collect = bytearray()
                self._want = True
            elif state == _S.COLUMNS or state == _S.PARAMS or state == _S.PREPARE_COLUMNS:
                self._column(state)
            elif state == _S.ROWS:
                self.rows += 1
            self._left = length
            if not length and self._state == _S.DONE:
                return pos
        return -1

    def _skip_rows(self, data: bytes, pos: int, end: int) -> int:
        """Walk over whole row packets in ``data`` from ``pos``, as fast as Python can:
        this is every row of every result set. Stops at the first packet that is not an
        ordinary whole row in this chunk (the general path then takes it)."""
        if self._undecided >= 0:
            return pos
        seq = -1
        rows = 0
        while end - pos >= 5:
            length = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
            first = data[pos + 4]
            following = pos + 4 + length
            if following > end or length == MAX_PAYLOAD or first == 0xFF or first == 0xFE:
                break
            seq = data[pos + 3]
            pos = following
            rows += 1
        if seq >= 0:
            self.next_seq = (seq + 1) & 0xFF
            self.rows += rows
        return pos

    def _ends_here(self, state: int, length: int, first: int) -> bool:
        """Whether a packet of a rows or definitions state must be looked at whole: only
        if it may end the result (an ERR, or 0xfe in a packet too short to be a row)."""
        if state == _S.ROWS:
            return first == 0xFF or (first == 0xFE and length < MAX_PAYLOAD)
        # COLUMNS: COM_FIELD_LIST's definitions end at EOF (or OK 0xfe)
        return self._count < 0 and first in (0xFE, 0xFF)

    def _column(self, state: int) -> None:
        """One column or parameter definition went by."""
        self._count -= 1
        if self._count:
            return
        if state == _S.COLUMNS:
            self._state = _S.ROWS if self._deprecate_eof else _S.COLUMNS_EOF
        elif state == _S.PARAMS:
            self._after_params()
        else:
            self._end_prepare_columns()

    def _packet(self, payload: bytes) -> None:
        state = self._state
        first = payload[0] if payload else -1
        if first == 0xFF:
            err = parse_err(payload)
            self.error = (err.code, err.message) if err else (0, "malformed error packet")
            self._state = _S.DONE
            return
        if state == _S.FIRST:
            self._first(payload)
        elif state == _S.ROWS or state == _S.COLUMNS:
            self._terminator(payload)  # a row or definition collected whole: see if it ends
        elif state == _S.COLUMNS_EOF:
            self._state = _S.ROWS
            status = parse_eof_status(payload)
            if status is not None and status & Status.CURSOR_EXISTS:
                self.status = status
                self._state = _S.DONE  # a cursor: rows come with COM_STMT_FETCH
        elif state == _S.PREPARE_OK:
            self._prepare_ok(payload)
        elif state == _S.PARAMS_EOF:
            self._after_params_eof()
        elif state == _S.PREPARE_COLUMNS_EOF:
            self._state = _S.DONE
        elif state == _S.SINGLE:
            ok = parse_ok(payload) if first == 0 else None
            if ok is not None:
                self._take_ok(ok.status, ok.affected_rows, ok.last_insert_id)
            else:
                status = parse_eof_status(payload)
                if status is not None:
                    self.status = status
            self._state = _S.DONE

    def _first(self, payload: bytes) -> None:
        first = payload[0] if payload else -1
        if first == 0x00:
            ok = parse_ok(payload)
            if ok is None:
                self.error = (0, "malformed OK packet")
                self._state = _S.DONE
                return
            self._take_ok(ok.status, ok.affected_rows, ok.last_insert_id)
            self._state = _S.FIRST if ok.status & Status.MORE_RESULTS_EXISTS else _S.DONE
            return
        if first == 0xFB:
            self.infile = True
            return
        count, _ = read_lenenc(payload, 0)
        if not count:
            self.error = (0, "malformed result set header")
            self._state = _S.DONE
            return
        self._count = count
        self._state = _S.COLUMNS

    def _terminator(self, payload: bytes) -> None:
        if not payload or payload[0] != 0xFE or len(payload) >= MAX_PAYLOAD:
            if self._state == _S.COLUMNS:
                self._column(_S.COLUMNS)
            return  # a row (or definition) that only looked like it might end things
        if self._deprecate_eof:
            ok = parse_ok(payload)
            status = ok.status if ok is not None else parse_eof_status(payload)
            if ok is not None:
                self._take_ok(ok.status, ok.affected_rows, ok.last_insert_id)
        else:
            status = parse_eof_status(payload)
        if status is None:
            self.error = (0, "malformed end of result set")
            self._state = _S.DONE
            return
        self.status = status
        more = status & Status.MORE_RESULTS_EXISTS and self.kind == Kind.RESULT
        self._state = _S.FIRST if more else _S.DONE

    def _take_ok(self, status: int, affected: int, insert_id: int) -> None:
        self.status = status
        self.affected_rows = affected
        if insert_id:
            self.last_insert_id = insert_id

    def _prepare_ok(self, payload: bytes) -> None:
        if len(payload) < 12 or payload[0] != 0:
            self.error = (0, "malformed prepare response")
            self._state = _S.DONE
            return
        stmt_id, columns, params = struct.unpack_from("<IHH", payload, 1)
        self.prepared = (stmt_id, columns, params)
        self._params, self._prepare_columns = params, columns
        if params:
            self._count = params
            self._state = _S.PARAMS
        else:
            self._after_params_eof()

    def _after_params(self) -> None:
        if self._deprecate_eof:
            self._after_params_eof()
        else:
            self._state = _S.PARAMS_EOF

    def _after_params_eof(self) -> None:
        if self._prepare_columns:
            self._count = self._prepare_columns
            self._state = _S.PREPARE_COLUMNS
        else:
            self._state = _S.DONE

    def _end_prepare_columns(self) -> None:
        self._state = _S.DONE if self._deprecate_eof else _S.PREPARE_COLUMNS_EOF
