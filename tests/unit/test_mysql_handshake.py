"""The login exchange: greeting, login, SSLRequest, AuthSwitchRequest and password checks."""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.mysql import auth
from meshproxy.mysql.constants import BACKEND_CAPS, SERVER_CAPS, UTF8MB4_GENERAL_CI, Cap
from meshproxy.mysql.handshake import (
    Greeting,
    Login,
    auth_switch_payload,
    greeting_payload,
    login_payload,
    parse_auth_switch,
    parse_greeting,
    parse_login,
    parse_ssl_request,
    ssl_request_payload,
)
from meshproxy.mysql.packets import lenenc_bytes

NONCE = bytes(range(1, 21))
# Text a str can encode to UTF-8 (no lone surrogates) and that has no NUL.
NO_NUL = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=30
)
ASCII_NAME = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30)
UINT32 = st.integers(min_value=0, max_value=2**32 - 1)


def greeting(**changes: object) -> Greeting:
    """A MySQL 8 style greeting, with some fields changed."""
    fields: dict[str, object] = {
        "server_version": "8.0.36",
        "connection_id": 77,
        "scramble": NONCE,
        "capabilities": int(SERVER_CAPS),
        "collation": UTF8MB4_GENERAL_CI,
        "status": 2,
        "auth_plugin": auth.CACHING_SHA2,
    }
    fields.update(changes)
    return Greeting(**fields)  # type: ignore[arg-type]


def login_prefix(caps: int, user: bytes = b"app") -> bytes:
    """The fixed part of a HandshakeResponse41 and its user name."""
    return struct.pack("<IIB", caps, 1 << 24, 33) + b"\x00" * 23 + user + b"\x00"


# ----------------------------------------------------------------- greeting


def test_greeting_round_trip() -> None:
    """A greeting this module builds parses back to the same fields."""
    g = greeting()
    assert parse_greeting(greeting_payload(g)) == g


@settings(max_examples=150, deadline=None)
@given(
    version=NO_NUL,
    connection_id=UINT32,
    scramble=st.binary(min_size=20, max_size=20).filter(lambda b: b[-1] != 0),
    caps=UINT32,
    collation=st.integers(min_value=0, max_value=255),
    status=st.integers(min_value=0, max_value=0xFFFF),
    plugin=ASCII_NAME,
)
def test_greeting_round_trip_any_fields(
    version: str,
    connection_id: int,
    scramble: bytes,
    caps: int,
    collation: int,
    status: int,
    plugin: str,
) -> None:
    """Any greeting with a 20-byte scramble and the PLUGIN_AUTH flag survives a round trip."""
    g = Greeting(
        version, connection_id, scramble, caps | Cap.PLUGIN_AUTH, collation, status, plugin
    )
    assert parse_greeting(greeting_payload(g)) == g


def test_greeting_without_plugin_auth_defaults_to_native() -> None:
    """A server that does not name its plugin means mysql_native_password."""
    g = greeting(capabilities=int(SERVER_CAPS & ~Cap.PLUGIN_AUTH))
    parsed = parse_greeting(greeting_payload(g))
    assert parsed is not None
    assert parsed.auth_plugin == auth.NATIVE
    assert parsed.scramble == NONCE


def test_greeting_of_mariadb_with_extended_capabilities() -> None:
    """MariaDB's extra capability bytes in the reserved area do not disturb the parse."""
    payload = bytearray(greeting_payload(greeting(server_version="5.5.5-10.11.6-MariaDB")))
    reserved = payload.index(b"5.5.5-10.11.6-MariaDB\x00") + 22 + 4 + 8 + 1 + 2 + 1 + 2 + 2 + 1
    payload[reserved + 6 : reserved + 10] = b"\x1d\x00\x00\x00"
    parsed = parse_greeting(bytes(payload))
    assert parsed == greeting(server_version="5.5.5-10.11.6-MariaDB")


def test_truncated_or_foreign_greetings_are_none() -> None:
    """A greeting cut short, of another protocol version, or an ERR, parses as None."""
    payload = greeting_payload(greeting())
    assert parse_greeting(b"") is None
    assert parse_greeting(b"\x09" + payload[1:]) is None
    assert parse_greeting(b"\xff\x10\x04Too many connections") is None
    assert parse_greeting(b"\x0a8.0.36") is None
    assert parse_greeting(payload[: len(b"\x0a8.0.36\x00") + 30]) is None


