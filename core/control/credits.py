"""Credit operations (``POST /keys/{id}/credits``, ``/identities/{id}/credits``)
and the limit state ``POST /keys/validate`` reports.

Theory of operation
-------------------
A balance is live state: the actor of its subject (a key's state key, an
identity's id) owns it, and with ``server.workers > 1`` the workers' shared
decision table does. An operation must not be lost against spending going on
at the same moment, so it is never a read-modify-write of storage here:
this service finds *which* balance (the subject) and *what it follows* (the
key's own credits, its plan's, the identity's or its plan's), and hands the
change to its owner, the ``Meter`` (``dataplane.creditops``: the admin API
runs in the process of the data plane's actors), which applies it in one
atomic step: synchronously in the actor (atomic under trio), or in one write
transaction of the shared table. ``apply_op`` is the rule itself, pure.

The audit entry (``credits.set|increment|decrement``, with the balance
before and after) is written once the owner has applied the operation.

Validate asks the same owner for what the next request would meet, without
spending (``spend = 0``: a peek), or admits ``spend`` credits against the
limits exactly as a proxied request of that cost would.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal, Protocol

from msgspec import Meta, Struct

from triogate.control.audit import Actor, append_audit
from triogate.control.effective import effective_identity
from triogate.control.keyresolve import CreditsFrom, KeyAccess, KeyResolver, PlanCredits, has_extras
from triogate.control.keys import KeyService
from triogate.control.models import LimitStateView, ValidateKeyRequest, ValidateResult
from triogate.control.timeutil import Clock
from triogate.errors import (
    Conflict,
    InsufficientCredits,
    NoCredits,
    NotFound,
    StoreUnreachable,
    ValidationError,
)
from triogate.storage import KeyRecord, Store, Table, WriteTxn, codec

__all__ = [
    "MAX_BALANCE",
    "CreditChange",
    "CreditOp",
    "CreditService",
    "CreditsResult",
    "Meter",
    "MeterState",
    "apply_op",
]

log = logging.getLogger("triogate.control.credits")

#: The largest balance (``Credits.remaining``'s bound).
MAX_BALANCE = 10**15

Op = Literal["set", "increment", "decrement"]


class CreditOp(Struct, forbid_unknown_fields=True):
    """``{"op": "set"|"increment"|"decrement", "amount": N}``."""

    op: Annotated[Op, Meta(description="set the balance, or add to it, or take from it")]
    amount: Annotated[
        int,
        Meta(ge=0, le=MAX_BALANCE, description="1 to 10^15 (set: 0 to 10^15)"),
    ]

    def __post_init__(self) -> None:
        if self.op != "set" and self.amount < 1:
            raise ValueError(f"amount must be at least 1 to {self.op}")


class CreditsResult(Struct):
    """The balance after an operation."""

    id: str
    op: Op
    amount: int
    previous_remaining: int
    credits_remaining: int


class MeterState(Struct):
    """What a key's next request meets (or what a spend met): the fewest
    credits left among its balances (None: no credits), each limit's state,
    and the refusal, if the spend was refused."""

    credits_remaining: int | None
    rate_limits: list[LimitStateView]
    refused: str | None = None


def apply_op(op: Op, amount: int, balance: int) -> int:
    """The balance after ``op``: ``InsufficientCredits`` (409) for a
    decrement below zero, ``ValidationError`` (400) past ``MAX_BALANCE``."""
    if op == "set":
        return amount
    if op == "decrement":
        if amount > balance:
            raise InsufficientCredits(
                f"cannot take {amount} credits: the balance is {balance}",
                credits_remaining=balance,
            )
        return balance - amount
    if balance + amount > MAX_BALANCE:
        raise ValidationError.single("amount", f"the balance would exceed {MAX_BALANCE}")
    return balance + amount


class CreditChange(Struct, frozen=True):
    """An operation to apply to a balance: callable as ``apply_op`` on the
    balance (in-process owners), or sent as it is (a cluster node's Redis
    applies the same rule in its script)."""

    op: Op
    amount: int

    def __call__(self, balance: int) -> int:
        return apply_op(self.op, self.amount, balance)


class Meter(Protocol):
    """The owner of live balances and limiter state (``dataplane.creditops``)."""

    async def change(
        self,
        subject: str,
        source: CreditsFrom,
        change: CreditChange,
        now: float,
        *,
        identity: bool = False,
    ) -> tuple[int, int] | None:
        """Apply ``change`` to ``subject``'s balance (following ``source``)
        atomically: (old, new), None if it has no credits. ``identity``: the
        subject is an identity's pool."""
        ...

    async def state(self, consumer: KeyRecord | KeyAccess, spend: int, now: float) -> MeterState:
        """The consumer's limit state now; with ``spend`` > 0, admitted (and
        spent) as a request of that cost."""
        ...


