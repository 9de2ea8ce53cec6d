"""What the control plane says about its own mesh certificate: whom it names, when it
expires, and a warning ahead of time (``mesh_tls.expiry_warning_days``)."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from meshproxy import log
from meshproxy.config import Config


def cert_status(config: Config, now: datetime.datetime | None = None) -> dict[str, Any] | None:
    """The ``mesh_tls`` part of ``/status``; None without [mesh_tls]."""
    tls = config.mesh_tls
    if tls is None:
        return None
    from meshproxy.security import pki  # cryptography: control process only

    try:
        info = pki.describe(Path(tls.cert))
    except (OSError, ValueError) as exc:
        return {"cert": tls.cert, "error": str(exc)}
    left = info.not_after - (now or datetime.datetime.now(datetime.UTC))
    expected = tls.name or config.node.name  # a workload's shared certificate names it
    return {
        "cert": tls.cert,
        "subject": info.subject,
        "node": info.node,
        "role": info.role,
        "serial": f"{info.serial:x}",
        "not_after": info.not_after.isoformat(),
        "expires_in_s": round(left.total_seconds()),
        "expiring": left < datetime.timedelta(days=tls.expiry_warning_days),
        "expected": expected,
        "role_matches": info.role == config.node.role and info.node == expected,
    }


def warn_if_needed(config: Config) -> None:
    """Log what an operator must act on: a certificate about to expire, or one that names
    another node or role than this one."""
    status = cert_status(config)
    if status is None:
        return
    if "error" in status:
        log.warning("mesh_tls_cert_unreadable", cert=status["cert"], error=status["error"])
        return
    if status["expiring"]:
        log.warning(
            "mesh_tls_cert_expiring",
            cert=status["cert"],
            not_after=status["not_after"],
            days_left=round(status["expires_in_s"] / 86400, 1),
        )
    if not status["role_matches"]:
        log.warning(
            "mesh_tls_cert_mismatch",
            cert=status["cert"],
            names=f"{status['node']} ({status['role']})",
            node=f"{status['expected']} ({config.node.role})",
        )
