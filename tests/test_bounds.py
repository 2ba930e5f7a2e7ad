"""Every number a config file or an admin request can set is bounded both
ways, and the limiter's numbers stay sane for any limit it can be given:
``remaining`` within [0, limit], ``reset`` finite and not negative,
``Retry-After`` a whole number of seconds, at least 1."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import Admin, Running
from triogate.admin.endpoints import ENDPOINTS
from triogate.config import parse_config
from triogate.control.models import CreateKeyRequest, UpdateKeyRequest
from triogate.dataplane.plugin_loader import discover
from triogate.errors import ConfigError, ValidationError
from triogate.policy.ratelimit import (
    MAX_LIMIT,
    MAX_PERIOD,
    MIN_PERIOD,
    Limit,
    LimitState,
    acquire,
    decide,
    headers_for,
    release,
)
from triogate.validation import convert_all

# ---- every number has two bounds -------------------------------------------------


def _unbounded(info: msgspec.inspect.Type, path: str, out: list[str], seen: set[type]) -> None:
    if isinstance(info, msgspec.inspect.Metadata):
        _unbounded(info.type, path, out, seen)
    elif isinstance(info, msgspec.inspect.IntType | msgspec.inspect.FloatType):
        low = info.ge is not None or info.gt is not None
        high = info.le is not None or info.lt is not None
        if not (low and high):
            out.append(path)
    elif isinstance(info, msgspec.inspect.StructType):
        if info.cls in seen:
            return
        seen.add(info.cls)
        for field in info.fields:
            _unbounded(field.type, f"{path}.{field.name}", out, seen)
    elif isinstance(info, msgspec.inspect.UnionType):
        for member in info.types:
            _unbounded(member, path, out, seen)
    elif isinstance(info, msgspec.inspect.ListType | msgspec.inspect.TupleType):
        _unbounded(info.item_type, f"{path}[]", out, seen)
    elif isinstance(info, msgspec.inspect.DictType):
        _unbounded(info.value_type, f"{path}.*", out, seen)


def unbounded_numbers(tp: Any, name: str) -> list[str]:
    out: list[str] = []
    _unbounded(msgspec.inspect.type_info(tp), name, out, set())
    return out


def test_every_number_in_the_config_is_bounded() -> None:
    from triogate.config import Config

    assert unbounded_numbers(Config, "config") == []


def test_every_number_in_a_plugin_config_is_bounded() -> None:
    found = [
        path
        for name, plugin in sorted(discover().items())
        for path in unbounded_numbers(plugin.Config, name)
    ]
    assert found == []


def test_every_number_in_an_admin_request_is_bounded() -> None:
    found = [
        path
        for ep in ENDPOINTS
        for tp in (ep.request, ep.query)
        if tp is not None
        for path in unbounded_numbers(tp, f"{ep.method} {ep.path}")
    ]
    assert found == []


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"keys": {"default_rate_limit": {"limit": 1, "period_seconds": 1e-300}}}, "period"),
        ({"keys": {"default_rate_limit": {"limit": 10**10, "period_seconds": 1}}}, "limit"),
        ({"keys": {"default_rate_limit": {"limit": 1, "period_seconds": 1e9}}}, "period"),
        ({"server": {"header_timeout_seconds": 1e-300}}, "header_timeout_seconds"),
        ({"server": {"max_request_body_bytes": 10**30}}, "max_request_body_bytes"),
        ({"storage": {"flush_interval_seconds": 1e-9}}, "flush_interval_seconds"),
    ],
)
def test_absurd_config_numbers_are_refused(raw: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, environ={})
    assert any(path in line for line in info.value.lines()), info.value.lines()


def test_a_rate_limit_plugin_period_of_1e_300_is_refused() -> None:
    config = discover()["rate-limit"].Config
    with pytest.raises(ValidationError) as info:
        convert_all({"limit": 5, "period_seconds": 1e-300}, config)
    assert [e.path for e in info.value.errors] == ["period_seconds"]
    convert_all({"limit": 5, "period_seconds": 0.001}, config)


def _limits(limit: int, period: float) -> list[dict[str, Any]]:
    return [{"name": "m", "limit": limit, "period_seconds": period}]


PERIOD = "rate_limits[0].period_seconds"
REFILL = {"remaining": 1, "refill_amount": 1, "refill_interval_seconds": 1e-300}


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("rate_limits", _limits(5, 1e-300), PERIOD),
        ("rate_limits", _limits(5, 0.0009), PERIOD),
        ("rate_limits", _limits(10**10, 1), "rate_limits[0].limit"),
        ("credits", {"remaining": 10**16}, "credits.remaining"),
        ("credits", REFILL, "credits.refill_interval_seconds"),
    ],
)
def test_absurd_key_numbers_are_refused(field: str, value: Any, path: str) -> None:
    with pytest.raises(ValidationError) as info:
        convert_all({"name": "n", "owner": "o", field: value}, CreateKeyRequest)
    assert [e.path for e in info.value.errors] == [path]


def test_a_patch_is_held_to_the_same_bounds() -> None:
    with pytest.raises(ValidationError) as info:
        convert_all({"rate_limits": _limits(5, 1e-9), "credits": REFILL}, UpdateKeyRequest)
    assert [e.path for e in info.value.errors] == [PERIOD, "credits.refill_interval_seconds"]
    assert convert_all({"credits": None}, UpdateKeyRequest).credits is None


def test_sane_key_numbers_pass() -> None:
    req = convert_all(
        {
            "name": "n",
            "owner": "o",
            "rate_limits": [{"name": "ms", "limit": 10**9, "period_seconds": 0.001}],
            "credits": {"remaining": 10**15, "refill_amount": 5, "refill_interval_seconds": 1},
        },
        CreateKeyRequest,
    )
    assert req.rate_limits[0].period_seconds == 0.001


async def test_the_admin_api_refuses_a_period_of_1e_300(running: Running, root: Admin) -> None:
    r = await running.client.post(
        "/keys",
        headers=root.headers,
        json={
            "name": "n",
            "owner": "o",
            "rate_limits": [{"name": "m", "limit": 5, "period_seconds": 1e-300}],
        },
    )
    assert r.status_code == 400, r.text
    assert [e["path"] for e in r.json()["errors"]] == ["rate_limits[0].period_seconds"]


# ---- the limiter's numbers ---------------------------------------------------------

NOW = 1_800_000_000.0


def test_remaining_at_a_hundred_million_per_second() -> None:
    limit = Limit("fast", 100_000_000, 1.0)
    state = LimitState()
    decisions, _ = acquire([(limit, state)], NOW)
    assert decisions[0].remaining == 99_999_999
    headers = dict(headers_for(decisions))
    assert headers[b"x-ratelimit-remaining"] == b"99999999"
    assert headers[b"x-ratelimit-limit"] == b"100000000"


@pytest.mark.parametrize("algorithm", ["gcra", "sliding_window"])
def test_a_stored_period_of_1e_300_still_gives_sane_numbers(algorithm: Any) -> None:
    """Records written before the bounds may hold any positive period; the
    limiter clamps it instead of overflowing (500) or reporting 300 digits."""
    limit = Limit("old", 5, 1e-300, algorithm)
    assert limit.period == MIN_PERIOD
    state = LimitState()
    for i in range(10):
        decisions, _ = acquire([(limit, state)], NOW + i * 1e-5)
        for name, value in headers_for(decisions):
            assert len(value) < 40, (name, value)
    assert Limit("x", 1, 1e12).period == MAX_PERIOD
    assert Limit("x", 1, math.nan).period == MAX_PERIOD


def _check(decision: Any, limit: Limit) -> None:
    assert 0 <= decision.remaining <= limit.limit
    if decision.allowed:
        assert decision.remaining <= limit.limit - 1
    assert math.isfinite(decision.reset) and decision.reset >= 0
    assert decision.retry_after >= 0


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, MAX_LIMIT),
    period=st.floats(MIN_PERIOD, MAX_PERIOD),
    algorithm=st.sampled_from(["gcra", "sliding_window"]),
    start=st.floats(0, 4e9),
    steps=st.lists(
        st.tuples(st.floats(0, 1e4), st.integers(1, 1_000_000), st.booleans()),
        min_size=1,
        max_size=30,
    ),
)
def test_limiter_numbers_stay_sane(
    limit: int,
    period: float,
    algorithm: Any,
    start: float,
    steps: list[tuple[float, int, bool]],
) -> None:
    policy = Limit("p", limit, period, algorithm)
    state = LimitState()
    now = start
    for gap, cost, give_back in steps:
        now += gap
        _check(decide(policy, state, now, cost), policy)
        decisions, reservation = acquire([(policy, state)], now, cost)
        for d in decisions:
            _check(d, policy)
        headers = dict(headers_for(decisions))
        remaining = int(headers[b"x-ratelimit-remaining"])
        assert 0 <= remaining <= limit
        assert int(headers[b"x-ratelimit-reset"]) >= 0
        if not decisions[0].allowed:
            retry_after = headers[b"retry-after"]
            assert retry_after.isdigit() and int(retry_after) >= 1
        else:
            assert b"retry-after" not in headers
        if reservation is not None and give_back:
            release(reservation, now)
