"""Roles: named bundles of scopes that keys refer to by name.

For the key service (CP1, ``control/keys.py``) -- what to call:

* ``check_roles(txn, names, field="roles")`` inside the write function of a
  key create / PATCH: raises ``ValidationError`` with ``roles[i]`` for each
  name that has no role (``unknown_roles`` gives the bare list).
* ``link_roles(txn, key_id, old_names, new_names)`` in the same write
  function, whenever a key's roles change: create (``()`` -> roles), PATCH
  (old -> new), rotate (``()`` -> the new key's roles; the old key keeps its
  entries until it is purged), revoke (roles -> ``()``). It keeps
  ``Table.ROLE_MEMBERS`` (role name + 0 + key id), which ``DELETE /roles``
  reads to refuse deleting a role some key names (409 ``ROLE_IN_USE``). An
  entry left behind (a purged key) is harmless: the delete re-reads each
  key it finds and drops stale entries.
* ``roles_by_name(txn, names)`` for the data plane and ``effective``: the
  live ``RoleRecord`` of each name that has one, read in the caller's
  snapshot, so a PATCHed role counts from the next request on in every
  process. A role deleted since grants nothing.

Theory of operation
-------------------
A role is ``RoleRecord`` under its id (``rol_…``) in ``Table.ROLES``, and its
name in ``Table.ROLE_NAMES`` (name -> id): names are unique and are what keys,
``deny_roles`` and ``X-Key-Roles`` use. A name is 1-64 characters of letters,
digits and ``_ . : -`` starting with a letter or digit, case-sensitive: it
fits in a header list without quoting. A role may have no scopes: it is then a
group label (for ``deny_roles``, ``X-Key-Roles``). A role's name can change
only while no key names it (keys carry names; renaming under them would
silently drop their scopes). Every change is one write function that re-reads
what it decides on, writes record, indexes and audit entry together.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from triogate.control.audit import Actor, append_audit
from triogate.control.ids import is_valid_id, new_id
from triogate.control.models import Scope
from triogate.control.paging import decode_cursor, take_page
from triogate.control.timeutil import Clock, system_clock, utc_required
from triogate.errors import Conflict, FieldError, NotFound, RoleInUse, ValidationError
from triogate.storage import KeyRecord, ReadTxn, Store, Table, WriteTxn, codec
from triogate.storage.records import RoleRecord

__all__ = [
    "MAX_ROLE_SCOPES",
    "ROLE_NAME_PATTERN",
    "CreateRoleRequest",
    "DeletedRole",
    "RoleName",
    "RolePage",
    "RoleService",
    "RoleView",
    "UpdateRoleRequest",
    "check_roles",
    "link_roles",
    "role_in_use",
    "roles_by_name",
    "unknown_roles",
]

ROLE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
MAX_ROLE_SCOPES = 100
_SEP = b"\x00"

RoleName = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=64,
        pattern=ROLE_NAME_PATTERN,
        description="1-64 letters, digits, '_', '.', ':' or '-', starting with a letter or digit",
    ),
]
RoleScopes = Annotated[
    list[Scope],
    Meta(max_length=MAX_ROLE_SCOPES, description=f"at most {MAX_ROLE_SCOPES}; may be empty"),
]
Description = Annotated[str, Meta(max_length=1024, description="free text, at most 1024")]


class CreateRoleRequest(Struct, forbid_unknown_fields=True):
    name: RoleName
    scopes: RoleScopes = []
    description: Description = ""


class UpdateRoleRequest(Struct, forbid_unknown_fields=True):
    name: RoleName | UnsetType = UNSET
    scopes: RoleScopes | UnsetType = UNSET
    description: Description | UnsetType = UNSET


class RoleView(Struct):
    id: str
    name: str
    scopes: list[str]
    description: str
    created_at: datetime
    updated_at: datetime


class RolePage(Struct):
    items: list[RoleView]
    next_cursor: str | None


class DeletedRole(Struct):
    id: str
    name: str
    deleted: bool = True


# ---- what the key service and the data plane call ---------------------------------


def _role_id(txn: ReadTxn, name: str) -> bytes | None:
    return txn.get(Table.ROLE_NAMES, name.encode())


def unknown_roles(txn: ReadTxn, names: Sequence[str]) -> list[str]:
    """The names in ``names`` that no role has (in order, each once)."""
    return [n for n in dict.fromkeys(names) if _role_id(txn, n) is None]


def check_roles(txn: ReadTxn, names: Sequence[str], field: str = "roles") -> None:
    """Raise a 400 with ``field[i]`` for every name that has no role."""
    missing = set(unknown_roles(txn, names))
    if missing:
        raise ValidationError(
            [
                FieldError(f"{field}[{i}]", f"no role named {name!r}")
                for i, name in enumerate(names)
                if name in missing
            ]
        )


def roles_by_name(txn: ReadTxn, names: Iterable[str]) -> dict[str, RoleRecord]:
    """The role of each name that has one (a deleted role is left out)."""
    found: dict[str, RoleRecord] = {}
    for name in names:
        role_id = _role_id(txn, name)
        if role_id is None:
            continue
        raw = txn.get(Table.ROLES, role_id)
        if raw is not None:
            found[name] = codec.role.decode(raw)
    return found


def _member_key(name: str, key_id: str) -> bytes:
    return name.encode() + _SEP + key_id.encode()


def link_roles(
    txn: WriteTxn, key_id: str, old_names: Iterable[str], new_names: Iterable[str]
) -> None:
    """Record that key ``key_id`` now names ``new_names`` instead of
    ``old_names`` (in ``Table.ROLE_MEMBERS``)."""
    old, new = set(old_names), set(new_names)
    for name in old - new:
        txn.delete(Table.ROLE_MEMBERS, _member_key(name, key_id))
    for name in new - old:
        txn.put(Table.ROLE_MEMBERS, _member_key(name, key_id), b"")


def _names_role(record: KeyRecord | None, name: str) -> bool:
    return record is not None and record.status != "revoked" and name in record.roles


def role_in_use(txn: ReadTxn, name: str) -> tuple[str | None, list[bytes]]:
    """The first key (not revoked) naming role ``name``, or None; and the
    index entries seen before it that name no such key (stale)."""
    prefix = name.encode() + _SEP
    stale: list[bytes] = []
    for entry, _ in txn.scan(Table.ROLE_MEMBERS, prefix=prefix):
        key_id = entry[len(prefix) :]
        raw = txn.get(Table.KEYS, key_id)
        if _names_role(None if raw is None else codec.key.decode(raw), name):
            return key_id.decode(), stale
        stale.append(entry)
    return None, stale


# ---- the admin API's service ------------------------------------------------------


def _view(record: RoleRecord) -> RoleView:
    return RoleView(
        id=record.id,
        name=record.name,
        scopes=list(record.scopes),
        description=record.description,
        created_at=utc_required(record.created_at),
        updated_at=utc_required(record.updated_at),
    )


def _in_use(txn: WriteTxn, role: RoleRecord, doing: str) -> None:
    """Raise ``RoleInUse`` if a key names ``role``; drop stale index entries."""
    key_id, stale = role_in_use(txn, role.name)
    if key_id is not None:
        raise RoleInUse(
            f"role {role.name!r} is named by key {key_id} (and maybe others): "
            f"take it off those keys before you {doing} it"
        )
    for entry in stale:
        txn.delete(Table.ROLE_MEMBERS, entry)


class RoleService:
    def __init__(self, store: Store, *, clock: Clock = system_clock) -> None:
        self._store = store
        self._clock = clock

    def __repr__(self) -> str:
        return f"<RoleService store={self._store!r}>"

    @staticmethod
    def _load(txn: ReadTxn, role_id: str) -> RoleRecord:
        if not is_valid_id(role_id, "rol"):
            raise ValidationError.single("id", "not a role id")
        raw = txn.get(Table.ROLES, role_id.encode())
        if raw is None:
            raise NotFound(f"no role {role_id}")
        return codec.role.decode(raw)

    @staticmethod
    def _claim_name(txn: WriteTxn, name: str, role_id: str) -> None:
        if _role_id(txn, name) is not None:
            raise Conflict(f"a role named {name!r} exists")
        txn.put(Table.ROLE_NAMES, name.encode(), role_id.encode())

    def resolve(self, ref: str) -> str:
        """The id of the role ``ref`` names: an id as is, else a name
        (the CLI takes either). NotFound for a name no role has."""
        if is_valid_id(ref, "rol"):
            return ref
        with self._store.read() as txn:
            role_id = _role_id(txn, ref) if ref else None
        if role_id is None:
            raise NotFound(f"no role named {ref[:64]!r}")
        return role_id.decode()

    def get(self, role_id: str) -> RoleView:
        with self._store.read() as txn:
            return _view(self._load(txn, role_id))

    def list(self, *, limit: int, cursor: str | None = None) -> RolePage:
        after = decode_cursor(cursor, "rol")
        with self._store.read() as txn:
            rows = (
                (k.decode(), codec.role.decode(v))
                for k, v in txn.scan(Table.ROLES, after=after, reverse=True)
            )
            items, next_cursor = take_page(rows, limit=limit, keep=lambda _: True, view=_view)
        return RolePage(items=items, next_cursor=next_cursor)

    async def create(self, req: CreateRoleRequest, actor: Actor) -> RoleView:
        now = self._clock()
        record = RoleRecord(
            id=new_id("rol", now),
            name=req.name,
            scopes=tuple(dict.fromkeys(req.scopes)),
            created_at=now,
            updated_at=now,
            description=req.description,
        )

        def fn(txn: WriteTxn) -> None:
            self._claim_name(txn, record.name, record.id)
            txn.put(Table.ROLES, record.id.encode(), codec.encode(record))
            append_audit(
                txn,
                actor=actor,
                action="role.create",
                target_id=record.id,
                now=now,
                details={"name": record.name, "scopes": list(record.scopes)},
            )

        await self._store.write(fn)
        return _view(record)

    async def update(self, role_id: str, req: UpdateRoleRequest, actor: Actor) -> RoleView:
        now = self._clock()
        fields = [f for f in req.__struct_fields__ if getattr(req, f) is not UNSET]

        def fn(txn: WriteTxn) -> RoleRecord:
            record = self._load(txn, role_id)
            changes: dict[str, Any] = {"updated_at": now}
            details: dict[str, Any] = {"fields": fields}
            if not isinstance(req.name, UnsetType) and req.name != record.name:
                _in_use(txn, record, "rename")
                self._claim_name(txn, req.name, role_id)
                txn.delete(Table.ROLE_NAMES, record.name.encode())
                changes["name"] = req.name
                details["previous_name"] = record.name
            if not isinstance(req.scopes, UnsetType):
                changes["scopes"] = tuple(dict.fromkeys(req.scopes))
                details["scopes"] = list(changes["scopes"])
            if not isinstance(req.description, UnsetType):
                changes["description"] = req.description
            updated = msgspec.structs.replace(record, **changes)
            txn.put(Table.ROLES, role_id.encode(), codec.encode(updated))
            append_audit(
                txn, actor=actor, action="role.update", target_id=role_id, now=now, details=details
            )
            return updated

        return _view(await self._store.write(fn))

    async def delete(self, role_id: str, actor: Actor) -> DeletedRole:
        now = self._clock()

        def fn(txn: WriteTxn) -> RoleRecord:
            record = self._load(txn, role_id)
            _in_use(txn, record, "delete")
            txn.delete(Table.ROLES, role_id.encode())
            txn.delete(Table.ROLE_NAMES, record.name.encode())
            append_audit(
                txn,
                actor=actor,
                action="role.delete",
                target_id=role_id,
                now=now,
                details={"name": record.name},
            )
            return record

        record = await self._store.write(fn)
        return DeletedRole(id=record.id, name=record.name)
