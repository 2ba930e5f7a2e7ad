"""The key lifecycle over the in-memory store with a hand-moved clock."""

from datetime import UTC, datetime

import msgspec
import pytest

from tests.conftest import FakeClock, make_secrets
from triogate.control.audit import Actor
from triogate.control.crypto import HmacKeyring, ServerSecrets
from triogate.control.keys import KeyService
from triogate.control.models import CreateKeyRequest, RotateKeyRequest, UpdateKeyRequest
from triogate.errors import Conflict, KeyVerdict, NotFound, ValidationError
from triogate.runtime.gateway import Gateway
from triogate.storage import Credits, MemoryStore, RateLimit, Table, codec

ACTOR = Actor("adm_test", "127.0.0.1")


def req(**kw: object) -> CreateKeyRequest:
    raw: dict[str, object] = {"name": "svc", "owner": "alice", "scopes": ["users:read"], **kw}
    return msgspec.convert(raw, CreateKeyRequest)


async def test_create_get_and_validate(memory_gateway: Gateway) -> None:
    keys = memory_gateway.keys
    created = await keys.create(
        req(metadata={"plan": "pro"}, rate_limits=[{"name": "s", "limit": 5, "period_seconds": 1}]),
        ACTOR,
    )
    assert created.key.startswith("tg_")
    got = keys.get(created.id)
    assert got.owner == "alice"
    assert got.metadata == {"plan": "pro"}
    assert got.rate_limits == [RateLimit("s", 5, 1.0)]
    assert not hasattr(got, "key")
    result = await keys.validate(created.key, ["users:read"])
    assert result.valid and result.key_id == created.id and result.owner == "alice"


async def test_plaintext_never_stored(memory_gateway: Gateway) -> None:
    created = await memory_gateway.keys.create(req(owner="owner-secret-xyz"), ACTOR)
    store = memory_gateway.store
    assert isinstance(store, MemoryStore)
    blob = b"".join(k + v for t in store._tables.values() for k, v in t.data.items())
    assert created.key.encode() not in blob
    assert b"owner-secret-xyz" not in blob


async def test_validate_codes(memory_gateway: Gateway, clock: FakeClock) -> None:
    keys = memory_gateway.keys
    created = await keys.create(req(expires_at=datetime.fromtimestamp(clock.now + 60, UTC)), ACTOR)
    assert (await keys.validate("tg_garbage")).code is KeyVerdict.INVALID_KEY
    assert (await keys.validate(keys.format.generate())).code is KeyVerdict.INVALID_KEY
    scoped = await keys.validate(created.key, ["users:read", "orders:write"])
    assert scoped.code is KeyVerdict.INSUFFICIENT_SCOPE and scoped.required_scopes == [
        "orders:write"
    ]
    clock.advance(60)
    expired = await keys.validate(created.key)
    assert expired.code is KeyVerdict.KEY_EXPIRED
    assert keys.get(created.id).status == "expired"
    # The admin API's JSON says the code as before: the verdict's value.
    body = msgspec.json.decode(msgspec.json.encode(expired))
    assert body["code"] == "KEY_EXPIRED" and body["valid"] is False
    record, verdict, _ = keys.validate_nowait(keys.format.generate())
    assert record is None and verdict is KeyVerdict.INVALID_KEY


async def test_revoke_twice_conflicts(memory_gateway: Gateway) -> None:
    keys = memory_gateway.keys
    created = await keys.create(req(), ACTOR)
    result = await keys.revoke(created.id, ACTOR)
    assert result.status == "revoked"
    with pytest.raises(Conflict):
        await keys.revoke(created.id, ACTOR)
    assert (await keys.validate(created.key)).code is KeyVerdict.KEY_REVOKED


async def test_unknown_and_malformed_ids(memory_gateway: Gateway) -> None:
    keys = memory_gateway.keys
    with pytest.raises(ValidationError):
        keys.get("nope")
    with pytest.raises(NotFound):
        keys.get("key_01M8DMHMHR1NGHF6N39PRHGQQT")
    with pytest.raises(NotFound):
        await keys.revoke("key_01M8DMHMHR1NGHF6N39PRHGQQT", ACTOR)


async def test_rotate_with_grace(memory_gateway: Gateway, clock: FakeClock) -> None:
    keys = memory_gateway.keys
    old = await keys.create(
        req(
            metadata={"m": 1},
            credits={"remaining": 7, "refill_amount": 1, "refill_interval_seconds": 60},
        ),
        ACTOR,
    )
    rotated = await keys.rotate(old.id, RotateKeyRequest(grace_seconds=30), ACTOR)
    new = rotated.new
    assert rotated.old.status == "rotated"
    assert new.rotated_from == old.id and keys.get(old.id).rotated_to == new.id
    assert (new.owner, new.scopes, new.metadata, new.credits) == (
        "alice",
        ["users:read"],
        {"m": 1},
        Credits(7, 1, 60),
    )
    assert (await keys.validate(old.key)).valid  # in grace
    assert (await keys.validate(new.key)).valid
    with pytest.raises(Conflict):
        await keys.rotate(old.id, RotateKeyRequest(), ACTOR)
    clock.advance(30)
    assert (await keys.validate(old.key)).code is KeyVerdict.KEY_ROTATED
    assert (await keys.validate(new.key)).valid


