"""What a flush writes for one key, and how it merges into the stored
``UsageRecord``: pure (no store, no clock), so the merge rules are tested
without a registry.

The counters (requests, status classes, last use) are *deltas*, added to what
is stored, so several processes may count the same key. The credit balance is
state: each process spends from the balance it knows, and the merge takes
off what this one spent since its last flush from what storage holds now,
so what two processes spent both come off. A balance of an older credits
version (a PATCH another process saw first) never replaces a newer one.
"""

from __future__ import annotations

import msgspec

from triogate.policy.creditversion import older_credits
from triogate.storage import UsageRecord

__all__ = ["UsageDelta", "UsageFlush", "merge_usage"]


class UsageDelta(msgspec.Struct, frozen=True, gc=False):
    """The counters an actor hands to a flush (given back if the write fails)."""

    requests: int
    #: Responses by status class since the last flush: index 0 is 1xx ... 4 is 5xx.
    by_class: tuple[int, int, int, int, int]
    credits_taken: int
    last_used_at: float | None
    #: Usage history: (minute since the epoch, ten counters) pairs
    #: (``history.MinuteCounts``), added to their buckets by the flush.
    minutes: tuple[tuple[int, tuple[int, ...]], ...] = ()


class UsageFlush(msgspec.Struct, frozen=True):
    """One key's part of a flush: its counters as a delta, and the credit
    and limiter state its actor holds."""

    key: bytes
    delta: UsageDelta
    credits: int | None  # the balance as the actor knows it; None: no credits
    credits_version: int
    credits_refilled_at: float | None
    #: GCRA state by limit name; empty keeps what is stored.
    limiters: dict[str, float]
    #: ``credits`` is the exact balance (the workers' shared table holds
    #: it, ``sharedlimits``): stored as is, not merged with what is stored.
    exact: bool = False


def merge_usage(old: UsageRecord | None, flush: UsageFlush) -> tuple[UsageRecord, int | None]:
    """The record to store for ``flush`` over ``old`` (None: nothing stored
    yet), and the balance storage now holds for the actor to pick up (None
    when storage keeps a newer credits version's balance: the actor learns the
    new version from the key record, not from here). An ``exact`` balance
    (several workers) is stored as it is: the shared table holds what every
    worker spent."""
    old = old if old is not None else UsageRecord()
    delta = flush.delta
    credits, version, refilled = flush.credits, flush.credits_version, flush.credits_refilled_at
    remaining = credits
    if (
        credits is not None
        and not flush.exact
        and old.credits_remaining is not None
        and old.credits_version == version
        and old.credits_refilled_at == refilled  # a refill resets the count
    ):
        # Another process may have spent some too: what is stored, less what
        # this actor spent since its last flush.
        taken = delta.credits_taken
        remaining = max(0, min(credits + taken, old.credits_remaining) - taken)
    stale = credits is not None and older_credits(version, old.credits_version)
    if stale or credits is None:
        # Storage has a newer credits version (a PATCH seen by another
        # process first), or this actor holds no balance: keep what is
        # stored, add only the counters.
        remaining = old.credits_remaining
        refilled = old.credits_refilled_at
        version = old.credits_version
    classes = tuple(o + d for o, d in zip(old.by_class, delta.by_class, strict=True))
    record = UsageRecord(
        requests=old.requests + delta.requests,
        last_used_at=max(
            (t for t in (old.last_used_at, delta.last_used_at) if t is not None), default=None
        ),
        by_class=classes,  # type: ignore[arg-type]
        credits_remaining=remaining,
        credits_refilled_at=refilled,
        credits_version=version,
        limiters=flush.limiters or old.limiters,
    )
    return record, None if stale else remaining
