"""Roles over the in-memory store: CRUD, unique names, the in-use index and
the functions the key service and the data plane call."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from tests.conftest import FakeClock
from triogate.control.audit import Actor
from triogate.control.roles import (
    CreateRoleRequest,
    RoleService,
    UpdateRoleRequest,
    check_roles,
    link_roles,
    role_in_use,
    roles_by_name,
    unknown_roles,
)
from triogate.errors import Conflict, NotFound, RoleInUse, ValidationError
from triogate.storage import KeyRecord, MemoryStore, Table, WriteTxn, codec
from triogate.validation import convert_all

ACTOR = Actor("adm_test", "127.0.0.1")


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def roles(store: MemoryStore, clock: FakeClock) -> RoleService:
    return RoleService(store, clock=clock)


def create_req(**kw: Any) -> CreateRoleRequest:
    return convert_all({"name": "reader", "scopes": ["users:read"], **kw}, CreateRoleRequest)


def update_req(**kw: Any) -> UpdateRoleRequest:
    return convert_all(kw, UpdateRoleRequest)


async def put_key(
    store: MemoryStore, key_id: str, names: tuple[str, ...], status: str = "active"
) -> None:
    record = KeyRecord(
        id=key_id,
        digest=key_id.encode(),
        digest_version=1,
        start="tg_abcd",
        name="k",
        sealed=b"",
        owner_tag=b"",
        owner_tag_version=1,
        scopes=(),
        status=status,
        created_at=0.0,
        updated_at=0.0,
        roles=names,
    )

    def fn(txn: WriteTxn) -> None:
        raw = txn.get(Table.KEYS, key_id.encode())
        old = () if raw is None else codec.key.decode(raw).roles
        txn.put(Table.KEYS, key_id.encode(), codec.encode(record))
        link_roles(txn, key_id, old, names if status != "revoked" else ())

    await store.write(fn)


def audit_actions(store: MemoryStore) -> list[str]:
    with store.read() as txn:
        return [codec.audit.decode(v).action for _, v in txn.scan(Table.AUDIT)]


KEY_A = "key_01J000000000000000000000AA"
KEY_B = "key_01J000000000000000000000BB"


async def test_create_get_list_update_delete(roles: RoleService, store: MemoryStore) -> None:
    created = await roles.create(create_req(description="reads users"), ACTOR)
    assert created.id.startswith("rol_") and created.name == "reader"
    assert created.scopes == ["users:read"] and created.description == "reads users"
    assert roles.get(created.id) == created
    assert roles.resolve("reader") == created.id and roles.resolve(created.id) == created.id

    updated = await roles.update(
        created.id, update_req(scopes=["users:read", "users:write"]), ACTOR
    )
    assert updated.scopes == ["users:read", "users:write"] and updated.name == "reader"
    with store.read() as txn:
        assert roles_by_name(txn, ["reader"])["reader"].scopes == ("users:read", "users:write")

    deleted = await roles.delete(created.id, ACTOR)
    assert (deleted.id, deleted.name, deleted.deleted) == (created.id, "reader", True)
    with pytest.raises(NotFound):
        roles.get(created.id)
    with store.read() as txn:
        assert roles_by_name(txn, ["reader"]) == {}
    assert audit_actions(store) == ["role.create", "role.update", "role.delete"]
    # The name is free again.
    assert (await roles.create(create_req(), ACTOR)).name == "reader"


async def test_names_are_unique(roles: RoleService) -> None:
    first = await roles.create(create_req(), ACTOR)
    with pytest.raises(Conflict) as info:
        await roles.create(create_req(scopes=[]), ACTOR)
    assert info.value.code == "CONFLICT"
    other = await roles.create(create_req(name="writer"), ACTOR)
    with pytest.raises(Conflict):
        await roles.update(other.id, update_req(name="reader"), ACTOR)
    assert roles.get(first.id).name == "reader" and roles.get(other.id).name == "writer"


async def test_a_role_may_have_no_scopes_and_scopes_are_deduplicated(roles: RoleService) -> None:
    label = await roles.create(CreateRoleRequest(name="beta-testers"), ACTOR)
    assert label.scopes == [] and label.description == ""
    twice = await roles.create(create_req(name="twice", scopes=["a", "b", "a"]), ACTOR)
    assert twice.scopes == ["a", "b"]


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"name": ""}, "name"),
        ({"name": "has space"}, "name"),
        ({"name": "comma,separated"}, "name"),
        ({"name": "-leading"}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"name": "ok", "scopes": ["a b"]}, "scopes[0]"),
        ({"name": "ok", "scopes": ["s"] * 101}, "scopes"),
        ({"name": "ok", "description": "d" * 1025}, "description"),
        ({"name": "ok", "extra": 1}, "extra"),
        ({"scopes": []}, "name"),
    ],
)
def test_bad_requests_name_the_field(raw: dict[str, Any], path: str) -> None:
    with pytest.raises(ValidationError) as info:
        convert_all(raw, CreateRoleRequest)
    assert path in [e.path for e in info.value.errors]


async def test_delete_of_a_role_in_use_is_409_until_no_live_key_names_it(
    roles: RoleService, store: MemoryStore
) -> None:
    role = await roles.create(create_req(), ACTOR)
    await put_key(store, KEY_A, ("reader",))
    await put_key(store, KEY_B, ("reader", "other"))
    with pytest.raises(RoleInUse) as info:
        await roles.delete(role.id, ACTOR)
    assert info.value.status == 409 and info.value.code == "ROLE_IN_USE"
    assert KEY_A in info.value.detail
    with pytest.raises(RoleInUse):  # renaming would orphan the keys' references
        await roles.update(role.id, update_req(name="renamed"), ACTOR)
    # Scopes and description can change under the keys: that is the point.
    await roles.update(role.id, update_req(scopes=["x"], description="d"), ACTOR)

    await put_key(store, KEY_A, ("other",))  # PATCHed off the role
    await put_key(store, KEY_B, ("reader",), status="revoked")  # revoked keys do not count
    assert (await roles.update(role.id, update_req(name="renamed"), ACTOR)).name == "renamed"
    await roles.delete(role.id, ACTOR)
    assert roles.list(limit=10).items == []


async def test_stale_index_entries_do_not_block_and_are_dropped(
    roles: RoleService, store: MemoryStore
) -> None:
    role = await roles.create(create_req(), ACTOR)

    def leftovers(txn: WriteTxn) -> None:
        # A purged key, and a key whose record no longer names the role.
        link_roles(txn, KEY_A, (), ("reader",))
        link_roles(txn, KEY_B, (), ("reader",))

    await store.write(leftovers)
    await put_key(store, KEY_B, ("other",))
    with store.read() as txn:
        key_id, stale = role_in_use(txn, "reader")
    assert key_id is None and len(stale) == 2
    await roles.delete(role.id, ACTOR)
    with store.read() as txn:
        assert list(txn.scan(Table.ROLE_MEMBERS, prefix=b"reader\x00")) == []


async def test_lookups_for_the_key_service(roles: RoleService, store: MemoryStore) -> None:
    await roles.create(create_req(), ACTOR)
    await roles.create(create_req(name="writer", scopes=["users:write"]), ACTOR)
    with store.read() as txn:
        assert unknown_roles(txn, ["reader", "nope", "writer", "nope"]) == ["nope"]
        assert set(roles_by_name(txn, ["writer", "nope", "reader"])) == {"writer", "reader"}
        check_roles(txn, ["reader", "writer"])
        with pytest.raises(ValidationError) as info:
            check_roles(txn, ["reader", "nope", "gone"], field="roles")
    assert [e.path for e in info.value.errors] == ["roles[1]", "roles[2]"]


async def test_link_roles_moves_index_entries(store: MemoryStore) -> None:
    def fn(txn: WriteTxn) -> None:
        link_roles(txn, KEY_A, (), ("a", "b"))
        link_roles(txn, KEY_A, ("a", "b"), ("b", "c"))

    await store.write(fn)
    with store.read() as txn:
        entries = sorted(k for k, _ in txn.scan(Table.ROLE_MEMBERS))
    assert entries == [b"b\x00" + KEY_A.encode(), b"c\x00" + KEY_A.encode()]


async def test_listing_pages_newest_first(roles: RoleService, clock: FakeClock) -> None:
    made = []
    for i in range(5):
        made.append((await roles.create(create_req(name=f"r{i}"), ACTOR)).id)
        clock.advance(1)
    first = roles.list(limit=2)
    assert [r.id for r in first.items] == made[:-3:-1] and first.next_cursor
    second = roles.list(limit=2, cursor=first.next_cursor)
    third = roles.list(limit=2, cursor=second.next_cursor)
    seen = [r.id for page in (first, second, third) for r in page.items]
    assert seen == made[::-1] and third.next_cursor is None
    with pytest.raises(ValidationError):
        roles.list(limit=2, cursor="garbage")


@pytest.mark.parametrize("bad", ["nope", "rol_x", "key_01J000000000000000000000AA", ""])
async def test_bad_or_unknown_ids(roles: RoleService, bad: str) -> None:
    with pytest.raises((ValidationError, NotFound)):
        roles.get(bad)
    with pytest.raises((ValidationError, NotFound)):
        await roles.delete(bad, ACTOR)
    with pytest.raises(NotFound):
        roles.resolve(bad or "")
    missing = "rol_01J000000000000000000000AA"
    with pytest.raises(NotFound):
        await roles.update(missing, update_req(description="x"), ACTOR)


async def test_update_records_what_changed(roles: RoleService, store: MemoryStore) -> None:
    role = await roles.create(create_req(), ACTOR)
    await roles.update(role.id, update_req(name="viewer"), ACTOR)
    with store.read() as txn:
        entries = [codec.audit.decode(v) for _, v in txn.scan(Table.AUDIT)]
        assert txn.get(Table.ROLE_NAMES, b"reader") is None
        assert txn.get(Table.ROLE_NAMES, b"viewer") == role.id.encode()
    last = entries[-1]
    assert last.action == "role.update" and last.target_id == role.id
    assert last.details == {"fields": ["name"], "previous_name": "reader"}
    # A record decodes as it was written.
    assert msgspec.structs.asdict(roles.get(role.id))["name"] == "viewer"
