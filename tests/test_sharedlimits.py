"""The workers' shared decision table (``dataplane.sharedlimits``) on a real
LMDB in tmp_path, with explicit ``now`` values: all-or-nothing over several
actors, undo, credits (exact, versioned, refunded), flushes of the exact
balance, pruning, a full table, a damaged environment, and real processes
deciding on one table at once.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from triogate.dataplane.actors import ActorRegistry
from triogate.dataplane.sharedlimits import SharedLimits
from triogate.policy.ratelimit import Limit
from triogate.storage import Credits, KeyRecord, MemoryStore, Table, UsageRecord, codec
from triogate.storage.limits_file import limits_path, open_limits_env
from triogate.testing import key_record

T0 = 1_700_000_000.0  # epoch-sized, as in production


def metered(remaining: int, *, version: int = 0, refill: tuple[int, float] = (0, 0.0)) -> KeyRecord:
    return msgspec.structs.replace(
        key_record("key_a"),
        credits=Credits(remaining, refill[0], refill[1]),
        credits_version=version,
        credits_set_at=T0,
        updated_at=T0,
    )


def make_registry(data_dir: Path, store: MemoryStore | None = None) -> ActorRegistry:
    registry = ActorRegistry(store or MemoryStore(), clock=lambda: T0)
    registry.set_worker(0, 2, SharedLimits.open(data_dir))
    return registry


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ActorRegistry]:
    reg = make_registry(tmp_path)
    yield reg
    assert reg.shared is not None
    reg.shared.close()


def test_limits_of_several_actors_are_decided_together(registry: ActorRegistry) -> None:
    key, identity = registry.actor("key_a"), registry.actor("idn_1")
    own, pool = Limit("own", 10, 60.0), Limit("pool", 3, 60.0)
    for _ in range(3):
        decisions, reservation = registry.acquire([(key, own), (identity, pool)], T0)
        assert reservation is not None
    decisions, reservation = registry.acquire([(key, own), (identity, pool)], T0)
    assert reservation is None
    assert (decisions[0].limit.name, decisions[0].allowed) == ("pool", False)
    # The refusal took nothing from the key's own limit: 7 of 10 are left.
    for _ in range(7):
        assert registry.acquire([(key, own)], T0)[1] is not None
    assert registry.acquire([(key, own)], T0)[1] is None


def test_release_gives_a_shared_reservation_back(registry: ActorRegistry) -> None:
    key, identity = registry.actor("key_a"), registry.actor("idn_1")
    limits = [(key, Limit("own", 1, 60.0)), (identity, Limit("pool", 1, 60.0, "sliding_window"))]
    _, reservation = registry.acquire(limits, T0)
    assert reservation is not None
    assert registry.acquire(limits, T0)[1] is None
    registry.release(reservation, T0)
    assert registry.acquire(limits, T0)[1] is not None


def test_admit_nowait_decides_in_the_table_and_undo_gives_back(registry: ActorRegistry) -> None:
    actor = registry.actor("key_a")
    limit = Limit("minute", 2, 60.0)
    record = metered(5)
    first = actor.admit_nowait([limit], T0, record=record, use_credits=True)
    assert (first.allowed, first.credits_taken, first.credits_left) == (True, 1, 4)
    assert actor.admit_nowait([limit], T0, record=record, use_credits=True).allowed
    refused = actor.admit_nowait([limit], T0, record=record, use_credits=True)
    assert (refused.allowed, refused.code, refused.credits_left) == (False, "RATE_LIMITED", 3)
    actor.undo_nowait(first, T0)
    assert registry.live_balance("key_a") == (4, 0)
    again = actor.admit_nowait([limit], T0, record=record, use_credits=True)
    assert (again.allowed, again.credits_left) == (True, 3)


def test_credits_run_out_exactly_and_a_quota_refusal_takes_no_limit(
    registry: ActorRegistry,
) -> None:
    actor = registry.actor("key_a")
    limit = Limit("minute", 3, 60.0)
    record = metered(2)
    codes = [
        actor.admit_nowait([limit], T0, record=record, use_credits=True).code for _ in range(3)
    ]
    assert codes == [None, None, "QUOTA_EXCEEDED"]
    # The quota refusal left the limit's third slot.
    assert actor.admit_nowait([limit], T0).allowed
    assert not actor.admit_nowait([limit], T0).allowed


def test_a_new_credits_version_resets_and_a_stale_record_does_not(
    registry: ActorRegistry,
) -> None:
    actor = registry.actor("key_a")
    assert actor.admit_nowait([], T0, record=metered(1), use_credits=True).allowed
    assert not actor.admit_nowait([], T0, record=metered(1), use_credits=True).allowed
    patched = metered(2, version=1)
    assert actor.admit_nowait([], T0, record=patched, use_credits=True).credits_left == 1
    # A record read before the PATCH (another worker saw it first) must not
    # hand the old version's balance out again.
    stale = actor.admit_nowait([], T0, record=metered(1), use_credits=True)
    assert (stale.allowed, stale.credits_left) == (True, 0)
    assert not actor.admit_nowait([], T0, record=patched, use_credits=True).allowed


def test_refill_tops_the_shared_balance_up(registry: ActorRegistry) -> None:
    actor = registry.actor("key_a")
    record = metered(1, refill=(3, 60.0))
    assert actor.admit_nowait([], T0, record=record, use_credits=True).allowed
    assert not actor.admit_nowait([], T0 + 59, record=record, use_credits=True).allowed
    refilled = actor.admit_nowait([], T0 + 60, record=record, use_credits=True)
    assert (refilled.allowed, refilled.credits_left) == (True, 2)


async def test_a_balance_starts_from_what_the_store_holds(tmp_path: Path) -> None:
    store = MemoryStore()
    usage = UsageRecord(credits_remaining=2, credits_version=0, credits_refilled_at=T0)
    await store.write(lambda txn: txn.put(Table.USAGE, b"key_a", codec.encode(usage)))
    reg = make_registry(tmp_path, store)
    actor = reg.actor("key_a")
    assert actor.admit_nowait([], T0, record=metered(10), use_credits=True).credits_left == 1


async def test_a_flush_stores_the_exact_balance(tmp_path: Path) -> None:
    store = MemoryStore()
    reg = make_registry(tmp_path, store)
    # Another worker: its own registry and actor, the same table.
    other = ActorRegistry(store, clock=lambda: T0)
    other.set_worker(1, 2, reg.shared)
    actor = reg.actor("key_a")
    for _ in range(3):
        assert actor.admit_nowait([], T0, record=metered(10), use_credits=True).allowed
    assert other.actor("key_a").admit_nowait([], T0, record=metered(10), use_credits=True).allowed
    assert actor.admit_nowait([], T0, record=metered(10), use_credits=True).credits_left == 5
    assert other.live_balance("key_a") == (5, 0)
    await other.flush(list(other.actors.values()))
    await reg.flush([actor])
    with store.read() as txn:
        raw = txn.get(Table.USAGE, b"key_a")
    assert raw is not None
    stored = codec.usage.decode(raw)
    assert (stored.credits_remaining, stored.requests) == (5, 0)


def test_prune_drops_only_states_that_are_whole_again(registry: ActorRegistry) -> None:
    a, b = registry.actor("key_a"), registry.actor("key_b")
    registry.acquire([(a, Limit("short", 5, 1.0))], T0)
    registry.acquire([(b, Limit("long", 5, 3600.0))], T0)
    registry.acquire([(b, Limit("window", 5, 10.0, "sliding_window"))], T0)
    assert registry.shared is not None
    assert registry.shared.prune(T0) == 0
    assert registry.shared.prune(T0 + 1.0) == 1  # "short" is whole again
    assert registry.shared.prune(T0 + 20.0) == 1  # two windows on
    assert registry.shared.prune(T0 + 3600.0) == 1


def test_a_full_table_drops_state_and_keeps_deciding(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env, dbs = open_limits_env(tmp_path, (b"limits", b"credits"), map_size=64 << 10)
    shared = SharedLimits(env, *dbs)
    limit = Limit("minute", 1, 60.0)
    caplog.set_level(logging.WARNING)
    allowed = 0
    for i in range(2000):  # bounded: a 64 KiB map fills well before
        _, reservation, _ = shared.decide([(f"ip:{i:05}", limit)], T0)
        allowed += reservation is not None
    shared.close()
    assert allowed == 2000  # each subject's first request: never refused for want of room
    assert "dropped every limiter state" in caplog.text


@pytest.mark.parametrize("damage", ["garbage", "truncated", "a file"])
def test_a_damaged_environment_is_recreated_with_a_warning(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    shared = SharedLimits.open(tmp_path)
    shared.decide([("key_a", Limit("minute", 1, 60.0))], T0)
    shared.close()
    path = limits_path(tmp_path)
    data = path / "data.mdb"
    if damage == "garbage":
        data.write_bytes(b"\x00garbage" * 4096)
    elif damage == "truncated":
        data.write_bytes(data.read_bytes()[:5000])
    else:
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
        path.write_text("not a directory")
    caplog.set_level(logging.WARNING)
    shared = SharedLimits.open(tmp_path)
    assert "starting it afresh" in caplog.text
    # A fresh table: the limit is whole again, and it works.
    assert shared.decide([("key_a", Limit("minute", 1, 60.0))], T0)[1] is not None
    assert shared.decide([("key_a", Limit("minute", 1, 60.0))], T0)[1] is None
    shared.close()


def test_a_missing_environment_is_created(tmp_path: Path) -> None:
    shared = SharedLimits.open(tmp_path)
    assert (limits_path(tmp_path) / "data.mdb").exists()
    shared.close()


_CONTENDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from triogate.dataplane.sharedlimits import SharedLimits
    from triogate.policy.ratelimit import Limit

    shared = SharedLimits.open(Path(sys.argv[1]))
    limit = Limit("minute", int(sys.argv[2]), 60.0)
    sys.stdin.readline()  # start together
    admitted = 0
    for _ in range(int(sys.argv[3])):
        admitted += shared.decide([("key_a", limit)], 1_700_000_000.0)[1] is not None
    shared.close()
    print(admitted)
    """
)


def test_processes_deciding_at_once_admit_exactly_the_limit(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTENDER, str(tmp_path), "500", "400"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    counts = []
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        counts.append(int(out))
    # 1,200 requests over three processes, a limit of 500: exactly 500.
    assert sum(counts) == 500, counts


def test_a_failing_table_falls_back_to_this_process_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reg = make_registry(tmp_path)
    assert reg.shared is not None
    reg.shared.close()  # every LMDB call now fails
    caplog.set_level(logging.ERROR)
    actor = reg.actor("key_a")
    limit = Limit("minute", 2, 60.0)
    record = metered(5)
    admissions = [
        actor.admit_nowait([limit], T0, record=record, use_credits=True) for _ in range(3)
    ]
    assert [a.code for a in admissions] == [None, None, "RATE_LIMITED"]
    assert admissions[1].credits_left == 3
    actor.undo_nowait(admissions[1], T0)  # no exception either
    assert actor.admit_nowait([limit], T0).allowed
    assert reg.live_balance("key_a") is None
    assert caplog.text.count("each worker decides alone") == 1
    assert reg.shared.errors >= 4
