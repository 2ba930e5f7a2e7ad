"""The rate-limit math, sans-IO: every decision is a pure function of ``now``.

Tables first (like h11's state-machine tests: given this state and this
``now``, exactly this decision), then hypothesis properties that hold for any
limit, period, request times and costs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triogate.config import RateLimitConfig
from triogate.policy.ratelimit import (
    Decision,
    Limit,
    LimitState,
    acquire,
    decide,
    headers_for,
    limit_from,
    release,
)
from triogate.storage import RateLimit

# The limiter compares times with this much slack (a float resolves ~2.4e-7 s
# at epoch times); "a bit earlier" in these tests is always well beyond it.
SLACK = 1e-6
PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)

# A step: (now, cost, allowed, remaining, reset, retry_after).
Step = tuple[float, int, bool, int, float, float]


def snapshot(state: LimitState) -> tuple[float, float, int, int]:
    return (state.tat, state.window, state.count, state.previous)


def run_table(limit: Limit, steps: Sequence[Step]) -> None:
    """Apply each step with ``acquire`` (which commits only when allowed) and
    check the decision field by field; a denial must leave the state alone."""
    state = LimitState()
    for i, (now, cost, allowed, remaining, reset, retry_after) in enumerate(steps):
        before = snapshot(state)
        predicted = decide(limit, state, now, cost)
        assert snapshot(state) == before, f"step {i}: decide changed the state"
        decisions, reservation = acquire([(limit, state)], now, cost)
        (d,) = decisions
        assert d == predicted, f"step {i}: decide and acquire disagree"
        assert d.limit is limit
        assert d.allowed is allowed, f"step {i} at t={now}: {d}"
        assert d.remaining == remaining, f"step {i} at t={now}: {d}"
        assert d.reset == pytest.approx(reset, abs=1e-12), f"step {i} at t={now}: {d}"
        assert d.retry_after == pytest.approx(retry_after, abs=1e-12), f"step {i}: {d}"
        assert (reservation is not None) is allowed
        if not allowed:
            assert snapshot(state) == before, f"step {i}: a denial consumed something"


def assert_same_decision(a: Decision, b: Decision) -> None:
    assert (a.limit, a.allowed, a.remaining) == (b.limit, b.allowed, b.remaining), (a, b)
    assert a.reset == pytest.approx(b.reset, abs=1e-9), (a, b)
    assert a.retry_after == pytest.approx(b.retry_after, abs=1e-9), (a, b)


# ---- GCRA ------------------------------------------------------------------------

THIRD = 1 / 3

GCRA_3_PER_SECOND: list[Step] = [
    # now    cost allowed remaining reset        retry_after
    (0.0, 1, True, 2, THIRD, 0.0),
    (0.0, 1, True, 1, 2 * THIRD, 0.0),
    (0.0, 1, True, 0, 1.0, 0.0),  # the burst: three at once
    (0.0, 1, False, 0, 1.0, THIRD),  # the 4th waits exactly one emission interval
    (0.2, 1, False, 0, 0.8, THIRD - 0.2),
    (THIRD - 1e-3, 1, False, 0, 1 - THIRD + 1e-3, 1e-3),  # not a bit earlier
    (THIRD, 1, True, 0, 1.0, 0.0),  # ... and exactly then
    (THIRD, 1, False, 0, 1.0, THIRD),
    (2 * THIRD, 1, True, 0, 1.0, 0.0),  # then one every T
    (5.0, 1, True, 2, THIRD, 0.0),  # idle long enough: the burst is whole again
    (5.0 + THIRD, 1, True, 2, THIRD, 0.0),
]

GCRA_3_PER_SECOND_COSTS: list[Step] = [
    (0.0, 2, True, 1, 2 * THIRD, 0.0),
    (0.0, 2, False, 1, 2 * THIRD, THIRD),  # two units do not fit, one would
    (0.0, 1, True, 0, 1.0, 0.0),
    (0.0, 3, False, 0, 1.0, 1.0),  # a whole burst's cost waits for the whole period
    (2 * THIRD, 2, True, 0, 1.0, 0.0),
    (10.0, 3, True, 0, 1.0, 0.0),  # cost == limit fits a fresh limit
]


def test_gcra_table_three_per_second() -> None:
    run_table(Limit("s", 3, 1.0), GCRA_3_PER_SECOND)


def test_gcra_table_costs() -> None:
    run_table(Limit("s", 3, 1.0), GCRA_3_PER_SECOND_COSTS)


def test_gcra_interval() -> None:
    assert Limit("m", 60, 60.0).interval == 1.0
    assert Limit("s", 4, 1.0).interval == 0.25


@pytest.mark.parametrize("now", [0.0, 0.5, 100.0, 1_800_000_000.0])
def test_gcra_cost_above_the_limit_is_always_denied(now: float) -> None:
    limit = Limit("s", 3, 1.0)
    state = LimitState()
    for t in (now, now + 1.0, now + 3600.0):
        decisions, reservation = acquire([(limit, state)], t, cost=4)
        assert not decisions[0].allowed
        assert reservation is None
        assert snapshot(state) == (0.0, -1, 0, 0)


def test_gcra_cost_above_the_limit_has_no_finite_retry_after() -> None:
    """Such a request can never pass, so ``retry_after`` must not promise a
    time (the sliding window says ``inf``); GCRA must not say 1/3 s."""
    limit = Limit("s", 3, 1.0)
    state = LimitState()
    d = decide(limit, state, 0.0, cost=4)
    assert not d.allowed
    # Whatever retry_after says, retrying then must pass, or it must be inf.
    if math.isfinite(d.retry_after):
        assert decide(limit, state, d.retry_after, cost=4).allowed, d
    assert d.retry_after == math.inf


# ---- sliding window --------------------------------------------------------------

SLIDING_4_PER_10S: list[Step] = [
    # now   cost allowed remaining reset retry_after
    (0.0, 1, True, 3, 10.0, 0.0),
    (1.0, 1, True, 2, 9.0, 0.0),
    (2.0, 1, True, 1, 8.0, 0.0),
    (3.0, 1, True, 0, 7.0, 0.0),
    # Full: the next window must first let 1/4 of these four slide out.
    (5.0, 1, False, 0, 5.0, 7.5),
    (9.999, 1, False, 0, 0.001, 2.501),
    # The boundary: at 10.0 the window is new, the previous one weighs fully.
    (10.0, 1, False, 0, 10.0, 2.5),
    (12.49, 1, False, 0, 7.51, 0.01),
    (12.5, 1, True, 0, 7.5, 0.0),  # 4 * 0.75 + 0 + 1 == 4
    (15.0, 1, True, 0, 5.0, 0.0),  # 4 * 0.5 + 1 + 1 == 4
    (15.0, 1, False, 0, 5.0, 2.5),  # 4 * 0.5 + 2 + 1 > 4: wait for 0.25 of it
    (17.5, 1, True, 0, 2.5, 0.0),  # 4 * 0.25 + 2 + 1 == 4
    # Two windows later nothing is left of either.
    (31.0, 1, True, 3, 9.0, 0.0),
    (31.0, 2, True, 1, 9.0, 0.0),
    # 3 + 2 > 4: in the next window, 1/3 of these three must slide out first.
    (31.0, 2, False, 1, 9.0, 9.0 + 10 / 3),
    (43.0, 2, False, 1, 7.0, 10 / 3 - 3.0),
    (40.0 + 10 / 3, 2, True, 0, 10 - 10 / 3, 0.0),
]


def test_sliding_window_table() -> None:
    run_table(Limit("w", 4, 10.0, "sliding_window"), SLIDING_4_PER_10S)


def test_sliding_window_weighs_the_previous_window() -> None:
    limit = Limit("w", 10, 10.0, "sliding_window")
    state = LimitState()
    for _ in range(10):
        assert acquire([(limit, state)], 9.0)[1] is not None
    # At 14.0, 60% of the previous window overlaps (4, 14]: used == 6.
    d = decide(limit, state, 14.0)
    assert d.allowed
    assert d.remaining == 3
    for _ in range(4):
        assert acquire([(limit, state)], 14.0)[1] is not None
    d = decide(limit, state, 14.0)
    assert not d.allowed
    assert d.remaining == 0
    # 10 * w + 4 + 1 <= 10 once w <= 0.5: at 15.0.
    assert d.retry_after == pytest.approx(1.0, abs=1e-12)
    assert not decide(limit, state, 14.999).allowed
    assert decide(limit, state, 15.0).allowed


@pytest.mark.parametrize("period", [0.1, 0.3, 0.7, 1.1, 2.2])
def test_sliding_window_weighs_the_previous_window_for_any_period(period: float) -> None:
    """Periods that are not binary fractions: the window arithmetic must still
    recognise the window right after the one that was counted."""
    limit = Limit("w", 10, period, "sliding_window")
    state = LimitState()
    k = 7
    t = (k + 0.5) * period
    for _ in range(10):
        assert acquire([(limit, state)], t)[1] is not None
    # Just after the next window starts, the previous one still weighs ~100%.
    d = decide(limit, state, (k + 1.001) * period)
    assert not d.allowed, (state, d)


@pytest.mark.parametrize("now", [0.0, 7.0, 1_800_000_000.0])
def test_sliding_window_cost_above_the_limit(now: float) -> None:
    limit = Limit("w", 4, 10.0, "sliding_window")
    state = LimitState()
    decisions, reservation = acquire([(limit, state)], now, cost=5)
    assert reservation is None
    assert not decisions[0].allowed
    assert decisions[0].retry_after == math.inf
    assert snapshot(state) == (0.0, -1, 0, 0)


# ---- several limits: all-or-nothing -------------------------------------------------


def test_acquire_denied_by_one_limit_consumes_nothing() -> None:
    burst = Limit("burst", 5, 1.0)
    minute = Limit("minute", 3, 60.0, "sliding_window")
    hourly = Limit("hour", 100, 3600.0)
    states = [LimitState(), LimitState(), LimitState()]
    items = list(zip((burst, minute, hourly), states, strict=True))
    for i in range(3):
        decisions, reservation = acquire(items, float(i))
        assert reservation is not None
        assert all(d.allowed for d in decisions)
    before = [snapshot(s) for s in states]
    decisions, reservation = acquire(items, 3.0)
    assert reservation is None
    assert [snapshot(s) for s in states] == before  # the GCRA limits too
    # The refusing limit is reported first.
    assert decisions[0].limit is minute
    assert not decisions[0].allowed
    assert {d.limit.name for d in decisions[1:]} == {"burst", "hour"}
    assert all(d.allowed for d in decisions[1:])
    # Nothing was taken from the limits that allowed: burst is as after t=2.
    assert decide(burst, states[0], 3.0).remaining == 4


def test_acquire_orders_decisions_by_restrictiveness() -> None:
    a = Limit("a", 10, 1.0)
    b = Limit("b", 3, 1.0)
    c = Limit("c", 5, 1.0)
    decisions, reservation = acquire([(a, LimitState()), (b, LimitState()), (c, LimitState())], 0)
    assert reservation is not None
    assert [d.limit.name for d in decisions] == ["b", "c", "a"]
    assert [d.remaining for d in decisions] == [2, 4, 9]


def test_acquire_all_allowed_commits_every_limit() -> None:
    g = Limit("g", 2, 1.0)
    w = Limit("w", 2, 1.0, "sliding_window")
    gs, ws = LimitState(), LimitState()
    for _ in range(2):
        assert acquire([(g, gs), (w, ws)], 0.5, cost=1)[1] is not None
    assert gs.tat == pytest.approx(1.5)
    assert (ws.window, ws.count, ws.previous) == (0.0, 2, 0)
    decisions, reservation = acquire([(g, gs), (w, ws)], 0.5)
    assert reservation is None
    assert [d.allowed for d in decisions] == [False, False]


def test_acquire_of_no_limits_allows() -> None:
    decisions, reservation = acquire([], 0.0)
    assert decisions == []
    assert reservation is not None


@pytest.mark.parametrize("algorithm", ["gcra", "sliding_window"])
def test_release_gives_capacity_back(algorithm: Literal["gcra", "sliding_window"]) -> None:
    limit = Limit("l", 3, 1.0, algorithm)
    state = LimitState()
    assert acquire([(limit, state)], 0.25)[1] is not None
    before = snapshot(state)
    expected = decide(limit, state, 0.25, cost=2)
    _, reservation = acquire([(limit, state)], 0.25, cost=2)
    assert reservation is not None
    assert not decide(limit, state, 0.25).allowed
    release(reservation, 0.25)
    assert_same_decision(decide(limit, state, 0.25, cost=2), expected)
    if algorithm == "sliding_window":
        assert snapshot(state) == before
    else:
        assert state.tat == pytest.approx(before[0])


def test_release_of_everything_restores_a_fresh_gcra_limit() -> None:
    limit = Limit("l", 3, 1.0)
    state = LimitState()
    _, reservation = acquire([(limit, state)], 10.0, cost=3)
    assert reservation is not None
    release(reservation, 10.0)
    assert decide(limit, state, 10.0, cost=3).allowed
    assert decide(limit, state, 10.0).remaining == 2


def test_release_later_gives_back_only_what_is_still_held() -> None:
    limit = Limit("l", 3, 1.0)
    state = LimitState()
    _, reservation = acquire([(limit, state)], 0.0, cost=3)
    assert reservation is not None
    # A second later the burst has refilled anyway: release must not go negative.
    release(reservation, 1.0)
    assert decide(limit, state, 1.0).remaining == 2
    assert decide(limit, state, 1.0, cost=3).allowed
    assert not decide(limit, state, 1.0, cost=4).allowed


# ---- headers ------------------------------------------------------------------------


def test_headers_for_nothing() -> None:
    assert headers_for([]) == []


def test_headers_for_allowed_report_the_most_restrictive() -> None:
    second = Limit("second", 10, 1.0)
    day = Limit("day", 1000, 86400.0, "sliding_window")
    decisions, _ = acquire([(day, LimitState()), (second, LimitState())], 0.0)
    assert headers_for(decisions) == [
        (b"ratelimit-policy", b'"second";q=10;w=1, "day";q=1000;w=86400'),
        (b"ratelimit", b'"second";r=9;t=1'),
        (b"x-ratelimit-limit", b"10"),
        (b"x-ratelimit-remaining", b"9"),
        (b"x-ratelimit-reset", b"1"),
    ]


def test_headers_for_a_denial_add_retry_after() -> None:
    second = Limit("second", 10, 1.0)
    day = Limit("day", 1000, 86400.0, "sliding_window")
    s_state, d_state = LimitState(), LimitState()
    for _ in range(10):
        assert acquire([(second, s_state), (day, d_state)], 100.0)[1] is not None
    decisions, reservation = acquire([(second, s_state), (day, d_state)], 100.0)
    assert reservation is None
    assert decisions[0].retry_after == pytest.approx(0.1)
    assert headers_for(decisions) == [
        (b"ratelimit-policy", b'"second";q=10;w=1, "day";q=1000;w=86400'),
        (b"ratelimit", b'"second";r=0;t=1'),
        (b"x-ratelimit-limit", b"10"),
        (b"x-ratelimit-remaining", b"0"),
        (b"x-ratelimit-reset", b"1"),
        (b"retry-after", b"1"),  # 0.1 s rounds up to a whole second
    ]


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [
        (0.0, b"1"),
        (1e-6, b"1"),
        (1.0, b"1"),
        (1.0000001, b"1"),
        (1.00001, b"2"),
        (2.5, b"3"),
        (59.2, b"60"),
    ],
)
def test_headers_for_retry_after_is_a_whole_number_of_seconds(
    retry_after: float, header: bytes
) -> None:
    limit = Limit("m", 60, 60.0)
    d = Decision(limit, False, 0, 12.25, retry_after)
    headers = dict(headers_for([d]))
    assert headers[b"retry-after"] == header
    assert headers[b"x-ratelimit-reset"] == b"13"
    assert headers[b"ratelimit-policy"] == b'"m";q=60;w=60'


def test_headers_for_lists_each_policy_once() -> None:
    limit = Limit("m", 60, 60.0)
    other = Limit("h", 1000, 3600.0)
    decisions = [
        Decision(limit, True, 5, 1.0, 0.0),
        Decision(limit, True, 7, 1.0, 0.0),
        Decision(other, True, 3, 2.0, 0.0),
    ]
    headers = dict(headers_for(decisions))
    assert headers[b"ratelimit-policy"] == b'"m";q=60;w=60, "h";q=1000;w=3600'
    assert headers[b"ratelimit"] == b'"h";r=3;t=2'
    assert b"retry-after" not in headers


def test_headers_for_a_request_that_can_never_pass() -> None:
    """A cost above a sliding window's limit: retry_after is inf. The headers
    must still be produced (not an OverflowError, i.e. a 500)."""
    limit = Limit("w", 4, 10.0, "sliding_window")
    d = decide(limit, LimitState(), 0.0, cost=5)
    assert d.retry_after == math.inf
    headers = dict(headers_for([d]))
    assert int(headers[b"retry-after"]) >= 1
    assert headers[b"ratelimit"] == b'"w";r=4;t=10'


# ---- properties ---------------------------------------------------------------------

Request = tuple[float, int]  # (now, cost)


@st.composite
def traffic(draw: st.DrawFn, *, costs_up_to_limit: bool = True) -> tuple[Limit, list[Request]]:
    """A GCRA limit, and requests at non-decreasing times with costs (bursts
    included: a gap of 0 is common). Costs stay within the limit unless
    ``costs_up_to_limit`` is false (then a cost may exceed a small limit)."""
    limit = draw(st.integers(min_value=1, max_value=20))
    period = draw(
        st.one_of(
            st.sampled_from([0.1, 0.25, 0.3, 1.0, 1.5, 10.0, 60.0]),
            st.floats(min_value=0.01, max_value=100.0, allow_nan=False, allow_infinity=False),
        )
    )
    max_cost = min(limit if costs_up_to_limit else limit + 2, 4)
    gap = st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=period * 1.5))
    pairs = draw(
        st.lists(st.tuples(gap, st.integers(min_value=1, max_value=max_cost)), max_size=80)
    )
    t = draw(st.sampled_from([0.0, 3.0, 1000.0]))
    requests: list[Request] = []
    for dt, cost in pairs:
        t += dt
        requests.append((t, cost))
    return Limit("p", limit, period), requests


def as_sliding(limit: Limit) -> Limit:
    return Limit(limit.name, limit.limit, limit.period, "sliding_window")


def admitted(limit: Limit, requests: Sequence[Request]) -> list[Request]:
    state = LimitState()
    out: list[Request] = []
    for now, cost in requests:
        decisions, reservation = acquire([(limit, state)], now, cost)
        assert decisions[0].allowed is (reservation is not None)
        if reservation is not None:
            out.append((now, cost))
    return out


@PROPERTY_SETTINGS
@given(traffic(costs_up_to_limit=False))
def test_gcra_never_admits_more_than_interval_over_t_plus_burst(
    case: tuple[Limit, list[Request]],
) -> None:
    limit, requests = case
    passed = admitted(limit, requests)
    t = limit.interval
    for i, (a, _) in enumerate(passed):
        units = 0
        for b, cost in passed[i:]:
            units += cost
            # The window [a, b] starts at an admitted request and ends at one:
            # the fullest window of length L = b - a starting at a.
            # (The limiter grants 1e-6 s of float slack at epoch times.)
            assert units <= (b - a + SLACK) / t + limit.limit, (a, b, units, passed)


@PROPERTY_SETTINGS
@given(st.integers(min_value=1, max_value=50), st.floats(min_value=0.01, max_value=1e4))
def test_gcra_admits_a_whole_burst_when_fresh(limit_value: int, period: float) -> None:
    limit = Limit("b", limit_value, period)
    state = LimitState()
    for i in range(limit_value):
        decisions, reservation = acquire([(limit, state)], 5.0)
        assert reservation is not None, i
        assert decisions[0].remaining == limit_value - i - 1
    denied = decide(limit, state, 5.0)
    assert not denied.allowed
    assert denied.retry_after == pytest.approx(limit.interval, rel=1e-9)


@PROPERTY_SETTINGS
@given(traffic(costs_up_to_limit=False))
def test_sliding_window_fixed_windows_never_exceed_the_limit(
    case: tuple[Limit, list[Request]],
) -> None:
    limit = as_sliding(case[0])
    per_window: dict[int, int] = {}
    for now, cost in admitted(limit, case[1]):
        k = math.floor(now / limit.period)
        per_window[k] = per_window.get(k, 0) + cost
    assert all(units <= limit.limit for units in per_window.values()), per_window


@PROPERTY_SETTINGS
@given(traffic(costs_up_to_limit=False))
def test_sliding_window_any_window_of_one_period_admits_at_most_twice_the_limit(
    case: tuple[Limit, list[Request]],
) -> None:
    limit = as_sliding(case[0])
    passed = admitted(limit, case[1])
    for i, (a, _) in enumerate(passed):
        units = sum(cost for b, cost in passed[i:] if b < a + limit.period)
        assert units <= 2 * limit.limit, (a, units, passed)


@PROPERTY_SETTINGS
@given(traffic(costs_up_to_limit=False))
def test_sliding_window_estimate_never_exceeds_the_limit(
    case: tuple[Limit, list[Request]],
) -> None:
    """The algorithm's own invariant: at every admission, the previous fixed
    window's admitted units, weighted by its overlap with (now - period, now],
    plus this window's (this request included) fit the limit."""
    limit = as_sliding(case[0])
    passed = admitted(limit, case[1])
    by_window: dict[int, list[Request]] = {}
    for now, cost in passed:
        by_window.setdefault(math.floor(now / limit.period), []).append((now, cost))
    for now, _ in passed:
        k = math.floor(now / limit.period)
        previous = sum(c for _, c in by_window.get(k - 1, []))
        current = sum(c for t, c in by_window[k] if t <= now)
        weight = 1.0 - (now - k * limit.period) / limit.period
        assert previous * weight + current <= limit.limit + 1e-6, (now, previous, current)


