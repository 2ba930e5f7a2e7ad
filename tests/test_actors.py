"""Per-key actors under trio's virtual clock: exact flush, eviction and refill
times, all-or-nothing admission with credits, snapshots, statistics, the flush
merge on its own, and several registries (processes) writing deltas to one
store.

Every test that runs the registry uses pytest-trio's ``autojump_clock`` and
makes the registry's clock ``trio.current_time``, so times are asserted
exactly (the clock starts at 0 and only jumps when every task is blocked).
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest
import trio
import trio.testing

from triogate.dataplane.actors import (
    ActorRegistry,
    ActorSnapshot,
    Admission,
    KeyActor,
    Refusal,
)
from triogate.dataplane.usageflush import UsageDelta, UsageFlush, merge_usage
from triogate.policy.ratelimit import Limit
from triogate.storage import (
    Credits,
    KeyRecord,
    MemoryStore,
    Store,
    Table,
    UsageRecord,
    WriteTxn,
    codec,
    open_lmdb_store,
)
from triogate.testing import key_record

T = TypeVar("T")
BASE = key_record("key_a")


def metered_record(
    key: str = "key_a",
    *,
    remaining: int = 10,
    refill_amount: int = 0,
    refill_interval: float = 0.0,
    version: int = 0,
    set_at: float | None = 0.0,
    updated_at: float = 0.0,
) -> KeyRecord:
    return msgspec.structs.replace(
        BASE,
        id=key,
        credits=Credits(remaining, refill_amount, refill_interval),
        credits_version=version,
        credits_set_at=set_at,
        updated_at=updated_at,
    )


def make_registry(
    store: Store | None = None, *, flush_interval: float = 1.0, idle_timeout: float = 300.0
) -> ActorRegistry:
    return ActorRegistry(
        store if store is not None else MemoryStore(),
        flush_interval=flush_interval,
        idle_timeout=idle_timeout,
        clock=trio.current_time,
    )


@asynccontextmanager
async def running(registry: ActorRegistry) -> AsyncIterator[trio.Nursery]:
    """The registry's ``run`` (flusher and sweeper) for the block; cancelled
    on the way out, which is the clean shutdown."""
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        yield nursery
        nursery.cancel_scope.cancel()


def stored(store: Store, key: str) -> UsageRecord | None:
    with store.read() as txn:
        raw = txn.get(Table.USAGE, key.encode())
    return None if raw is None else codec.usage.decode(raw)


async def put_usage(store: Store, key: str, usage: UsageRecord) -> None:
    await store.write(lambda txn: txn.put(Table.USAGE, key.encode(), codec.encode(usage)))


def live_actors_of(key: str) -> list[KeyActor]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, KeyActor) and o.key == key]


def summary(admission: Admission) -> tuple[bool, str | None, list[object], int, int | None]:
    return (
        admission.allowed,
        admission.code,
        list(admission.decisions),
        admission.credits_taken,
        admission.credits_left,
    )


# ---- spawning and loading ---------------------------------------------------------------


async def test_actor_is_spawned_on_first_use_and_loaded_from_stored_usage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    await put_usage(
        store,
        "key_a",
        UsageRecord(
            requests=7,
            last_used_at=-5.0,
            by_class=(0, 5, 0, 2, 0),
            credits_remaining=4,
            credits_refilled_at=-5.0,
            credits_version=2,
            limiters={"burst": 10.0},
        ),
    )
    registry = make_registry(store)
    assert registry.actors == {}
    actor = registry.actor("key_a")
    assert registry.actor("key_a") is actor
    assert registry.actors == {"key_a": actor}
    assert actor.snapshot() == ActorSnapshot(
        key="key_a",
        unflushed_requests=0,
        requests=7,
        credits=4,
        last_used_at=-5.0,
        limits={"burst": 10.0},
        dirty=False,
    )
    # The stored GCRA state: a "restart" does not hand out a fresh burst.
    burst = Limit("burst", 3, 10.0)
    record = metered_record(remaining=100, version=2)
    denied = actor.admit_nowait([burst], 0.0, record=record, use_credits=True)
    assert (denied.allowed, denied.code) == (False, "RATE_LIMITED")
    assert denied.decisions[0].retry_after == pytest.approx(10 / 3)
    # The stored balance of the same credits version, not the record's.
    assert actor.admit_nowait([], 0.0, record=record, use_credits=True).credits_left == 3
    assert actor.admit_nowait([burst], 10 / 3, record=record, use_credits=True).allowed


async def test_subject_actors_are_not_persisted(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    registry = make_registry(store)
    async with running(registry):
        subject = registry.subject("ip:r:10.0.0.1")
        assert registry.subject("ip:r:10.0.0.1") is subject
        assert subject.admit_nowait([Limit("r", 1, 1.0)], 0.0).allowed
        subject.record_nowait(200, 0.0)
        assert registry.statistics().dirty == 0
        await trio.sleep(2.5)
    assert stored(store, "ip:r:10.0.0.1") is None
    assert store.statistics().writes == 0


# ---- flushing ------------------------------------------------------------------------------


async def test_flush_happens_exactly_at_the_flush_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    registry = make_registry(store, flush_interval=1.0)
    assert trio.current_time() == 0.0
    async with running(registry):
        await trio.sleep_until(0.2)
        registry.actor("key_a").record_nowait(201, trio.current_time())
        s = registry.statistics()
        assert (s.dirty, s.flushes, s.last_flush_at) == (1, 0, None)
        await trio.sleep_until(0.9999)
        assert stored(store, "key_a") is None
        assert registry.statistics().dirty == 1
        await trio.sleep_until(1.0001)
        usage = stored(store, "key_a")
        assert usage is not None
        assert (usage.requests, usage.last_used_at, usage.by_class) == (1, 0.2, (0, 1, 0, 0, 0))
        s = registry.statistics()
        assert (s.dirty, s.flushes, s.last_flush_at, s.last_flush_records) == (0, 1, 1.0, 1)
        # Nothing dirty: the next tick writes nothing.
        await trio.sleep_until(2.5)
        assert registry.statistics().flushes == 1
        assert store.statistics().writes == 1
        # The next request goes out with the flush at t=3.0, as a delta.
        registry.actor("key_a").record_nowait(503, trio.current_time())
        await trio.sleep_until(2.9999)
        usage = stored(store, "key_a")
        assert usage is not None and usage.requests == 1
        await trio.sleep_until(3.0001)
        usage = stored(store, "key_a")
        assert usage is not None
        assert (usage.requests, usage.last_used_at, usage.by_class) == (2, 2.5, (0, 1, 0, 0, 1))
        assert registry.statistics().last_flush_at == 3.0


async def test_one_write_transaction_per_batch(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    registry = make_registry(store, flush_interval=1.0)
    async with running(registry):
        await trio.sleep_until(0.5)
        keys = [f"key_{i:02d}" for i in range(50)]
        for key in keys:
            registry.actor(key).record_nowait(200, trio.current_time())
        assert registry.statistics().dirty == 50
        writes = store.statistics().writes
        await trio.sleep_until(1.5)
        assert store.statistics().writes == writes + 1
        s = registry.statistics()
        assert (s.flushes, s.last_flush_records, s.dirty, s.live_actors) == (1, 50, 0, 50)
        for key in keys:
            usage = stored(store, key)
            assert usage is not None and usage.requests == 1


async def test_one_lmdb_commit_per_batch(tmp_path: Path) -> None:
    async with open_lmdb_store(tmp_path / "lmdb") as store:
        registry = make_registry(store)
        for i in range(50):
            registry.actor(f"key_{i:02d}").record_nowait(200, 1.0)
        before = store.statistics()
        await registry.flush(list(registry.actors.values()))
        after = store.statistics()
        assert (after.writes, after.commits) == (before.writes + 1, before.commits + 1)
        for i in range(50):
            usage = stored(store, f"key_{i:02d}")
            assert usage is not None and usage.requests == 1


async def test_clean_shutdown_flushes_everything(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    registry = make_registry(store, flush_interval=100.0)
    async with running(registry):
        await trio.sleep_until(0.5)
        for key in ("key_a", "key_b", "key_c"):
            registry.actor(key).record_nowait(200, trio.current_time())
        await trio.sleep_until(1.0)
        assert store.statistics().writes == 0
    # Cancelled at t=1.0: the final flush wrote every dirty actor at once.
    assert trio.current_time() == 1.0
    for key in ("key_a", "key_b", "key_c"):
        usage = stored(store, key)
        assert usage is not None and usage.requests == 1
    assert store.statistics().writes == 1
    s = registry.statistics()
    assert (s.flushes, s.last_flush_at, s.last_flush_records, s.dirty) == (1, 1.0, 3, 0)


# ---- eviction -----------------------------------------------------------------------------


async def test_idle_actor_is_evicted_after_a_final_flush(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    # Flushes far apart, so the write is eviction's own final flush; sweeps
    # every min(idle_timeout, max(flush_interval, 1)) = 5 s.
    registry = make_registry(store, flush_interval=100.0, idle_timeout=5.0)
    async with running(registry):
        await trio.sleep_until(0.2)
        registry.actor("key_a").record_nowait(200, trio.current_time())
        await trio.sleep_until(7.0)
        registry.actor("key_b").admit_nowait([Limit("l", 5, 1.0)], trio.current_time())
        # The sweep at t=5.0 found key_a active at 0.2 > 5.0 - 5.0: kept.
        await trio.sleep_until(9.9999)
        assert set(registry.actors) == {"key_a", "key_b"}
        assert stored(store, "key_a") is None
        assert registry.statistics().evicted == 0
        await trio.sleep_until(10.0001)
        # The sweep at t=10.0: key_a (idle since 0.2) flushed, then forgotten.
        usage = stored(store, "key_a")
        assert usage is not None
        assert (usage.requests, usage.last_used_at) == (1, 0.2)
        assert set(registry.actors) == {"key_b"}
        s = registry.statistics()
        assert (s.evicted, s.live_actors, s.flushes, s.last_flush_at) == (1, 1, 1, 10.0)
        assert live_actors_of("key_a") == []  # the memory is returned
        # key_b (active at 7.0) goes at the sweep at t=15.0, flushed first.
        await trio.sleep_until(14.9999)
        assert "key_b" in registry.actors
        await trio.sleep_until(15.0001)
        assert registry.actors == {}
        assert registry.statistics().evicted == 2
        usage_b = stored(store, "key_b")
        assert usage_b is not None and usage_b.limiters == {"l": pytest.approx(7.2)}
        assert live_actors_of("key_b") == []
        # Used again: a new actor continues from what was stored.
        actor = registry.actor("key_a")
        assert actor.snapshot().requests == 1
        actor.record_nowait(200, trio.current_time())
        assert actor.snapshot().requests == 2


async def test_evict_idle_keeps_recently_used_actors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = make_registry(idle_timeout=60.0, flush_interval=1000.0)
    registry.actor("key_old")
    await trio.sleep(30.0)
    registry.actor("key_new")
    await trio.sleep(30.0)
    assert await registry.evict_idle() == 1
    assert set(registry.actors) == {"key_new"}
    assert registry.statistics().evicted == 1


# ---- credits ------------------------------------------------------------------------------


async def test_credits_are_decremented_by_cost_and_run_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = make_registry()
    actor = registry.actor("key_a")
    record = metered_record(remaining=5)
    a = actor.admit_nowait([], 0.0, cost=3, record=record, use_credits=True)
    assert (a.allowed, a.credits_taken, a.credits_left) == (True, 3, 2)
    b = actor.admit_nowait([], 0.0, cost=3, record=record, use_credits=True)
    assert (b.allowed, b.code, b.credits_taken, b.credits_left) == (False, "QUOTA_EXCEEDED", 0, 2)
    c = actor.admit_nowait([], 0.0, cost=2, record=record, use_credits=True)
    assert (c.allowed, c.credits_left) == (True, 0)
    d = actor.admit_nowait([], 0.0, record=record, use_credits=True)
    assert (d.allowed, d.code, d.credits_left) == (False, "QUOTA_EXCEEDED", 0)
    # Without credits on the key, there is nothing to run out of.
    unlimited = msgspec.structs.replace(record, credits=None)
    e = actor.admit_nowait([], 0.0, record=unlimited, use_credits=True)
    assert (e.allowed, e.credits_left) == (True, None)


async def test_quota_denial_consumes_no_rate_limit(autojump_clock: trio.testing.MockClock) -> None:
    registry = make_registry()
    actor = registry.actor("key_a")
    limit = Limit("l", 2, 10.0)
    record = metered_record(remaining=1)
    assert actor.admit_nowait([limit], 0.0, record=record, use_credits=True).allowed
    refused = actor.admit_nowait([limit], 0.0, record=record, use_credits=True)
    assert (refused.allowed, refused.code) == (False, "QUOTA_EXCEEDED")
    # The limit's second slot is still there (the refused request took nothing).
    assert actor.admit_nowait([limit], 0.0).allowed
    assert not actor.admit_nowait([limit], 0.0).allowed


async def test_credits_refill_at_the_right_instant(autojump_clock: trio.testing.MockClock) -> None:
    registry = make_registry()
    record = metered_record(remaining=0, refill_amount=5, refill_interval=10.0)
    async with running(registry):
        actor = registry.actor("key_a")

        def admit() -> Admission:
            return actor.admit_nowait([], trio.current_time(), record=record, use_credits=True)

        assert admit().code == "QUOTA_EXCEEDED"
        await trio.sleep_until(9.999)
        assert admit().code == "QUOTA_EXCEEDED"
        await trio.sleep_until(10.0)
        assert [admit().allowed for _ in range(6)] == [True] * 5 + [False]
        await trio.sleep_until(19.999)
        assert admit().code == "QUOTA_EXCEEDED"
        await trio.sleep_until(20.0)
        assert admit().credits_left == 4
        # A refill tops up to refill_amount; unused credits do not pile up.
        await trio.sleep_until(30.0)
        assert admit().credits_left == 4
        await trio.sleep_until(55.0)  # two refill instants passed: still 5
        assert admit().credits_left == 4
        await trio.sleep_until(59.999)
        assert admit().credits_left == 3
        await trio.sleep_until(60.0)
        assert admit().credits_left == 4


@pytest.mark.parametrize(
    ("set_at", "updated_at", "first_refill"),
    [
        (3.0, 8.0, 13.0),  # credits set at 3.0, the key renamed at 8.0
        (0.0, 8.0, 10.0),  # set at the very start of the clock
        (None, 4.0, 14.0),  # a record from before credits_set_at: its last update
    ],
)
async def test_refills_count_from_when_the_credits_were_set(
    autojump_clock: trio.testing.MockClock,
    set_at: float | None,
    updated_at: float,
    first_refill: float,
) -> None:
    registry = make_registry()
    record = metered_record(
        remaining=0, refill_amount=5, refill_interval=10.0, set_at=set_at, updated_at=updated_at
    )
    await trio.sleep_until(first_refill - 1.5)  # first used after the credits were set
    actor = registry.actor("key_a")

    def admit() -> Admission:
        return actor.admit_nowait([], trio.current_time(), record=record, use_credits=True)

    assert admit().code == "QUOTA_EXCEEDED"
    await trio.sleep_until(first_refill - 0.001)
    assert admit().code == "QUOTA_EXCEEDED"
    await trio.sleep_until(first_refill)
    assert admit().credits_left == 4
    await trio.sleep_until(first_refill + 10.0)
    assert admit().credits_left == 4


async def test_a_balance_above_the_refill_amount_is_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = make_registry()
    actor = registry.actor("key_a")
    record = metered_record(remaining=8, refill_amount=5, refill_interval=10.0)
    assert actor.admit_nowait([], 0.0, record=record, use_credits=True).credits_left == 7
    assert actor.admit_nowait([], 10.0, record=record, use_credits=True).credits_left == 6


async def test_credits_refill_schedule_survives_eviction(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The refill instant of a key must not move because its actor was
    evicted: a key used only when empty still gets its refill at t=10."""
    store = MemoryStore()
    registry = make_registry(store, flush_interval=1.0, idle_timeout=5.0)
    record = metered_record(remaining=0, refill_amount=5, refill_interval=10.0)
    async with running(registry):
        first = registry.actor("key_a").admit_nowait([], 0.0, record=record, use_credits=True)
        assert first.code == "QUOTA_EXCEEDED"
        await trio.sleep_until(9.0)
        assert "key_a" not in registry.actors  # evicted at the sweep at t=5
        await trio.sleep_until(10.0)
        again = registry.actor("key_a").admit_nowait(
            [], trio.current_time(), record=record, use_credits=True
        )
        assert (again.allowed, again.credits_left) == (True, 4)


