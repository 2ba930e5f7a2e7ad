"""The workers' shared table (``dataplane.sharedlimits``) when its map fills,
on a real LMDB in tmp_path: no decision, credit operation or peek ever
raises (the documented fallback is deciding in the process), pruning goes
in batches of their own transactions, making room is not retried per
request after it failed, the sweeper keeps headroom, a table full at start
is recreated, and a one-process gateway discards the table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lmdb
import msgspec
import pytest

from triogate.dataplane.actors import ActorRegistry
from triogate.dataplane.sharedlimits import SharedLimits
from triogate.dataplane.sharedtable import PRUNE_BATCH, ROOM_AT
from triogate.policy.ratelimit import Limit
from triogate.storage import Credits, KeyRecord, MemoryStore
from triogate.storage.limits_file import discard_limits_env, limits_path, open_limits_env
from triogate.testing import key_record

T0 = 1_700_000_000.0
DAY = Limit("day", 1000, 86_400.0)
SECOND = Limit("second", 1_000_000, 1.0)


def _table(tmp_path: Path, kib: int) -> SharedLimits:
    env, dbs = open_limits_env(tmp_path, (b"limits", b"credits"), map_size=kib << 10)
    return SharedLimits(env, *dbs)


def _ip(i: int) -> str:
    return f"ip:10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"


def _metered(key: str, remaining: int) -> KeyRecord:
    return msgspec.structs.replace(
        key_record(key), credits=Credits(remaining, 0, 0.0), credits_set_at=T0, updated_at=T0
    )


def _fill(shared: SharedLimits, limit: Limit, share: float, step: float = 0.0) -> int:
    """Decide for new subjects until ``share`` of the map is in use: how many."""
    for i in range(200_000):  # bounded: a few MiB fill well before
        shared.decide([(_ip(i), limit)], T0 + i * step)
        if i % 64 == 0 and shared.used() >= share:
            return i + 1
    raise AssertionError("the map never filled")


@pytest.mark.parametrize("map_kib", [64, 256, 1024])
def test_a_table_full_of_live_states_keeps_deciding(tmp_path: Path, map_kib: int) -> None:
    """Distinct subjects (client addresses under ``by = "ip"``) whose limits
    are not whole again (a day-long period) fill the map: every decision
    is still answered, never an exception."""
    shared = _table(tmp_path, map_kib)
    try:
        for i in range(map_kib * 40):  # bounded: ~100 bytes an entry fills the map
            decisions, reservation, enough = shared.decide([(_ip(i), DAY)], T0 + i * 0.001)
            # A new subject: allowed, one request taken, whatever the map holds.
            assert [(d.allowed, d.remaining) for d in decisions] == [(True, DAY.limit - 1)], i
            assert reservation is not None and enough, i
        assert shared.errors == 0  # made room in the table, never fell back to per worker
    finally:
        shared.close()


@pytest.mark.parametrize(
    "map_kib",
    [
        64,
        1024,
        # A known defect (closing note): in a 4 MiB map that is full, pages a
        # deletion or a drop frees seem not to be reusable by the next write
        # (LMDB reuses freed pages only from transactions older than the last
        # committed one), so requests fall back to per-worker decisions until
        # the sweeper's next round. Strict: it fails once that is mended.
        pytest.param(4096, marks=pytest.mark.xfail(strict=True, reason="known: see comment")),
    ],
)
def test_a_table_full_of_expired_states_keeps_deciding(tmp_path: Path, map_kib: int) -> None:
    """States whole again a moment later (subjects arriving faster than the
    sweeper prunes): making room deletes in batches of their own
    transactions, so it fits in a full map."""
    shared = _table(tmp_path, map_kib)
    try:
        for i in range(map_kib * 40):
            decisions, reservation, enough = shared.decide([(_ip(i), SECOND)], T0 + i * 0.01)
            assert [(d.allowed, d.remaining) for d in decisions] == [(True, SECOND.limit - 1)], i
            assert reservation is not None and enough, i
        # "it fits in a full map": no MDB_MAP_FULL, so no fallback to per worker.
        assert shared.errors == 0
    finally:
        shared.close()


def test_credit_operations_and_peeks_on_a_full_table_never_raise(tmp_path: Path) -> None:
    reg = ActorRegistry(MemoryStore(), clock=lambda: T0)
    shared = _table(tmp_path, 64)
    reg.set_worker(0, 2, shared)
    for i in range(64 * 40):  # fill it with live states
        shared.decide([(_ip(i), DAY)], T0)
    actor = reg.actor("key_a")
    record = _metered("key_a", 10)
    assert shared.change_credits(actor, record, T0, lambda b: b + 5) == (10, 15)
    decisions = shared.peek([("key_a", DAY)], [(actor, record)], T0)
    assert [d.remaining for d in decisions] == [1000]
    assert actor.credits == 15
    shared.close()
    # A table that fails outright: the operation is this process's, still exact here.
    assert shared.change_credits(actor, record, T0, lambda b: b - 3) == (15, 12)
    assert actor.taken == 3  # merged into storage as a spend of 3
    assert shared.peek([("key_a", DAY)], [(actor, record)], T0)[0].remaining == 1000


def test_after_making_room_failed_it_is_not_retried_per_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Balances (which are never dropped) fill the map: making room cannot
    help, so the next requests fall back at once instead of each pruning
    the whole table again."""
    reg = ActorRegistry(MemoryStore(), clock=lambda: T0)
    shared = _table(tmp_path, 64)
    reg.set_worker(0, 2, shared)
    caplog.set_level(logging.WARNING)
    for i in range(64 * 40):  # bounded
        actor = reg.actor(f"key_{i:05}")
        shared.decide([], T0, credits=actor, record=_metered(actor.key, 100))
        if shared.errors:
            break
    assert shared.errors == 1, "the balances never filled the map"
    tries = 0
    prune = shared._prune_expired

    def counting(now: float) -> int:
        nonlocal tries
        tries += 1
        return prune(now)

    monkeypatch.setattr(shared, "_prune_expired", counting)
    for i in range(50):
        actor = reg.actor(f"new_{i}")
        _, reservation, ok = shared.decide(
            [(actor.key, DAY)], T0, credits=actor, record=_metered(actor.key, 1)
        )
        assert reservation is not None and ok  # decided in this process
    assert tries == 0
    assert shared.errors == 51
    assert caplog.text.count("each worker decides alone") == 1  # logged once a minute
    shared.close()


