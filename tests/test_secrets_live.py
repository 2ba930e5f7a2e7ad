"""A running gateway picks up HMAC secret versions another process added
(``triogate secrets rotate-hmac``) without a restart: on a reload, and on a
digest miss once the secrets file changed (looked at, one ``stat()``, at
most once a second; read only when it changed). Nothing is regenerated, and
a file that is not these secrets any more is not taken."""

from __future__ import annotations

import http.server
import json
import logging
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

import triogate.control.crypto as crypto
from tests.helpers_process import run_cli, serving
from triogate.config import parse_config
from triogate.control.audit import Actor
from triogate.control.crypto import ServerSecrets, add_hmac_version, load_secrets
from triogate.control.keys import KeyService
from triogate.control.models import CreateKeyRequest
from triogate.runtime.gateway import open_gateway
from triogate.storage import MemoryStore

ACTOR = Actor("test")
REQ = msgspec.convert({"name": "n", "owner": "o", "scopes": []}, CreateKeyRequest)


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Counting:
    """Wraps a function of ``triogate.control.crypto``, counting its calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.calls = 0
        real = getattr(crypto, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(crypto, name, counted)


def _live(data_dir: Path, clock: FakeMonotonic) -> tuple[MemoryStore, ServerSecrets, KeyService]:
    secrets = load_secrets(data_dir, environ={})
    secrets.monotonic = clock
    store = MemoryStore()
    return store, secrets, KeyService(store, secrets)


async def test_a_key_made_under_a_newer_version_validates_after_one_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeMonotonic()
    store, secrets, running = _live(tmp_path, clock)
    before = await running.create(REQ, ACTOR)
    stats = Counting(monkeypatch, "file_signature")
    reads = Counting(monkeypatch, "_read_file")

    # A flood of unknown keys: one stat() for the first, none for the rest
    # of the second, and never a read (the file did not change).
    for _ in range(1000):
        assert running.validate_nowait(running.format.generate())[0] is None
    assert (stats.calls, reads.calls) == (1, 0)
    clock.now += 0.5
    assert running.validate_nowait(running.format.generate())[0] is None
    assert (stats.calls, reads.calls) == (1, 0)

    # Another process rotates the HMAC secret and makes a key under it.
    assert add_hmac_version(tmp_path) == 2
    other = KeyService(store, load_secrets(tmp_path, environ={}))
    created = await other.create(REQ, ACTOR)
    reads.calls = 0
    # Within the second: not looked at yet, so not known yet.
    assert running.validate_nowait(created.key)[0] is None
    clock.now += 0.5
    stats.calls = 0
    record, verdict, stale = running.validate_nowait(created.key)
    assert record is not None and record.id == created.id and verdict is None and not stale
    # Looked at, read (looked at just before), taken.
    assert (stats.calls, reads.calls) == (2, 1)
    assert secrets.hmac.versions == (2, 1)
    # New keys are now made under version 2; the old key still validates.
    assert (await running.create(REQ, ACTOR)).key != created.key
    assert (await running.validate(before.key)).valid

    # Nothing changed since: misses go back to one stat() a second, no read.
    clock.now += 5
    stats.calls = reads.calls = 0
    for _ in range(100):
        assert running.validate_nowait(running.format.generate())[0] is None
    assert (stats.calls, reads.calls) == (1, 0)


async def test_other_secrets_in_the_file_are_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeMonotonic()
    _, secrets, running = _live(tmp_path, clock)
    key = await running.create(REQ, ACTOR)
    in_use = secrets.fingerprints()
    path = tmp_path / "secrets"
    original = path.read_text()

    # Someone put other secrets in place: kept what runs, said so once.
    path.unlink()
    load_secrets(tmp_path, environ={})  # generates a new file
    reads = Counting(monkeypatch, "_read_file")
    with caplog.at_level(logging.ERROR, logger="triogate.control.crypto"):
        for _ in range(3):
            assert running.validate_nowait(running.format.generate())[0] is None
            clock.now += 1.5
    assert secrets.fingerprints() == in_use
    assert reads.calls == 1
    assert [r.message for r in caplog.records if "not the same secrets" in r.message]
    assert (await running.validate(key.key)).valid

    # A file that lost a version is not taken either.
    doc = json.loads(original)
    add_hmac_version(tmp_path)  # on the foreign file; then ours, minus v1
    doc["hmac"] = {"2": json.loads(path.read_text())["hmac"]["2"]}
    path.write_text(json.dumps(doc))
    assert not secrets.refresh()
    assert secrets.fingerprints() == in_use

    # A file that went missing: nothing is generated, nothing changes.
    path.unlink()
    assert not secrets.refresh()
    clock.now += 1.5
    assert running.validate_nowait(running.format.generate())[0] is None
    assert not path.exists()
    assert secrets.fingerprints() == in_use


def test_secrets_from_the_environment_are_never_reread(monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = load_secrets(
        Path("/nonexistent"),
        environ={
            "TRIOGATE_HMAC_SECRET": "s" * 32,
            "TRIOGATE_ENCRYPTION_KEYS": "1:" + "A" * 43 + "=",
        },
    )
    stats = Counting(monkeypatch, "file_signature")
    assert not secrets.refresh_if_changed() and not secrets.refresh()
    assert stats.calls == 0


async def test_a_reload_takes_the_new_versions(tmp_path: Path) -> None:
    data = tmp_path / "data"
    source = tmp_path / "c.toml"
    source.write_text(f'[server]\ndata_dir = "{data}"\n')
    config = parse_config({"server": {"data_dir": str(data)}}, environ={})
    async with open_gateway(config, source=str(source)) as gw:
        assert gw.secrets.hmac.versions == (1,)
        assert add_hmac_version(data) == 2
        await gw.configs.reload(ACTOR)  # no key lookup in between
        assert gw.secrets.hmac.versions == (2, 1)
        created = await gw.keys.create(REQ, ACTOR)
        record, _ = gw.keys.lookup_nowait(created.key)
        assert record is not None and record.digest_version == 2


# ---- end to end: a running `triogate serve` ------------------------------------


class _Ok(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _cli_key(data: Path) -> str:
    res = run_cli(
        "keys", "create", "--data-dir", str(data), "--name", "n", "--owner", "o", "--json"
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    key: str = json.loads(res.stdout)["key"]
    return key


def _wait_for(what: str, check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def test_a_running_server_accepts_keys_made_after_rotate_hmac(
    tmp_path: Path, upstream: str
) -> None:
    data = tmp_path / "data"
    config = tmp_path / "c.toml"
    config.write_text(
        f"""
