"""The retry decisions (``triogate.policy.retry_policy``), pure: back-off with full
jitter, the upstream's Retry-After within the cap, the idempotency rule."""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triogate.policy.retry_policy import IDEMPOTENT, backoff, may_retry, retry_after

# ---- backoff ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry", "base", "cap", "draw", "expected"),
    [
        # a draw of 0 waits nothing, whatever the retry
        (1, 0.1, 10.0, 0.0, 0.0),
        (7, 0.1, 10.0, 0.0, 0.0),
        # the ceiling doubles per retry: 0.1, 0.2, 0.4, 0.8, 1.6
        (1, 0.1, 10.0, 0.5, 0.05),
        (2, 0.1, 10.0, 0.5, 0.1),
        (3, 0.1, 10.0, 0.5, 0.2),
        (4, 0.1, 10.0, 0.5, 0.4),
        (5, 0.1, 10.0, 0.5, 0.8),
        # ... until the cap
        (6, 0.1, 2.0, 0.5, 1.0),
        (20, 0.1, 2.0, 0.5, 1.0),
        (3, 1.0, 3.0, 0.25, 0.75),
        # base 0: no waiting at all
        (4, 0.0, 5.0, 0.9, 0.0),
        # base == cap: the ceiling is the cap from the first retry
        (1, 2.0, 2.0, 0.5, 1.0),
    ],
)
def test_backoff_values(retry: int, base: float, cap: float, draw: float, expected: float) -> None:
    assert backoff(retry, base, cap, draw) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("retry", [1, 2, 3, 4, 8])
def test_backoff_draw_towards_one_reaches_the_ceiling(retry: int) -> None:
    base, cap = 0.25, 1.5
    ceiling = min(cap, base * 2 ** (retry - 1))
    draw = 1.0 - 2**-52  # the largest float below 1
    value = backoff(retry, base, cap, draw)
    assert value <= ceiling
    assert value == pytest.approx(ceiling, rel=1e-12)


def test_backoff_first_retries_for_the_plugin_defaults() -> None:
    # retry plugin defaults: base 0.05 s, cap 2 s
    ceilings = [backoff(n, 0.05, 2.0, 1.0 - 2**-52) for n in range(1, 9)]
    assert ceilings == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])


def test_backoff_is_linear_in_the_draw() -> None:
    values = [backoff(3, 0.5, 10.0, d / 10) for d in range(10)]
    assert values == pytest.approx([0.2 * d for d in range(10)])
    assert values == sorted(values)


@settings(max_examples=500)
@given(
    retry=st.integers(min_value=1, max_value=64),
    base=st.floats(min_value=0, max_value=60, allow_nan=False),
    extra=st.floats(min_value=0, max_value=600, allow_nan=False),
    draw=st.floats(min_value=0, max_value=1, exclude_max=True, allow_nan=False),
)
def test_backoff_always_within_full_jitter_bounds(
    retry: int, base: float, extra: float, draw: float
) -> None:
    cap = min(600.0, base + extra)  # base <= cap, as the config insists
    value = backoff(retry, base, cap, draw)
    ceiling = min(cap, base * 2.0 ** (retry - 1))
    assert 0.0 <= value <= ceiling
    assert value <= cap
    assert value == pytest.approx(ceiling * draw, rel=1e-9, abs=1e-12)


@settings(max_examples=200)
@given(
    retry=st.integers(min_value=1, max_value=30),
    base=st.floats(min_value=0.001, max_value=10, allow_nan=False),
    draw=st.floats(min_value=0, max_value=1, exclude_max=True, allow_nan=False),
)
def test_backoff_never_shrinks_from_one_retry_to_the_next(
    retry: int, base: float, draw: float
) -> None:
    cap = 100.0
    assert backoff(retry, base, cap, draw) <= backoff(retry + 1, base, cap, draw)


# ---- retry_after ---------------------------------------------------------------------------

NOW = float(calendar.timegm((2030, 1, 1, 12, 0, 0)))  # Tue, 01 Jan 2030 12:00:00 GMT


def http_date(offset: float) -> bytes:
    when = datetime.fromtimestamp(NOW + offset, tz=UTC)
    return format_datetime(when, usegmt=True).encode("ascii")


@pytest.mark.parametrize(
    ("value", "cap", "expected"),
    [
        (b"5", 10.0, 5.0),
        (b"0", 10.0, 0.0),
        (b" 7 ", 10.0, 7.0),
        (b"10", 10.0, 10.0),  # exactly the cap is within it
        (b"11", 10.0, None),  # over the cap: not honoured
        (b"3600", 2.0, None),
        (b"007", 10.0, 7.0),
        (b"99999999999999999999999", 10.0, None),
    ],
)
def test_retry_after_seconds(value: bytes, cap: float, expected: float | None) -> None:
    assert retry_after(value, cap, NOW) == expected


def test_retry_after_http_date() -> None:
    assert http_date(3) == b"Tue, 01 Jan 2030 12:00:03 GMT"
    assert retry_after(http_date(3), 10.0, NOW) == pytest.approx(3.0)
    assert retry_after(http_date(10), 10.0, NOW) == pytest.approx(10.0)
    assert retry_after(http_date(0), 10.0, NOW) == 0.0
    # over the cap: not honoured
    assert retry_after(http_date(11), 10.0, NOW) is None
    assert retry_after(http_date(86400), 10.0, NOW) is None
    # in the past: go at once
    assert retry_after(http_date(-1), 10.0, NOW) == 0.0
    assert retry_after(b"Sun, 06 Nov 1994 08:49:37 GMT", 10.0, NOW) == 0.0
    # fractions of a second are the caller's ``now``
    assert retry_after(http_date(3), 10.0, NOW + 0.5) == pytest.approx(2.5)


