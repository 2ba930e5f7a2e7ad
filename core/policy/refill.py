"""When credits are topped up: pure functions of the credits' spec and times
(sans-IO: no clock, no store), used by the key actor (``sync_credits``), the
workers' shared table (through the actor), plans' and identities' pools, and
the ``Retry-After`` of ``QUOTA_EXCEEDED``.

Theory of operation
-------------------
A refill happens at *instants*; a balance remembers the last instant it was
refilled at (at first: when its credits were set). ``refills_due`` counts
the instants in ``(since, now]`` and names the last one, and the balance is
topped up to ``refill_amount`` once whatever the count (unused credits do
not pile up, as Unkey does). The instants are:

``refill_interval_seconds = S``
    ``since + k*S``: counted from the last refill, so from when the credits
    were set.
``refill_interval = "daily"``
    every 00:00 UTC (an epoch second divisible by 86,400: POSIX time has no
    leap seconds, UTC no daylight saving).
``refill_interval = "monthly"``
    00:00 UTC on ``refill_day`` (1-28, default 1) of every month: every month
    has that day, so no month is skipped or doubled.

Times are floats of epoch seconds, as everywhere in storage.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Final, Protocol

__all__ = [
    "DAY",
    "NEVER",
    "RefillSpec",
    "next_refill",
    "refills",
    "refills_due",
    "retry_after",
]

DAY: Final = 86_400
#: The wait reported for credits that never refill: "not soon".
NEVER: Final = 3600


class RefillSpec(Protocol):
    """What the rule reads of ``storage.Credits``."""

    @property
    def refill_amount(self) -> int: ...
    @property
    def refill_interval_seconds(self) -> float: ...
    @property
    def refill_interval(self) -> str | None: ...
    @property
    def refill_day(self) -> int | None: ...


def refills(spec: RefillSpec) -> bool:
    """Whether ``spec``'s balance is ever topped up."""
    return spec.refill_amount > 0 and (
        spec.refill_interval is not None or spec.refill_interval_seconds > 0
    )


# ---- the monthly calendar: months as one running index (year*12 + month-1) ----


def _month_instant(index: int, day: int) -> float:
    year, month0 = divmod(index, 12)
    return datetime(year, month0 + 1, day, tzinfo=UTC).timestamp()


def _months_passed(t: float, day: int) -> int:
    """The index of the month whose refill instant is the last at or before ``t``."""
    moment = datetime.fromtimestamp(t, UTC)
    index = moment.year * 12 + moment.month - 1
    return index if _month_instant(index, day) <= t else index - 1


def _calendar(spec: RefillSpec) -> tuple[str, int] | None:
    if spec.refill_interval == "daily":
        return "daily", 0
    if spec.refill_interval == "monthly":
        return "monthly", spec.refill_day or 1
    return None


def refills_due(spec: RefillSpec, since: float, now: float) -> tuple[int, float]:
    """How many refill instants fall in ``(since, now]``, and the last of
    them (``since`` when there is none): what the balance's "refilled at"
    becomes after topping up."""
    if not refills(spec) or now <= since:
        return 0, since
    calendar = _calendar(spec)
    if calendar is None:
        interval = spec.refill_interval_seconds
        # The slack keeps "exactly one period later" from flooring to zero.
        periods = math.floor((now - since) / interval + 1e-9)
        return (periods, since + periods * interval) if periods > 0 else (0, since)
    kind, day = calendar
    if kind == "daily":
        count = math.floor(now / DAY) - math.floor(since / DAY)
        return (count, math.floor(now / DAY) * DAY) if count > 0 else (0, since)
    last = _months_passed(now, day)
    count = last - _months_passed(since, day)
    return (count, _month_instant(last, day)) if count > 0 else (0, since)


def next_refill(spec: RefillSpec, last_refill_at: float) -> float:
    """The first refill instant after ``last_refill_at``; ``inf`` if the
    credits never refill."""
    if not refills(spec):
        return math.inf
    calendar = _calendar(spec)
    if calendar is None:
        return last_refill_at + spec.refill_interval_seconds
    kind, day = calendar
    if kind == "daily":
        return (math.floor(last_refill_at / DAY) + 1) * DAY
    return _month_instant(_months_passed(last_refill_at, day) + 1, day)


def retry_after(spec: RefillSpec | None, refilled_at: float | None, now: float) -> int:
    """Whole seconds until the balance is next topped up (at least 1;
    ``NEVER`` for credits that never refill): ``QUOTA_EXCEEDED``'s Retry-After."""
    if spec is None or not refills(spec):
        return NEVER
    at = next_refill(spec, refilled_at if refilled_at is not None else now)
    return max(1, math.ceil(at - now - 1e-6))
