"""Rate-limit decisions: pure functions of ``now`` (sans-IO, no clock, no I/O).

Theory of operation
-------------------
Two algorithms, chosen per limit:

GCRA (the generic cell rate algorithm; the default)
    One float of state per limit: the *theoretical arrival time* ``tat``.
    With emission interval ``T = period / limit``, a request of cost ``c`` at
    ``now`` is allowed iff ``max(tat, now) + c*T - period <= now``; allowing
    it sets ``tat = max(tat, now) + c*T``. So a fresh limit admits a burst of
    ``limit`` requests, then one every ``T``: over any interval of length
    ``L`` at most ``L/T + limit`` requests pass. Exact, O(1), and the wait
    before the next allowed request is known exactly (``Retry-After``).

sliding window counter (``algorithm = "sliding_window"``)
    Two counters: this fixed window's and the previous one's. The estimate
    at ``now`` weighs the previous window by how much of it still overlaps
    the sliding window ``(now - period, now]``. Cheaper to reason about for
    people used to "N per minute", approximate by design (Cloudflare's
    published error is a fraction of a percent).

Several limits on one request are decided all-or-nothing by ``acquire``:
every limit is checked first, and state changes only if all allow, so a
denied request consumes nothing. ``release`` gives a reservation back (a
request that a later check refused consumes nothing either).

One rate limit, one type per layer: ``triogate.config.RateLimitConfig`` as
configured (``[keys] default_rate_limit``, the ``rate-limit`` plugin's
settings), ``triogate.storage.RateLimit`` as stored on a key, and ``Limit``
here, what a decision takes. ``limit_from`` is the one conversion (config or
storage to ``Limit``); nothing converts back, since a ``Limit`` is never
configured or stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from triogate.policy.limits import (
    MAX_LIMIT,
    MAX_PERIOD,
    MIN_PERIOD,
    Algorithm,
    Decision,
    Limit,
    Reservation,
)

__all__ = [
    "MAX_LIMIT",
    "MAX_PERIOD",
    "MIN_PERIOD",
    "Algorithm",
    "Decision",
    "Limit",
    "LimitSpec",
    "LimitState",
    "Reservation",
    "acquire",
    "decide",
    "limit_from",
    "release",
]

# Times are epoch seconds (~1.8e9), where a float resolves ~2.4e-7 s:
# comparisons and floors get this much slack, or "exactly on time" and
# "exactly N left" would come out one tick wrong.
EPS = 1e-6


class LimitSpec(Protocol):
    """A rate limit as configured or stored (``RateLimitConfig``, storage's
    ``RateLimit``): what ``limit_from`` needs of it."""

    @property
    def limit(self) -> int: ...

    @property
    def period_seconds(self) -> float: ...

    @property
    def algorithm(self) -> Algorithm: ...


def limit_from(spec: LimitSpec, name: str, state_key: str = "") -> Limit:
    """The ``Limit`` a configured or stored rate limit decides with, reported
    as ``name``; ``state_key`` as in ``Limit``. Called when a config or a key
    record is read, never per request."""
    return Limit(name, spec.limit, spec.period_seconds, spec.algorithm, state_key)


class LimitState:
    """The mutable state of one limit for one subject (a key, an address...)."""

    __slots__ = ("count", "previous", "tat", "window")

    def __init__(self, tat: float = 0.0) -> None:
        self.tat = tat  # GCRA
        # Sliding window: the index of the current fixed window,
        # floor(now / period). An integer, not a start time: float starts
        # of consecutive windows differ by not-quite-period for many periods.
        self.window = -1
        self.count = 0  # ... requests in it
        self.previous = 0  # ... requests in the window before

    def __repr__(self) -> str:
        return f"<LimitState tat={self.tat:.3f} window={self.window} {self.previous}/{self.count}>"


def _units(span: float, t: float, most: int) -> int:
    """How many emission intervals ``t`` fit in ``span``, within [0, most].

    The slack absorbs float error in ``span`` (EPS seconds) but never more
    than half an interval: at 10^8 requests per second an interval is 1e-8 s,
    and EPS/t would add a hundred phantom requests."""
    units = math.floor(span / t + min(EPS / t, 0.5))
    return 0 if units < 0 else most if units > most else units


# A float's spacing relative to its value (2**-52, doubled for safety).
_ULP = 4.5e-16


def _gcra(limit: Limit, state: LimitState, now: float, cost: int) -> tuple[Decision, float]:
    period = limit.period
    count = limit.limit
    t = period / count
    tat = state.tat
    start = tat if tat > now else now
    new_tat = start + cost * t
    allow_at = new_tat - period
    # ``tat`` is a sum of up to ``limit`` intervals added to an epoch time
    # (~1.8e9), each addition rounding by up to half a spacing: at 50 per
    # 60 s the drift passes EPS and the 50th request would be refused. The
    # slack follows that worst case, never over half an interval.
    slack = count * now * _ULP
    if slack < EPS:
        slack = EPS
    elif slack > t * 0.5:
        slack = EPS if t * 0.5 < EPS else t * 0.5
    if allow_at > now + slack:
        remaining = _units(period - (start - now), t, count)
        # A cost above the limit never fits, however long one waits.
        wait = math.inf if cost > count else allow_at - now
        return Decision(limit, False, remaining, start - now, wait), tat
    # What this request took is not left over, whatever the float rounding.
    # (``_units`` inlined: the allowed path runs on every request.)
    most = count - cost
    if most < 0:
        most = 0
    fudge = EPS / t
    units = math.floor((period - (new_tat - now)) / t + (fudge if fudge < 0.5 else 0.5))
    remaining = 0 if units < 0 else most if units > most else units
    return Decision(limit, True, remaining, new_tat - now, 0.0), new_tat


def _window(limit: Limit, state: LimitState, now: float) -> tuple[int, int, int]:
    """(window index, previous count, current count) as of ``now``."""
    index = math.floor((now + EPS) / limit.period)
    if index == state.window:
        return index, state.previous, state.count
    if index == state.window + 1:
        return index, state.count, 0
    return index, 0, 0


def _sliding(limit: Limit, state: LimitState, now: float, cost: int) -> Decision:
    index, previous, count = _window(limit, state, now)
    start = index * limit.period
    weight = min(1.0, max(0.0, 1.0 - (now - start) / limit.period))
    used = previous * weight + count
    reset = start + limit.period - now  # when this fixed window ends
    reset = max(0.0, reset)
    if used + cost <= limit.limit + EPS:
        remaining = min(max(0, math.floor(limit.limit - used - cost + EPS)), limit.limit - cost)
        return Decision(limit, True, remaining, reset, 0.0)
    # When will previous*w(t) + count + cost fit? Within this window if the
    # previous window's share can decay enough; else in the next one.
    room = limit.limit - count - cost
    if previous > 0 and room >= 0:
        wait = start + limit.period * (1.0 - room / previous) - now
    else:
        nxt = start + limit.period
        room_next = limit.limit - cost
        if room_next < 0:
            wait = math.inf
        elif count > 0:
            wait = nxt + limit.period * max(0.0, 1.0 - room_next / count) - now
        else:
            wait = nxt - now
    remaining = min(max(0, math.floor(limit.limit - used + EPS)), limit.limit)
    return Decision(limit, False, remaining, reset, max(wait, 1e-3))


def decide(limit: Limit, state: LimitState, now: float, cost: int = 1) -> Decision:
    """What would happen to a request of ``cost`` now (state unchanged)."""
    if limit.algorithm == "gcra":
        return _gcra(limit, state, now, cost)[0]
    return _sliding(limit, state, now, cost)


def acquire(
    items: Sequence[tuple[Limit, LimitState]], now: float, cost: int = 1
) -> tuple[list[Decision], Reservation | None]:
    """Decide every limit; commit all of them only if all allow.

    Returns the decisions (denied ones first, then by fewest remaining, so
    ``decisions[0]`` is the one to report) and the reservation if allowed.
    Synchronous and free of awaits: atomic under trio."""
    if len(items) == 1 and items[0][0].algorithm == "gcra":
        # The common case, without the bookkeeping for several limits.
        limit, state = items[0]
        decision, new_tat = _gcra(limit, state, now, cost)
        if not decision.allowed:
            return [decision], None
        state.tat = new_tat
        return [decision], Reservation(items if type(items) is tuple else tuple(items), cost, now)
    decisions: list[Decision] = []
    commits: list[tuple[LimitState, float]] = []
    for limit, state in items:
        if limit.algorithm == "gcra":
            decision, new_tat = _gcra(limit, state, now, cost)
            commits.append((state, new_tat))
        else:
            decision = _sliding(limit, state, now, cost)
        decisions.append(decision)
    decisions.sort(key=_severity)
    if decisions and not decisions[0].allowed:
        return decisions, None
    for limit, state in items:
        if limit.algorithm == "sliding_window":
            index, previous, count = _window(limit, state, now)
            state.window, state.previous, state.count = index, previous, count + cost
    for state, new_tat in commits:
        state.tat = new_tat
    return decisions, Reservation(tuple(items), cost, now)


def release(reservation: Reservation, now: float) -> None:
    """Give back what a reservation took (the request was refused later)."""
    for limit, state in reservation.items:
        if limit.algorithm == "gcra":
            state.tat = max(now, state.tat - reservation.cost * limit.interval)
            if state.tat <= now:
                state.tat = 0.0
        else:
            index, previous, count = _window(limit, state, now)
            if index == _window(limit, state, reservation.at)[0]:
                state.window, state.previous = index, previous
                state.count = max(0, count - reservation.cost)


def _seconds(value: float) -> int:
    # GCRA's times are epoch-sized floats, exact only to about 2.4e-7 s: a
    # reset of 1.00000024 s is 1 s that rounding moved, not 2 s.
    return max(0, math.ceil(value - 1e-6))


def _policy_item(limit: Limit) -> str:
    """One ``RateLimit-Policy`` item. The window is whole seconds; a period
    under a second is advertised as its rate per second (5 per 0.1 s is
    ``q=50;w=1``), never as a window ten times stricter than it is."""
    if limit.period < 1:
        return f'"{limit.name}";q={int(limit.limit / limit.period)};w=1'
    return f'"{limit.name}";q={limit.limit};w={_seconds(limit.period)}'


def _severity(d: Decision) -> tuple[bool, int, float]:
    # The most restrictive decision sorts first: denied, fewest left, longest wait.
    return (d.allowed, d.remaining, -d.retry_after)


#: The parts of the RateLimit headers that depend only on the limits, not on
#: the decision: formatted once per limit (or set of limits) and reused, since
#: a route's and a key's limits are the same objects request after request.
#: Bounded: cleared when full (limits change only with config or key edits).
_CACHE_SIZE = 4096
_policy_cache: dict[tuple[Limit, ...], bytes] = {}
# Keyed by the Limit's id (a Limit hashes all its fields, per request): the
# entry keeps the Limit itself, so an id is only trusted while that very
# object is alive, never reused by a new one.
_limit_cache: dict[int, tuple[Limit, bytes, bytes, bytes]] = {}


def _policy_value(limits: tuple[Limit, ...]) -> bytes:
    value = _policy_cache.get(limits)
    if value is None:
        seen: dict[str, Limit] = {}
        for lim in limits:
            seen.setdefault(lim.name, lim)
        value = ", ".join(_policy_item(lim) for lim in seen.values()).encode("latin-1")
        if len(_policy_cache) >= _CACHE_SIZE:
            _policy_cache.clear()
        _policy_cache[limits] = value
    return value


def _limit_parts(limit: Limit) -> tuple[Limit, bytes, bytes, bytes]:
    """(the limit, the ``RateLimit`` item's quoted name, the
    ``X-RateLimit-Limit`` value, the ``RateLimit-Policy`` of this limit alone)."""
    parts = _limit_cache.get(id(limit))
    if parts is None or parts[0] is not limit:
        parts = (
            limit,
            f'"{limit.name}";r='.encode("latin-1"),
            b"%d" % limit.limit,
            _policy_item(limit).encode("latin-1"),
        )
        if len(_limit_cache) >= _CACHE_SIZE:
            _limit_cache.clear()
        _limit_cache[id(limit)] = parts
    return parts


# Two limits' policy by the pair's ids, as ``_limit_cache`` (the entry keeps
# both limits, so ids are trusted only while those objects are alive).
_pair_cache: dict[tuple[int, int], tuple[Limit, Limit, bytes]] = {}


def _pair_policy(first: Limit, second: Limit) -> bytes:
    entry = _pair_cache.get((id(first), id(second)))
    if entry is None or entry[0] is not first or entry[1] is not second:
        entry = (first, second, _policy_value((first, second)))
        if len(_pair_cache) >= _CACHE_SIZE:
            _pair_cache.clear()
        _pair_cache[(id(first), id(second))] = entry
    return entry[2]


def headers_for(decisions: Sequence[Decision]) -> list[tuple[bytes, bytes]]:
    """The response headers for every limit a request met: ``RateLimit-Policy``
    lists each policy and ``RateLimit`` reports the most restrictive (IETF
    httpapi ratelimit-headers draft syntax), with the classic
    ``X-RateLimit-*`` trio for the same limit; a denial adds ``Retry-After``
    (whole seconds, at least 1)."""
    if not decisions:
        return []
    if len(decisions) == 1:
        worst = decisions[0]
        _, name_part, limit_value, policy = _limit_parts(worst.limit)
    elif len(decisions) == 2:
        # A key's limit and a route's: the most restrictive picked without a
        # key tuple per decision, the policy cached by the pair's identity.
        first, second = decisions
        if first.allowed is not second.allowed:
            worst = second if first.allowed else first
        elif first.remaining != second.remaining:
            worst = first if first.remaining < second.remaining else second
        else:
            worst = first if first.retry_after >= second.retry_after else second
        _, name_part, limit_value, _ = _limit_parts(worst.limit)
        policy = _pair_policy(first.limit, second.limit)
    else:
        worst = min(decisions, key=_severity)
        _, name_part, limit_value, _ = _limit_parts(worst.limit)
        policy = _policy_value(tuple([d.limit for d in decisions]))
    limit = worst.limit
    # Bytes formatting throughout: no str made and encoded per request.
    remaining = b"%d" % worst.remaining
    seconds = math.ceil(worst.reset - 1e-6)  # ``_seconds``, inlined
    reset = b"%d" % (seconds if seconds > 0 else 0)
    out = [
        (b"ratelimit-policy", policy),
        (b"ratelimit", b"%b%b;t=%b" % (name_part, remaining, reset)),
        (b"x-ratelimit-limit", limit_value),
        (b"x-ratelimit-remaining", remaining),
        (b"x-ratelimit-reset", reset),
    ]
    if not worst.allowed:
        # A request that can never pass (cost above the limit) still gets a
        # finite answer: come back after a whole period.
        wait = worst.retry_after if math.isfinite(worst.retry_after) else limit.period
        out.append((b"retry-after", str(max(1, _seconds(wait))).encode()))
    return out
