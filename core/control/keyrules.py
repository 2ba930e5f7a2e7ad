"""What a key's record says about using it now: pure decisions over stored
records (no I/O but the digest lookup), shared by the key service, the
admin keys, the rotation chains, the data plane's key-auth and the admin
API's ``POST /keys/validate``.

Precedence of refusals (``access_decision``): another keyspace than the
route's is ``INVALID_KEY`` (as if unknown: a route tells nothing about keys
it does not take); then revoked, rotated past its grace, expired (401s,
which win over disabled); then disabled, the key or its identity (403
``KEY_DISABLED``); then a denied role (403 ``ROLE_DENIED``); then scopes,
all of ``scopes`` and one of ``any_scopes`` (403 ``INSUFFICIENT_SCOPE``).
Scopes are the key's *effective* ones (``control.effective``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from triogate.control.crypto import ServerSecrets
from triogate.control.permissions import scopes_missing
from triogate.errors import KeyVerdict
from triogate.policy.keyaccess import KeyRule
from triogate.storage import KeyRecord, Store, Table

__all__ = [
    "access_decision",
    "effective_status",
    "find_by_digest",
    "key_decision",
    "scopes_refused",
]

# Bound once: the refusals below are module constants, not enum look-ups.
_REVOKED: Final = KeyVerdict.KEY_REVOKED
_ROTATED: Final = KeyVerdict.KEY_ROTATED
_EXPIRED: Final = KeyVerdict.KEY_EXPIRED
_SCOPE: Final = KeyVerdict.INSUFFICIENT_SCOPE
_DISABLED: Final = KeyVerdict.KEY_DISABLED
_ROLE_DENIED: Final = KeyVerdict.ROLE_DENIED
_INVALID: Final = KeyVerdict.INVALID_KEY


def find_by_digest(
    store: Store, secrets: ServerSecrets, plaintext: str, index: Table, table: Table
) -> tuple[bytes, bytes, int] | None:
    """The stored record whose digest of ``plaintext`` is in ``index``, trying
    the current HMAC version first, then older ones: (record bytes, digest,
    version), or None. Shared by API keys and admin keys.

    On a miss, HMAC versions another process added to the secrets file
    (``triogate secrets rotate-hmac``, then a key made under it) are picked
    up: ``refresh_if_changed`` looks at the file at most once a second, and
    only when it changed is it read and the lookup tried again (once: the
    next look is a second away). Read ``secrets.hmac`` again after this
    call: it may be a newer keyring."""
    keyring = secrets.hmac
    for version in keyring.versions:
        digest = keyring.digest(plaintext, version)
        raw = store.get_through(index, digest, table)
        if raw is not None:
            return raw, digest, version
    if secrets.refresh_if_changed() and secrets.hmac is not keyring:
        return find_by_digest(store, secrets, plaintext, index, table)
    return None


def effective_status(record: KeyRecord, now: float) -> str:
    if record.status == "active" and record.expires_at is not None and now >= record.expires_at:
        return "expired"
    return record.status


def key_decision(
    record: KeyRecord, now: float, required_scopes: Sequence[str] = ()
) -> KeyVerdict | None:
    """None if the key may be used now for ``required_scopes``, else why not.
    Precedence: revoked, rotated past grace, expired, disabled, scopes (the
    key's own: a key with a plan, an identity or roles goes through
    ``access_decision`` with its effective scopes)."""
    status = record.status
    if status == "revoked":
        return _REVOKED
    if status == "rotated" and (record.grace_ends_at is None or now >= record.grace_ends_at):
        return _ROTATED
    if status == "expired" or (record.expires_at is not None and now >= record.expires_at):
        return _EXPIRED
    if not record.enabled:
        return _DISABLED
    if required_scopes and scopes_missing(record.scopes, required_scopes):
        return _SCOPE
    return None


def access_decision(
    record: KeyRecord,
    now: float,
    rule: KeyRule,
    *,
    scopes: Sequence[str],
    identity_enabled: bool = True,
    refused: Sequence[str] | None = None,
) -> KeyVerdict | None:
    """None if the key may be used now on a route asking ``rule``, else why
    not (the module docstring's precedence). ``scopes`` are the key's
    effective scopes; ``identity_enabled`` is False when the key's identity
    is disabled; ``refused`` is ``scopes_refused(scopes, rule)`` if the
    caller knows it already. Roles are denied by the names the key carries."""
    keyspace = rule.keyspace
    if keyspace is not None and record.keyspace != keyspace:
        return _INVALID
    verdict = key_decision(record, now)
    if verdict is not None:
        return verdict
    if not identity_enabled:
        return _DISABLED
    if rule.deny_roles and record.roles and not rule.deny_roles.isdisjoint(record.roles):
        return _ROLE_DENIED
    if refused is None:
        refused = scopes_refused(scopes, rule)
    if refused:
        return _SCOPE
    return None


def scopes_refused(scopes: Sequence[str], rule: KeyRule) -> list[str]:
    """What the refusal names when ``scopes`` do not satisfy ``rule``: the
    missing ones of ``scopes``, else (none of ``any_scopes`` is granted)
    every one of ``any_scopes``; empty when the scopes satisfy the rule."""
    if rule.scopes:
        missing = scopes_missing(scopes, rule.scopes)
        if missing:
            return missing
    any_scopes = rule.any_scopes
    if any_scopes and len(scopes_missing(scopes, any_scopes)) == len(any_scopes):
        return list(any_scopes)
    return []
