"""Effective settings (control/effective.py): a key's own field wins, else its
plan's, field by field; roles add scopes; an identity's pool is its own
limits and credits, else its plan's."""

from __future__ import annotations

import msgspec

from triogate.control.effective import effective_identity, effective_key
from triogate.storage.records import (
    Credits,
    IdentityRecord,
    PlanRecord,
    RateLimit,
    RoleRecord,
)
from triogate.testing import key_record

NOW = 1_800_000_000.0
OWN_LIMIT = RateLimit(name="own", limit=5, period_seconds=60)
PLAN_LIMIT = RateLimit(name="plan", limit=100, period_seconds=60)
OWN_CREDITS = Credits(remaining=7)
PLAN_CREDITS = Credits(remaining=1000, refill_amount=1000, refill_interval_seconds=86400)
PLAN = PlanRecord(
    id="pln_1",
    name="pro",
    created_at=NOW,
    updated_at=NOW,
    version=3,
    rate_limits=(PLAN_LIMIT,),
    credits=PLAN_CREDITS,
    scopes=("orders:read", "users:read"),
)
EMPTY_PLAN = PlanRecord(id="pln_2", name="empty", created_at=NOW, updated_at=NOW)


def role(name: str, *scopes: str) -> RoleRecord:
    return RoleRecord(id=f"rol_{name}", name=name, scopes=scopes, created_at=NOW, updated_at=NOW)


def identity(**changes: object) -> IdentityRecord:
    base = IdentityRecord(
        id="idn_1", external_id="cus_1", name="", metadata={}, created_at=NOW, updated_at=NOW
    )
    return msgspec.structs.replace(base, **changes)


def test_key_without_plan_or_roles_is_its_own_and_shares_its_tuples() -> None:
    key = key_record(scopes=("a",), rate_limits=(OWN_LIMIT,), credits=OWN_CREDITS)
    eff = effective_key(key, None, {})
    assert eff.scopes is key.scopes and eff.rate_limits is key.rate_limits
    assert eff.credits is OWN_CREDITS
    assert (eff.scopes_from, eff.rate_limits_from, eff.credits_from) == ("key", "key", "key")
    assert eff.plan_version == 0 and eff.roles == ()


def test_plan_fills_every_field_the_key_leaves_empty() -> None:
    eff = effective_key(key_record(scopes=()), PLAN, {})
    assert eff.scopes == PLAN.scopes and eff.rate_limits == (PLAN_LIMIT,)
    assert eff.credits == PLAN_CREDITS
    assert (eff.scopes_from, eff.rate_limits_from, eff.credits_from) == ("plan", "plan", "plan")
    assert eff.plan_version == 3


def test_key_fields_win_field_by_field() -> None:
    key = key_record(scopes=("mine",), rate_limits=(), credits=OWN_CREDITS)
    eff = effective_key(key, PLAN, {})
    assert eff.scopes == ("mine",) and eff.scopes_from == "key"
    assert eff.rate_limits == (PLAN_LIMIT,) and eff.rate_limits_from == "plan"
    assert eff.credits is OWN_CREDITS and eff.credits_from == "key"


def test_an_empty_plan_supplies_nothing() -> None:
    eff = effective_key(key_record(scopes=()), EMPTY_PLAN, {})
    assert eff.scopes == () and eff.rate_limits == () and eff.credits is None
    assert (eff.scopes_from, eff.rate_limits_from, eff.credits_from) == ("key", "key", "key")
    assert eff.plan_version == 1


def test_roles_add_scopes_in_order_without_duplicates_and_deleted_roles_grant_nothing() -> None:
    key = key_record(scopes=("a", "b"), roles=("admin", "gone", "reader"))
    roles = {
        "admin": role("admin", "b", "c"),
        "reader": role("reader", "d", "c"),
        "other": role("other", "zzz"),
    }
    eff = effective_key(key, None, roles)
    assert eff.scopes == ("a", "b", "c", "d")
    assert eff.roles == ("admin", "reader")
    assert eff.scopes_from == "key"


def test_roles_add_to_the_plans_scopes() -> None:
    key = key_record(scopes=(), roles=("writer",))
    eff = effective_key(key, PLAN, {"writer": role("writer", "orders:write")})
    assert eff.scopes == ("orders:read", "users:read", "orders:write")
    assert eff.scopes_from == "plan"


def test_a_role_without_scopes_changes_nothing() -> None:
    key = key_record(scopes=("a",), roles=("empty",))
    eff = effective_key(key, None, {"empty": role("empty")})
    assert eff.scopes is key.scopes and eff.roles == ("empty",)


def test_identity_pool_is_its_own_else_its_plans() -> None:
    own = effective_identity(identity(rate_limits=(OWN_LIMIT,), credits=OWN_CREDITS), PLAN)
    assert own.rate_limits == (OWN_LIMIT,) and own.credits is OWN_CREDITS
    assert (own.rate_limits_from, own.credits_from) == ("identity", "identity")
    assert own.plan_version == 3 and own.enabled

    planned = effective_identity(identity(enabled=False), PLAN)
    assert planned.rate_limits == (PLAN_LIMIT,) and planned.credits == PLAN_CREDITS
    assert (planned.rate_limits_from, planned.credits_from) == ("plan", "plan")
    assert not planned.enabled

    bare = effective_identity(identity(), None)
    assert bare.rate_limits == () and bare.credits is None and bare.plan_version == 0
    assert (bare.rate_limits_from, bare.credits_from) == ("identity", "identity")


def test_results_are_frozen_and_encode_to_json() -> None:
    eff = effective_key(key_record(scopes=()), PLAN, {})
    doc = msgspec.json.decode(msgspec.json.encode(eff))
    assert doc["scopes_from"] == "plan" and doc["credits"]["remaining"] == 1000
    try:
        eff.scopes = ()  # type: ignore[misc]
    except AttributeError:
        pass
    else:  # pragma: no cover
        raise AssertionError("EffectiveKey must be frozen")
