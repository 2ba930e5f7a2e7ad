"""What a key's record says about using it now: pure decisions over stored
records (no I/O but the digest lookup), shared by the key service, the
admin keys and the rotation chains."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from triogate.control.crypto import ServerSecrets
from triogate.control.permissions import scopes_missing
from triogate.errors import KeyVerdict
from triogate.storage import KeyRecord, Store, Table

__all__ = ["effective_status", "find_by_digest", "key_decision"]

# Bound once: the refusals below are module constants, not enum look-ups.
_REVOKED: Final = KeyVerdict.KEY_REVOKED
_ROTATED: Final = KeyVerdict.KEY_ROTATED
_EXPIRED: Final = KeyVerdict.KEY_EXPIRED
_SCOPE: Final = KeyVerdict.INSUFFICIENT_SCOPE


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
    Precedence: revoked, rotated past grace, expired, scopes."""
    status = record.status
    if status == "revoked":
        return _REVOKED
    if status == "rotated" and (record.grace_ends_at is None or now >= record.grace_ends_at):
        return _ROTATED
    if status == "expired" or (record.expires_at is not None and now >= record.expires_at):
        return _EXPIRED
    if required_scopes and scopes_missing(record.scopes, required_scopes):
        return _SCOPE
    return None
