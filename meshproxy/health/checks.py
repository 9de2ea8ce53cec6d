"""Active health checks: one probe of one server, mapped to (ok, detail). Never raises."""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass
from typing import Any

from meshproxy.config import Address, CheckConfig


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    detail: str
    read_only: bool | None = None
    # Replication, when asked for: the server has a replication source configured, and its
    # Seconds_Behind_Master (None on a primary, and on a replica whose IO or SQL thread is
    # not running).
    replica: bool = False
    lag_s: float | None = None


async def run_check(check: CheckConfig, address: Address, replication: bool = False) -> CheckResult:
    """Probe ``address`` as ``check`` says, within ``check.timeout_ms``; with ``replication``,
    a mysql check also reads the server's replication state (the check user needs the
    SLAVE MONITOR privilege for that)."""
    timeout_s = check.timeout_ms / 1000
    try:
        async with asyncio.timeout(timeout_s):
            if check.type == "mysql":
                return await _mysql(check, address, timeout_s, replication)
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


async def _mysql(
    check: CheckConfig, address: Address, timeout_s: float, replication: bool
) -> CheckResult:
    # Imported here: workers import this module but never check, and aiomysql (with PyMySQL
    # and cryptography) is a tenth of a worker's start-up, which is its restart time.
    import aiomysql
    from pymysql.constants import CLIENT

    # Both statements in one COM_QUERY, one round trip: the server sends two result sets.
    options = {"client_flag": CLIENT.MULTI_STATEMENTS} if replication else {}
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
            **options,
        )
    status: dict[str, Any] | None = None
    try:
        async with conn.cursor() as cursor:
            if not replication:
                await cursor.execute("SELECT @@read_only")
                row = await cursor.fetchone()
            else:
                await cursor.execute("SELECT @@read_only; SHOW SLAVE STATUS")
                row = await cursor.fetchone()
                await cursor.nextset()
                names = [column[0] for column in cursor.description or ()]
                values = await cursor.fetchone()
                status = None if values is None else dict(zip(names, values, strict=True))
    finally:
        # COM_QUIT, so the server does not count an aborted connection for every check.
        await conn.ensure_closed()
    read_only = bool(row and int(row[0]))
    detail = f"read_only={int(read_only)}"
    if not replication:
        return CheckResult(True, detail, read_only)
    if status is None:
        return CheckResult(True, f"{detail} not a replica", read_only)
    lag = status.get("Seconds_Behind_Master")
    if lag is not None:
        return CheckResult(True, f"{detail} lag={int(lag)}s", read_only, True, float(lag))
    return CheckResult(True, f"{detail} {_replication_stopped(status)}", read_only, True, None)


def _replication_stopped(status: dict[str, Any]) -> str:
    """Why a replica has no lag to report: the threads that do not run, and their errors."""
    threads = [
        f"{name}={status.get(name)}"
        for name in ("Slave_IO_Running", "Slave_SQL_Running")
        if status.get(name) != "Yes"
    ]
    if not threads:  # both run, yet no lag: the server could not tell (seldom, briefly)
        return "lag unknown"
    errors = [
        f"{kind} error {errno}: {str(status.get(f'Last_{kind}_Error'))[:200]}"
        for kind in ("IO", "SQL")
        if (errno := status.get(f"Last_{kind}_Errno"))
    ]
    return f"replication stopped ({', '.join(threads + errors)})"


def _describe_mysql(exc: BaseException) -> str:
    args: tuple[object, ...] = tuple(getattr(exc, "args", ()))
    if len(args) >= 2 and isinstance(args[0], int):
        return f"mysql error {args[0]}: {args[1]}"
    return str(exc) or type(exc).__name__
