"""Numbers of the MySQL protocol: capability and status flags, commands, error codes."""

from __future__ import annotations

from typing import Final

MAX_PAYLOAD = 0xFFFFFF  # a payload this long continues in the next packet


# Capability and status flags and commands are Final plain ints, not enum.IntFlag or
# IntEnum: they are tested for every login, command and answer. An IntFlag operand turns
# each ``&`` into a Python-level call, an IntEnum member read is a call to the enum's
# metaclass, and mypyc compiles a Final int into the code that reads it.
class Cap:
    LONG_PASSWORD: Final = 1
    FOUND_ROWS: Final = 1 << 1
    LONG_FLAG: Final = 1 << 2
    CONNECT_WITH_DB: Final = 1 << 3
    NO_SCHEMA: Final = 1 << 4
    COMPRESS: Final = 1 << 5
    ODBC: Final = 1 << 6
    LOCAL_FILES: Final = 1 << 7
    IGNORE_SPACE: Final = 1 << 8
    PROTOCOL_41: Final = 1 << 9
    INTERACTIVE: Final = 1 << 10
    SSL: Final = 1 << 11
    IGNORE_SIGPIPE: Final = 1 << 12
    TRANSACTIONS: Final = 1 << 13
    RESERVED: Final = 1 << 14
    SECURE_CONNECTION: Final = 1 << 15
    MULTI_STATEMENTS: Final = 1 << 16
    MULTI_RESULTS: Final = 1 << 17
    PS_MULTI_RESULTS: Final = 1 << 18
    PLUGIN_AUTH: Final = 1 << 19
    CONNECT_ATTRS: Final = 1 << 20
    PLUGIN_AUTH_LENENC_DATA: Final = 1 << 21
    CAN_HANDLE_EXPIRED_PASSWORDS: Final = 1 << 22
    SESSION_TRACK: Final = 1 << 23
    DEPRECATE_EOF: Final = 1 << 24


# What meshproxy offers clients. Not COMPRESS (clients fall back to plain packets) and not
# SESSION_TRACK (we track state ourselves; OK packets stay in the form every client reads).
SERVER_CAPS = (
    Cap.LONG_PASSWORD
    | Cap.FOUND_ROWS
    | Cap.LONG_FLAG
    | Cap.CONNECT_WITH_DB
    | Cap.NO_SCHEMA
    | Cap.ODBC
    | Cap.LOCAL_FILES
    | Cap.IGNORE_SPACE
    | Cap.PROTOCOL_41
    | Cap.INTERACTIVE
    | Cap.IGNORE_SIGPIPE
    | Cap.TRANSACTIONS
    | Cap.SECURE_CONNECTION
    | Cap.MULTI_STATEMENTS
    | Cap.MULTI_RESULTS
    | Cap.PS_MULTI_RESULTS
    | Cap.PLUGIN_AUTH
    | Cap.CONNECT_ATTRS
    | Cap.PLUGIN_AUTH_LENENC_DATA
    | Cap.DEPRECATE_EOF
)

# The client flags that change what a server sends or how it behaves for the session: a
# backend connection serves only clients that chose the same ones, so that its answers reach
# them byte for byte, never re-encoded.
WIRE_CAPS = (
    Cap.FOUND_ROWS
    | Cap.LONG_FLAG
    | Cap.NO_SCHEMA
    | Cap.LOCAL_FILES
    | Cap.IGNORE_SPACE
    | Cap.INTERACTIVE
    | Cap.MULTI_STATEMENTS
    | Cap.MULTI_RESULTS
    | Cap.PS_MULTI_RESULTS
    | Cap.DEPRECATE_EOF
)

# What a backend connection always asks for, besides the client's WIRE_CAPS.
BACKEND_CAPS = (
    Cap.LONG_PASSWORD
    | Cap.PROTOCOL_41
    | Cap.TRANSACTIONS
    | Cap.SECURE_CONNECTION
    | Cap.PLUGIN_AUTH
    | Cap.PLUGIN_AUTH_LENENC_DATA
    | Cap.CONNECT_ATTRS
)


class Status:
    IN_TRANS: Final = 1
    AUTOCOMMIT: Final = 1 << 1
    MORE_RESULTS_EXISTS: Final = 1 << 3
    NO_GOOD_INDEX_USED: Final = 1 << 4
    NO_INDEX_USED: Final = 1 << 5
    CURSOR_EXISTS: Final = 1 << 6
    LAST_ROW_SENT: Final = 1 << 7
    DB_DROPPED: Final = 1 << 8
    NO_BACKSLASH_ESCAPES: Final = 1 << 9
    METADATA_CHANGED: Final = 1 << 10
    QUERY_WAS_SLOW: Final = 1 << 11
    PS_OUT_PARAMS: Final = 1 << 12
    IN_TRANS_READONLY: Final = 1 << 13
    SESSION_STATE_CHANGED: Final = 1 << 14


class Command:
    SLEEP: Final = 0x00
    QUIT: Final = 0x01
    INIT_DB: Final = 0x02
    QUERY: Final = 0x03
    FIELD_LIST: Final = 0x04
    CREATE_DB: Final = 0x05
    DROP_DB: Final = 0x06
    REFRESH: Final = 0x07
    SHUTDOWN: Final = 0x08
    STATISTICS: Final = 0x09
    PROCESS_INFO: Final = 0x0A
    CONNECT: Final = 0x0B
    PROCESS_KILL: Final = 0x0C
    DEBUG: Final = 0x0D
    PING: Final = 0x0E
    TIME: Final = 0x0F
    DELAYED_INSERT: Final = 0x10
    CHANGE_USER: Final = 0x11
    BINLOG_DUMP: Final = 0x12
    TABLE_DUMP: Final = 0x13
    CONNECT_OUT: Final = 0x14
    REGISTER_SLAVE: Final = 0x15
    STMT_PREPARE: Final = 0x16
    STMT_EXECUTE: Final = 0x17
    STMT_SEND_LONG_DATA: Final = 0x18
    STMT_CLOSE: Final = 0x19
    STMT_RESET: Final = 0x1A
    SET_OPTION: Final = 0x1B
    STMT_FETCH: Final = 0x1C
    DAEMON: Final = 0x1D
    BINLOG_DUMP_GTID: Final = 0x1E
    RESET_CONNECTION: Final = 0x1F


# Error codes meshproxy itself answers with, worded as a MySQL server words them.
ER_CON_COUNT_ERROR = 1040  # Too many connections
ER_HANDSHAKE_ERROR = 1043  # Bad handshake
ER_ACCESS_DENIED_ERROR = 1045
ER_NO_DB_ERROR = 1046
ER_UNKNOWN_COM_ERROR = 1047
ER_NET_PACKET_TOO_LARGE = 1153
ER_NET_READ_ERROR = 1158
ER_UNKNOWN_STMT_HANDLER = 1243
ER_NOT_SUPPORTED_AUTH_MODE = 1251
ER_MALFORMED_PACKET = 1835
ER_SECURE_TRANSPORT_REQUIRED = 3159
ER_PROXY_NO_UPSTREAM = 9001  # ProxySQL's code when no backend could be reached
ER_PROXY_POOL_TIMEOUT = 9002
ER_PROXY_BACKEND_LOST = 9003
ER_PROXY_OUTCOME_UNKNOWN = 9004  # a write or COMMIT was cut off: it may or may not have run
ER_PROXY_NOT_REPLAYED = 9005  # a transaction could not be moved: it is rolled back

UTF8MB4_GENERAL_CI = 45
