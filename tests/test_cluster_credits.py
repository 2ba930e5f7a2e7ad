"""Credit operations on a balance the cluster's Redis holds
(core/cluster/credits.py, the ``CREDIT`` script), against a real
redis-server: set / increment / decrement as on a single node, atomic
against every node's spending and seen by every node's next decision; a
refusal writes nothing; a stale or newer credits version, a refill due and
a debt from an outage are reconciled as a decision reconciles them; Redis
unreachable or killed: ``StoreUnreachable``, nothing applied. Validate's
peek (a decision of cost 0) takes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from tests.redis_fixture import RedisServer, redis_server, redis_url, running_redis  # noqa: F401
from tests.test_cluster_decide import T0, Holder
from triogate.cluster.credits import change_credits, credit_call, parse_credit
from triogate.cluster.decide import Balance, credit_key
from triogate.cluster.limits import ClusterLimits, open_cluster_limits
from triogate.config import ClusterConfig
from triogate.control.credits import MAX_BALANCE, CreditChange, apply_op
from triogate.dataplane.actors import ActorRegistry
from triogate.dataplane.creditops import ActorMeter
from triogate.errors import (
    InsufficientCredits,
    LimitsUnavailable,
    StoreUnreachable,
    ValidationError,
)
from triogate.policy.ratelimit import Limit
from triogate.storage import Credits, KeyRecord, MemoryStore, Table, codec
from triogate.storage.records import RateLimit
from triogate.testing import key_record


async def _op(node: ClusterLimits, holder: Any, op: str, amount: int, record: Any = None) -> Any:
    return await change_credits(node, holder, record, op, amount, T0, most=MAX_BALANCE)


async def _raw(node: ClusterLimits, subject: str) -> dict[bytes, bytes]:
    raw: dict[bytes, bytes] = await node.link.client.hgetall(credit_key(node.namespace, subject))
    return raw


async def test_operations_are_the_clusters_and_every_node_spends_from_them(
    redis_url: str,  # noqa: F811
) -> None:
    config = ClusterConfig(redis_url=redis_url)
    async with open_cluster_limits(config) as a, open_cluster_limits(config) as b:
        on_a, on_b = Holder("key_ops", 3), Holder("key_ops", 3)
        # b spends one first: Redis has the balance (2).
        _, granted, enough = await b.decide([], T0, credits=on_b)
        assert granted is not None and enough and on_b.credits == 2
        # a's view is stale (3): the increment applies to Redis's 2.
        assert await _op(a, on_a, "increment", 5) == (2, 7)
        assert on_a.credits == 7  # mirrored
        # b's next decision spends from it: exactly 7 more, then refused.
        served = 0
        for _ in range(10):
            _, granted, enough = await b.decide([], T0, credits=on_b)
            served += granted is not None and enough
        assert served == 7 and on_b.credits == 0
        assert await _op(a, on_a, "set", 4) == (0, 4)
        assert await _op(b, on_b, "decrement", 4) == (4, 0)
        assert await _op(a, on_a, "set", 0) == (0, 0)
        assert await _raw(a, "key_ops") == {b"v": b"1", b"b": b"0", b"r": b""}


async def test_the_rule_is_the_single_nodes(redis_url: str) -> None:  # noqa: F811
    """Every op and amount answers as ``apply_op`` does (same errors)."""
    config = ClusterConfig(redis_url=redis_url)
    async with open_cluster_limits(config) as node:
        for i, (start, op, amount) in enumerate(
            [
                (5, "decrement", 5),
                (5, "decrement", 6),
                (0, "decrement", 1),
                (5, "increment", MAX_BALANCE - 5),
                (5, "increment", MAX_BALANCE - 4),
                (MAX_BALANCE, "set", 0),
                (0, "set", MAX_BALANCE),
            ]
        ):
            holder = Holder(f"key_rule_{i}", start)
            try:
                expected: Any = (start, apply_op(op, amount, start))  # type: ignore[arg-type]
            except (InsufficientCredits, ValidationError) as exc:
                expected = exc
            before = await _raw(node, holder.key)
            try:
                got: Any = await _op(node, holder, op, amount)
            except (InsufficientCredits, ValidationError) as exc:
                got = exc
            if isinstance(expected, Exception):
                assert type(got) is type(expected) and got.code == expected.code, (op, amount)
                assert str(got) == str(expected)
                # Refused: nothing written, not even the balance's first copy.
                assert await _raw(node, holder.key) == before == {}
                assert holder.credits == start
            else:
                assert got == expected, (op, amount)


async def test_a_refused_decrement_reports_the_balance(redis_url: str) -> None:  # noqa: F811
    config = ClusterConfig(redis_url=redis_url)
    async with open_cluster_limits(config) as node:
        holder = Holder("key_short", 3)
        await node.decide([], T0, credits=holder)
        with pytest.raises(InsufficientCredits) as caught:
            await _op(node, holder, "decrement", 3)
        assert caught.value.code == "INSUFFICIENT_CREDITS"
        assert caught.value.extra.get("credits_remaining") == 2
        assert (await _raw(node, "key_short"))[b"b"] == b"2"


async def test_credits_versions_stale_and_newer(redis_url: str) -> None:  # noqa: F811
    config = ClusterConfig(redis_url=redis_url)

    class Patched:
        credits_version = 2
        balance = 50

    async with open_cluster_limits(config) as a, open_cluster_limits(config) as b:
        old_a, old_b = Holder("key_v", 10), Holder("key_v", 10)
        await a.decide([], T0, credits=old_a)  # Redis: v1, 9
        # A PATCH seen by a's replica first (credits version 2, 50 credits):
        # the operation applies to the new version's balance.
        assert await _op(a, old_a, "increment", 5, Patched()) == (50, 55)
        assert old_a.credits_version == 2
        # b still knows version 1 (its replica lags): Redis keeps the newer
        # balance and b's operation applies to it, never to the stale one.
        assert await _op(b, old_b, "decrement", 5) == (55, 50)
        assert (old_b.credits_version, old_b.credits) == (2, 50)
        assert await _raw(a, "key_v") == {b"v": b"2", b"b": b"50", b"r": b""}


async def test_a_refill_due_is_applied_once_before_the_operation(
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
            if now >= T0 and (self.credits_refilled_at or 0) < T0:
                self.credits = max(self.credits or 0, 5)
                self.credits_refilled_at = T0

    async with open_cluster_limits(config) as a, open_cluster_limits(config) as b:
        on_a = Holder("key_refill", 1)
        on_a.credits_refilled_at = T0 - 100
        await a.decide([], T0 - 50, credits=on_a)  # Redis: 0, refilled at T0 - 100
        on_b = Refilling("key_refill", 0)
        on_b.credits_refilled_at = T0 - 100
        # b finds the refill due: topped up to 5, then incremented.
        assert await _op(b, on_b, "increment", 2, Record()) == (5, 7)
        assert on_b.credits_refilled_at == T0
        # a finds it due too: not applied again.
        again = Refilling("key_refill", 0)
        again.credits_refilled_at = T0 - 100
        assert await _op(a, again, "decrement", 1, Record()) == (7, 6)


async def test_a_debt_from_an_outage_is_charged_first(redis_url: str) -> None:  # noqa: F811
    config = ClusterConfig(redis_url=redis_url)
    async with open_cluster_limits(config) as node:
        holder = Holder("key_debt", 10)
        await node.decide([], T0, credits=holder)  # Redis: 9
        node.link.failed(OSError("cut off"))  # the fallback decides: 3 spent alone
        for _ in range(3):
            await node.decide([], T0, credits=holder)
        assert holder.credits == 6
        with pytest.raises(StoreUnreachable) as caught:
            await _op(node, holder, "increment", 1)
        assert caught.value.code == "STORE_UNAVAILABLE" and caught.value.status == 503
        assert (await _raw(node, "key_debt"))[b"b"] == b"9"  # nothing applied
        node.link.ok()
        assert await _op(node, holder, "increment", 1) == (6, 7)
        assert holder.credits == 7 and node.balance_of(holder, None).debt == 0


async def test_redis_killed_answers_store_unavailable_and_changes_nothing(
    tmp_path: Path,
) -> None:
    with running_redis(tmp_path / "redis", persistence=True) as server:
        await _killed(server)


async def _killed(server: RedisServer) -> None:
    config = ClusterConfig(redis_url=server.url)
    async with open_cluster_limits(config) as node:
        holder = Holder("key_kill", 5)
        await node.decide([], T0, credits=holder)
        server.kill()
        with pytest.raises(StoreUnreachable):
            await _op(node, holder, "increment", 100)
        # The link knows now: the next one is refused without a round trip.
        assert not node.link.reachable
        with pytest.raises(StoreUnreachable):
            await _op(node, holder, "set", 1)
        assert holder.credits == 4
        server.restart()
        with trio.fail_after(10):
            await node.link.wait_reachable()
        # The ops that failed are not half there: Redis restarted from its
        # append-only file with the balance the decision left.
        assert await _raw(node, "key_kill") == {b"v": b"1", b"b": b"4", b"r": b""}
        assert await _op(node, holder, "increment", 1) == (4, 5)


async def test_a_peek_takes_nothing(redis_url: str) -> None:  # noqa: F811
    config = ClusterConfig(redis_url=redis_url)
    lim = Limit("minute", 3, 60.0)
    async with open_cluster_limits(config) as node:
        holder = Holder("key_peek", 2)
        for _ in range(5):
            decisions = await node.peek([("key_peek", lim)], [(holder, None)], T0)
            assert decisions is not None
            assert [(d.allowed, d.remaining) for d in decisions] == [(True, 3)]
        assert holder.credits == 2
        await node.decide([("key_peek", lim)], T0, credits=holder)
        decisions = await node.peek([("key_peek", lim)], [(holder, None)], T0)
        assert decisions is not None and decisions[0].remaining == 2 and holder.credits == 1
        node.link.failed(OSError("cut off"))
        assert await node.peek([("key_peek", lim)], [(holder, None)], T0) is None
        assert holder.credits == 1  # the last known balance


def test_the_call_and_its_reply() -> None:
    keys, args = credit_call("ns", Balance("k", 3, 10, None, 0, 2), "increment", 5, 99)
    assert keys == ["{ns}:c:k"]
    assert args == ["3", "10", "", "0", "2", "increment", "5", "99"]
    reply = parse_credit([1, 10, 15, 3, b"1800000000.5"])
    assert (reply.status, reply.old, reply.new) == (1, 10, 15)
    assert reply.after.refilled_at == 1_800_000_000.5 and reply.after.balance == 15


def _metered(key_id: str, remaining: int) -> KeyRecord:
    return msgspec.structs.replace(
        key_record(key_id),
        credits=Credits(remaining, 0, 0.0),
        credits_version=1,
        credits_set_at=T0,
        updated_at=T0,
        rate_limits=(RateLimit("m", 10, 3600.0),),
    )


async def test_the_meter_on_a_cluster_node(redis_url: str) -> None:  # noqa: F811
    """``ActorMeter`` (the admin API's owner of balances) on a cluster node:
    operations and validate go to Redis; the stored balance is Redis's;
    Redis unreachable: 503 for an operation, the fallback for a spend
    (``deny``: ``LIMITS_UNAVAILABLE``), the last known balance for a peek."""
    config = ClusterConfig(redis_url=redis_url, fallback="deny")
    async with open_cluster_limits(config) as node, open_cluster_limits(config) as other:
        store = MemoryStore()
        actors = ActorRegistry(store, clock=lambda: T0)
        actors.cluster = node
        meter = ActorMeter(actors)
        record = _metered("key_meter", 5)
        assert await meter.change("key_meter", record, CreditChange("increment", 3), T0) == (5, 8)
        with store.read() as txn:
            raw = txn.get(Table.USAGE, b"key_meter")
        assert raw is not None and codec.usage.decode(raw).credits_remaining == 8
        # Another node spends from it.
        elsewhere = Holder("key_meter", 5)
        await other.decide([], T0, credits=elsewhere, record=None)
        assert elsewhere.credits == 7
        # validate: a peek reports the cluster's state and takes nothing.
        for _ in range(3):
            state = await meter.state(record, 0, T0)
            assert state.credits_remaining == 7 and state.refused is None
            assert [(v.name, v.remaining) for v in state.rate_limits] == [("m", 10)]
        # validate with spend: the request path's decision (limits first,
        # then every balance; all or nothing).
        state = await meter.state(record, 4, T0)
        assert (state.refused, state.credits_remaining) == (None, 3)
        assert [(v.name, v.remaining) for v in state.rate_limits] == [("m", 6)]
        state = await meter.state(record, 4, T0)
        assert (state.refused, state.credits_remaining) == ("QUOTA_EXCEEDED", 0)
        state = await meter.state(record, 3, T0)
        assert (state.refused, state.credits_remaining) == (None, 0)
        state = await meter.state(record, 4, T0)
        assert state.refused == "RATE_LIMITED"
        assert [(v.name, v.remaining) for v in state.rate_limits] == [("m", 3)]
        assert (await _raw(node, "key_meter"))[b"b"] == b"0"
        assert await meter.change("key_meter", record, CreditChange("set", 2), T0) == (0, 2)

        node.link.failed(OSError("cut off"))
        with pytest.raises(StoreUnreachable):
            await meter.change("key_meter", record, CreditChange("set", 1), T0)
        with pytest.raises(LimitsUnavailable) as caught:
            await meter.state(record, 1, T0)
        assert caught.value.status == 503 and caught.value.headers["Retry-After"] == "1"
        state = await meter.state(record, 0, T0)
        assert (state.credits_remaining, state.rate_limits) == (2, [])
        assert (await _raw(other, "key_meter"))[b"b"] == b"2"  # nothing changed
