"""Retry decisions: pure functions (no clock, no randomness of their own).

* ``backoff`` is exponential back-off with *full jitter* (AWS architecture
  blog, "Exponential Backoff And Jitter"): the n-th retry waits a uniformly
  random time in ``[0, min(cap, base * 2**(n-1))]``; the caller passes the
  uniform draw, so tests can pin it.
* ``retry_after`` reads an upstream ``Retry-After`` (seconds or an HTTP
  date) and honours it only within the cap: an upstream cannot park the
  gateway for an hour.
* ``may_retry`` holds the idempotency rule: only methods that are safe to
  repeat (RFC 9110 §9.2.2), or a request carrying an ``Idempotency-Key``.
"""

from __future__ import annotations

import email.utils
from collections.abc import Collection
from datetime import UTC

__all__ = ["IDEMPOTENT", "backoff", "may_retry", "retry_after"]

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


def backoff(retry: int, base: float, cap: float, draw: float) -> float:
    """Wait before retry number ``retry`` (1 for the first retry); ``draw``
    is uniform in [0, 1)."""
    ceiling: float = min(cap, base * 2.0 ** (retry - 1))
    return ceiling * draw


def retry_after(value: bytes | None, cap: float, now: float) -> float | None:
    """Seconds an upstream asked to wait, if it asked and it fits the cap."""
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    if text.isascii() and text.isdigit():  # not "²": Unicode digits are no seconds
        seconds = float(text)
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)  # an HTTP-date is always GMT
        seconds = when.timestamp() - now
    if seconds < 0:
        return 0.0
    return seconds if seconds <= cap else None


def may_retry(method: str, has_idempotency_key: bool, methods: Collection[str]) -> bool:
    return method in methods or has_idempotency_key