async def test_update_fields(memory_gateway: Gateway, clock: FakeClock) -> None:
    keys = memory_gateway.keys
    created = await keys.create(
        req(metadata={"a": 1}, expires_at=datetime.fromtimestamp(clock.now + 10, UTC)), ACTOR
    )
    clock.advance(1)
    patch = msgspec.convert(
        {"name": "renamed", "expires_at": None, "metadata": None}, UpdateKeyRequest
    )
    view = await keys.update(created.id, patch, ACTOR)
    assert (view.name, view.expires_at, view.metadata, view.owner) == (
        "renamed",
        None,
        None,
        "alice",
    )
    assert view.scopes == ["users:read"]  # untouched
    assert view.updated_at > view.created_at
    patch = msgspec.convert(
        {"scopes": ["a", "a", "b"], "credits": {"remaining": 3}}, UpdateKeyRequest
    )
    view = await keys.update(created.id, patch, ACTOR)
    assert view.scopes == ["a", "b"] and view.credits == Credits(3)
    past = msgspec.convert({"expires_at": "2000-01-01T00:00:00Z"}, UpdateKeyRequest)
    with pytest.raises(ValidationError):
        await keys.update(created.id, past, ACTOR)


async def test_list_by_owner_and_status(memory_gateway: Gateway) -> None:
    keys = memory_gateway.keys
    made = [await keys.create(req(owner="o1" if i % 2 else "o2"), ACTOR) for i in range(7)]
    await keys.revoke(made[1].id, ACTOR)
    page = keys.list(limit=10, owner="o1")
    assert [k.id for k in page.items] == [m.id for m in reversed(made) if m.owner == "o1"]
    page = keys.list(limit=10, owner="o1", status="active")
    assert made[1].id not in [k.id for k in page.items] and len(page.items) == 2
    assert keys.list(limit=10, owner="nobody").items == []
    first = keys.list(limit=3)
    second = keys.list(limit=3, cursor=first.next_cursor)
    third = keys.list(limit=3, cursor=second.next_cursor)
    ids = [k.id for p in (first, second, third) for k in p.items]
    assert ids == [m.id for m in reversed(made)] and third.next_cursor is None


async def test_cleanup_expires_and_purges(memory_gateway: Gateway, clock: FakeClock) -> None:
    keys = memory_gateway.keys
    expiring = await keys.create(req(expires_at=datetime.fromtimestamp(clock.now + 5, UTC)), ACTOR)
    old = await keys.create(req(), ACTOR)
    rotated = await keys.rotate(old.id, RotateKeyRequest(grace_seconds=5), ACTOR)
    keeper = await keys.create(req(), ACTOR)
    assert await keys.cleanup(ACTOR) == (0, 0)
    clock.advance(5)
    assert await keys.cleanup(ACTOR) == (1, 1)
    assert keys.get(expiring.id).status == "expired"
    with pytest.raises(NotFound):
        keys.get(old.id)
    assert (await keys.validate(old.key)).code is KeyVerdict.INVALID_KEY  # digest purged too
    assert keys.get(rotated.new.id).status == "active"
    assert keys.get(keeper.id).status == "active"
    assert await keys.cleanup(ACTOR) == (0, 0)


async def test_hmac_rotation_keeps_keys_and_reindexes(clock: FakeClock) -> None:
    store = MemoryStore()
    sealer = make_secrets().sealer
    v1 = ServerSecrets(HmacKeyring({1: b"o" * 32}), sealer, "test")
    keys_v1 = KeyService(store, v1, clock=clock)
    created = await keys_v1.create(req(owner="carol"), ACTOR)
    # Same encryption keys, a second HMAC version on top of the first.
    v2 = ServerSecrets(HmacKeyring({1: b"o" * 32, 2: b"n" * 32}), sealer, "test")
    keys_v2 = KeyService(store, v2, clock=clock)
    record, stale = keys_v2.lookup_nowait(created.key)
    assert record is not None and stale
    assert (await keys_v2.validate(created.key)).valid
    record, stale = keys_v2.lookup_nowait(created.key)
    assert record is not None and not stale and record.digest_version == 2
    with store.read() as txn:
        # The old entry stays, for processes that do not know version 2 yet.
        assert txn.get(Table.KEY_DIGESTS, v1.hmac.digest(created.key)) == created.id.encode()
        raw = txn.get(Table.KEYS, created.id.encode())
        assert raw is not None and codec.key.decode(raw).digest_version == 2
    # A process that only knows version 1 still validates the key.
    assert (await keys_v1.validate(created.key)).valid
    # The owner index still finds keys tagged under version 1 and 2 alike.
    newer = await keys_v2.create(req(owner="carol"), ACTOR)
    assert [k.id for k in keys_v2.list(limit=10, owner="carol").items] == [newer.id, created.id]


async def test_audit_written_with_each_action(memory_gateway: Gateway) -> None:
    keys = memory_gateway.keys
    created = await keys.create(req(), ACTOR)
    await keys.update(created.id, UpdateKeyRequest(name="x"), ACTOR)
    await keys.rotate(created.id, RotateKeyRequest(), ACTOR)
    page = memory_gateway.audit.list(limit=10)
    assert [e.action for e in page.items] == ["key.rotate", "key.update", "key.create"]
    assert {e.target_id for e in page.items} == {created.id}
    assert all(e.actor_id == "adm_test" and e.source_ip == "127.0.0.1" for e in page.items)
    assert memory_gateway.audit.list(limit=10, action="key.update").items[0].details == {
        "fields": ["name"]
    }
