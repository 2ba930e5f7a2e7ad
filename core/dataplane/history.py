"""Usage history on the hot path: each request is one increment into its
actor's current minute, by outcome and by status class.

Theory of operation
-------------------
An actor (``keyactor``) holds a ``MinuteCounts``: the minutes it counted
since its last flush, each a list of ten counters (five outcomes, five
status classes). The current minute's bounds are kept as two floats, so a
request costs two comparisons and two increments; a new minute (once a
minute per busy actor) costs a dict lookup. No datetime, no allocation per
request.

The flush (``actors``) hands the minutes to ``control.history.add_minutes``
in the same write transaction as the usage counters: each minute is added
to its minute, hour and day bucket there (UTC, aligned on the epoch), so
the hot path never touches an hour or a day.

Outcomes (each request is in exactly one):

* ``allowed``: the key was accepted and within its limits and credits,
  whatever the answer was, except
* ``upstream_error``: a 502, 503 or 504 from the upstream, or the gateway's
  own ``BAD_GATEWAY``, ``UPSTREAM_UNAVAILABLE`` or ``UPSTREAM_TIMEOUT``;
* ``rate_limited`` (429 ``RATE_LIMITED``) and ``quota_exceeded`` (429
  ``QUOTA_EXCEEDED``);
* ``invalid``: a *known* key refused (revoked, expired, rotated past its
  grace, disabled, lacking a scope, of a denied role), counted where
  key-auth refuses it (``count_refused``). An unknown key, or a key of
  another keyspace, belongs to no one and is not counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from triogate.dataplane.actors import ActorRegistry

__all__ = [
    "ALLOWED",
    "INVALID",
    "OUTCOMES",
    "QUOTA_EXCEEDED",
    "RATE_LIMITED",
    "UPSTREAM_ERROR",
    "MinuteCounts",
    "Minutes",
    "count_refused",
    "outcome_of",
]

ALLOWED: Final = 0
RATE_LIMITED: Final = 1
QUOTA_EXCEEDED: Final = 2
INVALID: Final = 3
UPSTREAM_ERROR: Final = 4
#: The outcome names, by index; the status classes follow at 5..9 (1xx..5xx).
OUTCOMES: Final = ("allowed", "rate_limited", "quota_exceeded", "invalid", "upstream_error")
COUNTERS: Final = 10
MINUTE: Final = 60.0

#: What a flush carries: (minute since the epoch, the ten counters) pairs.
Minutes = tuple[tuple[int, tuple[int, ...]], ...]

_CODES: Final[dict[str, int]] = {
    "RATE_LIMITED": RATE_LIMITED,
    "QUOTA_EXCEEDED": QUOTA_EXCEEDED,
    "BAD_GATEWAY": UPSTREAM_ERROR,
    "UPSTREAM_UNAVAILABLE": UPSTREAM_ERROR,
    "UPSTREAM_TIMEOUT": UPSTREAM_ERROR,
    # Key refusals come through ``count_refused``; listed so a refusal that
    # still reaches the log phase with a consumer is counted the same way.
    "KEY_REVOKED": INVALID,
    "KEY_EXPIRED": INVALID,
    "KEY_ROTATED": INVALID,
    "KEY_DISABLED": INVALID,
    "INSUFFICIENT_SCOPE": INVALID,
    "ROLE_DENIED": INVALID,
}


def outcome_of(status: int, code: str | None) -> int:
    """The outcome of an answered request: ``code`` is the gateway's
    problem code, None for an upstream's answer."""
    if code is None:
        return UPSTREAM_ERROR if 502 <= status <= 504 else ALLOWED
    return _CODES.get(code, ALLOWED)


def status_class(status: int) -> int:
    """0 for 1xx ... 4 for 5xx (out-of-range statuses to the nearest)."""
    return min(max(status // 100, 1), 5) - 1


class MinuteCounts:
    """One actor's unflushed history: counters per minute since the epoch.

    Nearly always only the current minute is unflushed (the flusher runs far
    more often than once a minute), so it has fields of its own and nothing
    is allocated before the first count; other minutes (a flush running late,
    a clock stepping back, a failed flush given back) go to ``older``, made
    when first needed. 100,000 live actors each hold one."""

    __slots__ = ("counts", "end", "minute", "older", "start")

    def __init__(self) -> None:
        # The current minute's counters and bounds; None and an empty range
        # until the first count, so it rolls.
        self.counts: list[int] | None = None
        self.minute = 0
        self.older: dict[int, list[int]] | None = None
        self.start = 0.0
        self.end = 0.0

    def __repr__(self) -> str:
        minutes = (self.counts is not None) + len(self.older or ())
        return f"<MinuteCounts {minutes} minutes>"

    def count(self, now: float, outcome: int, klass: int) -> None:
        """One request at ``now`` (wall-clock seconds): ``outcome`` 0..4,
        ``klass`` its status class 0..4."""
        if not (self.start <= now < self.end):
            self._roll(now)
        counts = self.counts
        assert counts is not None  # _roll set it
        counts[outcome] += 1
        counts[5 + klass] += 1

    def _roll(self, now: float) -> None:
        minute = max(int(now // MINUTE), 0)  # a clock before 1970 counts at 1970
        older = self.older
        if self.counts is not None:
            if older is None:
                older = self.older = {}
            older[self.minute] = self.counts
        counts = older.pop(minute, None) if older else None
        if counts is None:
            counts = [0] * COUNTERS
        self.counts = counts
        self.minute = minute
        self.start = minute * MINUTE
        self.end = self.start + MINUTE

    def take(self) -> Minutes:
        """The counted minutes, handed to a flush; empty from here on."""
        counts, older = self.counts, self.older
        if counts is None and not older:
            return ()
        out: list[tuple[int, tuple[int, ...]]] = []
        if older:
            out.extend((minute, tuple(c)) for minute, c in older.items())
        if counts is not None:
            out.append((self.minute, tuple(counts)))
        self.counts = None
        self.older = None
        self.start = self.end = 0.0
        return tuple(out)

    def restore(self, minutes: Minutes) -> None:
        """A flush of ``minutes`` failed: count them again, to be written
        with the next flush."""
        for minute, counts in minutes:
            current = self.counts
            if current is not None and minute == self.minute:
                mine = current
            else:
                if self.older is None:
                    self.older = {}
                found = self.older.get(minute)
                if found is None:
                    self.older[minute] = list(counts)
                    continue
                mine = found
            for i, n in enumerate(counts):
                mine[i] += n


def count_refused(
    registry: ActorRegistry, key_id: str, identity_id: str | None, status: int
) -> None:
    """A known key was refused (``invalid``): count it in its actor's
    history and its identity's (not in the running request counters, which
    count the requests a key was let through for)."""
    now = registry.clock()
    klass = status_class(status)
    for owner in (key_id, identity_id):
        if owner is None:
            continue
        actor = registry.actor(owner)
        actor.history.count(now, INVALID, klass)
        actor.last_active = now
        actor._touch()  # the flusher writes it
