"""The soak benchmark's decisions, sans-IO: what each kind of request must
be answered with, whether a sampled series keeps growing, percentiles.

Nothing here opens a socket or reads a clock, so the rules are unit-tested
on synthetic input (tests/test_soak_smoke.py).
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Growth",
    "Kind",
    "Outcome",
    "detect_growth",
    "judge",
    "percentile",
]


class Kind(enum.StrEnum):
    """What a soak request is meant to exercise (and so what it must get)."""

    OK = "ok"  # a valid key without limits, GET
    POST = "post"  # the same with a small body
    CLOSE = "close"  # the same on a fresh connection closed after the answer
    MISSING = "missing"  # no key at all
    INVALID = "invalid"  # a well-formed key the gateway never issued, or garbage
    DOOMED = "doomed"  # a key that gets revoked during the run
    REVOKED = "revoked"  # a key revoked a while ago
    RATE = "rate_limited"  # a key with a small rate limit of its own
    CREDITS = "credits"  # a key with few credits (refilled every few seconds)
    UPSTREAM_ERROR = "upstream_error"  # the upstream answers 500 or 503 on purpose
    SLOW = "slow"  # the upstream answers well within the route's timeout
    TOO_SLOW = "too_slow"  # the upstream answers after the route's timeout, on purpose
    NO_ROUTE = "no_route"  # a path no route matches


class Outcome(enum.StrEnum):
    OK = "ok"  # 2xx as expected
    REFUSED = "refused"  # the expected 4xx (401, 404)
    LIMITED = "limited"  # the expected 429 (rate limit or credits)
    UPSTREAM_5XX = "upstream_5xx"  # a 5xx the upstream made on purpose, passed through
    EXPECTED_504 = "expected_504"  # the gateway's 504 on the deliberately slow route
    GATEWAY_5XX = "gateway_5xx"  # a 5xx the gateway made and nothing here caused: a failure
    WRONG = "wrong"  # any other answer than the kind's expected ones: a failure


# (status, code): ``code`` is the problem+json ``code`` of a gateway-made
# answer, or UPSTREAM for an answer the soak upstream made (it marks every
# answer with a header, so what the gateway made itself is always known).
UPSTREAM = "<upstream>"
_GRANTED = (200, UPSTREAM)
_REVOKED = (401, "KEY_REVOKED")
_EXPECTED: dict[Kind, frozenset[tuple[int, str]]] = {
    Kind.OK: frozenset({_GRANTED}),
    Kind.POST: frozenset({_GRANTED}),
    Kind.CLOSE: frozenset({_GRANTED}),
    Kind.MISSING: frozenset({(401, "MISSING_KEY")}),
    Kind.INVALID: frozenset({(401, "INVALID_KEY")}),
    Kind.REVOKED: frozenset({_REVOKED}),
    Kind.RATE: frozenset({_GRANTED, (429, "RATE_LIMITED")}),
    Kind.CREDITS: frozenset({_GRANTED, (429, "QUOTA_EXCEEDED")}),
    Kind.UPSTREAM_ERROR: frozenset({(500, UPSTREAM), (503, UPSTREAM)}),
    Kind.SLOW: frozenset({_GRANTED}),
    Kind.TOO_SLOW: frozenset(),  # only the 504 below
    Kind.NO_ROUTE: frozenset({(404, "ROUTE_NOT_FOUND")}),
}
# The slow upstream is slow on purpose: the route's read timeout is below the
# too-slow delay, so the gateway's 504 there is caused by the upstream. A
# plain slow answer may miss it too on a starved machine: still the upstream.
_SLOW_KINDS = frozenset({Kind.SLOW, Kind.TOO_SLOW})


def judge(
    kind: Kind, status: int, code: str | None, *, from_upstream: bool, revoked: bool | None = None
) -> Outcome:
    """Classify one answer. ``code``: the problem+json code of a gateway-made
    answer (None when it had none). ``revoked`` (DOOMED keys only): True when
    the revocation was acknowledged before the request started, False when it
    was sent only after the answer arrived, None when they overlapped (either
    answer is right)."""
    if status >= 500 and not from_upstream:
        if kind in _SLOW_KINDS and status == 504 and code == "UPSTREAM_TIMEOUT":
            return Outcome.EXPECTED_504
        return Outcome.GATEWAY_5XX
    seen = (status, UPSTREAM if from_upstream else (code or ""))
    if kind is Kind.DOOMED:
        if revoked is None:
            expected = frozenset({_GRANTED, _REVOKED})
        else:
            expected = frozenset({_REVOKED if revoked else _GRANTED})
    else:
        expected = _EXPECTED[kind]
    if seen not in expected:
        return Outcome.WRONG
    if status >= 500:
        return Outcome.UPSTREAM_5XX
    if status == 429:
        return Outcome.LIMITED
    if status >= 400:
        return Outcome.REFUSED
    return Outcome.OK


@dataclass(frozen=True)
class Growth:
    """Whether a sampled series (RSS, fds) keeps growing; see detect_growth."""

    judged: bool  # False: too few samples after the warm-up to say
    growing: bool
    baseline: float  # median of the second third of the judged samples
    latest: float  # median of the last third
    allowed: float  # how far latest may exceed baseline
    samples: int  # samples judged (after the warm-up)

    def describe(self, unit: str, digits: int = 1) -> str:
        if not self.judged:
            return f"not judged ({self.samples} samples after the warm-up)"
        verdict = "GROWING" if self.growing else "flat"
        change = self.latest - self.baseline
        return (
            f"{verdict}: median {self.baseline:.{digits}f} {unit} (second third) -> "
            f"{self.latest:.{digits}f} {unit} (last third), {change:+.{digits}f} {unit}; "
            f"allowed +{self.allowed:.{digits}f} {unit}"
        )


def detect_growth(
    series: Sequence[float],
    *,
    abs_tolerance: float,
    rel_tolerance: float,
    warmup_fraction: float = 0.25,
    min_samples: int = 6,
) -> Growth:
    """A series keeps growing when, after a warm-up (the first
    ``warmup_fraction`` of it: caches, pools and the allocator's arenas fill
    up there), the median of its last third exceeds the median of its second
    third by more than ``max(abs_tolerance, rel_tolerance * that median)``.

    Medians, because a sample can land on a GC pause or a burst of
    connections: single spikes move them little. The second third rather
    than the first, so that growth that is still settling right after the
    warm-up is not taken for a leak; a leak grows between the two."""
    skip = math.ceil(len(series) * warmup_fraction)
    judged = [float(v) for v in series[skip:]]
    if len(judged) < max(3, min_samples):
        return Growth(False, False, math.nan, math.nan, math.nan, len(judged))
    third = len(judged) // 3
    baseline = statistics.median(judged[third : 2 * third])
    latest = statistics.median(judged[len(judged) - third :])
    allowed = max(abs_tolerance, rel_tolerance * abs(baseline))
    return Growth(True, latest - baseline > allowed, baseline, latest, allowed, len(judged))


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values; NaN for none."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])
