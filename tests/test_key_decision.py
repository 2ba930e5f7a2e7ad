"""The pure decision of whether a key may be used now (no I/O)."""

import msgspec
import pytest

from triogate.control.keys import effective_status, key_decision
from triogate.storage import KeyRecord
from triogate.testing import key_record

NOW = 1_800_000_000.0
BASE = key_record(scopes=("users:*", "orders:read"), created_at=NOW - 100, updated_at=NOW - 100)


def rec(**changes: object) -> KeyRecord:
    return msgspec.structs.replace(BASE, **changes)


@pytest.mark.parametrize(
    ("record", "scopes", "code"),
    [
        (rec(), (), None),
        (rec(), ("users:write", "orders:read"), None),
        (rec(), ("orders:write",), "INSUFFICIENT_SCOPE"),
        (rec(status="revoked"), (), "KEY_REVOKED"),
        (rec(status="revoked", expires_at=NOW - 1), (), "KEY_REVOKED"),
        (rec(status="rotated", grace_ends_at=NOW + 1), (), None),
        (rec(status="rotated", grace_ends_at=NOW), (), "KEY_ROTATED"),
        (rec(status="rotated", grace_ends_at=None), (), "KEY_ROTATED"),
        (rec(expires_at=NOW + 0.001), (), None),
        (rec(expires_at=NOW), (), "KEY_EXPIRED"),
        (rec(status="expired"), (), "KEY_EXPIRED"),
        (rec(expires_at=NOW - 1), ("orders:write",), "KEY_EXPIRED"),  # expiry before scopes
        (rec(status="rotated", grace_ends_at=NOW + 5), ("nope",), "INSUFFICIENT_SCOPE"),
    ],
)
def test_key_decision(record: KeyRecord, scopes: tuple[str, ...], code: str | None) -> None:
    assert key_decision(record, NOW, scopes) == code


def test_effective_status() -> None:
    assert effective_status(rec(expires_at=NOW - 1), NOW) == "expired"
    assert effective_status(rec(expires_at=NOW + 1), NOW) == "active"
    assert effective_status(rec(status="revoked", expires_at=NOW - 1), NOW) == "revoked"