@settings(max_examples=400, deadline=None)
@given(payload=st.binary(max_size=120))
def test_parse_greeting_never_raises(payload: bytes) -> None:
    """Arbitrary bytes parse as a greeting or as None, never raise."""
    parse_greeting(payload)
    parse_greeting(b"\x0a" + payload)
    parse_greeting(b"\x0a5.7\x00" + payload)


# ----------------------------------------------------------------- login


def test_login_round_trip() -> None:
    """A login this module builds parses back to what was given."""
    caps = BACKEND_CAPS | Cap.MULTI_RESULTS
    payload = login_payload(
        caps, UTF8MB4_GENERAL_CI, "app", b"t" * 20, "shop", auth.NATIVE, {"_client_name": "x"}
    )
    login = parse_login(payload)
    assert login == Login(
        capabilities=int(caps | Cap.CONNECT_WITH_DB),
        max_packet=1 << 30,
        collation=UTF8MB4_GENERAL_CI,
        user="app",
        auth_response=b"t" * 20,
        database="shop",
        auth_plugin=auth.NATIVE,
        raw_attributes=login.raw_attributes if login else b"",
    )
    assert login is not None
    assert login.attributes == {"_client_name": "x"}


@settings(max_examples=150, deadline=None)
@given(
    caps=UINT32,
    collation=st.integers(min_value=0, max_value=255),
    user=NO_NUL,
    auth_response=st.binary(max_size=300),
    database=NO_NUL,
    plugin=st.text(st.characters(min_codepoint=1, max_codepoint=0x7F), max_size=30),
    attributes=st.dictionaries(st.text(max_size=20), st.text(max_size=300), max_size=8),
)
def test_login_round_trip_any_fields(
    caps: int,
    collation: int,
    user: str,
    auth_response: bytes,
    database: str,
    plugin: str,
    attributes: dict[str, str],
) -> None:
    """Any 4.1 login survives a round trip; flags decide which optional parts are there."""
    caps |= Cap.PROTOCOL_41
    login = parse_login(
        login_payload(caps, collation, user, auth_response, database, plugin, attributes)
    )
    assert login is not None
    assert login.capabilities & Cap.PLUGIN_AUTH_LENENC_DATA
    assert bool(login.capabilities & Cap.CONNECT_WITH_DB) == bool(database)
    assert (login.collation, login.user, login.auth_response) == (collation, user, auth_response)
    assert login.database == database
    assert login.auth_plugin == (plugin if caps & Cap.PLUGIN_AUTH else "")
    assert login.attributes == (attributes if caps & Cap.CONNECT_ATTRS else {})


def test_login_with_one_byte_auth_length() -> None:
    """Without lenenc auth data, SECURE_CONNECTION's one-byte length prefix is read."""
    caps = Cap.PROTOCOL_41 | Cap.SECURE_CONNECTION | Cap.PLUGIN_AUTH
    payload = login_prefix(caps) + b"\x03abc" + b"mysql_native_password\x00"
    login = parse_login(payload)
    assert login is not None
    assert (login.user, login.auth_response, login.database) == ("app", b"abc", "")
    assert login.auth_plugin == auth.NATIVE
    assert login.max_packet == 1 << 24


def test_login_with_nul_terminated_auth_and_no_final_plugin_nul() -> None:
    """Old-style NUL-terminated auth data is read; a plugin name without its NUL is taken."""
    caps = Cap.PROTOCOL_41 | Cap.CONNECT_WITH_DB | Cap.PLUGIN_AUTH
    payload = login_prefix(caps) + b"pw\x00db\x00caching_sha2_password"
    login = parse_login(payload)
    assert login is not None
    assert (login.auth_response, login.database, login.auth_plugin) == (
        b"pw",
        "db",
        auth.CACHING_SHA2,
    )


def test_login_attributes_stop_at_garbage() -> None:
    """Connection attributes are read until they stop making sense."""
    caps = Cap.PROTOCOL_41 | Cap.PLUGIN_AUTH_LENENC_DATA | Cap.CONNECT_ATTRS
    attrs = lenenc_bytes(b"k") + lenenc_bytes(b"v") + lenenc_bytes(b"k2") + b"\xfc\xff"
    payload = login_prefix(caps) + b"\x00" + bytes((len(attrs),)) + attrs
    login = parse_login(payload)
    assert login is not None
    assert login.attributes == {"k": "v"}


