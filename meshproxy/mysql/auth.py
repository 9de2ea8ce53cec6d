"""Password checks of the frontend login and answers of the backend login.

``mysql_native_password`` proves knowledge of SHA1(password) against a stored
SHA1(SHA1(password)) (MySQL's ``*HEX`` form); a successful check also yields SHA1(password),
which is all meshproxy needs to log the same user in to a backend, so a login configured
with only the stored hash still gets pooled backend connections once its first client
has logged in. ``caching_sha2_password`` needs the clear password: its fast path is a
SHA-256 scramble; its full authentication sends the password in clear over TLS, or
RSA-encrypted with the server's public key on a plaintext connection.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

NATIVE = "mysql_native_password"
CACHING_SHA2 = "caching_sha2_password"
CLEAR = "mysql_clear_password"

# caching_sha2_password's AuthMoreData codes.
FAST_AUTH_OK = b"\x03"
PERFORM_FULL_AUTH = b"\x04"
REQUEST_PUBLIC_KEY = b"\x02"


# NUL ends the data for clients that read it as a C string; MySQL's own nonces avoid "$"
# too. Both are mapped to their neighbours (as a server's salt generator narrows its bytes).
_NONCE_BYTES = bytes.maketrans(b"\x00$", b"\x01%")


def scramble() -> bytes:
    """20 bytes of auth data for a login, without NUL or ``$``."""
    return os.urandom(20).translate(_NONCE_BYTES)


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def sha1_of(password: str) -> bytes:
    """SHA1(password): what a native login proves, and all a backend login needs."""
    return hashlib.sha1(password.encode()).digest()  # noqa: S324 - the protocol's hash


def native_stage2(password: str) -> bytes:
    """SHA1(SHA1(password)): what ``*HEX`` stores."""
    return hashlib.sha1(sha1_of(password)).digest()  # noqa: S324


def native_token(sha1_password: bytes, nonce: bytes) -> bytes:
    """A client's mysql_native_password answer, from SHA1(password)."""
    stage2 = hashlib.sha1(sha1_password).digest()  # noqa: S324 - the protocol's hash
    return _xor(sha1_password, hashlib.sha1(nonce[:20] + stage2).digest())  # noqa: S324


def native_verify(stage2: bytes, nonce: bytes, token: bytes) -> bytes | None:
    """Check a mysql_native_password answer; SHA1(password) when it is right."""
    if len(token) != 20:
        return None
    candidate = _xor(token, hashlib.sha1(nonce[:20] + stage2).digest())  # noqa: S324
    if hmac.compare_digest(hashlib.sha1(candidate).digest(), stage2):  # noqa: S324
        return candidate
    return None


def sha2_token(password: str, nonce: bytes) -> bytes:
    """caching_sha2_password's fast-path answer, from the clear password."""
    p1 = hashlib.sha256(password.encode()).digest()
    p2 = hashlib.sha256(p1).digest()
    return _xor(p1, hashlib.sha256(p2 + nonce[:20]).digest())


def sha2_verify(password: str, nonce: bytes, token: bytes) -> bool:
    return len(token) == 32 and hmac.compare_digest(sha2_token(password, nonce), token)


@dataclass(frozen=True)
class Secret:
    """What meshproxy knows of a login's password: the clear text, or only the stored hash."""

    clear: str | None
    stage2: bytes  # SHA1(SHA1(password))

    @classmethod
    def parse(cls, text: str) -> Secret:
        """A clear password, or MySQL's ``*`` + 40 hex digits (raises ValueError)."""
        if len(text) == 41 and text.startswith("*"):
            return cls(None, bytes.fromhex(text[1:]))
        return cls(text, native_stage2(text))


class RsaKey:
    """The key pair full caching_sha2 authentication uses on plaintext connections."""

    def __init__(self) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_pem = self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def decrypt_password(self, data: bytes, nonce: bytes) -> str | None:
        """The password a client encrypted (XORed with the nonce, then RSA-OAEP)."""
        try:
            plain = self._key.decrypt(
                data,
                padding.OAEP(
                    mgf=padding.MGF1(algorithm=hashes.SHA1()),  # noqa: S303 - the protocol's
                    algorithm=hashes.SHA1(),  # noqa: S303
                    label=None,
                ),
            )
        except ValueError:
            return None
        mixed = bytes(b ^ nonce[i % len(nonce)] for i, b in enumerate(plain))
        return mixed.rstrip(b"\x00").decode("utf-8", "replace")


def clear_from_packet(payload: bytes) -> str:
    """A password sent in clear (NUL-terminated) during full authentication."""
    return payload.split(b"\x00", 1)[0].decode("utf-8", "replace")