def copy_state(state: LimitState) -> LimitState:
    copy = LimitState(state.tat)
    copy.window, copy.count, copy.previous = state.window, state.count, state.previous
    return copy


def check_retry_after_is_exact(limit: Limit, requests: Sequence[Request]) -> None:
    """At every denial: retried exactly ``retry_after`` later the request
    passes; retried at 99% of it (when 1% matters) it does not."""
    state = LimitState()
    for now, cost in requests:
        decisions, reservation = acquire([(limit, state)], now, cost)
        if reservation is not None:
            continue
        d = decisions[0]
        frozen = copy_state(state)
        assert 0 < d.retry_after < math.inf, d
        later = decide(limit, frozen, now + d.retry_after, cost)
        assert later.allowed, (frozen, now, cost, d, later)
        if d.retry_after >= 0.01:
            sooner = decide(limit, frozen, now + 0.99 * d.retry_after, cost)
            assert not sooner.allowed, (frozen, now, cost, d, sooner)


@PROPERTY_SETTINGS
@given(traffic())
def test_gcra_retry_after_is_exact(case: tuple[Limit, list[Request]]) -> None:
    check_retry_after_is_exact(*case)


@PROPERTY_SETTINGS
@given(traffic())
def test_sliding_window_retry_after_is_exact(case: tuple[Limit, list[Request]]) -> None:
    check_retry_after_is_exact(as_sliding(case[0]), case[1])


