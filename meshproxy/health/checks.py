"""Active health checks: one probe of one server, mapped to (ok, detail). Never raises."""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass

from meshproxy.config import Address, CheckConfig


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    detail: str
    read_only: bool | None = None


async def run_check(check: CheckConfig, address: Address) -> CheckResult:
    """Probe ``address`` as ``check`` says, within ``check.timeout_ms``."""
    timeout_s = check.timeout_ms / 1000
    try:
        async with asyncio.timeout(timeout_s):
            if check.type == "mysql":
                return await _mysql(check, address, timeout_s)
            return await _tcp(address)
    except TimeoutError:
        return CheckResult(False, f"timed out after {check.timeout_ms} ms")
    except OSError as exc:
        return CheckResult(False, exc.strerror or str(exc))
    except Exception as exc:
        return CheckResult(False, _describe_mysql(exc))


async def _tcp(address: Address) -> CheckResult:
    _, writer = await asyncio.open_connection(address.host, address.port)
    writer.close()
    await writer.wait_closed()
    return CheckResult(True, "tcp connect ok")


async def _mysql(check: CheckConfig, address: Address, timeout_s: float) -> CheckResult:
    # Imported here: workers import this module but never check, and aiomysql (with PyMySQL
    # and cryptography) is a tenth of a worker's start-up, which is its restart time.
    import aiomysql

    # aiomysql warns about server-side notes on some versions; they are not our concern.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conn = await aiomysql.connect(
            host=address.host,
            port=address.port,
            user=check.user,
            password=check.password,
            connect_timeout=timeout_s,
            autocommit=True,
        )
    try:
        async with conn.cursor() as cursor:
            await cursor.execute("SELECT @@read_only")
            row = await cursor.fetchone()
    finally:
        # COM_QUIT, so the server does not count an aborted connection for every check.
        await conn.ensure_closed()
    read_only = bool(row and int(row[0]))
    return CheckResult(True, f"read_only={int(read_only)}", read_only)


def _describe_mysql(exc: BaseException) -> str:
    args: tuple[object, ...] = tuple(getattr(exc, "args", ()))
    if len(args) >= 2 and isinstance(args[0], int):
        return f"mysql error {args[0]}: {args[1]}"
    return str(exc) or type(exc).__name__
