"""The pure decision of whether a key may be used now (no I/O), and the one
table from its verdicts to the errors that refuse a request."""

import msgspec
import pytest

from triogate.control.keys import effective_status, key_decision
from triogate.errors import KEY_ERRORS, GatewayError, KeyVerdict
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
        (rec(), ("orders:write",), KeyVerdict.INSUFFICIENT_SCOPE),
        (rec(status="revoked"), (), KeyVerdict.KEY_REVOKED),
        (rec(status="revoked", expires_at=NOW - 1), (), KeyVerdict.KEY_REVOKED),
        (rec(status="rotated", grace_ends_at=NOW + 1), (), None),
        (rec(status="rotated", grace_ends_at=NOW), (), KeyVerdict.KEY_ROTATED),
        (rec(status="rotated", grace_ends_at=None), (), KeyVerdict.KEY_ROTATED),
        (rec(expires_at=NOW + 0.001), (), None),
        (rec(expires_at=NOW), (), KeyVerdict.KEY_EXPIRED),
        (rec(status="expired"), (), KeyVerdict.KEY_EXPIRED),
        (
            rec(expires_at=NOW - 1),
            ("orders:write",),
            KeyVerdict.KEY_EXPIRED,
        ),  # expiry before scopes
        (rec(status="rotated", grace_ends_at=NOW + 5), ("nope",), KeyVerdict.INSUFFICIENT_SCOPE),
    ],
)
def test_key_decision(record: KeyRecord, scopes: tuple[str, ...], code: KeyVerdict | None) -> None:
    assert key_decision(record, NOW, scopes) is code


def test_every_verdict_is_refused_by_the_error_with_its_code() -> None:
    # One table, complete, and a verdict's value is its error's public code:
    # the admin API's `code` and the data plane's problem+json agree.
    assert set(KEY_ERRORS) == set(KeyVerdict)
    for verdict, (cls, detail) in KEY_ERRORS.items():
        assert issubclass(cls, GatewayError)
        assert cls.code == verdict.value == verdict
        assert isinstance(verdict, str) and detail
    assert msgspec.json.encode({"code": KeyVerdict.KEY_REVOKED}) == b'{"code":"KEY_REVOKED"}'


def test_effective_status() -> None:
    assert effective_status(rec(expires_at=NOW - 1), NOW) == "expired"
    assert effective_status(rec(expires_at=NOW + 1), NOW) == "active"
    assert effective_status(rec(status="revoked", expires_at=NOW - 1), NOW) == "revoked"
