"""One error tree for the whole package.

I/O failures are mapped to these classes at the boundary where they happen, so callers
never have to know whether an OSError, a TimeoutError or a protocol violation was behind
a failed connect.
"""

from __future__ import annotations


class MeshproxyError(Exception):
    """Base of every error meshproxy raises on purpose."""


class ConfigError(MeshproxyError):
    """A configuration is invalid; names the file, the key path and the reason."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {reason}")


class ProtocolError(MeshproxyError):
    """A peer sent bytes that do not follow the protocol we expected."""


class HopHeaderError(ProtocolError):
    """A mesh hop header is malformed, oversized, of an unknown version or over the hop limit."""


class SessionClosed(MeshproxyError):
    """A client session ended while a command of it was being prepared."""


class Refusal(MeshproxyError):
    """A client session's command gets this MySQL error instead of running (the session
    carries on)."""

    def __init__(self, code: int, message: str, sql_state: str = "HY000") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.sql_state = sql_state


class UpstreamError(MeshproxyError):
    """No upstream could be reached for a client connection."""


class ConnectFailed(UpstreamError):
    """One connect attempt to one upstream member failed or timed out."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"connect to {address} failed: {reason}")


class NoUpstream(UpstreamError):
    """No member of an upstream group is eligible for new connections."""


def describe(exc: BaseException) -> str:
    """A short human reason for an I/O failure, for logs and client-facing errors."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