@pytest.mark.parametrize(
    "value",
    [
        b"Tue, 01 Jan 2030 12:00:04 GMT",  # IMF-fixdate
        b"Tuesday, 01-Jan-30 12:00:04 GMT",  # obsolete RFC 850 format
        b"Tue Jan  1 12:00:04 2030",  # obsolete asctime format (always GMT)
    ],
    ids=["imf-fixdate", "rfc850", "asctime"],
)
def test_retry_after_all_http_date_formats(value: bytes) -> None:
    # RFC 9110 §5.6.7: a recipient must accept all three formats.
    assert retry_after(value, 10.0, NOW) == pytest.approx(4.0)


@pytest.fixture
def non_utc_local_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run with the process's local time zone five hours east of UTC (an
    HTTP-date read as local time would then be five hours in the past)."""
    monkeypatch.setenv("TZ", "XST-5")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(
    "value",
    [
        b"Tue, 01 Jan 2030 12:00:04 GMT",
        b"Tuesday, 01-Jan-30 12:00:04 GMT",
        b"Tue Jan  1 12:00:04 2030",
    ],
    ids=["imf-fixdate", "rfc850", "asctime"],
)
@pytest.mark.usefixtures("non_utc_local_time")
def test_retry_after_http_date_does_not_depend_on_the_local_time_zone(value: bytes) -> None:
    # An HTTP-date is GMT (RFC 9110 §5.6.7), whatever the gateway host's zone.
    assert retry_after(value, 10.0, NOW) == pytest.approx(4.0)


@pytest.mark.usefixtures("non_utc_local_time")
def test_retry_after_minus_zero_zone_is_not_local_time() -> None:
    # Not an HTTP-date, but if accepted, "-0000" is UTC (RFC 5322 §3.3),
    # never the host's local time.
    seconds = retry_after(b"Tue, 01 Jan 2030 12:00:04 -0000", 10.0, NOW)
    assert seconds is None or seconds == pytest.approx(4.0)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"   ",
        b"soon",
        b"-1",
        b"+5",
        b"1.5",
        b"5s",
        b"1e3",
        b"0x10",
        b"Tue, 99 Foo 2030 12:00:00 GMT",
        b"\xb2",  # latin-1 superscript two: str.isdigit() says yes
        b"\xb9\xb3",
        b"\xff\xfe",
        b"\x00",
    ],
)
def test_retry_after_garbage_is_ignored(value: bytes) -> None:
    assert retry_after(value, 10.0, NOW) is None


def test_retry_after_absent() -> None:
    assert retry_after(None, 10.0, NOW) is None


@settings(max_examples=500)
@given(value=st.binary(max_size=40), cap=st.floats(min_value=0, max_value=600))
def test_retry_after_never_raises_and_stays_within_the_cap(value: bytes, cap: float) -> None:
    seconds = retry_after(value, cap, NOW)
    assert seconds is None or 0.0 <= seconds <= cap


@given(seconds=st.integers(min_value=0, max_value=10**6), cap=st.integers(0, 1000))
def test_retry_after_integer_seconds(seconds: int, cap: int) -> None:
    expected = float(seconds) if seconds <= cap else None
    assert retry_after(str(seconds).encode(), float(cap), NOW) == expected


# ---- may_retry -----------------------------------------------------------------------------

PLUGIN_DEFAULT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"])
def test_idempotent_methods_may_be_retried(method: str) -> None:
    assert method in IDEMPOTENT
    assert may_retry(method, False, PLUGIN_DEFAULT_METHODS) is True
    assert may_retry(method, True, PLUGIN_DEFAULT_METHODS) is True


@pytest.mark.parametrize("method", ["POST", "PATCH", "CONNECT", "PURGE"])
def test_other_methods_only_with_an_idempotency_key(method: str) -> None:
    assert method not in IDEMPOTENT
    assert may_retry(method, False, PLUGIN_DEFAULT_METHODS) is False
    assert may_retry(method, True, PLUGIN_DEFAULT_METHODS) is True


def test_the_method_list_is_the_callers() -> None:
    assert may_retry("GET", False, {"PUT"}) is False
    assert may_retry("POST", False, {"POST"}) is True
    assert may_retry("GET", False, ()) is False
    assert may_retry("GET", True, ()) is True
    # Methods are case-sensitive (RFC 9110 §9.1).
    assert may_retry("get", False, PLUGIN_DEFAULT_METHODS) is False


def test_idempotent_set_follows_rfc_9110() -> None:
    # §9.2.2: PUT, DELETE and the safe methods (GET, HEAD, OPTIONS, TRACE).
    assert {"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"} == IDEMPOTENT
    assert "POST" not in IDEMPOTENT and "PATCH" not in IDEMPOTENT


def test_days_ahead_is_over_any_cap() -> None:
    far = format_datetime(datetime.fromtimestamp(NOW, tz=UTC) + timedelta(days=2), usegmt=True)
    assert retry_after(far.encode(), 600.0, NOW) is None
