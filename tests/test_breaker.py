"""The circuit breaker's state machine (``triogate.policy.breaker``), pure: no I/O,
no clock. Every scenario is a table of steps ``(now, op, expected)``:

* ``ok`` / ``fail``: ``record(failed, now)``; ``expected`` is the state after;
* ``allow``: ``allow(now)``; ``expected`` is its answer (True/False);
* ``avail``: ``available(now)``; ``expected`` is its answer;
* ``state``: ``available(now)`` for its tick only; ``expected`` is the state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triogate.policy.breaker import Breaker, BreakerSettings, BreakerSnapshot, State

CLOSED, OPEN, HALF = State.CLOSED, State.OPEN, State.HALF_OPEN

Op = Literal["ok", "fail", "allow", "avail", "state"]
Step = tuple[float, Op, State | bool]


def run(breaker: Breaker, steps: Sequence[Step]) -> Breaker:
    for i, (now, op, expected) in enumerate(steps):
        where = f"step {i}: {op} at {now} ({breaker!r})"
        if op == "ok" or op == "fail":
            breaker.record(op == "fail", now)
            assert breaker.state is expected, where
        elif op == "allow":
            assert breaker.allow(now) is expected, where
        elif op == "avail":
            assert breaker.available(now) is expected, where
        else:
            breaker.available(now)
            assert breaker.state is expected, where
    return breaker


def make(**kw: Any) -> Breaker:
    return Breaker(BreakerSettings(**kw))


def opened(at: float, **kw: Any) -> Breaker:
    """A breaker that opened at ``at`` (``failure_threshold`` failures)."""
    kw.setdefault("failure_threshold", 1)
    b = make(**kw)
    for _ in range(int(kw["failure_threshold"])):
        b.record(True, at)
    assert b.state is OPEN
    return b


# ---- closed -> open: consecutive failures -------------------------------------------

CONSECUTIVE: list[tuple[str, int, list[Step]]] = [
    ("three in a row open it", 3, [(0, "fail", CLOSED), (1, "fail", CLOSED), (2, "fail", OPEN)]),
    (
        "a success resets the count",
        3,
        [
            (0, "fail", CLOSED),
            (1, "fail", CLOSED),
            (2, "ok", CLOSED),
            (3, "fail", CLOSED),
            (4, "fail", CLOSED),
            (5, "fail", OPEN),
        ],
    ),
    ("threshold 1: the first failure", 1, [(0, "ok", CLOSED), (1, "fail", OPEN)]),
    ("successes alone never open it", 1, [(t, "ok", CLOSED) for t in range(50)]),
]


@pytest.mark.parametrize(
    ("threshold", "steps"), [c[1:] for c in CONSECUTIVE], ids=[c[0] for c in CONSECUTIVE]
)
def test_consecutive_failures_open(threshold: int, steps: list[Step]) -> None:
    # The error rate cannot trigger here: its minimum is out of reach.
    run(make(failure_threshold=threshold, minimum_requests=1000), steps)


# ---- closed -> open: error rate over the rolling window ---------------------------------

RATE: list[tuple[str, list[Step]]] = [
    (
        "rate reached with the minimum count",
        [(0, "ok", CLOSED), (1, "fail", CLOSED), (2, "ok", CLOSED), (3, "fail", OPEN)],
    ),
    (
        "rate reached below the minimum count does nothing",
        [(0, "fail", CLOSED), (1, "ok", CLOSED), (2, "fail", CLOSED)],
    ),
    (
        "100 % failures but fewer than the minimum",
        [(0, "ok", CLOSED), (1, "fail", CLOSED), (1.5, "fail", CLOSED)],
    ),
    (
        "minimum reached, rate below the threshold",
        [
            (0, "ok", CLOSED),
            (1, "ok", CLOSED),
            (2, "ok", CLOSED),
            (3, "fail", CLOSED),
            (4, "ok", CLOSED),
            (5, "fail", CLOSED),
        ],
    ),
    (
        "old outcomes age out of the window",
        # Three failures long ago: at t=12.5 they are out of the 10 s window,
        # so at t=13 there are 2 requests in it (below the minimum of 4).
        [
            (0, "fail", CLOSED),
            (1, "fail", CLOSED),
            (2, "fail", CLOSED),
            (12.5, "ok", CLOSED),
            (13, "fail", CLOSED),
        ],
    ),
    (
        "aged-out successes no longer dilute the rate",
        # Four old successes are out of the window by t=20; of the four
        # outcomes left at t=23, three failed (over all eight it would be
        # 3/8, below the threshold).
        [
            (0, "ok", CLOSED),
            (0.5, "ok", CLOSED),
            (1, "ok", CLOSED),
            (1.5, "ok", CLOSED),
            (20, "fail", CLOSED),
            (21, "ok", CLOSED),
            (22, "fail", CLOSED),
            (23, "fail", OPEN),
        ],
    ),
    (
        "within the window nothing ages out",
        [(0, "fail", CLOSED), (3, "ok", CLOSED), (6, "ok", CLOSED), (9, "fail", OPEN)],
    ),
]


@pytest.mark.parametrize("steps", [c[1] for c in RATE], ids=[c[0] for c in RATE])
def test_error_rate_opens_with_minimum_within_window(steps: list[Step]) -> None:
    b = make(
        failure_threshold=100,  # consecutive failures out of the picture
        error_rate_threshold=0.5,
        minimum_requests=4,
        window_seconds=10,
    )
    run(b, steps)


def test_error_rate_threshold_is_a_share() -> None:
    # 0.75 needed: 2 of 4 is not enough, 3 of 4 is.
    settings_ = {"failure_threshold": 100, "error_rate_threshold": 0.75, "minimum_requests": 4}
    run(
        make(**settings_),
        [(0, "fail", CLOSED), (1, "ok", CLOSED), (2, "ok", CLOSED), (3, "fail", CLOSED)],
    )
    run(
        make(**settings_),
        [(0, "fail", CLOSED), (1, "ok", CLOSED), (2, "fail", CLOSED), (3, "fail", OPEN)],
    )


# ---- open: refuse, Retry-After, then half-open -------------------------------------------


def test_open_refuses_and_retry_after_is_exact() -> None:
    b = opened(5.0, open_seconds=10, max_open_seconds=100)
    assert b.open_until == 15.0
    for now, left in [(5.0, 10.0), (7.5, 7.5), (14.0, 1.0), (14.75, 0.25)]:
        assert b.allow(now) is False
        assert b.available(now) is False
        assert b.state is OPEN
        assert b.retry_after(now) == pytest.approx(left, abs=1e-12)
    assert b.retry_after(15.0) == 0.0
    assert b.retry_after(99.0) == 0.0


def test_half_open_after_open_seconds_exactly() -> None:
    b = opened(2.0, open_seconds=3, max_open_seconds=30)
    run(
        b,
        [
            (2.0, "state", OPEN),
            (4.999, "avail", False),
            (4.999, "allow", False),
            (4.999, "state", OPEN),
            (5.0, "state", HALF),  # 2 + 3, not a moment later
            (5.0, "allow", True),
        ],
    )
    assert b.retry_after(5.0) == 0.0


def test_outcomes_while_open_change_nothing() -> None:
    # Requests let through before it opened may still report.
    b = opened(0.0, open_seconds=10, max_open_seconds=100)
    run(
        b,
        [
            (1, "fail", OPEN),
            (2, "ok", OPEN),
            (3, "ok", OPEN),
            (9.9, "state", OPEN),
            (10, "state", HALF),
        ],
    )
    assert b.open_until == 10.0
    assert b.opened == 1


# ---- half-open: bounded probes, success threshold ----------------------------------------


@pytest.mark.parametrize("probes", [1, 2, 5])
def test_half_open_lets_exactly_the_probes_through(probes: int) -> None:
    b = opened(0.0, open_seconds=1, half_open_probes=probes, success_threshold=probes)
    answers = [b.allow(1.0) for _ in range(probes + 3)]
    assert answers == [True] * probes + [False] * 3
    assert b.state is HALF
    assert b.available(1.0) is False
    assert b.snapshot(1.0).probes_in_flight == probes
    # Time passing in half-open does not free a slot: only an outcome does.
    assert b.allow(100.0) is False


def test_available_does_not_take_a_probe_slot() -> None:
    b = opened(0.0, open_seconds=1, half_open_probes=1)
    assert [b.available(1.0) for _ in range(5)] == [True] * 5
    assert b.allow(1.0) is True
    assert b.available(1.0) is False
    assert b.allow(1.0) is False


def test_a_probe_success_frees_its_slot() -> None:
    b = opened(0.0, open_seconds=1, half_open_probes=2, success_threshold=3)
    run(
        b,
        [
            (1, "allow", True),
            (1, "allow", True),
            (1, "allow", False),
            (1.1, "ok", HALF),  # 1 of 3 successes; one slot free again
            (1.2, "allow", True),
            (1.2, "allow", False),
            (1.3, "ok", HALF),  # 2 of 3
            (1.4, "ok", CLOSED),  # 3 of 3: closed
            (1.5, "allow", True),
            (1.5, "allow", True),
            (1.5, "allow", True),
        ],
    )


SUCCESS_THRESHOLD: list[tuple[int, list[Step]]] = [
    (1, [(10, "allow", True), (10.5, "ok", CLOSED)]),
    (
        2,
        [
            (10, "allow", True),
            (10.5, "ok", HALF),
            (11, "allow", True),
            (11.5, "ok", CLOSED),
        ],
    ),
    (
        3,
        [
            (10, "allow", True),
            (10.1, "ok", HALF),
            (10.2, "allow", True),
            (10.3, "ok", HALF),
            (10.4, "allow", True),
            (10.5, "ok", CLOSED),
        ],
    ),
]


@pytest.mark.parametrize(("needed", "steps"), SUCCESS_THRESHOLD)
def test_success_threshold_closes(needed: int, steps: list[Step]) -> None:
    b = opened(0.0, open_seconds=10, max_open_seconds=100, success_threshold=needed)
    run(b, steps)
    snap = b.snapshot(steps[-1][0])
    assert snap.state == "closed"
    assert snap.consecutive_failures == 0
    assert snap.probes_in_flight == 0


def test_a_failed_probe_after_some_successes_reopens() -> None:
    b = opened(0.0, open_seconds=10, max_open_seconds=100, success_threshold=3)
    run(b, [(10, "allow", True), (10.5, "ok", HALF), (11, "allow", True), (11.5, "fail", OPEN)])
    assert b.open_until == 11.5 + 20
    # The successes before the failure do not carry over to the next half-open.
    run(b, [(31.5, "allow", True), (32, "ok", HALF), (32.1, "allow", True), (32.2, "ok", HALF)])


# ---- re-opening: growth, cap, reset ------------------------------------------------------------


def test_failed_probes_reopen_with_growth_up_to_the_cap() -> None:
    b = opened(0.0, open_seconds=1, growth=2, max_open_seconds=5)
    now = 0.0
    periods = []
    for _ in range(6):
        now = b.open_until  # half-open exactly when the period ends
        assert b.allow(now) is True
        assert b.state is HALF
        b.record(True, now + 0.25)  # the probe fails a little later
        assert b.state is OPEN
        periods.append(b.open_until - (now + 0.25))
        assert b.retry_after(now + 0.25) == pytest.approx(periods[-1])
        assert b.snapshot(now + 0.25).open_seconds == pytest.approx(periods[-1])
    assert periods == pytest.approx([2, 4, 5, 5, 5, 5])
    assert b.opened == 7


@pytest.mark.parametrize(
    ("growth", "expected"),
    [(1.0, [3, 3, 3]), (1.5, [4.5, 6.75, 10]), (3.0, [9, 10, 10])],
)
def test_growth_factor(growth: float, expected: list[float]) -> None:
    b = opened(0.0, open_seconds=3, growth=growth, max_open_seconds=10)
    periods = []
    for _ in expected:
        now = b.open_until
        assert b.allow(now)
        b.record(True, now)
        periods.append(b.open_until - now)
    assert periods == pytest.approx(expected)


def test_success_closes_and_resets_the_open_period() -> None:
    b = opened(0.0, open_seconds=1, growth=2, max_open_seconds=60, failure_threshold=2)
    for _ in range(3):  # open periods 2, 4, 8
        now = b.open_until
        assert b.allow(now)
        b.record(True, now)
    assert b.current_open == 8
    now = b.open_until
    assert b.allow(now)
    b.record(False, now)
    assert b.state is CLOSED
    snap = b.snapshot(now)
    assert snap.open_seconds == 1  # back to the first period
    assert snap.open_until is None
    # It takes the full threshold to open again, and then for open_seconds.
    run(b, [(now + 1, "fail", CLOSED), (now + 2, "fail", OPEN)])
    assert b.open_until == now + 2 + 1
    assert b.retry_after(now + 2) == 1


def test_reopen_from_closed_uses_open_seconds_not_the_grown_period() -> None:
    b = opened(0.0, open_seconds=2, growth=3, max_open_seconds=100)
    now = b.open_until
    b.allow(now)
    b.record(True, now)  # grown: 6
    now = b.open_until
    b.allow(now)
    b.record(False, now)  # closed
    b.record(True, now + 1)  # threshold 1: open again
    assert b.state is OPEN
    assert b.open_until == now + 1 + 2


# ---- snapshot ---------------------------------------------------------------------------------


def test_snapshot_fields_through_the_cycle() -> None:
    b = make(
        failure_threshold=3,
        minimum_requests=100,
        window_seconds=60,
        open_seconds=4,
        max_open_seconds=100,
        half_open_probes=2,
        success_threshold=2,
    )
    b.record(False, 0)
    b.record(True, 1)
    b.record(True, 2)
    assert b.snapshot(2) == BreakerSnapshot(
        state="closed",
        consecutive_failures=2,
        window_requests=3,
        window_failures=2,
        open_until=None,
        open_seconds=4,
        probes_in_flight=0,
        opened=0,
    )
    b.record(True, 3)
    assert b.snapshot(3) == BreakerSnapshot(
        state="open",
        consecutive_failures=0,
        window_requests=0,
        window_failures=0,
        open_until=7,
        open_seconds=4,
        probes_in_flight=0,
        opened=1,
    )
    assert b.allow(7) and b.allow(7)
    snap = b.snapshot(7.5)
    assert snap.state == "half_open"
    assert snap.probes_in_flight == 2
    assert snap.open_until is None
    b.record(True, 8)
    snap = b.snapshot(8)
    assert (snap.state, snap.open_until, snap.open_seconds, snap.opened) == ("open", 16, 8, 2)
    # A snapshot serialises (GET /upstreams shows it).
    assert msgspec.json.decode(msgspec.json.encode(snap))["state"] == "open"


def test_snapshot_counts_only_outcomes_within_the_window() -> None:
    b = make(failure_threshold=100, minimum_requests=100, window_seconds=10)
    b.record(True, 0)
    b.record(False, 1)
    b.record(True, 2)
    snap = b.snapshot(5)
    assert (snap.window_requests, snap.window_failures) == (3, 2)
    # 30 s later the window is empty: a snapshot must not report stale counts.
    snap = b.snapshot(30)
    assert (snap.window_requests, snap.window_failures) == (0, 0)


def test_snapshot_ticks_open_to_half_open() -> None:
    b = opened(0.0, open_seconds=5, max_open_seconds=50)
    assert b.snapshot(4.9).state == "open"
    assert b.snapshot(5).state == "half_open"
    assert b.state is HALF


def test_defaults() -> None:
    s = BreakerSettings()
    assert (s.failure_threshold, s.half_open_probes, s.success_threshold) == (5, 1, 1)
    assert s.open_seconds <= s.max_open_seconds
    assert s.growth >= 1
    b = Breaker(s)
    assert b.state is CLOSED
    assert b.allow(0) and b.available(0)
    assert b.retry_after(0) == 0.0


# ---- properties over arbitrary event sequences -------------------------------------------------

events = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=30, allow_nan=False),  # time step
        st.sampled_from(["ok", "fail", "allow", "avail"]),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(
    steps=events,
    probes=st.integers(1, 3),
    threshold=st.integers(1, 4),
    growth=st.sampled_from([1.0, 1.5, 2.0, 4.0]),
)
def test_invariants(
    steps: list[tuple[float, str]], probes: int, threshold: int, growth: float
) -> None:
    s = BreakerSettings(
        failure_threshold=threshold,
        minimum_requests=5,
        window_seconds=20,
        open_seconds=2,
        max_open_seconds=16,
        growth=growth,
        half_open_probes=probes,
    )
    b = Breaker(s)
    now = 0.0
    for dt, op in steps:
        now += dt
        if op == "allow":
            refused = b.state is OPEN and now < b.open_until
            ok = b.allow(now)
            if refused:
                assert not ok  # never through while open
        elif op == "avail":
            b.available(now)
        else:
            b.record(op == "fail", now)
        assert 0 <= b.probes <= probes
        assert s.open_seconds <= b.current_open <= s.max_open_seconds
        if b.state is OPEN:
            assert 0 <= b.retry_after(now) <= b.current_open + 1e-9
            assert b.open_until - b.current_open <= now + 1e-9
        else:
            assert b.retry_after(now) == 0.0
        snap = b.snapshot(now)
        assert snap.state == b.state.value
        assert 0 <= snap.window_failures <= snap.window_requests
