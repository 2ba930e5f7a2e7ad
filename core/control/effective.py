"""Effective settings: what a key (or an identity's shared pool) actually gets
once its plan and roles are taken into account. Pure functions over records,
no I/O: the data plane calls them per request, the admin API for the
``effective`` block of ``GET /keys/{id}``.

The rule (docs/identities.md), field by field:

* ``scopes``: the key's own if non-empty, else its plan's; then plus the
  scopes of each of its roles (a role deleted since grants nothing).
* ``rate_limits``: the key's own if non-empty, else its plan's.
* ``credits``: the key's own if set, else its plan's (a balance of the key's
  own that starts at the plan's ``remaining`` and refills by its rule).

An identity's pool is its own ``rate_limits`` / ``credits``, else its plan's.
An identity's plan sets the pool only: it does not fill its keys' settings.

Cheap on purpose: the record's tuples are passed through, never copied, and
scopes are only rebuilt when a role adds some.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from msgspec import Struct

from triogate.storage.records import (
    Credits,
    IdentityRecord,
    KeyRecord,
    PlanRecord,
    RateLimit,
    RoleRecord,
)

__all__ = ["EffectiveKey", "EffectivePool", "effective_identity", "effective_key"]

KeySource = Literal["key", "plan"]
PoolSource = Literal["identity", "plan"]


class EffectiveKey(Struct, frozen=True):
    """A key's settings after its plan and roles. ``*_from`` says where each
    came from: ``"plan"`` only when the plan supplied it, else ``"key"``
    (also when neither has any). ``plan_version`` is the plan's version the
    result was computed from (0: no plan), for caches to tell it stale."""

    scopes: tuple[str, ...]
    rate_limits: tuple[RateLimit, ...]
    credits: Credits | None
    scopes_from: KeySource
    rate_limits_from: KeySource
    credits_from: KeySource
    # The role names that exist and were applied (deleted ones are dropped).
    roles: tuple[str, ...] = ()
    plan_version: int = 0


class EffectivePool(Struct, frozen=True):
    """An identity's shared pool after its plan (see ``EffectiveKey``)."""

    rate_limits: tuple[RateLimit, ...]
    credits: Credits | None
    rate_limits_from: PoolSource
    credits_from: PoolSource
    enabled: bool = True
    plan_version: int = 0


def effective_key(
    key: KeyRecord, plan: PlanRecord | None, roles: Mapping[str, RoleRecord]
) -> EffectiveKey:
    """``key``'s effective settings. ``plan`` is the record of
    ``key.plan_id`` (None: no plan, or the plan is gone); ``roles`` maps role
    names to records and may hold more than the key's roles (only
    ``key.roles`` are looked at)."""
    scopes = key.scopes
    scopes_from: KeySource = "key"
    rate_limits = key.rate_limits
    rate_limits_from: KeySource = "key"
    credits = key.credits
    credits_from: KeySource = "key"
    plan_version = 0
    if plan is not None:
        plan_version = plan.version
        if not scopes and plan.scopes:
            scopes, scopes_from = plan.scopes, "plan"
        if not rate_limits and plan.rate_limits:
            rate_limits, rate_limits_from = plan.rate_limits, "plan"
        if credits is None and plan.credits is not None:
            credits, credits_from = plan.credits, "plan"
    applied: tuple[str, ...] = ()
    if key.roles:
        found = [roles[name] for name in key.roles if name in roles]
        applied = tuple(r.name for r in found)
        extra = [s for r in found for s in r.scopes]
        if extra:
            # Order kept (own first), duplicates dropped.
            scopes = tuple(dict.fromkeys((*scopes, *extra)))
    return EffectiveKey(
        scopes=scopes,
        rate_limits=rate_limits,
        credits=credits,
        scopes_from=scopes_from,
        rate_limits_from=rate_limits_from,
        credits_from=credits_from,
        roles=applied,
        plan_version=plan_version,
    )


def effective_identity(identity: IdentityRecord, plan: PlanRecord | None) -> EffectivePool:
    """``identity``'s shared pool; ``plan`` is the record of
    ``identity.plan_id`` (None: no plan, or the plan is gone)."""
    rate_limits = identity.rate_limits
    rate_limits_from: PoolSource = "identity"
    credits = identity.credits
    credits_from: PoolSource = "identity"
    plan_version = 0
    if plan is not None:
        plan_version = plan.version
        if not rate_limits and plan.rate_limits:
            rate_limits, rate_limits_from = plan.rate_limits, "plan"
        if credits is None and plan.credits is not None:
            credits, credits_from = plan.credits, "plan"
    return EffectivePool(
        rate_limits=rate_limits,
        credits=credits,
        rate_limits_from=rate_limits_from,
        credits_from=credits_from,
        enabled=identity.enabled,
        plan_version=plan_version,
    )
