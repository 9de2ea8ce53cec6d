"""One log line per event (a connection refused, a server going down), never per packet."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_logger = logging.getLogger("meshproxy")


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        extra = " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname.lower():<7} {record.msg}"
        return f"{line} {extra}" if extra else line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        return json.dumps(
            {"ts": record.created, "level": record.levelname.lower(), "event": record.msg}
            | {k: str(v) if not isinstance(v, int | float | bool) else v for k, v in fields.items()}
        )


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text) if not text or any(c in text for c in ' ="') else text


def setup(level: str = "info", fmt: str = "text", node: str = "", process: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    _logger.handlers[:] = [handler]
    _logger.setLevel(level.upper())
    _logger.propagate = False
    global _node, _process  # one node per process, set once at start-up
    _node, _process = node, process


_node = ""
_process = ""


def set_level(level: str) -> None:
    _logger.setLevel(level.upper())


def event(name: str, level: int = logging.INFO, **fields: object) -> None:
    """Log one event with key=value fields."""
    if _logger.isEnabledFor(level):
        if _node:
            fields = {"node": _node, **({"proc": _process} if _process else {}), **fields}
        _logger.log(level, name, extra={"fields": fields})


def warning(name: str, **fields: object) -> None:
    event(name, logging.WARNING, **fields)


def debug(name: str, **fields: object) -> None:
    event(name, logging.DEBUG, **fields)
