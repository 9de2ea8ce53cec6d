"""The login exchange's packets: the server greeting (Handshake v10), the client's
HandshakeResponse41 or SSLRequest, and AuthSwitchRequest. Parsers return None on bytes that
do not form the packet they expect."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from meshproxy.mysql.constants import Cap
from meshproxy.mysql.packets import lenenc, lenenc_bytes, read_lenenc, read_lenenc_bytes, read_nul

SERVER_STATUS_AUTOCOMMIT = 2


@dataclass(frozen=True)
class Greeting:
    server_version: str
    connection_id: int
    scramble: bytes  # 20 bytes of auth plugin data
    capabilities: int
    collation: int
    status: int
    auth_plugin: str


def greeting_payload(g: Greeting) -> bytes:
    caps = g.capabilities
    return b"".join(
        (
            b"\x0a",
            g.server_version.encode() + b"\x00",
            struct.pack("<I", g.connection_id),
            g.scramble[:8],
            b"\x00",
            struct.pack("<H", caps & 0xFFFF),
            bytes((g.collation & 0xFF,)),
            struct.pack("<H", g.status),
            struct.pack("<H", caps >> 16 & 0xFFFF),
            bytes((len(g.scramble) + 1,)),
            b"\x00" * 10,
            g.scramble[8:] + b"\x00",
            g.auth_plugin.encode() + b"\x00",
        )
    )


def parse_greeting(payload: bytes) -> Greeting | None:
    """A server's Handshake v10 (MariaDB's extended capabilities are ignored)."""
    if not payload or payload[0] != 0x0A:
        return None
    version, pos = read_nul(payload, 1)
    if version is None or pos + 31 > len(payload):
        return None
    connection_id = struct.unpack_from("<I", payload, pos)[0]
    part1 = payload[pos + 4 : pos + 12]
    pos += 13
    caps_low, collation, status, caps_high, data_len = struct.unpack_from("<HBHHB", payload, pos)
    pos += 8 + 10
    caps = caps_low | caps_high << 16
    part2_len = max(13, data_len - 8)
    part2 = payload[pos : pos + part2_len].rstrip(b"\x00")
    pos += part2_len
    plugin = b""
    if caps & Cap.PLUGIN_AUTH:
        plugin = payload[pos:].split(b"\x00", 1)[0]
    return Greeting(
        server_version=version.decode("utf-8", "replace"),
        connection_id=connection_id,
        scramble=part1 + part2,
        capabilities=caps,
        collation=collation,
        status=status,
        auth_plugin=plugin.decode("ascii", "replace") or "mysql_native_password",
    )


@dataclass(frozen=True)
class Login:
    """What a client's HandshakeResponse41 says."""

    capabilities: int
    max_packet: int
    collation: int
    user: str
    auth_response: bytes
    database: str
    auth_plugin: str
    # Connection attributes as sent: nothing on the login path needs them, so they are
    # read only when asked for (a tenth of a login's parsing otherwise).
    raw_attributes: bytes = b""

    @property
    def attributes(self) -> dict[str, str]:
        return _parse_attributes(self.raw_attributes, 0) if self.raw_attributes else {}


def parse_ssl_request(payload: bytes) -> int | None:
    """The capability flags of an SSLRequest (a login cut short before the user name)."""
    if len(payload) != 32:
        return None
    caps = int(struct.unpack_from("<I", payload)[0])
    return caps if caps & Cap.SSL and caps & Cap.PROTOCOL_41 else None


def ssl_request_payload(capabilities: int, collation: int) -> bytes:
    """An SSLRequest, as meshproxy sends it to a backend before TLS starts."""
    caps = capabilities | Cap.SSL
    return struct.pack("<IIB", caps, 1 << 30, collation) + b"\x00" * 23


def parse_login(payload: bytes) -> Login | None:
    if len(payload) < 33:
        return None
    caps, max_packet, collation = struct.unpack_from("<IIB", payload)
    if not caps & Cap.PROTOCOL_41:
        return None  # pre-4.1 clients are not served
    user, pos = read_nul(payload, 32)
    if user is None:
        return None
    auth, pos = _read_auth(payload, pos, caps)
    if auth is None:
        return None
    database: bytes | None = b""
    if caps & Cap.CONNECT_WITH_DB and pos < len(payload):
        database, pos = read_nul(payload, pos)
    if database is None:
        return None
    plugin, pos = _read_plugin(payload, pos, caps)
    raw_attributes = payload[pos:] if caps & Cap.CONNECT_ATTRS else b""
    try:
        return Login(
            capabilities=caps,
            max_packet=max_packet,
            collation=collation,
            user=user.decode("utf-8"),
            auth_response=bytes(auth),
            database=database.decode("utf-8"),
            auth_plugin=plugin.decode("ascii"),
            raw_attributes=raw_attributes,
        )
    except UnicodeDecodeError:
        return None


