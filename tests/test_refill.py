"""The sans-IO refill rule (``policy.refill``) with explicit times: daily at
00:00 UTC, monthly on ``refill_day`` across month ends and leap years, and
the interval in seconds as before; and the ``Credits`` bounds."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import msgspec
import pytest

from triogate.policy.refill import NEVER, next_refill, refills, refills_due, retry_after
from triogate.storage import Credits


def t(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


def monthly(day: int | None = None) -> Credits:
    return Credits(remaining=0, refill_amount=100, refill_interval="monthly", refill_day=day)


DAILY = Credits(remaining=0, refill_amount=10, refill_interval="daily")


def test_daily_refills_at_midnight_utc() -> None:
    since = t(2027, 3, 14, 15, 30)
    assert next_refill(DAILY, since) == t(2027, 3, 15)
    assert refills_due(DAILY, since, t(2027, 3, 14, 23, 59, 59)) == (0, since)
    assert refills_due(DAILY, since, t(2027, 3, 15)) == (1, t(2027, 3, 15))
    assert refills_due(DAILY, since, t(2027, 3, 18, 6)) == (4, t(2027, 3, 18))
    # Refilled exactly at midnight: the next is the following midnight.
    assert next_refill(DAILY, t(2027, 3, 15)) == t(2027, 3, 16)


def test_monthly_on_the_first_by_default() -> None:
    spec = monthly()
    since = t(2027, 1, 20, 8)
    assert next_refill(spec, since) == t(2027, 2, 1)
    assert refills_due(spec, since, t(2027, 1, 31, 23, 59)) == (0, since)
    assert refills_due(spec, since, t(2027, 2, 1)) == (1, t(2027, 2, 1))
    # Across a year end.
    assert refills_due(spec, t(2027, 11, 15), t(2028, 1, 2)) == (2, t(2028, 1, 1))
    assert next_refill(spec, t(2027, 12, 1)) == t(2028, 1, 1)


def test_monthly_refill_day_28_across_february_and_leap_years() -> None:
    spec = monthly(28)
    # Set on the 29th of January: February's 28th is next, in a leap year too.
    assert next_refill(spec, t(2028, 1, 29)) == t(2028, 2, 28)
    assert next_refill(spec, t(2027, 1, 29)) == t(2027, 2, 28)
    # Leap day and the end of February: the 28th has passed, March's is next.
    assert next_refill(spec, t(2028, 2, 29, 12)) == t(2028, 3, 28)
    assert refills_due(spec, t(2028, 2, 27), t(2028, 2, 29)) == (1, t(2028, 2, 28))
    # Every month has a 28th: twelve refills a year, none skipped or doubled.
    assert refills_due(spec, t(2027, 12, 28), t(2028, 12, 28)) == (12, t(2028, 12, 28))
    # Before the day in the month: last month's counts.
    assert refills_due(spec, t(2027, 5, 1), t(2027, 5, 27)) == (0, t(2027, 5, 1))
    assert refills_due(spec, t(2027, 4, 27), t(2027, 5, 27)) == (1, t(2027, 4, 28))


def test_monthly_on_day_15_from_month_ends() -> None:
    spec = monthly(15)
    assert next_refill(spec, t(2027, 1, 31, 23, 59)) == t(2027, 2, 15)
    assert next_refill(spec, t(2027, 2, 15)) == t(2027, 3, 15)
    assert next_refill(spec, t(2027, 2, 14, 23, 59, 59)) == t(2027, 2, 15)
    assert refills_due(spec, t(2027, 1, 31), t(2027, 4, 30)) == (3, t(2027, 4, 15))


def test_interval_in_seconds_counts_from_the_last_refill() -> None:
    spec = Credits(remaining=0, refill_amount=5, refill_interval_seconds=60)
    assert next_refill(spec, 1000.0) == 1060.0
    assert refills_due(spec, 1000.0, 1059.0) == (0, 1000.0)
    assert refills_due(spec, 1000.0, 1060.0) == (1, 1060.0)
    assert refills_due(spec, 1000.0, 1250.0) == (4, 1240.0)


def test_never_and_retry_after() -> None:
    never = Credits(remaining=3)
    no_amount = Credits(remaining=3, refill_interval="daily")
    assert not refills(never) and not refills(no_amount)
    assert next_refill(never, 0.0) == math.inf
    assert refills_due(no_amount, 0.0, 1e9) == (0, 0.0)
    assert retry_after(never, None, 1e9) == NEVER
    assert retry_after(None, None, 1e9) == NEVER
    now = t(2027, 3, 31, 23, 0)
    assert retry_after(monthly(), t(2027, 3, 1), now) == 3600
    assert retry_after(DAILY, t(2027, 3, 31), t(2027, 3, 31, 23, 59, 59, 500_000)) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"remaining": 1, "refill_interval": "daily", "refill_interval_seconds": 60},
        {"remaining": 1, "refill_interval": "monthly", "refill_day": 29},
        {"remaining": 1, "refill_interval": "monthly", "refill_day": 0},
        {"remaining": 1, "refill_interval": "daily", "refill_day": 3},
        {"remaining": 1, "refill_day": 3},
        {"remaining": 1, "refill_interval": "weekly"},
    ],
)
def test_credits_refuse_bad_refills(body: dict[str, object]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(body, Credits)


def test_credits_decode_without_the_new_fields() -> None:
    # A record written before issue 13 decodes unchanged.
    old = msgspec.msgpack.encode({"remaining": 4, "refill_amount": 2})
    credits = msgspec.msgpack.decode(old, type=Credits)
    assert credits.refill_interval is None and credits.refill_day is None
