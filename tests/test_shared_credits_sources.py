"""Credits versions are ordered only within one source (a key's own credits,
an identity's, one plan's: ``policy.creditversion``): a balance moved to
another source starts from that source's, with one process and with the
workers' shared table alike, while a stale read of the same source is still
ignored. And the flush to storage follows the same rule."""

from __future__ import annotations

from pathlib import Path

import msgspec

from triogate.control.keyresolve import PlanCredits, plan_credits_version
from triogate.dataplane.actors import ActorRegistry
from triogate.dataplane.sharedlimits import SharedLimits
from triogate.dataplane.usageflush import UsageDelta, UsageFlush, merge_usage
from triogate.policy.creditversion import older_credits
from triogate.storage import Credits, KeyRecord, MemoryStore, UsageRecord
from triogate.storage.records import PlanRecord
from triogate.testing import key_record

T0 = 1_700_000_000.0


def metered(remaining: int, *, version: int = 0) -> KeyRecord:
    return msgspec.structs.replace(
        key_record("key_a"),
        credits=Credits(remaining, 0, 0.0),
        credits_version=version,
        credits_set_at=T0,
        updated_at=T0,
    )


def plan(remaining: int, *, credits_version: int = 0, plan_id: str = "pln_x") -> PlanRecord:
    return PlanRecord(
        id=plan_id, name="p", version=1, created_at=T0, updated_at=T0,
        credits=Credits(remaining, 0, 0.0), credits_version=credits_version, credits_set_at=T0,
    )  # fmt: skip


def _registry(tmp_path: Path, workers: int = 2) -> ActorRegistry:
    reg = ActorRegistry(MemoryStore(), clock=lambda: T0)
    tmp_path.mkdir(exist_ok=True)
    reg.set_worker(0, workers, SharedLimits.open(tmp_path) if workers > 1 else None)
    return reg


def _spend(reg: ActorRegistry, source: KeyRecord | PlanCredits, n: int) -> list[bool]:
    actor = reg.actor("key_a")
    return [actor.admit_nowait([], T0, record=source, use_credits=True).allowed for _ in range(n)]


def test_plan_versions_name_their_plan_and_order_its_changes() -> None:
    a1, a2 = (
        plan_credits_version(plan(1, credits_version=1)),
        plan_credits_version(plan(1, credits_version=2)),
    )
    b5 = plan_credits_version(plan(1, credits_version=5, plan_id="pln_y"))
    assert older_credits(a1, a2) and not older_credits(a2, a1)
    assert not older_credits(a1, b5) and not older_credits(b5, a1)  # two plans
    assert not older_credits(3, a1) and not older_credits(a1, 3)  # own credits and a plan's
    assert older_credits(2, 3)  # a key's own credits
    assert a1 < 1 << 63  # fits the table's signed 64-bit version


def test_leaving_plan_credits_for_own_credits_resets_with_one_process_and_workers(
    tmp_path: Path,
) -> None:
    """A key on a plan with 1 credit spends it; then it is PATCHed off the
    plan with 1000 credits of its own (version 1, far below a plan's)."""
    for workers in (1, 2):
        reg = _registry(tmp_path / str(workers), workers)
        assert _spend(reg, PlanCredits(plan(1)), 2) == [True, False]
        assert _spend(reg, metered(1000, version=1), 2) == [True, True]
        if reg.shared is not None:
            assert reg.shared.balance("key_a") == (998, 1)
            reg.shared.close()


def test_moving_to_a_plan_with_a_lower_credits_version_resets(tmp_path: Path) -> None:
    """Plan A's credits were set 5 times, plan B's twice: a key moved from A
    to B gets B's balance."""
    for workers in (1, 2):
        reg = _registry(tmp_path / str(workers), workers)
        assert _spend(reg, PlanCredits(plan(1, credits_version=5)), 2) == [True, False]
        reset_b = PlanCredits(plan(100, credits_version=2, plan_id="pln_y"))
        assert _spend(reg, reset_b, 2) == [True, True]
        if reg.shared is not None:
            reg.shared.close()


def test_a_stale_read_of_the_same_plan_is_still_ignored(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    assert _spend(reg, PlanCredits(plan(2, credits_version=3)), 1) == [True]
    # Another worker read the plan before its credits were set (version 2):
    # the table's newer balance (1 left) stands; no reset to 2.
    assert _spend(reg, PlanCredits(plan(2, credits_version=2)), 2) == [True, False]
    assert reg.shared is not None
    reg.shared.close()


def test_a_credit_operation_keeps_the_source_and_a_stale_read_does_not_undo_it(
    tmp_path: Path,
) -> None:
    """Issue 13's credit operations change a balance, not its version: a
    top-up on the table stands against a record read before the last PATCH."""
    reg = _registry(tmp_path)
    assert reg.shared is not None
    actor = reg.actor("key_a")
    assert _spend(reg, metered(1, version=4), 1) == [True]
    assert reg.shared.change_credits(actor, metered(1, version=4), T0, lambda b: b + 10) == (0, 10)
    assert _spend(reg, metered(1, version=3), 1) == [True]  # stale: ignored, 10 -> 9
    assert reg.shared.balance("key_a") == (9, 4)
    reg.shared.close()


def _flush(credits: int, version: int, taken: int = 0) -> UsageFlush:
    return UsageFlush(
        key=b"key_a",
        delta=UsageDelta(1, (0, 1, 0, 0, 0), taken, T0),
        credits=credits,
        credits_version=version,
        credits_refilled_at=T0,
        limiters={},
    )


def test_the_flush_stores_a_balance_of_another_source_and_keeps_a_newer_one() -> None:
    on_plan = UsageRecord(
        credits_remaining=0,
        credits_version=plan_credits_version(plan(1, credits_version=5)),
        credits_refilled_at=T0,
    )
    # Off the plan, onto the key's own credits (version 1): stored.
    record, picked_up = merge_usage(on_plan, _flush(999, 1, taken=1))
    assert (record.credits_remaining, record.credits_version, picked_up) == (999, 1, 999)
    # A flush of an older version of the same source: storage keeps its own.
    record, picked_up = merge_usage(record, _flush(5, 0))
    assert (record.credits_remaining, record.credits_version, picked_up) == (999, 1, None)