@PROPERTY_SETTINGS
@given(traffic(costs_up_to_limit=False))
def test_acquire_is_all_or_nothing_and_release_undoes_it(
    case: tuple[Limit, list[Request]],
) -> None:
    base, requests = case
    g = base
    w = Limit("w", base.limit + 1, base.period * 2, "sliding_window")
    gs, ws = LimitState(), LimitState()
    for now, cost in requests:
        before = (snapshot(gs), snapshot(ws))
        expected = [decide(g, gs, now, cost), decide(w, ws, now, cost)]
        decisions, reservation = acquire([(g, gs), (w, ws)], now, cost)
        assert (reservation is not None) is all(d.allowed for d in expected)
        assert sorted(d.allowed for d in decisions) == sorted(d.allowed for d in expected)
        if reservation is None:
            assert (snapshot(gs), snapshot(ws)) == before
            continue
        release(reservation, now)
        # Given back at once: the very same request decides the same way.
        assert_same_decision(decide(g, gs, now, cost), expected[0])
        assert_same_decision(decide(w, ws, now, cost), expected[1])
        # Keep the traffic flowing: take it for real this time.
        assert acquire([(g, gs), (w, ws)], now, cost)[1] is not None


# ---- one conversion: configured or stored rate limits to ``Limit`` -----------------------


