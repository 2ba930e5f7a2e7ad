import base64
import os
import stat
from pathlib import Path

import pytest

from triogate.control.crypto import (
    HmacKeyring,
    Sealer,
    add_hmac_version,
    load_secrets,
)
from triogate.errors import SecretsError


def test_seal_roundtrip_and_binding_to_record() -> None:
    sealer = Sealer({1: os.urandom(32)})
    blob = sealer.seal(b"alice@example.com", b"key_1")
    assert b"alice" not in blob
    assert sealer.open(blob, b"key_1") == b"alice@example.com"
    with pytest.raises(SecretsError):
        sealer.open(blob, b"key_2")  # moved onto another record
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(SecretsError):
        sealer.open(tampered, b"key_1")
    with pytest.raises(SecretsError):
        sealer.open(b"short", b"key_1")


def test_old_encryption_versions_still_open_after_rotation() -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    old = Sealer({1: k1}).seal(b"x", b"id")
    both = Sealer({1: k1, 2: k2})
    assert both.current == 2
    assert both.open(old, b"id") == b"x"
    new = both.seal(b"y", b"id")
    assert new[1:3] == (2).to_bytes(2, "big")
    with pytest.raises(SecretsError):
        Sealer({1: k1}).open(new, b"id")


def test_encryption_key_must_be_32_bytes() -> None:
    with pytest.raises(SecretsError):
        Sealer({1: b"short"})


def test_hmac_keyring_versions_newest_first() -> None:
    ring = HmacKeyring({1: b"a" * 32, 3: b"c" * 32, 2: b"b" * 32})
    assert ring.versions == (3, 2, 1)
    assert ring.current == 3
    assert ring.digest("k") == ring.digest("k", 3) != ring.digest("k", 1)
    assert len(ring.tag("owner", "alice")) == 16


def test_secrets_file_generated_once_with_mode_0600(tmp_path: Path) -> None:
    first = load_secrets(tmp_path, environ={})
    path = tmp_path / "secrets"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = load_secrets(tmp_path, environ={})
    assert first.hmac.digest("x") == second.hmac.digest("x")
    assert second.sealer.open(first.sealer.seal(b"v", b"a"), b"a") == b"v"


def test_environment_secrets_win_and_write_no_file(tmp_path: Path) -> None:
    env = {
        "TRIOGATE_HMAC_SECRET": "s" * 32 + ",2:" + "t" * 32,
        "TRIOGATE_ENCRYPTION_KEYS": "1:" + base64.b64encode(os.urandom(32)).decode(),
    }
    secrets = load_secrets(tmp_path, environ=env)
    assert secrets.source == "environment"
    assert secrets.hmac.versions == (2, 1)
    assert not (tmp_path / "secrets").exists()


@pytest.mark.parametrize(
    "env",
    [
        {"TRIOGATE_HMAC_SECRET": "short", "TRIOGATE_ENCRYPTION_KEYS": "1:" + "A" * 44},
        {"TRIOGATE_HMAC_SECRET": "s" * 32, "TRIOGATE_ENCRYPTION_KEYS": "nobase64"},
        {"TRIOGATE_HMAC_SECRET": "s" * 32, "TRIOGATE_ENCRYPTION_KEYS": "1:!!!"},
        {
            "TRIOGATE_HMAC_SECRET": "s" * 32,
            "TRIOGATE_ENCRYPTION_KEYS": "1:" + base64.b64encode(b"x" * 16).decode(),
        },
        {
            "TRIOGATE_HMAC_SECRET": "0:" + "s" * 32,
            "TRIOGATE_ENCRYPTION_KEYS": "1:" + base64.b64encode(b"x" * 32).decode(),
        },
    ],
)
def test_bad_environment_secrets_are_refused(tmp_path: Path, env: dict[str, str]) -> None:
    with pytest.raises(SecretsError):
        load_secrets(tmp_path, environ=env)


def test_add_hmac_version_keeps_old_versions(tmp_path: Path) -> None:
    before = load_secrets(tmp_path, environ={})
    assert add_hmac_version(tmp_path) == 2
    after = load_secrets(tmp_path, environ={})
    assert after.hmac.current == 2
    assert after.hmac.digest("k", 1) == before.hmac.digest("k")
    assert stat.S_IMODE((tmp_path / "secrets").stat().st_mode) == 0o600
