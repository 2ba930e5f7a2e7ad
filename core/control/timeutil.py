"""Time as the core sees it: float seconds since the epoch, UTC.

Services take a ``clock`` callable so tests can move time without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

__all__ = ["Clock", "epoch", "system_clock", "utc"]

Clock = Callable[[], float]
system_clock: Clock = time.time


def utc(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def utc_required(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def epoch(dt: datetime | None) -> float | None:
    return None if dt is None else dt.timestamp()
