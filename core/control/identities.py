"""Identities: the customer behind several keys (Unkey's identities, Kong's
consumers). An identity's rate limits and credits are one pool all its keys
draw from; its limiter state and balance live in ``USAGE`` under its id, as
a key's do under its state key (the data plane's identity actor writes
them).

Theory of operation
-------------------
``external_id`` (the customer's id in the user's system) is unique through
``IDENTITY_EXTERNAL_IDS``; the keys naming an identity are listed in
``IDENTITY_KEYS`` (``keyfields.index_key`` keeps it as keys change), read as
a stream: an identity's usage is the sum over its keys one at a time, and
ten thousand keys are never loaded at once.

Deleting an identity is one write: it looks at its keys in that very
transaction, so a key created on it at the same moment either is seen (and
the delete is refused, or revokes it too) or is refused itself (400, the
identity is gone). A deleted identity leaves no key naming it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec
from msgspec import UNSET

from triogate.control.audit import Actor, append_audit
from triogate.control.customer_models import (
    CreateIdentityRequest,
    DeletedIdentity,
    IdentityPage,
    IdentityUsageView,
    IdentityView,
    UpdateIdentityRequest,
)
from triogate.control.effective import effective_identity
from triogate.control.ids import is_valid_id, new_id
from triogate.control.keychain import LiveBalance, stored_usage
from triogate.control.keyfields import find_identity, index_key
from triogate.control.keyresolve import plan_credits_version
from triogate.control.membership import add_member, members, remove_member
from triogate.control.paging import decode_cursor, take_page
from triogate.control.plans import find_plan
from triogate.control.timeutil import Clock, system_clock, utc, utc_required
from triogate.errors import Conflict, IdentityHasKeys, NotFound, ValidationError
from triogate.storage import Credits, KeyRecord, ReadTxn, Store, Table, WriteTxn, codec
from triogate.storage.records import IdentityRecord, PlanRecord

__all__ = ["IdentityService", "load_identity"]

#: Revoked keys named in one ``identity.delete`` audit entry (each key has
#: its own ``key.revoke`` entry besides).
_AUDIT_IDS = 1000


def load_identity(txn: ReadTxn, identity_id: str) -> IdentityRecord:
    if not is_valid_id(identity_id, "idn"):
        raise ValidationError.single("id", "not an identity id")
    found = find_identity(txn, identity_id)
    if found is None:
        raise NotFound(f"no identity {identity_id}")
    return found


def _live(record: KeyRecord, now: float) -> bool:
    """Whether the key can still be used (so deleting its identity matters)."""
    if record.status == "active":
        return record.expires_at is None or now < record.expires_at
    if record.status == "rotated":
        return record.grace_ends_at is not None and now < record.grace_ends_at
    return False


def _refuse_taken(txn: ReadTxn, external_id: str, own_id: str | None) -> None:
    taken = txn.get(Table.IDENTITY_EXTERNAL_IDS, external_id.encode())
    if taken is not None and taken.decode() != own_id:
        raise Conflict(
            f"an identity with external_id {external_id[:64]!r} exists: {taken.decode()}"
        )


def _require_plan(txn: ReadTxn, plan_id: str) -> None:
    if find_plan(txn, plan_id) is None:
        raise ValidationError.single("plan_id", f"no plan {plan_id[:64]!r}")


class IdentityService:
    def __init__(self, store: Store, *, clock: Clock = system_clock) -> None:
        self._store = store
        self._clock = clock
        # The actors' in-memory balances (set by the gateway that runs
        # them): the pool's balance being spent, not the last flush.
        self.live_balance: LiveBalance | None = None

    def __repr__(self) -> str:
        return f"<IdentityService store={self._store!r}>"

    # ---- reading ----------------------------------------------------------

    def _pool_remaining(
        self, txn: ReadTxn, record: IdentityRecord, credits: Credits, plan: PlanRecord | None
    ) -> int:
        """The pool's balance: the live actor's, else the last flushed, for
        the version the balance belongs to (the identity's own credits', or
        the plan's when the credits are the plan's), else the full amount."""
        version = record.credits_version if plan is None else plan_credits_version(plan)
        if self.live_balance is not None:
            known = self.live_balance(record.id)
            if known is not None and known[1] == version:
                return known[0]
        state = stored_usage(txn, record.id)
        if state.credits_remaining is not None and state.credits_version == version:
            return state.credits_remaining
        return credits.remaining

    def _view(self, txn: ReadTxn, r: IdentityRecord) -> IdentityView:
        plan = None if r.plan_id is None else find_plan(txn, r.plan_id)
        effective = effective_identity(r, plan)
        own = r.credits
        if own is not None:
            own = msgspec.structs.replace(own, remaining=self._pool_remaining(txn, r, own, None))
        return IdentityView(
            id=r.id,
            external_id=r.external_id,
            name=r.name,
            metadata=r.metadata,
            rate_limits=list(r.rate_limits),
            credits=own,
            plan_id=r.plan_id,
            enabled=r.enabled,
            created_at=utc_required(r.created_at),
            updated_at=utc_required(r.updated_at),
            effective=effective,
        )

    def get(self, identity_id: str) -> IdentityView:
        with self._store.read() as txn:
            return self._view(txn, load_identity(txn, identity_id))

    def list(
        self, *, limit: int, cursor: str | None = None, external_id: str | None = None
    ) -> IdentityPage:
        after = decode_cursor(cursor, "idn")
        with self._store.read() as txn:
            raws: Iterable[tuple[bytes, bytes]]
            if external_id is not None:
                # At most one: the index names it (a cursor past it: none).
                found = txn.get(Table.IDENTITY_EXTERNAL_IDS, external_id.encode())
                raw = None if found is None else txn.get(Table.IDENTITIES, found)
                raws = []
                if found is not None and raw is not None and (after is None or found < after):
                    raws = [(found, raw)]
            else:
                raws = txn.scan(Table.IDENTITIES, after=after, reverse=True)
            rows = ((k.decode(), codec.identity.decode(v)) for k, v in raws)
            items, next_cursor = take_page(
                rows, limit=limit, keep=lambda r: True, view=lambda r: self._view(txn, r)
            )
        return IdentityPage(items=items, next_cursor=next_cursor)

    def usage(self, identity_id: str) -> IdentityUsageView:
        """Its keys' usage summed (one key at a time) and the pool's balance."""
        with self._store.read() as txn:
            record = load_identity(txn, identity_id)
            count = requests = 0
            last_used: float | None = None
            classes = [0, 0, 0, 0, 0]
            for key_id in members(txn, Table.IDENTITY_KEYS, identity_id):
                usage = stored_usage(txn, key_id)
                count += 1
                requests += usage.requests
                if usage.last_used_at is not None and (
                    last_used is None or usage.last_used_at > last_used
                ):
                    last_used = usage.last_used_at
                for i, n in enumerate(usage.by_class):
                    classes[i] += n
            plan = None if record.plan_id is None else find_plan(txn, record.plan_id)
            pool = effective_identity(record, plan)
            remaining = None
            if pool.credits is not None:
                from_plan = plan if pool.credits_from == "plan" else None
                remaining = self._pool_remaining(txn, record, pool.credits, from_plan)
        return IdentityUsageView(
            identity_id=identity_id,
            keys=count,
            requests=requests,
            last_used_at=utc(last_used),
            by_status_class={f"{i + 1}xx": n for i, n in enumerate(classes)},
            credits_remaining=remaining,
            rate_limits=list(pool.rate_limits),
        )

    # ---- mutations --------------------------------------------------------

    async def create(self, req: CreateIdentityRequest, actor: Actor) -> IdentityView:
        now = self._clock()
        record = IdentityRecord(
            id=new_id("idn", now),
            external_id=req.external_id,
            name=req.name,
            metadata=req.metadata or {},
            created_at=now,
            updated_at=now,
            rate_limits=tuple(req.rate_limits),
            credits=req.credits,
            credits_set_at=now if req.credits is not None else None,
            plan_id=req.plan_id,
            enabled=req.enabled,
        )

        def fn(txn: WriteTxn) -> None:
            if record.plan_id is not None:
                _require_plan(txn, record.plan_id)
            _refuse_taken(txn, record.external_id, None)
            txn.put(Table.IDENTITIES, record.id.encode(), codec.encode(record))
            txn.put(Table.IDENTITY_EXTERNAL_IDS, record.external_id.encode(), record.id.encode())
            if record.plan_id is not None:
                add_member(txn, Table.PLAN_MEMBERS, record.plan_id, record.id)
            append_audit(
                txn,
                actor=actor,
                action="identity.create",
                target_id=record.id,
                now=now,
                details={"external_id": record.external_id, "plan_id": record.plan_id},
            )

        await self._store.write(fn)
        with self._store.read() as txn:
            return self._view(txn, record)

    async def update(
        self, identity_id: str, req: UpdateIdentityRequest, actor: Actor
    ) -> IdentityView:
        now = self._clock()
        changed = [f for f in req.__struct_fields__ if getattr(req, f) is not UNSET]

        def fn(txn: WriteTxn) -> IdentityRecord:
            record = load_identity(txn, identity_id)
            changes: dict[str, Any] = {"updated_at": now}
            if req.external_id is not UNSET and req.external_id != record.external_id:
                _refuse_taken(txn, req.external_id, identity_id)
                txn.delete(Table.IDENTITY_EXTERNAL_IDS, record.external_id.encode())
                txn.put(Table.IDENTITY_EXTERNAL_IDS, req.external_id.encode(), identity_id.encode())
                changes["external_id"] = req.external_id
            if req.plan_id is not UNSET and req.plan_id != record.plan_id:
                if req.plan_id is not None:
                    _require_plan(txn, req.plan_id)
                    add_member(txn, Table.PLAN_MEMBERS, req.plan_id, identity_id)
                if record.plan_id is not None:
                    remove_member(txn, Table.PLAN_MEMBERS, record.plan_id, identity_id)
                changes["plan_id"] = req.plan_id
            if req.name is not UNSET:
                changes["name"] = req.name
            if req.metadata is not UNSET:
                changes["metadata"] = req.metadata or {}
            if req.rate_limits is not UNSET:
                changes["rate_limits"] = tuple(req.rate_limits)
            if req.credits is not UNSET:
                # A new version makes the pool's balance counted so far
                # stale, in every process: the PATCH takes effect at once.
                changes["credits"] = req.credits
                changes["credits_version"] = record.credits_version + 1
                changes["credits_set_at"] = now
            if req.enabled is not UNSET:
                changes["enabled"] = req.enabled
            updated = msgspec.structs.replace(record, **changes)
            txn.put(Table.IDENTITIES, identity_id.encode(), codec.encode(updated))
            append_audit(
                txn,
                actor=actor,
                action="identity.update",
                target_id=identity_id,
                now=now,
                details={"fields": changed},
            )
            if updated.enabled != record.enabled:
                append_audit(
                    txn,
                    actor=actor,
                    action="identity.enable" if updated.enabled else "identity.disable",
                    target_id=identity_id,
                    now=now,
                )
            return updated

        updated = await self._store.write(fn)
        with self._store.read() as txn:
            return self._view(txn, updated)

    async def delete(self, identity_id: str, actor: Actor, *, revoke_keys: bool) -> DeletedIdentity:
        now = self._clock()

        def fn(txn: WriteTxn) -> list[str]:
            record = load_identity(txn, identity_id)
            # Decided first, before anything is written: a refusal leaves
            # nothing behind (and stops at the first live key).
            if not revoke_keys:
                for key_id in members(txn, Table.IDENTITY_KEYS, identity_id):
                    raw = txn.get(Table.KEYS, key_id.encode())
                    if raw is not None and _live(codec.key.decode(raw), now):
                        raise IdentityHasKeys(
                            f"identity {identity_id} has live keys (e.g. {key_id}); "
                            "revoke them, or delete with ?revoke_keys=true"
                        )
            revoked: list[str] = []
            # Collected before writing: the writes below change the index.
            key_ids = list(members(txn, Table.IDENTITY_KEYS, identity_id))
            for key_id in key_ids:
                raw = txn.get(Table.KEYS, key_id.encode())
                if raw is None:
                    remove_member(txn, Table.IDENTITY_KEYS, identity_id, key_id)
                    continue
                key = codec.key.decode(raw)
                changes: dict[str, Any] = {"identity_id": None, "updated_at": now}
                live = _live(key, now)
                if live:
                    changes.update(status="revoked", revoked_at=now)
                updated = msgspec.structs.replace(key, **changes)
                txn.put(Table.KEYS, key_id.encode(), codec.encode(updated))
                index_key(txn, key, updated)
                if live:
                    revoked.append(key_id)
                    append_audit(
                        txn,
                        actor=actor,
                        action="key.revoke",
                        target_id=key_id,
                        now=now,
                        details={"reason": "identity.delete", "identity_id": identity_id},
                    )
            txn.delete(Table.IDENTITIES, identity_id.encode())
            txn.delete(Table.IDENTITY_EXTERNAL_IDS, record.external_id.encode())
            txn.delete(Table.USAGE, identity_id.encode())  # the pool's state
            if record.plan_id is not None:
                remove_member(txn, Table.PLAN_MEMBERS, record.plan_id, identity_id)
            append_audit(
                txn,
                actor=actor,
                action="identity.delete",
                target_id=identity_id,
                now=now,
                details={
                    "external_id": record.external_id,
                    "keys": len(key_ids),
                    "revoked_keys": revoked[:_AUDIT_IDS],
                },
            )
            return revoked

        revoked = await self._store.write(fn)
        return DeletedIdentity(id=identity_id, deleted=True, revoked_keys=revoked)
