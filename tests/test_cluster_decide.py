"""Limits and credits decided in Redis (core/cluster/lua.py, decide.py,
limits.py) make the decisions of the single-process code
(core/policy/ratelimit.py), against a real redis-server.

The properties drive both with the same operations (a time step, a request
of some cost, an undo of the last granted one) and compare every answer:
allowed, remaining, reset and retry-after (float tolerance), for GCRA and the
sliding window, one limit or several at once; then the credits: never below
zero, all-or-nothing with the limits and across several balances.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.redis_fixture import RedisServer, redis_server, redis_url  # noqa: F401
from triogate.cluster.limits import ClusterLimits, open_cluster_limits
from triogate.cluster.redis import open_redis
from triogate.config import ClusterConfig
from triogate.policy.ratelimit import Limit, LimitState, Reservation, acquire, release

PROPERTY = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
_namespaces = itertools.count()
T0 = 1_800_000_000.0


class Holder:
    """A balance's owner as the data plane's actor is (``CreditHolder``)."""

    def __init__(self, key: str, credits: int | None, version: int = 1) -> None:
        self.key = key
        self.credits = credits
        self.credits_version = version
        self.credits_refilled_at: float | None = None
        self.next_record: Any = None

    def sync_credits(self, record: Any, now: float) -> None:
        if record is not None and record.credits_version != self.credits_version:
            self.credits = record.balance
            self.credits_version = record.credits_version


@asynccontextmanager
async def deciding(url: str) -> AsyncIterator[ClusterLimits]:
    """A ``ClusterLimits`` deciding at the caller's clock, opened per example:
    pytest-trio runs each hypothesis example in a trio run of its own, so
    nothing async may outlive one (an async fixture would)."""
    config = ClusterConfig(redis_url=url, command_timeout_seconds=5.0)
    async with (
        open_redis(config) as link,
        open_cluster_limits(config, link=link, redis_clock=False) as limits,
    ):
        fresh(limits)
        yield limits


@pytest.fixture
async def cluster(redis_url: str) -> AsyncIterator[ClusterLimits]:  # noqa: F811
    async with deciding(redis_url) as limits:
        yield limits


def fresh(cluster: ClusterLimits) -> None:
    """A namespace of its own for one hypothesis example."""
    cluster.namespace = f"t{next(_namespaces)}"


def close(a: float, b: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def same_decisions(local: list[Any], remote: list[Any]) -> None:
    assert len(local) == len(remote)
    for mine, theirs in zip(local, remote, strict=True):
        assert mine.limit == theirs.limit
        assert mine.allowed == theirs.allowed, (mine, theirs)
        assert mine.remaining == theirs.remaining, (mine, theirs)
        assert close(mine.reset, theirs.reset), (mine, theirs)
        assert close(mine.retry_after, theirs.retry_after), (mine, theirs)


limits_st = st.lists(
    st.builds(
        Limit,
        name=st.sampled_from(["a", "b", "c"]),
        limit=st.integers(1, 12),
        period=st.sampled_from([0.5, 1.0, 3.0, 10.0, 60.0]),
        algorithm=st.sampled_from(["gcra", "sliding_window"]),
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda lim: lim.name,
)
ops_st = st.lists(
    st.tuples(
        st.sampled_from(["request", "request", "request", "undo"]),
        st.sampled_from([0.0, 0.0, 0.01, 0.2, 0.5, 1.0, 2.5, 7.0, 30.0]),
        st.integers(1, 3),
    ),
    min_size=1,
    max_size=40,
)


@PROPERTY
@given(limits=limits_st, ops=ops_st)
async def test_limits_decide_as_one_process(
    redis_url: str,  # noqa: F811
    limits: list[Limit],
    ops: list[tuple[str, float, int]],
) -> None:
    async with deciding(redis_url) as cluster:
        await _limits_as_one_process(cluster, limits, ops)


async def _limits_as_one_process(
    cluster: ClusterLimits, limits: list[Limit], ops: list[tuple[str, float, int]]
) -> None:
    states = {lim.name: LimitState() for lim in limits}
    items = [("key_1", lim) for lim in limits]
    now = T0
    granted: list[tuple[Reservation, Reservation]] = []
    for op, step, cost in ops:
        now += step
        if op == "undo":
            if granted:
                mine, theirs = granted.pop()
                release(mine, now)
                await cluster.undo(theirs, now)
            continue
        local, reservation = acquire([(lim, states[lim.name]) for lim in limits], now, cost)
        remote, remote_reservation, enough = await cluster.decide(items, now, cost)
        assert enough
        same_decisions(local, remote)
        assert (reservation is None) == (remote_reservation is None)
        if reservation is not None and remote_reservation is not None:
            granted.append((reservation, remote_reservation))


@PROPERTY
@given(
    limit=st.integers(1, 8),
    balances=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    ops=st.lists(st.tuples(st.integers(1, 3), st.booleans()), min_size=1, max_size=25),
)
async def test_credits_never_below_zero_and_all_or_nothing(
    redis_url: str,  # noqa: F811
    limit: int,
    balances: list[int],
    ops: list[tuple[int, bool]],
) -> None:
    async with deciding(redis_url) as cluster:
        await _credits_as_one_process(cluster, limit, balances, ops)


async def _credits_as_one_process(
    cluster: ClusterLimits, limit: int, balances: list[int], ops: list[tuple[int, bool]]
) -> None:
    lim = Limit("minute", limit, 60.0)
    state = LimitState()
    holders = [Holder(f"key_{i}", b) for i, b in enumerate(balances)]
    model = list(balances)
    now = T0
    for cost, undo in ops:
        now += 1.0
        decisions, reservation = acquire([(lim, state)], now, cost)
        short = None
        if reservation is not None:
            short = next((i for i, b in enumerate(model) if b < cost), None)
            if short is not None:
                release(reservation, now)
                reservation = None
        got, got_reservation, got_short = await cluster.grant(
            [("key_0", lim)], [(h, None) for h in holders], now, cost
        )
        same_decisions(decisions, got)
        assert got_short == short
        assert (got_reservation is None) == (reservation is None)
        if reservation is not None:
            model = [b - cost for b in model]
        assert [h.credits for h in holders] == model
        assert min(model) >= 0
        if undo and reservation is not None and got_reservation is not None:
            release(reservation, now)
            await cluster.undo_many(got_reservation, now, [(h, cost) for h in holders])
            model = [b + cost for b in model]
            assert [h.credits for h in holders] == model
    # What Redis holds is the model, read back by a fresh holder.
    for i, expected in enumerate(model):
        probe = Holder(f"key_{i}", 10**6)
        await cluster.grant([], [(probe, None)], now, 0)
        assert probe.credits == expected


async def test_two_nodes_share_one_limit_exactly(redis_url: str) -> None:  # noqa: F811
    """A key limited to 9 a minute, called round-robin over three nodes, gets 9."""
    config = ClusterConfig(redis_url=redis_url)
    lim = Limit("minute", 9, 60.0)
    async with (
        open_cluster_limits(config) as a,
        open_cluster_limits(config) as b,
        open_cluster_limits(config) as c,
    ):
        nodes = [a, b, c]
        allowed = 0
        for i in range(30):
            _, reservation, _ = await nodes[i % 3].decide([("key_9", lim)], T0)
            allowed += reservation is not None
        assert allowed == 9


async def test_credits_are_exact_across_nodes_and_a_new_version_resets(
    redis_url: str,  # noqa: F811
) -> None:
    config = ClusterConfig(redis_url=redis_url)
    async with open_cluster_limits(config) as a, open_cluster_limits(config) as b:
        holders = [Holder("key_c", 11), Holder("key_c", 11)]
        served = 0
        for i in range(20):
            node, holder = (a, holders[0]) if i % 2 else (b, holders[1])
            _, reservation, enough = await node.decide([], T0, credits=holder)
            served += reservation is not None and enough
        assert served == 11
        assert holders[0].credits == holders[1].credits == 0

        class Record:
            credits_version = 2
            balance = 3

        # A PATCH (a new credits version) on one node: every node spends from it.
        _, reservation, enough = await a.decide([], T0, credits=holders[0], record=Record())
        assert enough and holders[0].credits == 2
        _, reservation, enough = await b.decide([], T0, credits=holders[1])
        assert enough and holders[1].credits == 1 and holders[1].credits_version == 2


async def test_a_refill_is_applied_once_whichever_node_sees_it(
    redis_url: str,  # noqa: F811
) -> None:
    config = ClusterConfig(redis_url=redis_url)

    class Spec:
        refill_amount = 5

    class Record:
        credits = Spec()
        credits_version = 1

    class Refilling(Holder):
        def sync_credits(self, record: Any, now: float) -> None:
            if now >= T0 + 100 and (self.credits_refilled_at or 0) < T0 + 100:
                self.credits = max(self.credits or 0, 5)
                self.credits_refilled_at = T0 + 100

    async with open_cluster_limits(config) as a, open_cluster_limits(config) as b:
        one, two = Refilling("key_r", 2), Refilling("key_r", 2)
        await a.decide([], T0, credits=one, record=Record())
        await a.decide([], T0, credits=one, record=Record())
        assert one.credits == 0
        # Both nodes find the refill due; the balance is topped up once.
        await a.decide([], T0 + 101, credits=one, record=Record())
        await b.decide([], T0 + 101, credits=two, record=Record())
        assert one.credits == 4 and two.credits == 3


async def test_decisions_of_one_tick_share_a_pipeline(cluster: ClusterLimits) -> None:
    fresh(cluster)
    lim = Limit("second", 1000, 1.0)
    results: list[bool] = []
    before = cluster.batcher.stats.pipelines

    async def one(i: int) -> None:
        _, reservation, _ = await cluster.decide([(f"key_{i % 7}", lim)], T0)
        results.append(reservation is not None)

    async with trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(one, i)
    assert results == [True] * 100
    assert cluster.batcher.stats.pipelines - before < 10


async def test_usage_counters_add_up_across_nodes(redis_url: str) -> None:  # noqa: F811
    config = ClusterConfig(redis_url=redis_url)
    async with open_cluster_limits(config) as a, open_cluster_limits(config) as b:
        a.add_usage("key_u", 3, [0, 2, 0, 1, 0], 2, T0)
        b.add_usage("key_u", 4, [0, 4, 0, 0, 0], 0, T0 + 5)
        for node in (a, b):  # a decision flushes the queued counters along with it
            await node.decide([], T0)
        usage = await a.usage("key_u")
        assert usage["requests"] == 7 and usage["s2"] == 6 and usage["s4"] == 1
        assert usage["taken"] == 2 and usage["last_used_at"] == T0 + 5


async def test_scripts_are_loaded_again_after_a_script_flush(
    cluster: ClusterLimits,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    fresh(cluster)
    lim = Limit("minute", 2, 60.0)
    assert (await cluster.decide([("key_s", lim)], T0))[1] is not None
    assert redis_server.command("SCRIPT", "FLUSH").startswith(b"+OK")
    assert (await cluster.decide([("key_s", lim)], T0))[1] is not None
    assert (await cluster.decide([("key_s", lim)], T0))[1] is None