def test_limit_from_converts_the_config_and_the_storage_type_alike() -> None:
    configured = RateLimitConfig(limit=5, period_seconds=60.0, algorithm="sliding_window")
    stored = RateLimit("minute", 5, 60.0, "sliding_window")
    expected = Limit("minute", 5, 60.0, "sliding_window")
    assert limit_from(configured, "minute") == limit_from(stored, stored.name) == expected
    routed = limit_from(RateLimitConfig(limit=1, period_seconds=1.0), "route-key", "route:r:x")
    assert routed == Limit("route-key", 1, 1.0, "gcra", state_key="route:r:x")
    assert routed.key == "route:r:x"
    # A period stored before the lower bound existed is clamped, as ever.
    assert limit_from(RateLimit("old", 1, 1e-300), "old").period == 0.001


def test_a_reset_moved_by_float_rounding_is_not_a_whole_second_more() -> None:
    now = 1_800_000_000.123  # epoch-sized: GCRA's sums round here
    limit = Limit("burst", 5, 1.0)
    state = LimitState()
    for _ in range(5):
        decisions, _ = acquire([(limit, state)], now)
    headers = dict(headers_for(decisions))
    assert headers[b"x-ratelimit-reset"] == b"1", decisions[0].reset


def test_a_sub_second_period_is_advertised_as_its_rate_per_second() -> None:
    fast = Limit("fast", 5, 0.1)
    decisions, _ = acquire([(fast, LimitState())], 1_800_000_000.0)
    policy = dict(headers_for(decisions))[b"ratelimit-policy"]
    assert policy == b'"fast";q=50;w=1'


@pytest.mark.parametrize("count", [7, 10, 49, 50, 64, 100, 999, 1000, 5000])
@pytest.mark.parametrize("epoch", [0.0, 1.7e9, 1.8e9, 4.0e9])
def test_gcra_admits_exactly_its_limit_at_epoch_times(count: int, epoch: float) -> None:
    # tat accumulates count intervals on top of an epoch time: float drift
    # must not cost the last request (50 per 60 s at ~1.8e9 lost one).
    limit = Limit("l", count, 60.0)
    state = LimitState()
    now = epoch + 0.123
    admitted = sum(acquire([(limit, state)], now)[1] is not None for _ in range(count + 5))
    assert admitted == count