@pytest.mark.parametrize(
    "payload",
    [
        login_prefix(Cap.SECURE_CONNECTION) + b"\x00",  # not PROTOCOL_41
        login_prefix(Cap.PROTOCOL_41)[:32],  # no user name
        login_prefix(Cap.PROTOCOL_41) + b"pw",  # auth without its NUL
        login_prefix(Cap.PROTOCOL_41 | Cap.SECURE_CONNECTION) + b"\x09abc",  # auth cut short
        login_prefix(Cap.PROTOCOL_41 | Cap.SECURE_CONNECTION),  # no auth length byte
        login_prefix(Cap.PROTOCOL_41 | Cap.PLUGIN_AUTH_LENENC_DATA) + b"\xfb",  # NULL auth
        login_prefix(Cap.PROTOCOL_41 | Cap.CONNECT_WITH_DB) + b"\x00db",  # db without NUL
        login_prefix(Cap.PROTOCOL_41, user=b"\xff\xfe") + b"\x00",  # user not UTF-8
    ],
)
def test_bad_logins_are_none(payload: bytes) -> None:
    """A login that is cut short, pre-4.1 or not UTF-8 parses as None."""
    assert parse_login(payload) is None


@settings(max_examples=400, deadline=None)
@given(payload=st.binary(max_size=150), caps=UINT32)
def test_parse_login_never_raises(payload: bytes, caps: int) -> None:
    """Arbitrary bytes, also behind any capability flags, parse as a login or None."""
    parse_login(payload)
    parse_login(login_prefix(caps | Cap.PROTOCOL_41) + payload)


# ----------------------------------------------------------------- SSLRequest


def test_ssl_request() -> None:
    """A 32-byte login prefix with SSL and PROTOCOL_41 is an SSLRequest with those flags."""
    caps = Cap.PROTOCOL_41 | Cap.SSL | Cap.PLUGIN_AUTH
    assert parse_ssl_request(login_prefix(caps)[:32]) == caps
    assert parse_ssl_request(login_prefix(Cap.PROTOCOL_41)[:32]) is None
    assert parse_ssl_request(login_prefix(Cap.SSL)[:32]) is None
    assert parse_ssl_request(login_prefix(caps)) is None  # a full login is not one


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=40))
def test_parse_ssl_request_never_raises(payload: bytes) -> None:
    """Arbitrary bytes parse as an SSLRequest's flags or None."""
    caps = parse_ssl_request(payload)
    assert caps is None or len(payload) == 32


# ----------------------------------------------------------------- AuthSwitchRequest


def test_auth_switch_round_trip() -> None:
    """An AuthSwitchRequest gives back its plugin and data (without the trailing NUL)."""
    payload = auth_switch_payload(auth.NATIVE, NONCE)
    assert parse_auth_switch(payload) == (auth.NATIVE, NONCE)
    assert parse_auth_switch(b"\xfemysql_clear_password\x00") == (auth.CLEAR, b"")


def test_old_or_broken_auth_switch_is_none() -> None:
    """The bare 0xfe of the old protocol, a plugin without NUL, or an OK, is None."""
    assert parse_auth_switch(b"\xfe") is None
    assert parse_auth_switch(b"\xfeplugin") is None
    assert parse_auth_switch(b"\x00\x00\x00\x02\x00\x00\x00") is None
    assert parse_auth_switch(b"") is None


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=60))
def test_parse_auth_switch_never_raises(payload: bytes) -> None:
    """Arbitrary bytes parse as an AuthSwitchRequest or None."""
    parse_auth_switch(payload)
    parse_auth_switch(b"\xfe" + payload)


# ----------------------------------------------------------------- passwords