[server]
admin_listen = "127.0.0.1:0"
proxy_listen = "127.0.0.1:0"
data_dir = "{data}"
shutdown_grace_seconds = 5

[upstreams.ok]
targets = ["{upstream}"]

[[routes]]
name = "all"
path = "/{{rest:path}}"
upstream = "ok"
[routes.plugins]
key-auth = {{}}
"""
    )
    with serving(config) as sp:
        line = _wait_for(
            "the proxy's address",
            lambda: next((x for x in sp.stdout_lines if "proxy listening on" in x), None),
        )
        match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        assert match is not None, line
        with httpx.Client(base_url=match.group(1), timeout=10) as proxy:

            def status(key: str) -> int:
                return proxy.get("/x", headers={"x-api-key": key}).status_code

            before = _cli_key(data)
            assert status(before) == 200
            fingerprint_v1 = json.loads((data / "secrets").read_text())["hmac"]["1"]

            # Rotated and a key made by other processes: accepted, no restart
            # (a digest miss looks at the changed file: within a second).
            rotated = run_cli("secrets", "rotate-hmac", "--data-dir", str(data))
            assert rotated.returncode == 0, rotated.stderr
            after = _cli_key(data)
            _wait_for("the key made after rotate-hmac", lambda: status(after) == 200)
            assert status(before) == 200

            # A reload (SIGHUP) takes a rotation before any key needs it.
            assert run_cli("secrets", "rotate-hmac", "--data-dir", str(data)).returncode == 0
            sp.proc.send_signal(signal.SIGHUP)
            _wait_for(
                "the reload's secrets line",
                lambda: "HMAC versions [1, 2, 3] (current 3)" in sp.stderr(),
            )
            newest = _cli_key(data)
            _wait_for("the key made after the reload", lambda: status(newest) == 200)
            assert (status(before), status(after)) == (200, 200)
            assert status("tg_" + "A" * 40) == 401
        assert sp.stop() == 0
    # Nothing was regenerated: version 1 is the one the data directory began with.
    assert json.loads((data / "secrets").read_text())["hmac"]["1"] == fingerprint_v1
    assert sorted(json.loads((data / "secrets").read_text())["hmac"]) == ["1", "2", "3"]