def test_prune_deletes_in_batches_and_counts_what_it_dropped(tmp_path: Path) -> None:
    shared = _table(tmp_path, 4096)
    n = PRUNE_BATCH * 5 + 7
    for i in range(n):
        shared.decide([(_ip(i), SECOND)], T0)
    shared.decide([("key_live", DAY)], T0)
    assert shared.prune(T0 + 5.0, scan=n + 1) == n
    assert shared.prune(T0 + 5.0, scan=n + 1) == 0
    # The live state is kept: its limit is not whole again.
    assert shared.peek([("key_live", DAY)], [], T0)[0].remaining == 999
    shared.close()


def test_the_sweep_keeps_headroom_dropping_expired_states_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shared = _table(tmp_path, 1024)
    shared.decide([("key_live", DAY)], T0)
    _fill(shared, SECOND, ROOM_AT + 0.05)
    caplog.set_level(logging.WARNING)
    assert shared.sweep(T0 + 5.0) > 0
    assert shared.used() < ROOM_AT
    assert "dropped every limiter state" not in caplog.text
    assert shared.peek([("key_live", DAY)], [], T0)[0].remaining == 999
    shared.close()


def test_the_sweep_drops_live_states_when_expired_ones_do_not_make_room(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reg = ActorRegistry(MemoryStore(), clock=lambda: T0)
    shared = _table(tmp_path, 1024)
    reg.set_worker(0, 2, shared)
    actor = reg.actor("key_a")
    shared.decide([], T0, credits=actor, record=_metered("key_a", 10))
    _fill(shared, DAY, ROOM_AT + 0.05)
    caplog.set_level(logging.WARNING)
    shared.sweep(T0 + 5.0)
    assert shared.used() < ROOM_AT
    assert "dropped every limiter state" in caplog.text
    assert shared.balance("key_a") == (9, 0)  # balances are kept
    for i in range(100):  # and it decides in the table again
        assert shared.decide([(_ip(i), DAY)], T0)[1] is not None
    assert shared.errors == 0
    shared.close()


def test_a_table_full_at_start_is_recreated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env, (limits, _) = open_limits_env(tmp_path, (b"limits", b"credits"), map_size=1 << 20)
    with pytest.raises(lmdb.MapFullError):
        for i in range(1 << 15):  # bounded: ~14,000 fill a MiB
            with env.begin(write=True, db=limits) as txn:
                txn.put(f"{_ip(i)}\x00day".encode(), b"\x00" * 40)
    env.close()
    caplog.set_level(logging.WARNING)
    shared = _table(tmp_path, 1024)
    assert "starting it afresh" in caplog.text
    assert shared.used() < 0.5
    assert shared.decide([("key_a", DAY)], T0)[1] is not None
    assert shared.errors == 0
    shared.close()


def test_discard_removes_the_table_and_is_a_no_op_without_one(tmp_path: Path) -> None:
    discard_limits_env(tmp_path)  # none yet
    shared = SharedLimits.open(tmp_path)
    shared.decide([("key_a", DAY)], T0)
    shared.close()
    assert limits_path(tmp_path).exists()
    discard_limits_env(tmp_path)
    assert not limits_path(tmp_path).exists()
    limits_path(tmp_path).write_text("not a directory")
    discard_limits_env(tmp_path)
    assert not limits_path(tmp_path).exists()