def _parse_attributes(payload: bytes, pos: int) -> dict[str, str]:
    total, pos = read_lenenc(payload, pos)
    if total is None:
        return {}
    end = min(pos + total, len(payload))
    out: dict[str, str] = {}
    while pos < end and len(out) < 64:
        key, pos = read_lenenc_bytes(payload, pos)
        value, pos = read_lenenc_bytes(payload, pos)
        if key is None or value is None:
            break
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return out


def login_payload(
    capabilities: int,
    collation: int,
    user: str,
    auth_response: bytes,
    database: str,
    auth_plugin: str,
    attributes: dict[str, str] | None = None,
) -> bytes:
    """A HandshakeResponse41, as meshproxy sends it to a backend."""
    caps = capabilities | Cap.PLUGIN_AUTH_LENENC_DATA
    if database:
        caps |= Cap.CONNECT_WITH_DB
    else:
        caps &= ~Cap.CONNECT_WITH_DB
    parts = [
        struct.pack("<IIB", caps, 1 << 30, collation),
        b"\x00" * 23,
        user.encode() + b"\x00",
        lenenc_bytes(auth_response),
    ]
    if database:
        parts.append(database.encode() + b"\x00")
    if caps & Cap.PLUGIN_AUTH:  # without it a server would read the name as what follows
        parts.append(auth_plugin.encode() + b"\x00")
    if caps & Cap.CONNECT_ATTRS:
        attrs = b"".join(
            lenenc_bytes(k.encode()) + lenenc_bytes(v.encode())
            for k, v in (attributes or {}).items()
        )
        parts.append(lenenc(len(attrs)) + attrs)
    return b"".join(parts)


def auth_switch_payload(plugin: str, data: bytes) -> bytes:
    """AuthSwitchRequest: the server asks the client to answer with another plugin."""
    return b"\xfe" + plugin.encode() + b"\x00" + data + b"\x00"


def parse_auth_switch(payload: bytes) -> tuple[str, bytes] | None:
    if not payload or payload[0] != 0xFE or len(payload) < 2:
        return None
    plugin, pos = read_nul(payload, 1)
    if plugin is None:
        return None
    return plugin.decode("ascii", "replace"), payload[pos:].rstrip(b"\x00")


def parse_change_user(payload: bytes, capabilities: int) -> Login | None:
    """COM_CHANGE_USER: a new login on an open connection, answered against the nonce of
    the connection's greeting (the client keeps its flags; the charset may change)."""
    if not payload or payload[0] != 0x11:
        return None
    user, pos = read_nul(payload, 1)
    if user is None or pos > len(payload):
        return None
    # COM_CHANGE_USER has no lenenc form of the auth data.
    auth, pos = _read_auth(payload, pos, capabilities & ~Cap.PLUGIN_AUTH_LENENC_DATA)
    if auth is None:
        return None
    database, pos = read_nul(payload, pos) if pos < len(payload) else (b"", pos)
    if database is None:
        return None
    collation = 0
    if pos + 2 <= len(payload):
        collation = int(struct.unpack_from("<H", payload, pos)[0]) & 0xFF
        pos += 2
    plugin, pos = _read_plugin(payload, pos, capabilities)
    try:
        return Login(
            capabilities=capabilities,
            max_packet=0,
            collation=collation,
            user=user.decode("utf-8"),
            auth_response=bytes(auth),
            database=database.decode("utf-8"),
            auth_plugin=plugin.decode("ascii"),
        )
    except UnicodeDecodeError:
        return None


def _read_auth(payload: bytes, pos: int, caps: int) -> tuple[bytes | None, int]:
    """A login's auth data, in the form its capability flags say (None: malformed)."""
    if caps & Cap.PLUGIN_AUTH_LENENC_DATA:
        return read_lenenc_bytes(payload, pos)
    if caps & Cap.SECURE_CONNECTION:
        if pos >= len(payload):
            return None, pos
        n = payload[pos]
        end = pos + 1 + n
        return (payload[pos + 1 : end], end) if end <= len(payload) else (None, end)
    return read_nul(payload, pos)


def _read_plugin(payload: bytes, pos: int, caps: int) -> tuple[bytes, int]:
    """The auth plugin name at the end of a login (some clients omit the final NUL)."""
    if not caps & Cap.PLUGIN_AUTH or pos >= len(payload):
        return b"", pos
    end = payload.find(b"\x00", pos)
    end = len(payload) if end < 0 else end
    return payload[pos:end], end + 1
