"""What a key's record says about using it now: pure decisions over stored
records (no I/O but the digest lookup), shared by the key service, the
admin keys and the rotation chains."""

from __future__ import annotations

from collections.abc import Sequence

from triogate.control.crypto import HmacKeyring
from triogate.control.permissions import scopes_missing
from triogate.storage import KeyRecord, Store, Table

__all__ = ["effective_status", "find_by_digest", "key_decision"]


def find_by_digest(
    store: Store, keyring: HmacKeyring, plaintext: str, index: Table, table: Table
) -> tuple[bytes, bytes, int] | None:
    """The stored record whose digest of ``plaintext`` is in ``index``, trying
    the current HMAC version first, then older ones: (record bytes, digest,
    version), or None. Shared by API keys and admin keys."""
    for version in keyring.versions:
        digest = keyring.digest(plaintext, version)
        raw = store.get_through(index, digest, table)
        if raw is not None:
            return raw, digest, version
    return None


def effective_status(record: KeyRecord, now: float) -> str:
    if record.status == "active" and record.expires_at is not None and now >= record.expires_at:
        return "expired"
    return record.status


def key_decision(record: KeyRecord, now: float, required_scopes: Sequence[str] = ()) -> str | None:
    """None if the key may be used now for ``required_scopes``, else the error
    code. Precedence: revoked, rotated past grace, expired, scopes."""
    status = record.status
    if status == "revoked":
        return "KEY_REVOKED"
    if status == "rotated" and (record.grace_ends_at is None or now >= record.grace_ends_at):
        return "KEY_ROTATED"
    if status == "expired" or (record.expires_at is not None and now >= record.expires_at):
        return "KEY_EXPIRED"
    if required_scopes and scopes_missing(record.scopes, required_scopes):
        return "INSUFFICIENT_SCOPE"
    return None
