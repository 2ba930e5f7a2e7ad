"""A key's plan, identity and roles, read per request for the keys that have
any: what key-auth decides with and what the limiter admits.

Theory of operation
-------------------
A key with no plan, no identity and no roles is decided on its record alone
(``keyrules.key_decision``): nothing here runs for it, so it costs no extra
read and no extra object. For any other key, ``KeyResolver.resolve`` opens
one read snapshot and reads, in it, the key's record again (by id: the
decision is then the snapshot's, whatever changed since the digest lookup),
its plan, its roles (``roles.roles_by_name``), its identity and the
identity's plan. Each is one record, so no request sees half a plan; and
since they are read on every request, a PATCH from any process applies from
the next request on.

Decoding is cached by the record's bytes (a record that did not change is
not decoded again, and what was derived from it is kept), which is the
exact form of caching by ``PlanRecord.version`` / ``IdentityRecord.updated_at``:
no change goes unseen, even one that forgot to bump them.

A key whose ``identity_id`` names no identity any more (deleted under load)
is treated as having none, as Unkey does: the key keeps working on its own
limits. A plan that is gone counts as no plan; a role that is gone grants
nothing.

Credits a key takes from its plan are a balance of the key's own (under its
state key), as its own credits would be; ``PlanCredits`` gives that balance
a version of the plan's (``plan_credits_version``: the plan's id in the high
bits, its ``credits_version`` in the low 32), so setting the plan's credits
resets every member's balance from the next request on, and changing
anything else of the plan does not. Versions are ordered only within one
source (``policy.creditversion``): a key moved to another plan, or off its plan,
starts from the new source's balance, whatever the two versions' sizes.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Final

from triogate.control.effective import (
    EffectiveKey,
    EffectivePool,
    effective_identity,
    effective_key,
)
from triogate.control.keyrules import access_decision, scopes_refused
from triogate.control.roles import roles_by_name
from triogate.errors import KeyVerdict
from triogate.policy.creditversion import SOURCE_SHIFT
from triogate.policy.keyaccess import KeyRule
from triogate.storage import KeyRecord, ReadTxn, Store, Table, codec
from triogate.storage.records import Credits, IdentityRecord, PlanRecord, RateLimit, RoleRecord

__all__ = ["KeyAccess", "KeyResolver", "PlanCredits", "has_extras", "plan_credits_version"]

#: Decoded records kept per kind; past it the cache starts over (bounded
#: memory with 10,000s of plans or identities; a miss only costs a decode).
MAX_CACHED: Final = 65_536
#: Plan-derived credit versions live above every version a record counts to.
_PLAN_VERSION_BASE: Final = 1 << 62


def has_extras(record: KeyRecord) -> bool:
    """Whether the key has a plan, an identity or roles (else its record
    alone decides)."""
    return record.identity_id is not None or record.plan_id is not None or bool(record.roles)


def plan_credits_version(plan: PlanRecord) -> int:
    """The credits version of a balance that follows ``plan``'s credits:
    the same in every process and after a restart, growing with each change
    of the plan's credits (and with nothing else of the plan). The plan's
    id is in the high bits (``policy.creditversion``)."""
    source = zlib.crc32(plan.id.encode()) & 0xFFFFFF
    return _PLAN_VERSION_BASE | source << SOURCE_SHIFT | plan.credits_version


class PlanCredits:
    """Credits taken from a plan, in the shape an actor syncs its balance
    from (``credits``, ``credits_version``, ``credits_set_at``, ``updated_at``)."""

    __slots__ = ("credits", "credits_set_at", "credits_version", "updated_at")

    def __init__(self, plan: PlanRecord) -> None:
        self.credits: Credits | None = plan.credits
        self.credits_version = plan_credits_version(plan)
        # Refills count from when the plan's credits were set.
        self.credits_set_at: float | None = (
            plan.credits_set_at if plan.credits_set_at is not None else plan.created_at
        )
        self.updated_at = plan.updated_at

    def __repr__(self) -> str:
        return f"<PlanCredits {self.credits!r} v{self.credits_version}>"


CreditsFrom = KeyRecord | IdentityRecord | PlanCredits


class _Plan:
    __slots__ = ("credits", "raw", "record")

    def __init__(self, raw: bytes, record: PlanRecord) -> None:
        self.raw = raw
        self.record = record
        self.credits = PlanCredits(record) if record.credits is not None else None


class _Pool:
    """An identity's resolved pool, kept while its record and plan's are."""

    __slots__ = ("credits", "identity", "plan", "pool", "raw")

    def __init__(
        self, raw: bytes, identity: IdentityRecord, plan: _Plan | None, pool: EffectivePool
    ) -> None:
        self.raw = raw
        self.identity = identity
        self.plan = plan
        self.pool = pool
        self.credits: CreditsFrom | None = None
        if pool.credits is not None:
            if pool.credits_from == "identity":
                self.credits = identity
            elif plan is not None:
                self.credits = plan.credits


class KeyAccess:
    """A key with a plan, an identity or roles, resolved in one snapshot.

    Fits the plugin API's ``Consumer``: ``id``, ``name``, ``state_key``,
    ``scopes`` (the effective ones) and ``roles`` (those that exist). The
    limiter reads ``rate_limits`` / ``credits`` (the key's effective, with
    where its balance syncs from) and the identity's pool."""

    __slots__ = (
        "_checked",
        "credits",
        "effective",
        "id",
        "identity",
        "identity_enabled",
        "name",
        "pool",
        "pool_credits",
        "rate_limits",
        "record",
        "roles",
        "scopes",
        "state_key",
    )

    def __init__(
        self,
        record: KeyRecord,
        effective: EffectiveKey,
        credits: CreditsFrom | None,
        pool: _Pool | None,
    ) -> None:
        self.record = record
        self.effective = effective
        self.id = record.id
        self.name = record.name
        self.state_key = record.state_key
        self.scopes = effective.scopes
        self.roles = effective.roles
        self.rate_limits: tuple[RateLimit, ...] = effective.rate_limits
        self.credits = credits
        self.identity: IdentityRecord | None = None
        self.pool: EffectivePool | None = None
        self.pool_credits: CreditsFrom | None = None
        self.identity_enabled = True
        # The last rule checked against these scopes, and what it refused:
        # a key used on one route decides its scopes once, not per request.
        self._checked: tuple[KeyRule, list[str]] | None = None
        if pool is not None:
            self.identity = pool.identity
            self.pool = pool.pool
            self.pool_credits = pool.credits
            self.identity_enabled = pool.identity.enabled

    def refused(self, rule: KeyRule) -> list[str]:
        """``keyrules.scopes_refused`` of the effective scopes for ``rule``."""
        checked = self._checked
        if checked is not None and checked[0] is rule:
            return checked[1]
        refused = scopes_refused(self.scopes, rule)
        self._checked = (rule, refused)
        return refused

    def __repr__(self) -> str:
        identity = self.identity.id if self.identity is not None else None
        return f"<KeyAccess {self.id} identity={identity} plan={self.record.plan_id}>"