def sha1(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()  # noqa: S324 - the protocol's hash


def test_scramble_is_20_bytes_without_nul_or_dollar() -> None:
    """Auth data has 20 bytes, none NUL or '$', and differs between calls."""
    values = {auth.scramble() for _ in range(20)}
    assert len(values) == 20
    assert all(len(v) == 20 and 0 not in v and ord("$") not in v for v in values)


@settings(max_examples=50, deadline=None)
@given(password=st.text(max_size=40), nonce=st.binary(min_size=20, max_size=20))
def test_native_verify_accepts_the_right_password(password: str, nonce: bytes) -> None:
    """The client's token for the right password verifies and yields SHA1(password)."""
    stage1 = sha1(password.encode())
    token = auth.native_token(stage1, nonce)
    assert auth.native_verify(auth.native_stage2(password), nonce, token) == stage1


def test_native_verify_refuses_a_wrong_password_or_nonce() -> None:
    """A token made from another password, for another nonce, or cut short, is refused."""
    stage2 = auth.native_stage2("secret")
    right = auth.native_token(sha1(b"secret"), NONCE)
    assert auth.native_verify(stage2, NONCE, auth.native_token(sha1(b"Secret"), NONCE)) is None
    assert auth.native_verify(stage2, bytes(20), right) is None
    assert auth.native_verify(stage2, NONCE, right[:19]) is None
    assert auth.native_verify(stage2, NONCE, b"") is None


def test_native_stage2_is_the_stored_hash() -> None:
    """native_stage2 matches MySQL's PASSWORD('secret') without the '*'."""
    stored = "14E65567ABDB5135D0CFD9A70B3032C179A49EE7"
    assert auth.native_stage2("secret").hex().upper() == stored


def test_secret_parses_a_stored_hash() -> None:
    """'*' and 40 hex digits is a stored hash: no clear text, the hash as stage2."""
    secret = auth.Secret.parse("*14E65567ABDB5135D0CFD9A70B3032C179A49EE7")
    assert secret.clear is None
    assert secret.stage2 == auth.native_stage2("secret")
    token = auth.native_token(sha1(b"secret"), NONCE)
    assert auth.native_verify(secret.stage2, NONCE, token) == sha1(b"secret")


def test_secret_parses_clear_text() -> None:
    """Anything else is a clear password, including a short one starting with '*'."""
    secret = auth.Secret.parse("*secret")
    assert secret == auth.Secret("*secret", auth.native_stage2("*secret"))
    assert auth.Secret.parse("") == auth.Secret("", auth.native_stage2(""))


def test_secret_refuses_a_hash_that_is_not_hex() -> None:
    """A 41-character '*' value with non-hex digits raises ValueError."""
    with pytest.raises(ValueError, match="non-hexadecimal"):
        auth.Secret.parse("*" + "G" * 40)


@settings(max_examples=50, deadline=None)
@given(password=st.text(max_size=40), nonce=st.binary(min_size=20, max_size=20))
def test_sha2_verify(password: str, nonce: bytes) -> None:
    """The fast-path token verifies for its password and nonce only."""
    token = auth.sha2_token(password, nonce)
    assert len(token) == 32
    assert auth.sha2_verify(password, nonce, token)
    assert not auth.sha2_verify(password + "x", nonce, token)
    assert not auth.sha2_verify(password, nonce, token[:31])


def test_sha2_token_matches_the_protocol_formula() -> None:
    """XOR(SHA256(pw), SHA256(SHA256(SHA256(pw)) + nonce)), as MySQL computes it."""
    p1 = hashlib.sha256(b"secret").digest()
    mix = hashlib.sha256(hashlib.sha256(p1).digest() + NONCE).digest()
    assert auth.sha2_token("secret", NONCE) == bytes(a ^ b for a, b in zip(p1, mix, strict=True))


def test_rsa_key_decrypts_what_a_client_encrypts() -> None:
    """A password XORed with the nonce and encrypted with the public key decrypts back."""
    key = auth.RsaKey()
    public = serialization.load_pem_public_key(key.public_pem)
    assert isinstance(public, rsa.RSAPublicKey)
    clear = b"p\xc3\xa4ss\x00"  # what clients send: the NUL-terminated password
    mixed = bytes(b ^ NONCE[i % len(NONCE)] for i, b in enumerate(clear))
    oaep = padding.OAEP(
        mgf=padding.MGF1(algorithm=hashes.SHA1()),  # noqa: S303 - the protocol's
        algorithm=hashes.SHA1(),  # noqa: S303
        label=None,
    )
    assert key.decrypt_password(public.encrypt(mixed, oaep), NONCE) == "päss"
    assert key.decrypt_password(b"garbage", NONCE) is None


def test_clear_from_packet() -> None:
    """A clear-text password ends at its NUL (or the end of the packet)."""
    assert auth.clear_from_packet(b"secret\x00") == "secret"
    assert auth.clear_from_packet(b"secret") == "secret"


def test_an_ssl_request_we_send_is_one_a_server_reads() -> None:
    """meshproxy's SSLRequest to a backend carries the SSL flag and parses as one."""
    payload = ssl_request_payload(Cap.PROTOCOL_41 | Cap.LONG_PASSWORD, 45)
    caps = parse_ssl_request(payload)
    assert caps is not None
    assert caps & Cap.SSL
    assert payload[8] == 45
