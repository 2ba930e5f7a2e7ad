"""The data plane's side of issue 12, on a MemoryStore and a fake clock:
the refusal rules (``keyrules.access_decision``), a key's plan, identity and
roles read per request (``keyresolve``), and admission of a key with its
identity's shared pool, all-or-nothing (``keyadmit`` via ``ActorLimiter``),
route-bound limits included."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import trio

from tests.conftest import FakeClock
from triogate.control.keyresolve import KeyAccess, KeyResolver, has_extras
from triogate.control.keyrules import access_decision, key_decision, scopes_refused
from triogate.dataplane.actors import ActorRegistry
from triogate.dataplane.plugin_services import ActorLimiter
from triogate.errors import KeyVerdict, QuotaExceeded, RateLimited
from triogate.plugins.contract import Context
from triogate.policy.keyaccess import KeyRule
from triogate.storage import Credits, MemoryStore, RateLimit, Table, codec
from triogate.storage.records import IdentityRecord, KeyRecord, PlanRecord, RoleRecord
from triogate.testing import key_record, make_context, route_view

NOW = 1_800_000_000.0


def identity(identity_id: str = "idn_a", **fields: Any) -> IdentityRecord:
    base: dict[str, Any] = {
        "id": identity_id,
        "external_id": identity_id,
        "name": "",
        "metadata": {},
        "created_at": NOW,
        "updated_at": NOW,
    }
    return IdentityRecord(**{**base, **fields})


def plan(plan_id: str = "pln_a", **fields: Any) -> PlanRecord:
    return PlanRecord(
        **{"id": plan_id, "name": plan_id, "created_at": NOW, "updated_at": NOW, **fields}
    )


def minute(limit: int, name: str = "minute", routes: tuple[str, ...] = ()) -> RateLimit:
    return RateLimit(name=name, limit=limit, period_seconds=60, routes=routes)


def put(store: MemoryStore, table: Table, key: str, record: Any) -> None:
    async def write() -> None:
        await store.write(lambda txn: txn.put(table, key.encode(), codec.encode(record)))

    trio.run(write)


def put_role(store: MemoryStore, role: RoleRecord) -> None:
    put(store, Table.ROLES, role.id, role)

    async def write() -> None:
        await store.write(
            lambda txn: txn.put(Table.ROLE_NAMES, role.name.encode(), role.id.encode())
        )

    trio.run(write)


@pytest.fixture
def store() -> Iterator[MemoryStore]:
    yield MemoryStore()


# ---- the refusal rules -------------------------------------------------------------


def test_revoked_expired_win_over_disabled_and_disabled_over_scopes() -> None:
    disabled = key_record(enabled=False, scopes=("a",))
    assert key_decision(disabled, NOW) is KeyVerdict.KEY_DISABLED
    assert key_decision(key_record(enabled=False, status="revoked"), NOW) is KeyVerdict.KEY_REVOKED
    expired = key_record(enabled=False, expires_at=NOW - 1)
    assert key_decision(expired, NOW) is KeyVerdict.KEY_EXPIRED
    assert key_decision(disabled, NOW, ("b",)) is KeyVerdict.KEY_DISABLED
    ok = key_record()
    assert access_decision(ok, NOW, KeyRule(), scopes=(), identity_enabled=False) is (
        KeyVerdict.KEY_DISABLED
    )


def test_keyspace_is_invalid_key_before_anything_else() -> None:
    rule = KeyRule(keyspace="live")
    revoked_test = key_record(keyspace="test", status="revoked")
    assert access_decision(revoked_test, NOW, rule, scopes=()) is KeyVerdict.INVALID_KEY
    assert access_decision(key_record(keyspace="live"), NOW, rule, scopes=()) is None
    assert access_decision(key_record(), NOW, KeyRule(), scopes=()) is None


def test_any_scopes_deny_roles_and_what_a_refusal_names() -> None:
    rule = KeyRule(scopes=("a",), any_scopes=("x", "y:z"), deny_roles=frozenset({"bad"}))
    key = key_record(roles=("ops",))
    assert access_decision(key, NOW, rule, scopes=("a", "y:*")) is None
    assert access_decision(key, NOW, rule, scopes=("a",)) is KeyVerdict.INSUFFICIENT_SCOPE
    assert scopes_refused(("a",), rule) == ["x", "y:z"]
    assert scopes_refused(("x",), rule) == ["a"]
    denied = key_record(roles=("ops", "bad"))
    assert access_decision(denied, NOW, rule, scopes=("a", "x")) is KeyVerdict.ROLE_DENIED


# ---- resolving a key's plan, identity and roles ------------------------------------------


def test_a_key_without_extras_is_decided_on_its_record(store: MemoryStore) -> None:
    resolver = KeyResolver(store)
    key = key_record(scopes=("a",))
    assert not has_extras(key)
    consumer, verdict = resolver.decide(key, NOW, KeyRule(scopes=("a",)))
    assert consumer is key and verdict is None


def test_plan_and_roles_give_effective_scopes_read_per_request(store: MemoryStore) -> None:
    resolver = KeyResolver(store)
    put(store, Table.PLANS, "pln_a", plan(scopes=("orders:read",)))
    put_role(store, RoleRecord("rol_1", "ops", ("admin:*",), NOW, NOW))
    key = key_record(plan_id="pln_a", roles=("ops", "gone"))
    put(store, Table.KEYS, key.id, key)
    consumer, verdict = resolver.decide(key, NOW, KeyRule(scopes=("orders:read", "admin:x")))
    assert verdict is None and isinstance(consumer, KeyAccess)
    assert consumer.scopes == ("orders:read", "admin:*") and consumer.roles == ("ops",)
    # The plan changes: the next request sees it (the cache is by the record's bytes).
    put(store, Table.PLANS, "pln_a", plan(scopes=("other",), version=2))
    _, verdict = resolver.decide(key, NOW, KeyRule(scopes=("orders:read",)))
    assert verdict is KeyVerdict.INSUFFICIENT_SCOPE


def test_a_disabled_identity_disables_its_keys_and_a_deleted_one_is_none(
    store: MemoryStore,
) -> None:
    resolver = KeyResolver(store)
    key = key_record(identity_id="idn_a")
    put(store, Table.KEYS, key.id, key)
    put(store, Table.IDENTITIES, "idn_a", identity(enabled=False))
    assert resolver.decide(key, NOW, KeyRule())[1] is KeyVerdict.KEY_DISABLED
    put(store, Table.IDENTITIES, "idn_a", identity(enabled=True, updated_at=NOW + 1))
    assert resolver.decide(key, NOW, KeyRule())[1] is None

    async def delete() -> None:
        await store.write(lambda txn: txn.delete(Table.IDENTITIES, b"idn_a"))

    trio.run(delete)
    consumer, verdict = resolver.decide(key, NOW, KeyRule())
    assert verdict is None and isinstance(consumer, KeyAccess) and consumer.identity is None


def test_the_decision_is_the_snapshots_record_not_the_lookups(store: MemoryStore) -> None:
    resolver = KeyResolver(store)
    key = key_record(plan_id="pln_a")
    put(store, Table.PLANS, "pln_a", plan())
    put(store, Table.KEYS, key.id, key.__class__(**{**_fields(key), "status": "revoked"}))
    assert resolver.decide(key, NOW, KeyRule())[1] is KeyVerdict.KEY_REVOKED


def _fields(record: KeyRecord) -> dict[str, Any]:
    return {f: getattr(record, f) for f in record.__struct_fields__}


# ---- admission with the identity's pool ----------------------------------------------------


class Harness:
    def __init__(self, store: MemoryStore, clock: FakeClock) -> None:
        self.store = store
        self.clock = clock
        self.actors = ActorRegistry(store, clock=clock)
        self.limiter = ActorLimiter(self.actors)
        self.resolver = KeyResolver(store)

    def access(self, key: KeyRecord) -> KeyAccess:
        consumer = self.resolver.resolve(key)
        assert consumer is not None
        return consumer

    def admit(self, key: KeyRecord, route: str = "test", cost: int = 1) -> Context:
        ctx = make_context(route=route_view(route))
        consumer = self.access(key) if has_extras(key) else key
        self.limiter.admit_key_nowait(ctx, consumer, cost)
        return ctx


def test_two_keys_of_one_identity_share_its_pool_exactly(
    store: MemoryStore, clock: FakeClock
) -> None:
    h = Harness(store, clock)
    put(store, Table.IDENTITIES, "idn_a", identity(rate_limits=(minute(10),)))
    keys = [key_record(f"key_{i}", identity_id="idn_a") for i in range(2)]
    for key in keys:
        put(store, Table.KEYS, key.id, key)
    admitted = 0
    for i in range(30):
        try:
            h.admit(keys[i % 2])
            admitted += 1
        except RateLimited:
            pass
    assert admitted == 10


def test_a_refusal_by_either_takes_nothing_from_the_other(
    store: MemoryStore, clock: FakeClock
) -> None:
    h = Harness(store, clock)
    put(store, Table.IDENTITIES, "idn_a", identity(credits=Credits(remaining=3)))
    own = key_record("key_own", identity_id="idn_a", rate_limits=(minute(1),))
    other = key_record("key_other", identity_id="idn_a")
    for key in (own, other):
        put(store, Table.KEYS, key.id, key)
    h.admit(own)  # 1 of the key's 1, 1 of the pool's 3 credits
    with pytest.raises(RateLimited):
        h.admit(own)  # the key's own limit: the pool's credits are untouched
    h.admit(other)
    h.admit(other)
    with pytest.raises(QuotaExceeded) as quota:
        h.admit(other)
    assert "identity" in str(quota.value.detail)
    pool = h.actors.actor("idn_a")
    assert pool.credits == 0
    # A refusal later (ctx.undo) gives back to both.
    clock.advance(61)
    put(store, Table.IDENTITIES, "idn_a", identity(credits=Credits(remaining=1), credits_version=1))
    ctx = h.admit(own)
    assert pool.credits == 0
    for undo in ctx.undo:
        undo()
    assert pool.credits == 1
    h.admit(own)  # the key's limit was given back too


def test_key_credits_and_pool_credits_both_or_neither(store: MemoryStore, clock: FakeClock) -> None:
    h = Harness(store, clock)
    put(store, Table.IDENTITIES, "idn_a", identity(credits=Credits(remaining=5)))
    key = key_record("key_k", identity_id="idn_a", credits=Credits(remaining=1))
    put(store, Table.KEYS, key.id, key)
    h.admit(key)
    with pytest.raises(QuotaExceeded):
        h.admit(key)
    assert h.actors.actor("idn_a").credits == 4  # the key's refusal took nothing from the pool


def test_plan_limits_apply_and_a_plan_change_reaches_the_next_request(
    store: MemoryStore, clock: FakeClock
) -> None:
    h = Harness(store, clock)
    put(store, Table.PLANS, "pln_a", plan(rate_limits=(minute(1),)))
    key = key_record("key_p", plan_id="pln_a")
    put(store, Table.KEYS, key.id, key)
    h.admit(key)
    with pytest.raises(RateLimited):
        h.admit(key)
    put(store, Table.PLANS, "pln_a", plan(rate_limits=(minute(100),), version=2))
    clock.advance(60)  # the 1-a-minute limit's state is carried over (as a PATCH's is)
    for _ in range(3):
        ctx = h.admit(key)
    assert ctx.rate_limits[0].limit.limit == 100
    # Plan credits: a balance of the key's own, reset when the plan's credits are set.
    put(store, Table.PLANS, "pln_a", plan(credits=Credits(remaining=1), version=3))
    h.admit(key)
    with pytest.raises(QuotaExceeded):
        h.admit(key)
    put(
        store,
        Table.PLANS,
        "pln_a",
        plan(credits=Credits(remaining=2), version=4, credits_version=1),
    )
    h.admit(key)
    h.admit(key)
    with pytest.raises(QuotaExceeded):
        h.admit(key)


def test_route_bound_limits_apply_only_on_their_routes(
    store: MemoryStore, clock: FakeClock
) -> None:
    h = Harness(store, clock)
    plain = key_record("key_r", rate_limits=(minute(1, "orders", ("orders",)), minute(5)))
    for _ in range(3):
        h.admit(plain, route="users")
    h.admit(plain, route="orders")
    with pytest.raises(RateLimited):
        h.admit(plain, route="orders")
    # An identity's route-bound limit too.
    put(
        store,
        Table.IDENTITIES,
        "idn_b",
        identity("idn_b", rate_limits=(minute(1, "o", ("orders",)),)),
    )
    key = key_record("key_i", identity_id="idn_b")
    put(store, Table.KEYS, key.id, key)
    h.admit(key, route="users")
    h.admit(key, route="users")
    h.admit(key, route="orders")
    with pytest.raises(RateLimited):
        h.admit(key, route="orders")


def test_ten_thousand_keys_on_one_identity_stay_exact(store: MemoryStore, clock: FakeClock) -> None:
    h = Harness(store, clock)
    put(store, Table.IDENTITIES, "idn_big", identity("idn_big", rate_limits=(minute(64),)))
    admitted = 0
    for i in range(10_000):
        key = key_record(f"key_{i}", identity_id="idn_big")
        put(store, Table.KEYS, key.id, key)
        try:
            h.admit(key)
            admitted += 1
        except RateLimited:
            pass
    assert admitted == 64


def test_usage_is_recorded_for_the_key_and_its_identity(
    store: MemoryStore, clock: FakeClock
) -> None:
    h = Harness(store, clock)
    put(store, Table.IDENTITIES, "idn_a", identity())
    key = key_record("key_u", identity_id="idn_a")
    put(store, Table.KEYS, key.id, key)
    h.limiter.record_nowait(h.access(key), 200)
    assert h.actors.actor("key_u").snapshot().requests == 1
    assert h.actors.actor("idn_a").snapshot().requests == 1
