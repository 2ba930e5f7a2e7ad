"""Backups of a live data directory, done the way docs/operations.md says.

A real ``triogate serve`` runs, with keys in it and a client creating more
keys the whole time, while its LMDB environment is copied:

* with the Python ``lmdb`` API: the ``backup_lmdb.py`` script of the page
  (its ```python block), run in a process of its own;
* with ``mdb_copy -c`` when it is installed (Debian: ``lmdb-utils``).

Each copy, with the ``secrets`` file, is restored into a new data directory
and served by a second gateway: the admin key and the API keys validate
there, sealed fields (the owner) read back, a key revoked before the copy is
still revoked, a key made after the copy is unknown, and the copy is one
consistent snapshot (every ``key.create`` audit entry has its key and every
key its entry: they are written in one transaction). A copy restored without
its secrets refuses to start; with secrets from the environment, the LMDB
copy alone is enough.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers_process import run_cli, serving, write_config

DOCS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
MDB_COPY_LINE = 'mdb_copy -c "$DATA_DIR/lmdb" "$BACKUP_DIR"'
ENV_SECRETS = {
    "TRIOGATE_HMAC_SECRET": "1:" + "backup-test-hmac-secret-" * 2,
    "TRIOGATE_ENCRYPTION_KEYS": "1:" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY=",
}
_PYTHON_BLOCK_RE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


# ---- the documented commands ---------------------------------------------------------


def _documented_python_backup() -> str:
    text = DOCS.read_text(encoding="utf-8")
    blocks = [b for b in _PYTHON_BLOCK_RE.findall(text) if "env.copy(" in b]
    assert len(blocks) == 1, "docs/operations.md: expected one ```python block with env.copy("
    return blocks[0]


def _copy_with_python(source: Path, destination: Path, scratch: Path) -> None:
    script = scratch / "backup_lmdb.py"
    script.write_text(_documented_python_backup())
    destination.mkdir(mode=0o700)
    done = subprocess.run(
        [sys.executable, str(script), str(source), str(destination)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"backup_lmdb.py failed:\n{done.stdout}\n{done.stderr}"


def _copy_with_mdb_copy(source: Path, destination: Path) -> None:
    assert MDB_COPY_LINE in DOCS.read_text(encoding="utf-8"), (
        f"docs/operations.md no longer shows {MDB_COPY_LINE!r}: keep this test in step"
    )
    destination.mkdir(mode=0o700)
    done = subprocess.run(
        ["mdb_copy", "-c", str(source), str(destination)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"mdb_copy failed:\n{done.stdout}\n{done.stderr}"


def _restore(backup: Path, data_dir: Path, *, with_secrets: bool) -> Path:
    """docs/operations.md, "Restoring": data.mdb into DATA_DIR/lmdb, the
    secrets file into DATA_DIR."""
    (data_dir / "lmdb").mkdir(parents=True, mode=0o700)
    shutil.copy2(backup / "data.mdb", data_dir / "lmdb" / "data.mdb")
    if with_secrets:
        shutil.copy2(backup / "secrets", data_dir / "secrets")
    return data_dir


# ---- admin API helpers -----------------------------------------------------------------


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _create_key(client: httpx.Client, admin_key: str, name: str) -> dict[str, Any]:
    r = client.post(
        "/keys",
        json={"name": name, "owner": "acme", "scopes": ["users:read"]},
        headers=_bearer(admin_key),
    )
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


def _validate(client: httpx.Client, admin_key: str, key: str) -> dict[str, Any]:
    r = client.post("/keys/validate", json={"key": key}, headers=_bearer(admin_key))
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def _all(client: httpx.Client, admin_key: str, path: str, **query: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100, **query}
    for _ in range(1000):
        r = client.get(path, params=params, headers=_bearer(admin_key))
        assert r.status_code == 200, r.text
        page = r.json()
        items.extend(page["items"])
        if not page["next_cursor"]:
            return items
        params["cursor"] = page["next_cursor"]
    raise AssertionError(f"{path}: paging did not end")


class KeyWriter:
    """Creates keys through the admin API until stopped: the gateway is busy
    writing while it is copied."""

    def __init__(self, url: str, admin_key: str) -> None:
        self.url = url
        self.admin_key = admin_key
        self.created: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __repr__(self) -> str:
        return f"<KeyWriter {len(self.created)} created, {len(self.failures)} failures>"

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.is_set():
                try:
                    created = _create_key(client, self.admin_key, f"busy-{len(self.created)}")
                except (AssertionError, httpx.HTTPError) as exc:
                    self.failures.append(repr(exc))
                    return
                self.created.append(created["id"])

    def start(self, *, at_least: int) -> None:
        self._thread.start()
        deadline = time.monotonic() + 20
        while len(self.created) < at_least and not self.failures:
            assert time.monotonic() < deadline, "the key writer made no progress"
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)
        assert not self._thread.is_alive(), "the key writer did not stop"
        assert not self.failures, self.failures


# ---- one live gateway, copied while it serves ------------------------------------------


@dataclass
class LiveBackup:
    admin_key: str
    active: dict[str, Any]
    revoked: dict[str, Any]
    after: dict[str, Any]  # created once the copies were taken
    busy_before_copy: list[str]
    copies: dict[str, Path] = field(default_factory=dict)  # method -> backup directory


@pytest.fixture(scope="module")
def live_backup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBackup]:
    root = tmp_path_factory.mktemp("live-backup")
    data = root / "data"
    with serving(write_config(root / "source.toml", data)) as server, server.client() as admin:
        r = admin.post("/setup", json={"name": "root", "email": "root@example.com"})
        assert r.status_code == 201, r.text
        admin_key = r.json()["key"]
        active = _create_key(admin, admin_key, "active")
        revoked = _create_key(admin, admin_key, "revoked")
        r = admin.delete(f"/keys/{revoked['id']}", headers=_bearer(admin_key))
        assert r.status_code == 200, r.text

        writer = KeyWriter(server.url, admin_key)
        writer.start(at_least=3)
        busy_before_copy = list(writer.created)
        copies: dict[str, Path] = {}
        try:
            copies["python"] = root / "backup-python"
            _copy_with_python(data / "lmdb", copies["python"], root)
            # Never skipped: without lmdb-utils the test below fails and
            # names the package (tests/system/install.sh installs it).
            if shutil.which("mdb_copy"):
                copies["mdb_copy"] = root / "backup-mdb_copy"
                _copy_with_mdb_copy(data / "lmdb", copies["mdb_copy"])
        finally:
            writer.stop()
        for backup in copies.values():
            shutil.copy2(data / "secrets", backup / "secrets")

        # The gateway went on serving throughout, and goes on after.
        after = _create_key(admin, admin_key, "after")
        assert server.stop() == 0, server.stderr()
    yield LiveBackup(admin_key, active, revoked, after, busy_before_copy, copies)


@pytest.mark.parametrize("method", ["python", "mdb_copy"])
def test_a_restored_copy_serves_the_keys(
    live_backup: LiveBackup, method: str, tmp_path: Path
) -> None:
    if method not in live_backup.copies:
        pytest.fail(
            "mdb_copy is not installed: run tests/system/install.sh "
            "(Debian: apt-get install lmdb-utils)"
        )
    backup = live_backup.copies[method]
    assert (backup / "data.mdb").is_file() and not (backup / "lock.mdb").exists()
    data = _restore(backup, tmp_path / "restored", with_secrets=True)
    admin_key = live_backup.admin_key
    with serving(write_config(tmp_path / "restored.toml", data)) as server, server.client() as c:
        active = _validate(c, admin_key, live_backup.active["key"])
        assert active["valid"] is True, active
        assert active["key_id"] == live_backup.active["id"]
        assert active["owner"] == "acme"  # a sealed field: the encryption key came along

        revoked = _validate(c, admin_key, live_backup.revoked["key"])
        assert (revoked["valid"], revoked["code"]) == (False, "KEY_REVOKED"), revoked

        after = _validate(c, admin_key, live_backup.after["key"])
        assert after == {"valid": False, "code": "INVALID_KEY"}, "a key made after the copy"

        # One consistent snapshot: keys and their audit entries agree exactly.
        keys = {k["id"] for k in _all(c, admin_key, "/keys")}
        created = {e["target_id"] for e in _all(c, admin_key, "/audit", action="key.create")}
        assert keys == created
        assert {live_backup.active["id"], live_backup.revoked["id"]} <= keys
        assert set(live_backup.busy_before_copy) <= keys
        assert live_backup.after["id"] not in keys

        # The restored gateway takes writes of its own.
        fresh = _create_key(c, admin_key, "on-the-restored-copy")
        assert _validate(c, admin_key, fresh["key"])["valid"] is True
        assert server.stop() == 0, server.stderr()


def test_a_copy_without_its_secrets_refuses_to_start(
    live_backup: LiveBackup, tmp_path: Path
) -> None:
    data = _restore(live_backup.copies["python"], tmp_path / "restored", with_secrets=False)
    config = write_config(tmp_path / "restored.toml", data)
    # New secrets would lock every key out for good: the gateway refuses
    # to start instead, with one sentence, and generates nothing.
    done = run_cli("serve", "-c", str(config))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "holds a store but not its secrets" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (data / "secrets").exists()


def test_with_environment_secrets_the_lmdb_copy_is_enough(tmp_path: Path) -> None:
    data = tmp_path / "data"
    source = write_config(tmp_path / "source.toml", data)
    with serving(source, env=ENV_SECRETS) as server, server.client() as c:
        r = c.post("/setup", json={"name": "root", "email": "root@example.com"})
        assert r.status_code == 201, r.text
        admin_key = r.json()["key"]
        key = _create_key(c, admin_key, "env")
        assert not (data / "secrets").exists(), "secrets from the environment: no file"
        _copy_with_python(data / "lmdb", tmp_path / "backup", tmp_path)
        assert server.stop() == 0, server.stderr()

    restored = _restore(tmp_path / "backup", tmp_path / "restored", with_secrets=False)
    config = write_config(tmp_path / "restored.toml", restored)
    with serving(config, env=ENV_SECRETS) as server, server.client() as c:
        result = _validate(c, admin_key, key["key"])
        assert result["valid"] is True and result["owner"] == "acme", result
        assert server.stop() == 0, server.stderr()
