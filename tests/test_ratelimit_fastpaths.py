"""The rate-limit decisions' fast paths answer as the general ones.

``headers_for`` has a path for two decisions (a key's limit and a route's)
that picks the most restrictive without a sort key and caches the policy by
the pair's identity; ``_gcra`` inlines ``_units`` on the allowed path. Both
are checked against the general rule over many generated cases, ties
included, in both orders.
"""

from __future__ import annotations

import math
import random

from triogate.policy.ratelimit import (
    Decision,
    Limit,
    LimitState,
    _gcra,
    _severity,
    _units,
    headers_for,
)


def _general_headers(decisions: list[Decision]) -> list[tuple[bytes, bytes]]:
    """``headers_for`` as for three or more decisions: the general path."""
    worst = min(decisions, key=_severity)
    # The same limit thrice: the general path lists a policy once.
    return headers_for([worst, *decisions, worst])


def test_two_decisions_report_what_the_general_rule_reports() -> None:
    rng = random.Random(7)
    limits = [Limit(f"l{i}", rng.choice([1, 5, 100]), rng.choice([1.0, 60.0])) for i in range(6)]
    for _ in range(5000):
        pair = [
            Decision(
                rng.choice(limits),
                rng.random() < 0.5,
                rng.choice([0, 1, 2]),
                rng.choice([0.5, 1.0, 30.0]),
                rng.choice([0.0, 1.0, 2.5, math.inf]),
            )
            for _ in range(2)
        ]
        if pair[0].limit is pair[1].limit:
            continue
        fast = dict(headers_for(pair))
        general = dict(_general_headers(pair))
        # The policy lists both limits in the pair's order either way.
        expected_policy = b", ".join(dict(headers_for([d]))[b"ratelimit-policy"] for d in pair)
        assert fast[b"ratelimit-policy"] == expected_policy
        del fast[b"ratelimit-policy"], general[b"ratelimit-policy"]
        assert fast == general, pair


def test_the_pair_policy_follows_new_limit_objects() -> None:
    """A cached policy is never served for other limits, even when a new
    pair's objects could reuse a freed pair's ids."""
    for n in range(1, 50):
        first, second = Limit("a", n, 60.0), Limit("b", n + 1, 60.0)
        decisions = [Decision(first, True, 0, 1.0, 0.0), Decision(second, True, 0, 1.0, 0.0)]
        policy = dict(headers_for(decisions))[b"ratelimit-policy"]
        assert policy == f'"a";q={n};w=60, "b";q={n + 1};w=60'.encode()


def _gcra_reference(
    limit: Limit, state: LimitState, now: float, cost: int
) -> tuple[int, float, float]:
    """The allowed path as written before ``_units`` was inlined."""
    t = limit.period / limit.limit
    start = state.tat if state.tat > now else now
    new_tat = start + cost * t
    remaining = _units(limit.period - (new_tat - now), t, max(0, limit.limit - cost))
    return remaining, new_tat - now, new_tat


def test_gcra_allowed_path_counts_as_units_does() -> None:
    rng = random.Random(11)
    checked = 0
    for _ in range(20000):
        limit = Limit(
            "x",
            rng.choice([1, 2, 3, 10, 50, 1000, 10**9]),
            rng.choice([0.001, 0.1, 1.0, 60.0, 86400.0]),
        )
        cost = rng.choice([1, 1, 2, 5])
        now = 1.8e9 + rng.random() * 1000
        tat = rng.choice([0.0, now - rng.random(), now + rng.random() * limit.period])
        decision, new_tat = _gcra(limit, LimitState(tat), now, cost)
        if not decision.allowed:
            continue
        checked += 1
        remaining, reset, expected_tat = _gcra_reference(limit, LimitState(tat), now, cost)
        assert (decision.remaining, decision.reset, new_tat) == (remaining, reset, expected_tat)
    assert checked > 5000