async def test_patch_with_a_new_credits_version_takes_effect_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    registry = make_registry(store)
    actor = registry.actor("key_a")
    v0 = metered_record(remaining=10)
    for _ in range(3):
        assert actor.admit_nowait([], 0.0, record=v0, use_credits=True).allowed
    assert actor.credits == 7
    # The same version again does not reset anything.
    assert actor.admit_nowait([], 0.0, record=v0, use_credits=True).credits_left == 6
    # A PATCH (credits_version bumped): the new balance, from the next request on.
    v1 = metered_record(remaining=100, version=1)
    assert actor.admit_nowait([], 0.5, record=v1, use_credits=True).credits_left == 99
    await registry.flush([actor])
    usage = stored(store, "key_a")
    assert usage is not None
    assert (usage.credits_remaining, usage.credits_version) == (99, 1)
    # A PATCH down to zero denies at once.
    v2 = metered_record(remaining=0, version=2)
    assert actor.admit_nowait([], 1.0, record=v2, use_credits=True).code == "QUOTA_EXCEEDED"
    # And one written by another process reaches an actor loaded from storage.
    other = make_registry(store).actor("key_a")
    assert other.credits == 99
    assert other.admit_nowait([], 2.0, record=v2, use_credits=True).code == "QUOTA_EXCEEDED"