class KeyResolver:
    """Resolves keys with a plan, an identity or roles over one store (one
    per process; its caches are only ever read under the same snapshot
    rules as the records they hold)."""

    __slots__ = ("_keys", "_plans", "_pools", "_store")

    def __init__(self, store: Store) -> None:
        self._store = store
        self._plans: dict[str, _Plan] = {}
        self._pools: dict[str, _Pool] = {}
        # Per key: its record's bytes, plan and pool, and what they resolved
        # to: a key none of whose records changed is not decoded again.
        self._keys: dict[str, tuple[bytes, _Plan | None, _Pool | None, KeyAccess]] = {}

    def __repr__(self) -> str:
        return f"<KeyResolver {len(self._plans)} plans, {len(self._pools)} identities cached>"

    def resolve(self, record: KeyRecord) -> KeyAccess | None:
        """``record``'s key as one snapshot has it, with its plan, roles and
        identity; None if the key is gone from it."""
        key_id = record.id
        with self._store.read() as txn:
            raw = txn.get(Table.KEYS, key_id.encode())
            if raw is None:
                return None
            cached = self._keys.get(key_id)
            if cached is not None and cached[0] == raw:
                key = cached[3].record
            else:
                key, cached = codec.key.decode(raw), None
            plan = self._plan(txn, key.plan_id) if key.plan_id is not None else None
            pool = self._pool(txn, key.identity_id) if key.identity_id is not None else None
            if key.roles:
                # Roles are read (and their scopes applied) on every request.
                return self._access(key, plan, pool, roles_by_name(txn, key.roles))
        if cached is not None and cached[1] is plan and cached[2] is pool:
            return cached[3]
        access = self._access(key, plan, pool, {})
        if len(self._keys) >= MAX_CACHED:
            self._keys.clear()
        self._keys[key_id] = (raw, plan, pool, access)
        return access

    def resolve_in(self, txn: ReadTxn, key: KeyRecord) -> KeyAccess:
        """``key`` resolved in the caller's snapshot ``txn``."""
        plan = self._plan(txn, key.plan_id) if key.plan_id is not None else None
        pool = self._pool(txn, key.identity_id) if key.identity_id is not None else None
        roles = roles_by_name(txn, key.roles) if key.roles else {}
        return self._access(key, plan, pool, roles)

    @staticmethod
    def _access(
        key: KeyRecord, plan: _Plan | None, pool: _Pool | None, roles: Mapping[str, RoleRecord]
    ) -> KeyAccess:
        effective = effective_key(key, plan.record if plan is not None else None, roles)
        credits: CreditsFrom | None = None
        if effective.credits is not None:
            credits = key if effective.credits_from == "key" else _plan_credits(plan)
        return KeyAccess(key, effective, credits, pool)

    def decide(
        self, record: KeyRecord, now: float, rule: KeyRule
    ) -> tuple[KeyRecord | KeyAccess | None, KeyVerdict | None]:
        """The key as it is decided (its record for a key without extras, a
        ``KeyAccess`` for one with; None if it vanished) and why it is
        refused on a route asking ``rule`` (None: it may be used)."""
        if not has_extras(record):
            return record, access_decision(record, now, rule, scopes=record.scopes)
        access = self.resolve(record)
        if access is None:
            return None, KeyVerdict.INVALID_KEY
        verdict = access_decision(
            access.record,
            now,
            rule,
            scopes=access.scopes,
            identity_enabled=access.identity_enabled,
            refused=access.refused(rule),
        )
        return access, verdict

    # ---- the cached reads ---------------------------------------------------------

    def _plan(self, txn: ReadTxn, plan_id: str) -> _Plan | None:
        raw = txn.get(Table.PLANS, plan_id.encode())
        if raw is None:
            return None
        cached = self._plans.get(plan_id)
        if cached is not None and cached.raw == raw:
            return cached
        plan = _Plan(raw, codec.plan.decode(raw))
        if len(self._plans) >= MAX_CACHED:
            self._plans.clear()
        self._plans[plan_id] = plan
        return plan

    def _pool(self, txn: ReadTxn, identity_id: str) -> _Pool | None:
        raw = txn.get(Table.IDENTITIES, identity_id.encode())
        if raw is None:
            return None  # deleted under load: the key goes on without a pool
        cached = self._pools.get(identity_id)
        if cached is not None and cached.raw == raw:
            identity = cached.identity
        else:
            identity = codec.identity.decode(raw)
            cached = None
        plan = self._plan(txn, identity.plan_id) if identity.plan_id is not None else None
        if cached is not None and cached.plan is plan:
            return cached
        pool = _Pool(
            raw, identity, plan, effective_identity(identity, plan.record if plan else None)
        )
        if len(self._pools) >= MAX_CACHED:
            self._pools.clear()
        self._pools[identity_id] = pool
        return pool


def _plan_credits(plan: _Plan | None) -> PlanCredits | None:
    return plan.credits if plan is not None else None
