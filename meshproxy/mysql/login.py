"""The server side of the login, sans I/O: packets in, steps out.

    greeting -> [SSLRequest -> TLS] -> HandshakeResponse41
        -> [AuthSwitchRequest -> answer]           another plugin than the client chose
        -> [AuthMoreData(full auth) -> password]   caching_sha2_password, not cached yet
        -> OK | ERR 1045

A login that gets the password wrong, names an unknown user, or sends something that is
not a login ends with the ERR a MySQL server would send; the shell closes afterwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from meshproxy.mysql import auth
from meshproxy.mysql.constants import (
    ER_ACCESS_DENIED_ERROR,
    ER_HANDSHAKE_ERROR,
    SERVER_CAPS,
    UTF8MB4_GENERAL_CI,
    Cap,
    Status,
)
from meshproxy.mysql.handshake import (
    Greeting,
    Login,
    auth_switch_payload,
    greeting_payload,
    parse_change_user,
    parse_login,
    parse_ssl_request,
)
from meshproxy.mysql.packets import Packet, err_payload, ok_payload

# What the greeting says until a backend's own version is known. Clients pick defaults by
# it (MySQL 8 clients choose collation 255, which MariaDB lacks): it must name the flavor.
SERVER_VERSION = "5.5.5-10.11.6-MariaDB-meshproxy"


@dataclass(frozen=True)
class Account:
    name: str
    secret: auth.Secret
    require_tls: bool
    plugin: str = ""  # the auth plugin it must use; "" takes the client's choice of two


@dataclass(frozen=True)
class Send:
    """Send this payload to the client and wait for its next packet."""

    payload: bytes


@dataclass(frozen=True)
class StartTls:
    """The client asked for TLS: wrap the connection, then wait for its login."""


@dataclass(frozen=True)
class Accepted:
    payloads: tuple[bytes, ...]  # to send, in order: [AuthMoreData(fast auth OK),] OK
    account: Account
    login: Login
    sha1_password: bytes | None  # learned from a native login, for backend logins


@dataclass(frozen=True)
class Refused:
    err: bytes  # the ERR payload to send; the shell closes after it
    reason: str  # for counters: unknown user, wrong password, tls required, bad handshake


Step = Send | StartTls | Accepted | Refused


class ServerLogin:
    """One client's login, driven by its packets."""

    def __init__(
        self,
        connection_id: int,
        accounts: Callable[[str], Account | None],
        rsa: auth.RsaKey | None,
        cached: set[str],
        tls_offered: bool,
        peer_host: str,
        server_version: str = SERVER_VERSION,
    ) -> None:
        self.server_version = server_version
        self.nonce = auth.scramble()
        self._accounts = accounts
        self._rsa = rsa
        self._cached = cached  # users whose caching_sha2 login is "cached" (fast path)
        self._tls_offered = tls_offered
        self._host = peer_host
        self.tls = False
        self.connection_id = connection_id
        self._login: Login | None = None
        self._account: Account | None = None
        self._plugin = ""
        self._stage = "login"
        self.capabilities = 0

    @property
    def user_name(self) -> str:
        return self._login.user if self._login is not None else ""

    def greeting(self) -> bytes:
        caps = SERVER_CAPS | (Cap.SSL if self._tls_offered else 0)
        return greeting_payload(
            Greeting(
                server_version=self.server_version,
                connection_id=self.connection_id,
                scramble=self.nonce,
                capabilities=caps,
                collation=UTF8MB4_GENERAL_CI,
                status=Status.AUTOCOMMIT,
                auth_plugin=auth.NATIVE,
            )
        )

    def receive(self, packet: Packet) -> Step:
        payload = packet.payload
        if self._stage == "login":
            ssl_caps = parse_ssl_request(payload) if not self.tls else None
            if ssl_caps is not None:
                if not self._tls_offered:
                    return self._bad("TLS was not offered")
                self.tls = True
                return StartTls()
            login = parse_login(payload)
            if login is None:
                return self._bad("malformed login")
            return self._start(login)
        if self._stage == "switched":
            return self._check(payload)
        if self._stage == "full":
            return self._full(payload)
        if self._stage == "rsa":
            return self._rsa_password(payload)
        return self._bad("unexpected packet")

    def change_user(self, payload: bytes) -> Step:
        """COM_CHANGE_USER on a logged-in connection: the login starts over."""
        login = parse_change_user(payload, self.capabilities)
        if login is None:
            return self._bad("malformed COM_CHANGE_USER")
        if not login.collation and self._login is not None:
            login = dataclasses.replace(login, collation=self._login.collation)
        self._stage = "login"
        self._account = None
        return self._start(login)

    def _start(self, login: Login) -> Step:
        self._login = login
        if not self.capabilities:
            self.capabilities = login.capabilities & (SERVER_CAPS | Cap.SSL)
        account = self._accounts(login.user)
        if account is None:
            return self._deny("unknown user", bool(login.auth_response))
        self._account = account
        if account.require_tls and not self.tls:
            return self._deny("tls required", bool(login.auth_response))
        plugin = login.auth_plugin or auth.NATIVE
        wanted = account.plugin or (
            plugin if plugin in (auth.NATIVE, auth.CACHING_SHA2) else auth.NATIVE
        )
        if wanted == auth.CACHING_SHA2 and account.secret.clear is None:
            wanted = auth.NATIVE  # only the stored native hash is known
        if wanted != plugin or not login.capabilities & Cap.PLUGIN_AUTH:
            if not login.capabilities & Cap.PLUGIN_AUTH:
                return self._verify_native(login.auth_response)
            self.nonce = auth.scramble()
            self._plugin = wanted
            self._stage = "switched"
            return Send(auth_switch_payload(wanted, self.nonce))
        self._plugin = plugin
        return self._check(login.auth_response)

    def _check(self, answer: bytes) -> Step:
        if self._plugin == auth.CACHING_SHA2:
            return self._sha2(answer)
        return self._verify_native(answer)

    def _verify_native(self, answer: bytes) -> Step:
        account = self._account
        assert account is not None
        if not answer and account.secret.clear == "":
            return self._accept(None)  # an account with an empty password
        sha1 = auth.native_verify(account.secret.stage2, self.nonce, answer)
        if sha1 is None:
            return self._deny("wrong password", bool(answer))
        return self._accept(sha1)

    def _sha2(self, answer: bytes) -> Step:
        account = self._account
        assert account is not None
        clear = account.secret.clear
        assert clear is not None
        if not clear and answer in (b"", b"\x00"):
            return self._accept(None)
        if not auth.sha2_verify(clear, self.nonce, answer):
            return self._deny("wrong password", bool(answer))
        if account.name in self._cached:
            self._stage = "fast"
            return self._accept(None, more=auth.FAST_AUTH_OK)
        self._stage = "full"  # like a server whose cache does not hold this user yet
        return Send(b"\x01" + auth.PERFORM_FULL_AUTH)

    def _full(self, payload: bytes) -> Step:
        if self.tls:
            return self._compare_clear(auth.clear_from_packet(payload))
        if payload == auth.REQUEST_PUBLIC_KEY and self._rsa is not None:
            self._stage = "rsa"
            return Send(b"\x01" + self._rsa.public_pem)
        return self._deny("full authentication needs TLS or the RSA key", True)

    def _rsa_password(self, payload: bytes) -> Step:
        assert self._rsa is not None
        password = self._rsa.decrypt_password(payload, self.nonce)
        if password is None:
            return self._deny("wrong password", True)
        return self._compare_clear(password)

    def _compare_clear(self, password: str) -> Step:
        account = self._account
        assert account is not None
        if account.secret.clear is None or password != account.secret.clear:
            return self._deny("wrong password", True)
        self._cached.add(account.name)
        return self._accept(None)

    def _accept(self, sha1: bytes | None, more: bytes = b"") -> Step:
        account, login = self._account, self._login
        assert account is not None
        assert login is not None
        self._stage = "done"
        ok = ok_payload(Status.AUTOCOMMIT)
        payloads = (b"\x01" + more, ok) if more else (ok,)
        return Accepted(payloads, account, login, sha1)

    def _deny(self, reason: str, used_password: bool) -> Step:
        login = self._login
        user = login.user if login else ""
        self._stage = "done"
        using = "YES" if used_password else "NO"
        message = f"Access denied for user '{user}'@'{self._host}' (using password: {using})"
        return Refused(err_payload(ER_ACCESS_DENIED_ERROR, message, "28000"), reason)

    def _bad(self, reason: str) -> Step:
        self._stage = "done"
        return Refused(err_payload(ER_HANDSHAKE_ERROR, "Bad handshake", "08S01"), reason)
