"""The circuit breaker: a pure, table-driven state machine of ``now``.

Theory of operation
-------------------
One breaker guards one upstream target. It has three states::

    CLOSED ──(too many failures)──▶ OPEN ──(open period over)──▶ HALF_OPEN
       ▲                              ▲                              │
       └──────(probes succeed)────────┼──────(a probe fails)─────────┘

* CLOSED: requests pass; outcomes are counted. It opens on
  ``failure_threshold`` consecutive failures, or when the error rate over
  the last ``window_seconds`` reaches ``error_rate_threshold`` with at least
  ``minimum_requests`` requests in the window.
* OPEN: requests are refused at once (the caller answers 503 with
  ``Retry-After`` = the time left), the upstream is not touched. After the
  open period the breaker is HALF_OPEN.
* HALF_OPEN: at most ``half_open_probes`` requests are let through at a time
  (the probes). ``success_threshold`` successes close it; one failure opens
  it again, for a period ``growth`` times longer than the last, up to
  ``max_open_seconds`` (exponential back-off for an upstream that stays down).

The breaker never reads a clock and does no I/O: every method takes ``now``.
Transitions are a table, ``_TRANSITIONS[(state, event)] -> handler``, in the
style of h11's state machine; an event with no entry for a state is ignored.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Final

import msgspec

__all__ = [
    "Breaker",
    "BreakerSettings",
    "BreakerSnapshot",
    "FailurePolicy",
    "State",
    "breaker_for",
]


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Event(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    TICK = "tick"  # time passed: an open period may have ended


class BreakerSettings(msgspec.Struct, frozen=True):
    failure_threshold: int = 5
    error_rate_threshold: float = 0.5
    minimum_requests: int = 20
    window_seconds: float = 10.0
    open_seconds: float = 10.0
    max_open_seconds: float = 300.0
    growth: float = 2.0
    half_open_probes: int = 1
    success_threshold: int = 1


class FailurePolicy(msgspec.Struct, frozen=True):
    """What counts as a failure for a breaker: by default transport errors,
    timeouts and any 5xx status."""

    statuses: frozenset[int] = frozenset()  # empty: every 5xx
    transport_errors: bool = True
    timeouts: bool = True

    def failed(self, status: int | None, error: str | None) -> bool:
        if error == "timeout":
            return self.timeouts
        if error is not None:
            return self.transport_errors
        assert status is not None
        return status in self.statuses if self.statuses else status >= 500


class BreakerSnapshot(msgspec.Struct, frozen=True):
    state: str
    consecutive_failures: int
    window_requests: int
    window_failures: int
    open_until: float | None
    open_seconds: float
    probes_in_flight: int
    opened: int


class Breaker:
    __slots__ = (
        "_outcomes",
        "consecutive_failures",
        "current_open",
        "open_until",
        "opened",
        "probe_successes",
        "probes",
        "settings",
        "state",
    )

    def __init__(self, settings: BreakerSettings) -> None:
        self.settings = settings
        self.state = State.CLOSED
        self.consecutive_failures = 0
        self._outcomes: deque[tuple[float, bool]] = deque()  # (at, failed)
        self.open_until = 0.0
        self.current_open = settings.open_seconds
        self.probes = 0  # probes in flight (half-open)
        self.probe_successes = 0
        self.opened = 0  # how many times it opened

    def __repr__(self) -> str:
        return f"<Breaker {self.state.value} failures={self.consecutive_failures}>"

    # ---- queries -----------------------------------------------------------------

    def allow(self, now: float) -> bool:
        """May a request go to the target now? A True in HALF_OPEN takes a
        probe slot: the caller must report its outcome."""
        self._fire(Event.TICK, now)
        if self.state is State.CLOSED:
            return True
        if self.state is State.HALF_OPEN and self.probes < self.settings.half_open_probes:
            self.probes += 1
            return True
        return False

    def available(self, now: float) -> bool:
        """Would ``allow`` say yes (without taking a probe slot)?"""
        self._fire(Event.TICK, now)
        return self.state is State.CLOSED or (
            self.state is State.HALF_OPEN and self.probes < self.settings.half_open_probes
        )

    def retry_after(self, now: float) -> float:
        """Seconds until the breaker lets a request through again."""
        return max(0.0, self.open_until - now) if self.state is State.OPEN else 0.0

    def snapshot(self, now: float) -> BreakerSnapshot:
        self._fire(Event.TICK, now)
        self._forget_before(now - self.settings.window_seconds)
        failures = sum(1 for _, failed in self._outcomes if failed)
        return BreakerSnapshot(
            state=self.state.value,
            consecutive_failures=self.consecutive_failures,
            window_requests=len(self._outcomes),
            window_failures=failures,
            open_until=self.open_until if self.state is State.OPEN else None,
            open_seconds=self.current_open,
            probes_in_flight=self.probes,
            opened=self.opened,
        )

    # ---- events ------------------------------------------------------------------

    def record(self, failed: bool, now: float) -> None:
        """The outcome of a request that ``allow`` let through."""
        self._fire(Event.FAILURE if failed else Event.SUCCESS, now)

    def abandon(self) -> None:
        """A request ``allow`` let through ended with no verdict on the
        target (the client went away, its body was refused): give back its
        probe slot, count nothing."""
        if self.state is State.HALF_OPEN and self.probes > 0:
            self.probes -= 1

    def _fire(self, event: Event, now: float) -> None:
        handler = _TRANSITIONS.get((self.state, event))
        if handler is not None:
            handler(self, now)

    def _forget_before(self, cutoff: float) -> None:
        window = self._outcomes
        while window and window[0][0] <= cutoff:
            window.popleft()

    # ---- handlers (the table's cells) -----------------------------------------

    def _closed_outcome(self, now: float, failed: bool) -> None:
        s = self.settings
        window = self._outcomes
        window.append((now, failed))
        self._forget_before(now - s.window_seconds)
        self.consecutive_failures = self.consecutive_failures + 1 if failed else 0
        if self.consecutive_failures >= s.failure_threshold:
            self._open(now, s.open_seconds)
            return
        if failed and len(window) >= s.minimum_requests:
            failures = sum(1 for _, f in window if f)
            if failures / len(window) >= s.error_rate_threshold:
                self._open(now, s.open_seconds)

    def _closed_success(self, now: float) -> None:
        self._closed_outcome(now, False)

    def _closed_failure(self, now: float) -> None:
        self._closed_outcome(now, True)

    def _open_tick(self, now: float) -> None:
        if now >= self.open_until:
            self.state = State.HALF_OPEN
            self.probes = 0
            self.probe_successes = 0

    def _half_open_success(self, now: float) -> None:
        self.probes = max(0, self.probes - 1)
        self.probe_successes += 1
        if self.probe_successes >= self.settings.success_threshold:
            self.state = State.CLOSED
            self.consecutive_failures = 0
            self._outcomes.clear()
            self.current_open = self.settings.open_seconds

    def _half_open_failure(self, now: float) -> None:
        s = self.settings
        self._open(now, min(self.current_open * s.growth, s.max_open_seconds))

    def _open(self, now: float, seconds: float) -> None:
        self.state = State.OPEN
        self.current_open = seconds
        self.open_until = now + seconds
        self.probes = 0
        self.opened += 1
        self._outcomes.clear()
        self.consecutive_failures = 0


_TRANSITIONS: Final[dict[tuple[State, Event], Callable[[Breaker, float], None]]] = {
    (State.CLOSED, Event.SUCCESS): Breaker._closed_success,
    (State.CLOSED, Event.FAILURE): Breaker._closed_failure,
    (State.OPEN, Event.TICK): Breaker._open_tick,
    # An outcome that arrives while OPEN (a request let through before it
    # opened) changes nothing: the open period stands.
    (State.HALF_OPEN, Event.SUCCESS): Breaker._half_open_success,
    (State.HALF_OPEN, Event.FAILURE): Breaker._half_open_failure,
}


def breaker_for(current: Breaker | None, settings: BreakerSettings | None) -> Breaker | None:
    """The breaker a target should have under a new config: none when no
    route configures one; the ``current`` one, state and all, when its
    settings did not change (a reload must not close an open breaker); else
    a new one. A decision only: the caller installs the result."""
    if settings is None:
        return None
    if current is not None and current.settings == settings:
        return current
    return Breaker(settings)
