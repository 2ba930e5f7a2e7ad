"""Identities, plans and the customer fields of keys, over the in-memory store
with a hand-moved clock: the services (control/identities.py, plans.py,
keyfields.py), their indexes, their 400s and 409s and their audit entries."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from tests.conftest import FakeClock
from triogate.control.audit import Actor
from triogate.control.customer_models import (
    CreateIdentityRequest,
    CreatePlanRequest,
    UpdateIdentityRequest,
    UpdatePlanRequest,
)
from triogate.control.ids import new_id
from triogate.control.keyresolve import plan_credits_version
from triogate.control.membership import members
from triogate.control.models import CreateKeyRequest, RotateKeyRequest, UpdateKeyRequest
from triogate.control.roles import CreateRoleRequest
from triogate.errors import (
    Conflict,
    IdentityHasKeys,
    KeyVerdict,
    NotFound,
    PlanInUse,
    RoleInUse,
    ValidationError,
)
from triogate.runtime.gateway import Gateway
from triogate.storage import Credits, RateLimit, Table, UsageRecord, codec

ACTOR = Actor("adm_test", "127.0.0.1")
MINUTE = {"name": "minute", "limit": 10, "period_seconds": 60}


def key_req(**kw: Any) -> CreateKeyRequest:
    return msgspec.convert({"name": "svc", "owner": "alice", **kw}, CreateKeyRequest)


def patch(**kw: Any) -> UpdateKeyRequest:
    return msgspec.convert(kw, UpdateKeyRequest)


def identity_req(**kw: Any) -> CreateIdentityRequest:
    return msgspec.convert({"external_id": "cus_1", **kw}, CreateIdentityRequest)


def plan_req(**kw: Any) -> CreatePlanRequest:
    return msgspec.convert({"name": "pro", **kw}, CreatePlanRequest)


def audit_actions(gw: Gateway) -> list[tuple[str, str | None, dict[str, Any]]]:
    with gw.store.read() as txn:
        entries = [codec.audit.decode(v) for _, v in txn.scan(Table.AUDIT)]
    return [(e.action, e.target_id, e.details) for e in entries]


def index(gw: Gateway, table: Table, owner: str) -> list[str]:
    with gw.store.read() as txn:
        return list(members(txn, table, owner))


def field_paths(exc: pytest.ExceptionInfo[ValidationError]) -> list[str]:
    return [e.path for e in exc.value.errors]


# ---- plans --------------------------------------------------------------------------


async def test_plan_crud_version_and_unique_name(memory_gateway: Gateway) -> None:
    plans = memory_gateway.plans
    plan = await plans.create(plan_req(scopes=["a", "a", "b"], rate_limits=[MINUTE]), ACTOR)
    assert plan.id.startswith("pln_") and plan.version == 1 and plan.scopes == ["a", "b"]
    with pytest.raises(Conflict):
        await plans.create(plan_req(), ACTOR)
    other = await plans.create(plan_req(name="basic"), ACTOR)
    with pytest.raises(Conflict):
        await plans.update(other.id, msgspec.convert({"name": "pro"}, UpdatePlanRequest), ACTOR)
    renamed = await plans.update(
        plan.id,
        msgspec.convert({"name": "pro", "credits": {"remaining": 5}}, UpdatePlanRequest),
        ACTOR,
    )
    assert renamed.version == 2 and renamed.credits == Credits(remaining=5)
    assert renamed.rate_limits == [RateLimit("minute", 10, 60.0)]
    page = plans.list(limit=1)
    assert [p.id for p in page.items] == [other.id] and page.next_cursor is not None
    assert [p.id for p in plans.list(limit=1, cursor=page.next_cursor).items] == [plan.id]
    await plans.delete(other.id, ACTOR)
    with pytest.raises(NotFound):
        plans.get(other.id)
    with pytest.raises(ValidationError):
        plans.get("key_nope")
    actions = [a for a, _, _ in audit_actions(memory_gateway)]
    assert actions.count("plan.create") == 2 and "plan.update" in actions
    assert "plan.delete" in actions


async def test_plan_in_use_until_its_members_leave(memory_gateway: Gateway) -> None:
    gw = memory_gateway
    plan = await gw.plans.create(plan_req(), ACTOR)
    key = await gw.keys.create(key_req(plan_id=plan.id), ACTOR)
    identity = await gw.identities.create(identity_req(plan_id=plan.id), ACTOR)
    assert sorted(index(gw, Table.PLAN_MEMBERS, plan.id)) == sorted([key.id, identity.id])
    with pytest.raises(PlanInUse):
        await gw.plans.delete(plan.id, ACTOR)
    await gw.identities.update(
        identity.id, msgspec.convert({"plan_id": None}, UpdateIdentityRequest), ACTOR
    )
    with pytest.raises(PlanInUse):
        await gw.plans.delete(plan.id, ACTOR)
    await gw.keys.revoke(key.id, ACTOR)  # a revoked key no longer uses its plan
    assert index(gw, Table.PLAN_MEMBERS, plan.id) == []
    await gw.plans.delete(plan.id, ACTOR)


# ---- keys: references, effective, enabled ------------------------------------------


async def test_unknown_references_are_400_on_their_field_paths(memory_gateway: Gateway) -> None:
    keys = memory_gateway.keys
    await memory_gateway.roles.create(msgspec.convert({"name": "ok"}, CreateRoleRequest), ACTOR)
    bad = key_req(
        identity_id="idn_01ARZ3NDEKTSV4RRFFQ69G5FAV",
        plan_id="nonsense",
        roles=["ok", "nope"],
    )
    with pytest.raises(ValidationError) as exc:
        await keys.create(bad, ACTOR)
    assert field_paths(exc) == ["identity_id", "plan_id", "roles[1]"]
    with pytest.raises(ValidationError) as exc2:
        await keys.create(key_req(keyspace="nope"), ACTOR)
    assert field_paths(exc2) == ["keyspace"]
    created = await keys.create(key_req(), ACTOR)
    with pytest.raises(ValidationError) as exc3:
        await keys.update(created.id, patch(plan_id="pln_01ARZ3NDEKTSV4RRFFQ69G5FAV"), ACTOR)
    assert field_paths(exc3) == ["plan_id"]
    # Nothing was written by the refusals.
    assert [k.id for k in keys.list(limit=10).items] == [created.id]


async def test_key_view_shows_fields_and_effective_block(memory_gateway: Gateway) -> None:
    gw = memory_gateway
    plan = await gw.plans.create(
        plan_req(scopes=["orders:read"], rate_limits=[MINUTE], credits={"remaining": 100}),
        ACTOR,
    )
    await gw.roles.create(
        msgspec.convert({"name": "writer", "scopes": ["orders:write"]}, CreateRoleRequest), ACTOR
    )
    identity = await gw.identities.create(identity_req(), ACTOR)
    created = await gw.keys.create(
        key_req(plan_id=plan.id, identity_id=identity.id, roles=["writer"]), ACTOR
    )
    assert (created.plan_id, created.identity_id, created.roles) == (
        plan.id,
        identity.id,
        ["writer"],
    )
    assert created.enabled and created.keyspace == "default"
    eff = created.effective
    assert eff.scopes == ("orders:read", "orders:write") and eff.scopes_from == "plan"
    assert eff.rate_limits == (RateLimit("minute", 10, 60.0),) and eff.rate_limits_from == "plan"
    assert eff.credits == Credits(remaining=100) and eff.plan_version == 1
    # A plan change shows on the next read.
    await gw.plans.update(plan.id, msgspec.convert({"scopes": ["x"]}, UpdatePlanRequest), ACTOR)
    eff2 = gw.keys.get(created.id).effective
    assert eff2.scopes == ("x", "orders:write") and eff2.plan_version == 2
    # validate uses the effective scopes.
    assert (await gw.keys.validate(created.key, ["x", "orders:write"])).valid
    refused = await gw.keys.validate(created.key, ["orders:read"])
    assert refused.code is KeyVerdict.INSUFFICIENT_SCOPE
    assert refused.required_scopes == ["orders:read"]


async def test_disable_enable_key_and_identity(memory_gateway: Gateway, clock: FakeClock) -> None:
    gw = memory_gateway
    identity = await gw.identities.create(identity_req(), ACTOR)
    key = await gw.keys.create(key_req(identity_id=identity.id), ACTOR)
    assert (await gw.keys.validate(key.key)).valid
    off = await gw.keys.update(key.id, patch(enabled=False), ACTOR)
    assert off.enabled is False
    result = await gw.keys.validate(key.key)
    assert not result.valid and result.code is KeyVerdict.KEY_DISABLED
    await gw.keys.update(key.id, patch(enabled=True), ACTOR)
    assert (await gw.keys.validate(key.key)).valid
    # The identity disables every key of it.
    await gw.identities.update(
        identity.id, msgspec.convert({"enabled": False}, UpdateIdentityRequest), ACTOR
    )
    assert (await gw.keys.validate(key.key)).code is KeyVerdict.KEY_DISABLED
    assert gw.identities.get(identity.id).effective.enabled is False
    await gw.identities.update(
        identity.id, msgspec.convert({"enabled": True}, UpdateIdentityRequest), ACTOR
    )
    assert (await gw.keys.validate(key.key)).valid
    # Revoked wins over disabled.
    await gw.keys.update(key.id, patch(enabled=False), ACTOR)
    await gw.keys.revoke(key.id, ACTOR)
    assert (await gw.keys.validate(key.key)).code is KeyVerdict.KEY_REVOKED
    actions = [(a, t) for a, t, _ in audit_actions(gw)]
    assert actions.count(("key.disable", key.id)) == 2
    assert ("key.enable", key.id) in actions
    assert ("identity.disable", identity.id) in actions
    assert ("identity.enable", identity.id) in actions


async def test_create_disabled_and_patch_is_audited_with_old_and_new(
    memory_gateway: Gateway,
) -> None:
    gw = memory_gateway
    key = await gw.keys.create(key_req(enabled=False), ACTOR)
    assert (await gw.keys.validate(key.key)).code is KeyVerdict.KEY_DISABLED
    identity = await gw.identities.create(identity_req(), ACTOR)
    await gw.keys.update(key.id, patch(identity_id=identity.id), ACTOR)
    assert index(gw, Table.IDENTITY_KEYS, identity.id) == [key.id]
    await gw.keys.update(key.id, patch(identity_id=None), ACTOR)
    assert index(gw, Table.IDENTITY_KEYS, identity.id) == []
    updates = [d for a, t, d in audit_actions(gw) if a == "key.update" and t == key.id]
    assert updates[0]["identity_id"] == {"from": None, "to": identity.id}
    assert updates[1]["identity_id"] == {"from": identity.id, "to": None}
    created = [d for a, t, d in audit_actions(gw) if a == "key.create" and t == key.id]
    assert created[0]["enabled"] is False


async def test_rotation_keeps_the_customer_fields(
    memory_gateway: Gateway, clock: FakeClock
) -> None:
    gw = memory_gateway
    plan = await gw.plans.create(plan_req(), ACTOR)
    identity = await gw.identities.create(identity_req(), ACTOR)
    await gw.roles.create(msgspec.convert({"name": "r1"}, CreateRoleRequest), ACTOR)
    key = await gw.keys.create(
        key_req(plan_id=plan.id, identity_id=identity.id, roles=["r1"], enabled=False), ACTOR
    )
    rotated = await gw.keys.rotate(key.id, RotateKeyRequest(grace_seconds=60), ACTOR)
    new = rotated.new
    assert (new.identity_id, new.plan_id, new.roles, new.enabled, new.keyspace) == (
        identity.id,
        plan.id,
        ["r1"],
        False,
        "default",
    )
    assert sorted(index(gw, Table.IDENTITY_KEYS, identity.id)) == sorted([key.id, new.id])
    assert sorted(index(gw, Table.PLAN_MEMBERS, plan.id)) == sorted([key.id, new.id])
    # The old key leaves the indexes when cleanup purges it.
    clock.advance(61)
    await gw.keys.cleanup(ACTOR)
    assert index(gw, Table.IDENTITY_KEYS, identity.id) == [new.id]
    assert index(gw, Table.PLAN_MEMBERS, plan.id) == [new.id]
    # A role some key names cannot be deleted (CP2's ROLE_MEMBERS, kept here).
    role_id = gw.roles.resolve("r1")
    with pytest.raises(RoleInUse):
        await gw.roles.delete(role_id, ACTOR)


# ---- identities ---------------------------------------------------------------------


async def test_identity_crud_unique_external_id_and_filter(memory_gateway: Gateway) -> None:
    ids = memory_gateway.identities
    a = await ids.create(identity_req(name="Acme", metadata={"tier": "gold"}), ACTOR)
    assert a.id.startswith("idn_") and a.metadata == {"tier": "gold"} and a.enabled
    with pytest.raises(Conflict):
        await ids.create(identity_req(), ACTOR)
    b = await ids.create(identity_req(external_id="cus_2"), ACTOR)
    with pytest.raises(Conflict):
        await ids.update(
            b.id, msgspec.convert({"external_id": "cus_1"}, UpdateIdentityRequest), ACTOR
        )
    assert [i.id for i in ids.list(limit=10).items] == [b.id, a.id]
    assert [i.id for i in ids.list(limit=10, external_id="cus_1").items] == [a.id]
    assert ids.list(limit=10, external_id="cus_404").items == []
    moved = await ids.update(
        a.id,
        msgspec.convert({"external_id": "cus_9", "metadata": None}, UpdateIdentityRequest),
        ACTOR,
    )
    assert moved.external_id == "cus_9" and moved.metadata == {}
    assert [i.id for i in ids.list(limit=10, external_id="cus_9").items] == [a.id]
    assert ids.list(limit=10, external_id="cus_1").items == []
    # The freed external_id can be taken again.
    await ids.create(identity_req(), ACTOR)
    with pytest.raises(ValidationError) as exc:
        await ids.create(
            identity_req(external_id="x", plan_id="pln_01ARZ3NDEKTSV4RRFFQ69G5FAV"), ACTOR
        )
    assert field_paths(exc) == ["plan_id"]
    with pytest.raises(NotFound):
        ids.get("idn_01ARZ3NDEKTSV4RRFFQ69G5FAV")


async def test_identity_pool_effective_from_plan(memory_gateway: Gateway) -> None:
    gw = memory_gateway
    plan = await gw.plans.create(plan_req(rate_limits=[MINUTE], credits={"remaining": 50}), ACTOR)
    identity = await gw.identities.create(identity_req(plan_id=plan.id), ACTOR)
    pool = identity.effective
    assert pool.rate_limits_from == "plan" and pool.credits == Credits(remaining=50)
    usage = gw.identities.usage(identity.id)
    assert usage.credits_remaining == 50 and usage.rate_limits == [RateLimit("minute", 10, 60.0)]
    # The identity's plan does not fill its keys' settings.
    key = await gw.keys.create(key_req(identity_id=identity.id), ACTOR)
    assert key.effective.rate_limits == () and key.effective.credits is None


async def test_identity_usage_sums_keys_and_reads_the_pool_balance(
    memory_gateway: Gateway,
) -> None:
    gw = memory_gateway
    identity = await gw.identities.create(identity_req(credits={"remaining": 100}), ACTOR)
    k1 = await gw.keys.create(key_req(identity_id=identity.id), ACTOR)
    k2 = await gw.keys.create(key_req(identity_id=identity.id), ACTOR)
    await gw.keys.create(key_req(), ACTOR)  # not on the identity

    def put(txn: Any) -> None:
        for kid, n, last in ((k1.id, 3, 10.0), (k2.id, 4, 20.0)):
            usage = UsageRecord(requests=n, last_used_at=last, by_class=(0, n, 0, 0, 0))
            txn.put(Table.USAGE, kid.encode(), codec.encode(usage))
        pool = UsageRecord(credits_remaining=61, credits_version=0)
        txn.put(Table.USAGE, identity.id.encode(), codec.encode(pool))

    await gw.store.write(put)
    usage = gw.identities.usage(identity.id)
    assert (usage.keys, usage.requests) == (2, 7)
    assert usage.by_status_class["2xx"] == 7 and usage.last_used_at is not None
    assert usage.last_used_at.timestamp() == 20.0
    assert usage.credits_remaining == 61
    assert gw.identities.get(identity.id).credits == Credits(remaining=61)
    # A PATCH of credits makes the stored balance stale.
    await gw.identities.update(
        identity.id, msgspec.convert({"credits": {"remaining": 5}}, UpdateIdentityRequest), ACTOR
    )
    assert gw.identities.usage(identity.id).credits_remaining == 5


async def test_delete_identity_with_live_keys(memory_gateway: Gateway) -> None:
    gw = memory_gateway
    plan = await gw.plans.create(plan_req(), ACTOR)
    identity = await gw.identities.create(identity_req(plan_id=plan.id), ACTOR)
    live = await gw.keys.create(key_req(identity_id=identity.id), ACTOR)
    dead = await gw.keys.create(key_req(identity_id=identity.id), ACTOR)
    await gw.keys.revoke(dead.id, ACTOR)
    with pytest.raises(IdentityHasKeys):
        await gw.identities.delete(identity.id, ACTOR, revoke_keys=False)
    assert gw.identities.get(identity.id).id == identity.id  # nothing changed
    assert gw.keys.get(live.id).status == "active"
    deleted = await gw.identities.delete(identity.id, ACTOR, revoke_keys=True)
    assert deleted.deleted and deleted.revoked_keys == [live.id]
    with pytest.raises(NotFound):
        gw.identities.get(identity.id)
    for kid in (live.id, dead.id):
        view = gw.keys.get(kid)
        assert view.status == "revoked" and view.identity_id is None
    assert index(gw, Table.IDENTITY_KEYS, identity.id) == []
    assert index(gw, Table.PLAN_MEMBERS, plan.id) == []
    assert gw.identities.list(limit=10, external_id="cus_1").items == []
    await gw.plans.delete(plan.id, ACTOR)  # the identity left its plan
    revokes = [d for a, t, d in audit_actions(gw) if a == "key.revoke" and t == live.id]
    assert revokes == [{"reason": "identity.delete", "identity_id": identity.id}]
    (entry,) = [d for a, t, d in audit_actions(gw) if a == "identity.delete"]
    assert entry["revoked_keys"] == [live.id] and entry["keys"] == 2
    # A key can no longer be put on it.
    with pytest.raises(ValidationError):
        await gw.keys.create(key_req(identity_id=identity.id), ACTOR)


async def test_delete_identity_without_live_keys_needs_no_flag(
    memory_gateway: Gateway, clock: FakeClock
) -> None:
    gw = memory_gateway
    identity = await gw.identities.create(identity_req(), ACTOR)
    key = await gw.keys.create(
        msgspec.convert({"name": "s", "owner": "o", "identity_id": identity.id}, CreateKeyRequest),
        ACTOR,
    )
    await gw.keys.revoke(key.id, ACTOR)
    deleted = await gw.identities.delete(identity.id, ACTOR, revoke_keys=False)
    assert deleted.revoked_keys == []


async def test_many_keys_on_one_identity_page_and_sum(memory_gateway: Gateway) -> None:
    """10,000 keys on one identity: the usage sum walks the index one key
    at a time; deleting with revoke_keys is one write."""
    gw = memory_gateway
    identity = await gw.identities.create(identity_req(), ACTOR)
    n = 10_000
    template = await gw.keys.create(key_req(identity_id=identity.id), ACTOR)
    raw = gw.store.read
    with raw() as txn:
        record = gw.keys._load(txn, template.id)

    def many(txn: Any) -> None:
        # Records made directly: the index is what is under test, not
        # 10,000 HMACs.
        for _ in range(1, n):
            kid = new_id("key")
            copy = msgspec.structs.replace(record, id=kid)
            txn.put(Table.KEYS, kid.encode(), codec.encode(copy))
            txn.put(Table.IDENTITY_KEYS, identity.id.encode() + b"\0" + kid.encode(), b"")
            txn.put(Table.USAGE, kid.encode(), codec.encode(UsageRecord(requests=1)))

    await gw.store.write(many)
    usage = gw.identities.usage(identity.id)
    assert usage.keys == n and usage.requests == n - 1
    deleted = await gw.identities.delete(identity.id, ACTOR, revoke_keys=True)
    assert len(deleted.revoked_keys) == n
    assert index(gw, Table.IDENTITY_KEYS, identity.id) == []


async def test_list_keys_of_an_identity_pages_through_its_index(memory_gateway: Gateway) -> None:
    gw = memory_gateway
    identity = await gw.identities.create(identity_req(), ACTOR)
    mine = [
        (await gw.keys.create(key_req(identity_id=identity.id, owner=f"o{i % 2}"), ACTOR)).id
        for i in range(5)
    ]
    await gw.keys.create(key_req(owner="o0"), ACTOR)  # another identity's: not listed
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        page = gw.keys.list(limit=2, cursor=cursor, identity_id=identity.id)
        seen += [k.id for k in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == list(reversed(mine))
    both = gw.keys.list(limit=10, identity_id=identity.id, owner="o0")
    assert [k.id for k in both.items] == [mine[4], mine[2], mine[0]]
    await gw.keys.revoke(mine[1], ACTOR)
    revoked = gw.keys.list(limit=10, identity_id=identity.id, status="revoked")
    assert [k.id for k in revoked.items] == [mine[1]]


async def test_plan_credits_version_and_pool_balance_from_the_plan(
    memory_gateway: Gateway,
) -> None:
    gw = memory_gateway
    plan = await gw.plans.create(plan_req(credits={"remaining": 50}), ACTOR)
    identity = await gw.identities.create(identity_req(plan_id=plan.id), ACTOR)
    with gw.store.read() as txn:
        record = codec.plan.decode(txn.get(Table.PLANS, plan.id.encode()) or b"")
    assert record.credits_version == 0 and record.credits_set_at is not None
    version = plan_credits_version(record)

    def flush(txn: Any) -> None:
        pool = UsageRecord(credits_remaining=7, credits_version=version)
        txn.put(Table.USAGE, identity.id.encode(), codec.encode(pool))

    await gw.store.write(flush)
    assert gw.identities.usage(identity.id).credits_remaining == 7
    # Renaming leaves the balance; setting credits resets it.
    await gw.plans.update(plan.id, msgspec.convert({"name": "x"}, UpdatePlanRequest), ACTOR)
    assert gw.identities.usage(identity.id).credits_remaining == 7
    await gw.plans.update(
        plan.id, msgspec.convert({"credits": {"remaining": 9}}, UpdatePlanRequest), ACTOR
    )
    with gw.store.read() as txn:
        bumped = codec.plan.decode(txn.get(Table.PLANS, plan.id.encode()) or b"")
    assert bumped.credits_version == 1 and bumped.version == 3
    assert gw.identities.usage(identity.id).credits_remaining == 9
