"""Plans: settings many keys and identities share (Tyk's policies, Kong's
consumer groups). What a plan says applies to each member where the member
sets nothing of its own, field by field (``effective``).

Every change bumps ``version`` and is one write: the data plane reads a
member's plan in the same snapshot as the member (or caches it by version),
so no request sees half a plan and every process sees a change on its next
request. A plan's members are indexed (``PLAN_MEMBERS``); a plan with
members cannot be deleted (409 ``PLAN_IN_USE``).
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET

from triogate.control.audit import Actor, append_audit
from triogate.control.customer_models import (
    CreatePlanRequest,
    DeletedPlan,
    PlanPage,
    PlanView,
    UpdatePlanRequest,
)
from triogate.control.ids import is_valid_id, new_id
from triogate.control.membership import has_member
from triogate.control.paging import decode_cursor, take_page
from triogate.control.timeutil import Clock, system_clock, utc_required
from triogate.errors import Conflict, NotFound, PlanInUse, ValidationError
from triogate.storage import ReadTxn, Store, Table, WriteTxn, codec
from triogate.storage.records import PlanRecord

__all__ = ["PlanService", "find_plan", "load_plan", "plan_view"]


def find_plan(txn: ReadTxn, plan_id: str) -> PlanRecord | None:
    """The plan, or None when there is none (a malformed id included)."""
    if not is_valid_id(plan_id, "pln"):
        return None
    raw = txn.get(Table.PLANS, plan_id.encode())
    return None if raw is None else codec.plan.decode(raw)


def load_plan(txn: ReadTxn, plan_id: str) -> PlanRecord:
    if not is_valid_id(plan_id, "pln"):
        raise ValidationError.single("id", "not a plan id")
    found = find_plan(txn, plan_id)
    if found is None:
        raise NotFound(f"no plan {plan_id}")
    return found


def plan_view(r: PlanRecord) -> PlanView:
    return PlanView(
        id=r.id,
        name=r.name,
        version=r.version,
        rate_limits=list(r.rate_limits),
        credits=r.credits,
        scopes=list(r.scopes),
        created_at=utc_required(r.created_at),
        updated_at=utc_required(r.updated_at),
    )


def _refuse_duplicate_name(txn: ReadTxn, name: str, own_id: str | None) -> None:
    # Plans are few (tens, not thousands): a scan inside the write decides
    # uniqueness atomically without an index of its own.
    for _, raw in txn.scan(Table.PLANS):
        other = codec.plan.decode(raw)
        if other.name == name and other.id != own_id:
            raise Conflict(f"a plan named {name!r} exists: {other.id}")


class PlanService:
    def __init__(self, store: Store, *, clock: Clock = system_clock) -> None:
        self._store = store
        self._clock = clock

    def __repr__(self) -> str:
        return f"<PlanService store={self._store!r}>"

    def get(self, plan_id: str) -> PlanView:
        with self._store.read() as txn:
            return plan_view(load_plan(txn, plan_id))

    def list(self, *, limit: int, cursor: str | None = None) -> PlanPage:
        after = decode_cursor(cursor, "pln")
        with self._store.read() as txn:
            rows = (
                (k.decode(), codec.plan.decode(v))
                for k, v in txn.scan(Table.PLANS, after=after, reverse=True)
            )
            items, next_cursor = take_page(rows, limit=limit, keep=lambda r: True, view=plan_view)
        return PlanPage(items=items, next_cursor=next_cursor)

    async def create(self, req: CreatePlanRequest, actor: Actor) -> PlanView:
        now = self._clock()
        record = PlanRecord(
            id=new_id("pln", now),
            name=req.name,
            created_at=now,
            updated_at=now,
            rate_limits=tuple(req.rate_limits),
            credits=req.credits,
            scopes=tuple(dict.fromkeys(req.scopes)),
            credits_set_at=now if req.credits is not None else None,
        )

        def fn(txn: WriteTxn) -> None:
            _refuse_duplicate_name(txn, record.name, None)
            txn.put(Table.PLANS, record.id.encode(), codec.encode(record))
            append_audit(
                txn,
                actor=actor,
                action="plan.create",
                target_id=record.id,
                now=now,
                details={"name": record.name},
            )

        await self._store.write(fn)
        return plan_view(record)

    async def update(self, plan_id: str, req: UpdatePlanRequest, actor: Actor) -> PlanView:
        now = self._clock()
        changed = [f for f in req.__struct_fields__ if getattr(req, f) is not UNSET]

        def fn(txn: WriteTxn) -> PlanRecord:
            record = load_plan(txn, plan_id)
            changes: dict[str, Any] = {"updated_at": now, "version": record.version + 1}
            if req.name is not UNSET:
                _refuse_duplicate_name(txn, req.name, plan_id)
                changes["name"] = req.name
            if req.rate_limits is not UNSET:
                changes["rate_limits"] = tuple(req.rate_limits)
            if req.credits is not UNSET:
                # A new credits version resets every member's balance that
                # follows the plan's credits, from its next request on.
                changes["credits"] = req.credits
                changes["credits_version"] = record.credits_version + 1
                changes["credits_set_at"] = now
                # Members' balances that follow the plan's credits reset.
                changes["credits_version"] = record.credits_version + 1
                changes["credits_set_at"] = now
            if req.scopes is not UNSET:
                changes["scopes"] = tuple(dict.fromkeys(req.scopes))
            updated = msgspec.structs.replace(record, **changes)
            txn.put(Table.PLANS, plan_id.encode(), codec.encode(updated))
            append_audit(
                txn,
                actor=actor,
                action="plan.update",
                target_id=plan_id,
                now=now,
                details={"fields": changed, "version": updated.version},
            )
            return updated

        return plan_view(await self._store.write(fn))

    async def delete(self, plan_id: str, actor: Actor) -> DeletedPlan:
        now = self._clock()

        def fn(txn: WriteTxn) -> None:
            record = load_plan(txn, plan_id)
            if has_member(txn, Table.PLAN_MEMBERS, plan_id):
                raise PlanInUse(
                    f"plan {plan_id} still has keys or identities on it; move them first"
                )
            txn.delete(Table.PLANS, plan_id.encode())
            append_audit(
                txn,
                actor=actor,
                action="plan.delete",
                target_id=plan_id,
                now=now,
                details={"name": record.name},
            )

        await self._store.write(fn)
        return DeletedPlan(id=plan_id, deleted=True)