async def test_two_actors_are_independent(autojump_clock: trio.testing.MockClock) -> None:
    registry = make_registry()
    a, b = registry.actor("key_a"), registry.actor("key_b")
    limit = Limit("l", 2, 10.0)
    rec_a, rec_b = metered_record("key_a", remaining=1), metered_record("key_b", remaining=5)
    assert a.admit_nowait([limit], 0.0, record=rec_a, use_credits=True).allowed
    assert a.admit_nowait([limit], 0.0, record=rec_a, use_credits=True).code == "QUOTA_EXCEEDED"
    assert a.admit_nowait([limit], 0.0).allowed
    assert a.admit_nowait([limit], 0.0).code == "RATE_LIMITED"
    # key_b's limit and credits are untouched by all of that.
    first = b.admit_nowait([limit], 0.0, record=rec_b, use_credits=True)
    assert (first.allowed, first.credits_left, first.decisions[0].remaining) == (True, 4, 1)
    a.record_nowait(200, 0.0)
    assert (a.snapshot().requests, b.snapshot().requests) == (1, 0)


async def test_undo_gives_back_credits_and_capacity(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    registry = make_registry(store)
    actor = registry.actor("key_a")
    limits = [Limit("burst", 2, 10.0), Limit("window", 3, 60.0, "sliding_window")]
    record = metered_record(remaining=10)
    fresh = actor.admit_nowait(limits, 0.0, cost=2, record=record, use_credits=True)
    assert (fresh.allowed, fresh.credits_left) == (True, 8)
    assert not actor.admit_nowait(limits, 0.0, record=record, use_credits=True).allowed
    actor.undo_nowait(fresh, 0.0)
    assert actor.credits == 10
    again = actor.admit_nowait(limits, 0.0, cost=2, record=record, use_credits=True)
    assert summary(again) == summary(fresh)
    actor.undo_nowait(again, 0.0)
    await registry.flush([actor])
    usage = stored(store, "key_a")
    assert usage is not None and usage.credits_remaining == 10


async def test_undo_after_a_flush_is_persisted(autojump_clock: trio.testing.MockClock) -> None:
    """The flusher may run while the request is in flight; a refusal after
    that must still give the credit back in storage, not only in memory."""
    store = MemoryStore()
    registry = make_registry(store, flush_interval=1.0)
    record = metered_record(remaining=10)
    async with running(registry):
        actor = registry.actor("key_a")
        admission = actor.admit_nowait([], 0.5, record=record, use_credits=True)
        await trio.sleep_until(1.5)  # flushed at t=1.0 with 9 left
        usage = stored(store, "key_a")
        assert usage is not None and usage.credits_remaining == 9
        actor.undo_nowait(admission, trio.current_time())
        assert actor.credits == 10
        assert registry.statistics().dirty == 1  # the refund is written next
        await trio.sleep_until(2.5)
        usage = stored(store, "key_a")
        assert usage is not None and usage.credits_remaining == 10


# ---- without a key record, snapshots, flushing now ---------------------------------------


async def test_admission_without_a_record_spends_the_known_balance(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``use_credits`` without a record (no fresher word on the credits) must
    not be silently ignored: once the actor knows the key's balance, it is
    spent; without ``use_credits`` it is left alone."""
    registry = make_registry()
    actor = registry.actor("key_a")
    record = metered_record(remaining=2)
    assert actor.admit_nowait([], 0.0, record=record, use_credits=True).credits_left == 1
    spent = actor.admit_nowait([], 0.0, use_credits=True)
    assert (spent.allowed, spent.credits_taken, spent.credits_left) == (True, 1, 0)
    refused = actor.admit_nowait([], 0.0, use_credits=True)
    assert (refused.allowed, refused.code) == (False, Refusal.QUOTA_EXCEEDED)
    assert refused.code == "QUOTA_EXCEEDED"  # the problem code, as a string too
    free = actor.admit_nowait([], 0.0)
    assert (free.allowed, free.credits_taken) == (True, 0)
    assert actor.credits == 0


async def test_record_counts_by_status_class_and_the_snapshot_shows_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = make_registry(flush_interval=1.0)
    async with running(registry):
        await trio.sleep_until(0.25)
        actor = registry.actor("key_a")
        for status in (200, 204, 404, 500, 101):
            actor.record_nowait(status, trio.current_time())
        assert actor.snapshot() == ActorSnapshot(
            key="key_a",
            unflushed_requests=5,
            requests=5,
            credits=None,
            last_used_at=0.25,
            limits={},
            dirty=True,
        )
        assert actor.by_class == (1, 2, 0, 1, 1)
        await trio.sleep_until(1.5)
        snap = actor.snapshot()
        assert (snap.unflushed_requests, snap.requests, snap.dirty) == (0, 5, False)


async def test_flush_writes_now(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    registry = make_registry(store, flush_interval=100.0)
    async with running(registry):
        actor = registry.actor("key_a")
        actor.record_nowait(200, trio.current_time())
        await registry.flush([actor])
        assert trio.current_time() < 1.0
        usage = stored(store, "key_a")
        assert usage is not None and usage.requests == 1
        assert registry.statistics().flushes == 1


async def test_a_failed_flush_gives_the_counts_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = make_registry(FailingStore())
    actor = registry.actor("key_a")
    actor.admit_nowait([], 0.0, record=metered_record(remaining=5), use_credits=True)
    actor.record_nowait(404, 0.0)
    with pytest.raises(OSError, match="on fire"):
        await registry.flush([actor])
    assert (actor.requests, actor.by_class, actor.taken, actor.dirty) == (
        1,
        (0, 0, 0, 1, 0),
        1,
        True,
    )
    assert actor.snapshot().requests == 1
    assert registry.statistics().dirty == 1


class FailingStore(MemoryStore):
    async def write(self, fn: Callable[[WriteTxn], T]) -> T:
        await trio.lowlevel.checkpoint()
        raise OSError("disk on fire")


# ---- the flush merge, on its own --------------------------------------------------------------


def flush_of(
    requests: int = 0,
    *,
    taken: int = 0,
    credits: int | None = None,
    version: int = 0,
    refilled: float | None = None,
    last_used: float | None = None,
    limiters: dict[str, float] | None = None,
) -> UsageFlush:
    delta = UsageDelta(requests, (0, requests, 0, 0, 0), taken, last_used)
    return UsageFlush(b"key_a", delta, credits, version, refilled, limiters or {})


def test_merge_adds_counters_to_what_is_stored() -> None:
    old = UsageRecord(requests=4, last_used_at=9.0, by_class=(1, 3, 0, 0, 0), limiters={"l": 2.0})
    record, balance = merge_usage(old, flush_of(2, last_used=5.0))
    assert (record.requests, record.by_class, record.last_used_at) == (6, (1, 5, 0, 0, 0), 9.0)
    assert record.limiters == {"l": 2.0}  # no limiter state of its own: what is stored stays
    assert balance is None
    first, _ = merge_usage(None, flush_of(1, last_used=5.0, limiters={"l": 3.0}))
    assert (first.requests, first.last_used_at, first.limiters) == (1, 5.0, {"l": 3.0})


def test_merge_takes_what_this_process_spent_off_the_stored_balance() -> None:
    # Stored 7 (another process spent 3 of 10); this one knows 8, spent 2.
    old = UsageRecord(credits_remaining=7, credits_version=1, credits_refilled_at=0.0)
    record, balance = merge_usage(old, flush_of(credits=8, taken=2, version=1, refilled=0.0))
    assert (record.credits_remaining, balance) == (5, 5)
    # A refill since (another refill instant): this actor's balance is the truth.
    record, balance = merge_usage(old, flush_of(credits=5, taken=0, version=1, refilled=10.0))
    assert (record.credits_remaining, record.credits_refilled_at, balance) == (5, 10.0, 5)


def test_merge_never_lets_a_stale_credits_version_win() -> None:
    old = UsageRecord(credits_remaining=99, credits_version=2, credits_refilled_at=1.0)
    record, balance = merge_usage(old, flush_of(1, credits=3, taken=1, version=1))
    assert (record.credits_remaining, record.credits_version, record.requests) == (99, 2, 1)
    assert balance is None
    # An actor without credits keeps the stored balance as well, and reports it.
    record, balance = merge_usage(old, flush_of(1))
    assert (record.credits_remaining, record.credits_version, balance) == (99, 2, 99)


# ---- statistics ---------------------------------------------------------------------------


async def test_statistics(autojump_clock: trio.testing.MockClock) -> None:
    registry = make_registry(flush_interval=1.0, idle_timeout=10.0)
    s = registry.statistics()
    assert msgspec.structs.asdict(s) == {
        "live_actors": 0,
        "dirty": 0,
        "flushes": 0,
        "last_flush_at": None,
        "last_flush_records": 0,
        "evicted": 0,
    }
    async with running(registry):
        await trio.sleep_until(0.5)
        registry.actor("key_a").record_nowait(200, 0.5)
        registry.actor("key_b").record_nowait(200, 0.5)
        registry.actor("key_c")  # spawned, clean
        s = registry.statistics()
        assert (s.live_actors, s.dirty) == (3, 2)
        await trio.sleep_until(1.5)
        s = registry.statistics()
        assert s.dirty == 0
        assert (s.flushes, s.last_flush_at, s.last_flush_records) == (1, 1.0, 2)
        await trio.sleep_until(11.5)  # idle since 0.5: the sweep at t=11 evicts all three
        s = registry.statistics()
        assert (s.live_actors, s.evicted, s.flushes) == (0, 3, 1)
    assert repr(registry) == "<ActorRegistry 0 actors, 0 dirty, 1 flushes>"


# ---- several writers ----------------------------------------------------------------------


async def test_two_registries_add_their_deltas(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    one, two = make_registry(store), make_registry(store)
    async with running(one), running(two):
        await trio.sleep_until(0.5)
        for _ in range(3):
            one.actor("key_a").record_nowait(200, trio.current_time())
        await trio.sleep_until(0.75)
        for status in (200, 429):
            two.actor("key_a").record_nowait(status, trio.current_time())
        await trio.sleep_until(1.5)
        usage = stored(store, "key_a")
        assert usage is not None
        assert (usage.requests, usage.by_class, usage.last_used_at) == (5, (0, 4, 0, 1, 0), 0.75)
        assert (one.statistics().flushes, two.statistics().flushes) == (1, 1)
        # And again: deltas, never a registry's total.
        one.actor("key_a").record_nowait(200, trio.current_time())
        await trio.sleep_until(2.5)
        usage = stored(store, "key_a")
        assert usage is not None and usage.requests == 6


async def test_two_registries_spend_one_balance(autojump_clock: trio.testing.MockClock) -> None:
    """Two processes see a key's credits (same version) for the first time at
    different instants; what both spent must come off the stored balance."""
    store = MemoryStore()
    one, two = make_registry(store), make_registry(store)
    record = metered_record(remaining=10)
    async with running(one), running(two):
        await trio.sleep_until(0.25)
        for _ in range(3):
            assert (
                one.actor("key_a")
                .admit_nowait([], trio.current_time(), record=record, use_credits=True)
                .allowed
            )
        await trio.sleep_until(0.5)
        for _ in range(2):
            assert (
                two.actor("key_a")
                .admit_nowait([], trio.current_time(), record=record, use_credits=True)
                .allowed
            )
        await trio.sleep_until(1.5)
        usage = stored(store, "key_a")
        assert usage is not None and usage.credits_remaining == 5
        # Each learns what the other spent at its next flush.
        one.actor("key_a").admit_nowait([], trio.current_time(), record=record, use_credits=True)
        two.actor("key_a").admit_nowait([], trio.current_time(), record=record, use_credits=True)
        await trio.sleep_until(2.5)
        usage = stored(store, "key_a")
        assert usage is not None and usage.credits_remaining == 3


async def test_a_stale_credits_version_never_overwrites_a_newer_balance(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Process two still holds state from before a PATCH when it flushes after
    process one wrote the new version's balance: its requests count, but its
    stale balance must not replace the new one."""
    store = MemoryStore()
    one, two = make_registry(store), make_registry(store)
    v0, v1 = metered_record(remaining=10), metered_record(remaining=100, version=1)
    a, b = one.actor("key_a"), two.actor("key_a")
    assert a.admit_nowait([], 0.25, record=v0, use_credits=True).allowed
    assert b.admit_nowait([], 0.25, record=v0, use_credits=True).allowed
    b.record_nowait(200, 0.25)
    # The PATCH: process one sees v1 first and flushes its balance.
    assert a.admit_nowait([], 0.5, record=v1, use_credits=True).credits_left == 99
    await one.flush([a])
    await two.flush([b])
    usage = stored(store, "key_a")
    assert usage is not None
    assert usage.requests == 1
    assert (usage.credits_version, usage.credits_remaining) == (1, 99)
    # A third process loading now continues from v1's balance.
    three = make_registry(store).actor("key_a")
    assert three.admit_nowait([], 1.0, record=v1, use_credits=True).credits_left == 98
