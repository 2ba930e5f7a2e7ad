"""A key's customer fields (issue 12): its identity, plan, roles, keyspace
and ``enabled``: the checks of what a request names, the indexes that
follow a key, and the effective settings of a stored key.

Everything here runs inside the key service's read or write transactions:
a reference is checked in the very write that stores it, so an identity or
plan deleted at the same moment either refuses the key or is refused
itself (``IDENTITY_HAS_KEYS``, ``PLAN_IN_USE``), never both passing.

The indexes follow a key's record (``index_key``, from the old record to
the new one, in the same write):

* ``IDENTITY_KEYS``: every key naming the identity, whatever its status,
  so the identity's usage sums its keys' history (revoked keys included);
* ``PLAN_MEMBERS`` and ``ROLE_MEMBERS`` (``roles.link_roles``): the keys
  that still *use* the plan or role: a revoked key leaves them (revocation
  is final), so it does not keep a plan or role from being deleted.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from triogate.control.audit import Actor, append_audit
from triogate.control.effective import EffectiveKey, effective_key
from triogate.control.ids import is_valid_id
from triogate.control.membership import add_member, remove_member
from triogate.control.plans import find_plan
from triogate.control.roles import link_roles, roles_by_name, unknown_roles
from triogate.errors import FieldError
from triogate.storage import KeyRecord, ReadTxn, Table, WriteTxn, codec
from triogate.storage.records import IdentityRecord

__all__ = [
    "find_identity",
    "identity_disabled",
    "index_key",
    "key_effective",
    "reference_errors",
    "revoke_record",
]


def find_identity(txn: ReadTxn, identity_id: str) -> IdentityRecord | None:
    """The identity, or None when there is none (a malformed id included)."""
    if not is_valid_id(identity_id, "idn"):
        return None
    raw = txn.get(Table.IDENTITIES, identity_id.encode())
    return None if raw is None else codec.identity.decode(raw)


def reference_errors(
    txn: ReadTxn,
    *,
    identity_id: str | None = None,
    plan_id: str | None = None,
    roles: Iterable[str] = (),
) -> list[FieldError]:
    """Every id or name a key request refers to that does not exist, at its
    field path (400 ``VALIDATION_ERROR``, all of them at once)."""
    errors: list[FieldError] = []
    if identity_id is not None and find_identity(txn, identity_id) is None:
        errors.append(FieldError("identity_id", f"no identity {identity_id[:64]!r}"))
    if plan_id is not None and find_plan(txn, plan_id) is None:
        errors.append(FieldError("plan_id", f"no plan {plan_id[:64]!r}"))
    names = list(roles)
    missing = set(unknown_roles(txn, names)) if names else set()
    errors.extend(
        FieldError(f"roles[{i}]", f"no role named {name[:64]!r}")
        for i, name in enumerate(names)
        if name in missing
    )
    return errors


def _uses(record: KeyRecord | None) -> tuple[str | None, str | None, frozenset[str]]:
    """(identity, plan, roles) whose indexes list ``record``."""
    if record is None:
        return None, None, frozenset()
    if record.status == "revoked":
        return record.identity_id, None, frozenset()
    return record.identity_id, record.plan_id, frozenset(record.roles)


def index_key(txn: WriteTxn, old: KeyRecord | None, new: KeyRecord | None) -> None:
    """Move the key's index entries from what ``old`` named to what ``new``
    names (None: the key did not exist / no longer exists)."""
    either = new if new is not None else old
    if either is None:
        return
    key_id = either.id
    old_identity, old_plan, old_roles = _uses(old)
    new_identity, new_plan, new_roles = _uses(new)
    if old_identity != new_identity:
        if old_identity is not None:
            remove_member(txn, Table.IDENTITY_KEYS, old_identity, key_id)
        if new_identity is not None:
            add_member(txn, Table.IDENTITY_KEYS, new_identity, key_id)
    if old_plan != new_plan:
        if old_plan is not None:
            remove_member(txn, Table.PLAN_MEMBERS, old_plan, key_id)
        if new_plan is not None:
            add_member(txn, Table.PLAN_MEMBERS, new_plan, key_id)
    if old_roles != new_roles:
        link_roles(txn, key_id, old_roles, new_roles)


def key_effective(txn: ReadTxn, record: KeyRecord) -> EffectiveKey:
    """The key's effective settings with its plan and roles as stored now."""
    plan = None if record.plan_id is None else find_plan(txn, record.plan_id)
    roles = roles_by_name(txn, record.roles) if record.roles else {}
    return effective_key(record, plan, roles)


def identity_disabled(txn: ReadTxn, record: KeyRecord) -> bool:
    """Whether the key's identity exists and is disabled."""
    if record.identity_id is None:
        return False
    identity = find_identity(txn, record.identity_id)
    return identity is not None and not identity.enabled


def revoke_record(
    txn: WriteTxn,
    record: KeyRecord,
    *,
    now: float,
    actor: Actor,
    details: dict[str, object] | None = None,
) -> KeyRecord:
    """Revoke ``record`` (the caller checked it is not revoked yet): the
    record, its indexes and its ``key.revoke`` audit entry, in ``txn``."""
    updated = msgspec.structs.replace(record, status="revoked", revoked_at=now, updated_at=now)
    txn.put(Table.KEYS, record.id.encode(), codec.encode(updated))
    index_key(txn, record, updated)
    append_audit(
        txn,
        actor=actor,
        action="key.revoke",
        target_id=record.id,
        now=now,
        details=dict(details) if details else None,
    )
    return updated
