"""Application logs: stdlib ``logging`` with levels, as text or JSON lines.

Modules log through ``logging.getLogger("triogate.<module>")`` and nothing
else; how the lines look is decided once, here, from the ``[log]`` section.
``json`` writes one object per line (``ts``, ``level``, ``logger``,
``message``, and ``request_id`` / ``exc`` when there are any), for log
shippers that should not have to parse free text. The access log (one line
per request) is a separate stream: see ``accesslog.py``.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from typing import TextIO

import msgspec

from triogate.config import LogConfig

__all__ = ["TEXT_FORMAT", "JsonFormatter", "configure_logging", "json_info_line"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Line(msgspec.Struct, omit_defaults=True):
    ts: str
    level: str
    logger: str
    message: str
    request_id: str | None = None
    exc: str | None = None
    stack: str | None = None


def rfc3339(ts: float) -> str:
    """``2024-05-01T12:00:00.123Z``: UTC, milliseconds."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def json_info_line(message: str, logger: str) -> str:
    """``message`` as one INFO line of the JSON log format, for what is written
    to stdout outside logging (the readiness lines): with ``log.format =
    "json"`` stdout carries nothing but JSON objects."""
    line = _Line(ts=rfc3339(time.time()), level="INFO", logger=logger, message=message)
    return msgspec.json.encode(line).decode()


class JsonFormatter(logging.Formatter):
    """One JSON object per record. ``request_id`` comes from the record's
    extras (``log.info(..., extra={"request_id": rid})``)."""

    def __init__(self) -> None:
        super().__init__()
        # A handler formats under its own lock, so one encoder is enough.
        self._encoder = msgspec.json.Encoder()

    def format(self, record: logging.LogRecord) -> str:
        exc = None
        if record.exc_info:
            exc = self.formatException(record.exc_info)
        elif record.exc_text:
            exc = record.exc_text
        request_id = getattr(record, "request_id", None)
        line = _Line(
            ts=rfc3339(record.created),
            level=record.levelname,
            logger=record.name,
            message=record.getMessage(),
            request_id=str(request_id) if request_id is not None else None,
            exc=exc,
            stack=self.formatStack(record.stack_info) if record.stack_info else None,
        )
        return self._encoder.encode(line).decode()


def configure_logging(
    config: LogConfig, *, level: str | None = None, stream: TextIO | None = None
) -> None:
    """Replace the root logger's handlers with one writing ``config.format``
    lines to ``stream`` (stderr). ``level`` (the command line's) overrides
    ``config.level``."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    formatter = JsonFormatter() if config.format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level or config.level, handlers=[handler], force=True)