class CreditService:
    """Credit operations and validate's state, over the owner ``meter``."""

    def __init__(self, store: Store, keys: KeyService, meter: Meter, *, clock: Clock) -> None:
        self._store = store
        self._keys = keys
        self._meter = meter
        self._clock = clock
        self._resolver = KeyResolver(store)

    def __repr__(self) -> str:
        return f"<CreditService {self._meter!r}>"

    # ---- operations ---------------------------------------------------------------

    async def change_key(self, key_id: str, req: CreditOp, actor: Actor) -> CreditsResult:
        with self._store.read() as txn:
            raw = txn.get(Table.KEYS, key_id.encode())
            if raw is None:
                raise NotFound(f"no key {key_id}")
            record = codec.key.decode(raw)
            if record.status == "revoked":
                # As rotating one: a revoked key's balance serves nothing.
                raise Conflict(f"key {key_id} is revoked: its credits cannot change")
            source: CreditsFrom | None = record if record.credits is not None else None
            if has_extras(record):
                source = self._resolver.resolve_in(txn, record).credits
        if source is None or source.credits is None:
            raise NoCredits(f"key {key_id} has no credits (set them with PATCH /keys/{key_id})")
        # A rotation chain spends one balance: the state key's.
        return await self._change(key_id, record.state_key, source, req, actor, identity=False)

    async def change_identity(self, identity_id: str, req: CreditOp, actor: Actor) -> CreditsResult:
        with self._store.read() as txn:
            raw = txn.get(Table.IDENTITIES, identity_id.encode())
            if raw is None:
                raise NotFound(f"no identity {identity_id}")
            identity = codec.identity.decode(raw)
            plan = None
            if identity.plan_id is not None:
                plan_raw = txn.get(Table.PLANS, identity.plan_id.encode())
                plan = None if plan_raw is None else codec.plan.decode(plan_raw)
        pool = effective_identity(identity, plan)
        source: CreditsFrom | None = None
        if pool.credits is not None:
            from_plan = pool.credits_from == "plan" and plan is not None
            source = PlanCredits(plan) if from_plan and plan is not None else identity
        if source is None:
            raise NoCredits(
                f"identity {identity_id} has no credits "
                f"(set them with PATCH /identities/{identity_id})"
            )
        return await self._change(identity_id, identity_id, source, req, actor, identity=True)

    async def _change(
        self,
        target: str,
        subject: str,
        source: CreditsFrom,
        req: CreditOp,
        actor: Actor,
        *,
        identity: bool,
    ) -> CreditsResult:
        now = self._clock()
        op, amount = req.op, req.amount
        changed = await self._meter.change(
            subject, source, CreditChange(op, amount), now, identity=identity
        )
        if changed is None:
            raise NoCredits(f"{target} has no credits")
        old, new = changed

        def audit(txn: WriteTxn) -> None:
            append_audit(
                txn,
                actor=actor,
                action=f"credits.{op}",
                target_id=target,
                now=now,
                details={"amount": amount, "old": old, "new": new},
            )

        try:
            await self._store.write(audit)
        except StoreUnreachable:
            # A cluster node whose Redis went away between the operation
            # (applied: Redis answered) and its audit entry. Say so plainly,
            # so the operation is not repeated; the log keeps the entry.
            log.error(
                "credit operation applied but not audited (Redis unreachable): %s %d on %s "
                "by %s: %d -> %d",
                op, amount, target, actor, old, new,
            )  # fmt: skip
            raise StoreUnreachable(
                f"the operation was applied ({old} -> {new} credits) but its audit entry could "
                "not be written (the cluster's Redis became unreachable): do not repeat it"
            ) from None
        return CreditsResult(
            id=target, op=op, amount=amount, previous_remaining=old, credits_remaining=new
        )

    # ---- validate -------------------------------------------------------------------

    async def validate(self, req: ValidateKeyRequest) -> ValidateResult:
        """``KeyService.validate``, plus, for a valid key, its credits and
        limit state (with ``spend``: spent and admitted, Unkey's verify)."""
        result = await self._keys.validate(req.key, req.scopes)
        if not result.valid:
            return result
        record, _ = self._keys.lookup_nowait(req.key)
        if record is None:  # revoked and purged in between
            return result
        consumer: KeyRecord | KeyAccess = record
        if has_extras(record):
            access = self._resolver.resolve(record)
            if access is None:
                return result
            consumer = access
        state = await self._meter.state(consumer, req.spend, self._clock())
        result.credits_remaining = state.credits_remaining
        result.rate_limits = state.rate_limits
        if state.refused is not None:
            result.valid = False
            result.code = state.refused
        return result
