"""Key import through the real ``triogate serve`` and CLI: a thousand imported
plaintext keys (the gateway's own format and a foreign one) and a hundred
SHA-256 hashes all work on the data plane through a real upstream, bad items
fail alone, re-import is idempotent, a SHA-256 key is re-indexed under the
HMAC at first use, and ``[keys] import_formats`` reloads."""

from __future__ import annotations

import hashlib
import json
import secrets
import string
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import lmdb

from tests.helpers_process import clean_env, run_cli, serving, threaded_upstream, triogate_command
from tests.test_reload import config_doc, route, write_doc
from triogate.control.keyformat import KeyFormat
from triogate.control.keysha256 import SHA256_VERSION
from triogate.storage import codec

JSON = dict[str, Any]
FORMAT = "^sk_live_[A-Za-z0-9]{24}$"
_ALNUM = string.ascii_letters + string.digits
OWN = KeyFormat("tg_")


def foreign() -> str:
    return "sk_live_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _doc(data: Path, upstream: str, formats: list[str]) -> JSON:
    return config_doc(
        data,
        {"a": upstream},
        [route("open", "/open", "a", plugins={"key-auth": {}})],
        keys={"import_formats": formats},
    )


def _setup(c: httpx.Client) -> dict[str, str]:
    r = c.post("/setup", json={"name": "root", "email": "root@example.com"})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


def _import(c: httpx.Client, admin: dict[str, str], items: list[Any]) -> JSON:
    r = c.post("/keys/import", json={"keys": items}, headers=admin)
    assert r.status_code == 200, r.text
    body: JSON = r.json()
    return body


def _status(proxy: httpx.Client, key: str) -> int:
    return proxy.get("/open", headers={"Authorization": f"Bearer {key}"}).status_code


def _tables(data: Path) -> tuple[dict[bytes, bytes], dict[bytes, bytes], dict[bytes, bytes]]:
    """KEYS, KEY_DIGESTS and KEY_SHA256 of a stopped gateway's store."""
    env = lmdb.open(str(data / "lmdb"), readonly=True, lock=False, max_dbs=64)
    try:
        with env.begin() as txn:
            out = []
            for name in (b"keys", b"key_digests", b"key_sha256"):
                db = env.open_db(name, txn=txn, create=False)
                out.append(dict(txn.cursor(db=db)))
            return out[0], out[1], out[2]
    finally:
        env.close()


def test_imported_keys_work_on_the_data_plane(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with threaded_upstream() as upstream:
        cfg = write_doc(tmp_path / "gw.toml", _doc(data, upstream, [FORMAT]))
        plain = [OWN.generate() for _ in range(500)] + [foreign() for _ in range(500)]
        hidden = [OWN.generate() for _ in range(50)] + [foreign() for _ in range(50)]
        unused = foreign()  # imported by its SHA-256, never used
        with serving(cfg) as sp, sp.client() as c, httpx.Client(base_url=sp.proxy_url) as proxy:
            admin = _setup(c)
            items = [{"key": k, "name": f"p{i}", "owner": "acme"} for i, k in enumerate(plain)]
            result = _import(c, admin, items)
            assert not result["failed"], result["failed"][:3]
            assert [m["index"] for m in result["migrated"]] == list(range(1000))
            plain_ids = [m["id"] for m in result["migrated"]]
            sha_items = [
                {"sha256": sha(k), "name": f"h{i}", "owner": "acme", "credits": {"remaining": 5}}
                for i, k in enumerate(hidden)
            ]
            result = _import(c, admin, sha_items)
            assert len(result["migrated"]) == 100 and not result["failed"]
            sha_ids = [m["id"] for m in result["migrated"]]
            assert _import(c, admin, [{"sha256": sha(unused), "name": "u", "owner": "o"}])[
                "migrated"
            ]

            # Every imported key works at once, through the upstream.
            for key in plain + hidden:
                assert _status(proxy, key) == 200, key
            # The SHA-256 keys spend their credits like any key.
            r = proxy.get("/open", headers={"X-API-Key": hidden[0]})
            assert r.status_code == 200 and r.text == "ok"

            # Re-import: the same ids, nothing new.
            again = _import(c, admin, items[:10] + sha_items[:10])
            assert [m["id"] for m in again["migrated"]] == plain_ids[:10] + sha_ids[:10]
            assert all(m["existing"] for m in again["migrated"]) and not again["failed"]
            changed = _import(c, admin, [{**items[0], "name": "other"}])
            assert changed["failed"][0]["code"] == "CONFLICT"

            # A foreign key matching no format: refused at import and on the data plane.
            stranger = "pk_" + "".join(secrets.choice(_ALNUM) for _ in range(30))
            refused = _import(c, admin, [{"key": stranger, "name": "x", "owner": "o"}])
            assert refused["failed"][0]["code"] == "VALIDATION_ERROR"
            assert refused["failed"][0]["errors"][0]["path"] == "key"
            assert _status(proxy, stranger) == 401

            # Half bad: the good half is imported, each bad item reported.
            good = [foreign() for _ in range(5)]
            bad: list[Any] = [
                {"key": "short", "name": "b", "owner": "o"},
                {"key": foreign(), "owner": "o"},
                "junk",
                {"key": foreign(), "name": "b", "owner": "o", "plan_id": "pln_nope"},
                {"sha256": "00", "name": "b", "owner": "o"},
            ]
            mixed: list[Any] = []
            for g, b in zip(good, bad, strict=True):
                mixed += [{"key": g, "name": "g", "owner": "o"}, b]
            result = _import(c, admin, mixed)
            assert [m["index"] for m in result["migrated"]] == [0, 2, 4, 6, 8]
            assert [f["index"] for f in result["failed"]] == [1, 3, 5, 7, 9]
            assert all(f["code"] == "VALIDATION_ERROR" for f in result["failed"])
            for key in good:
                assert _status(proxy, key) == 200

            # 1,001 items: the whole call is refused.
            r = c.post("/keys/import", json={"keys": items[:1] * 1001}, headers=admin)
            assert r.status_code == 400 and r.json()["code"] == "VALIDATION_ERROR", r.text
            assert r.json()["errors"][0]["path"] == "keys"
            r = c.post("/keys/import", json={"keys": items[:1]})
            assert r.status_code == 401
            for body in ({"keys": "x"}, {}, {"keys": []}, {"keys": items[:1], "x": 1}, [1]):
                r = c.post("/keys/import", json=body, headers=admin)
                assert r.status_code == 400 and r.json()["code"] == "VALIDATION_ERROR", r.text

            audit = c.get(
                "/audit", params={"action": "key.import", "limit": 5}, headers=admin
            ).json()
            assert len(audit["items"]) == 5 and audit["items"][0]["details"]["kind"] == "key"
            assert sp.stop() == 0

        # After first use each SHA-256 key is indexed under its HMAC; its
        # SHA-256 entry is gone (the unused one's stays).
        keys, digests, by_sha = _tables(data)
        assert list(by_sha) == [bytes.fromhex(sha(unused))]
        for key_id in sha_ids:
            record = codec.key.decode(keys[key_id.encode()])
            assert record.digest_version != SHA256_VERSION
            assert digests[record.digest] == key_id.encode()
        doctor = run_cli("doctor", "--data-dir", str(data))
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "0 error(s), 0 warning(s)" in doctor.stdout, doctor.stdout

        # After a restart they work by their HMAC alone.
        with serving(cfg) as sp, httpx.Client(base_url=sp.proxy_url) as proxy:
            for key in hidden[:10] + plain[:5] + plain[-5:]:
                assert _status(proxy, key) == 200, key


def _cli_import(cfg: Path, path: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*triogate_command(), "keys", "import", "-c", str(cfg), "--json", path],
        input=stdin,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )


def test_cli_import_and_reloaded_formats(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with threaded_upstream() as upstream:
        cfg = write_doc(tmp_path / "gw.toml", _doc(data, upstream, [FORMAT]))
        alien, hidden, own = foreign(), foreign(), OWN.generate()
        with serving(cfg) as sp, sp.client() as c, httpx.Client(base_url=sp.proxy_url) as proxy:
            admin = _setup(c)
            # JSON lines, with a line that is not JSON and a bad item, while serving.
            lines = tmp_path / "keys.jsonl"
            lines.write_text(
                json.dumps({"key": alien, "name": "a", "owner": "o"})
                + "\n{not json\n"
                + json.dumps({"key": "x" * 20, "name": "b", "owner": "o"})
                + "\n"
                + json.dumps({"sha256": sha(hidden), "name": "c", "owner": "o"})
                + "\n"
            )
            done = _cli_import(cfg, str(lines))
            assert done.returncode == 1, done.stderr  # some failed
            result = json.loads(done.stdout)
            assert [m["index"] for m in result["migrated"]] == [0, 3]
            assert [(f["index"], f["code"]) for f in result["failed"]] == [
                (1, "VALIDATION_ERROR"),
                (2, "VALIDATION_ERROR"),
            ]
            assert _status(proxy, alien) == 200
            # Imported by another process: the gateway looks within a second.
            deadline = time.monotonic() + 10
            while _status(proxy, hidden) != 200:
                assert time.monotonic() < deadline, "the SHA-256 import was never found"
                time.sleep(0.1)

            # A JSON array on stdin; human output; a re-import is no failure.
            array = json.dumps([{"key": own, "name": "d", "owner": "o"}])
            done = subprocess.run(
                [*triogate_command(), "keys", "import", "-c", str(cfg), "-"],
                input=array,
                capture_output=True,
                text=True,
                env=clean_env(),
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            assert done.stdout.startswith("migrated 1 (0 already present), failed 0")
            done = _cli_import(cfg, "-", stdin=array)
            assert done.returncode == 0 and json.loads(done.stdout)["migrated"][0]["existing"]
            assert _status(proxy, own) == 200
            audit = c.get("/audit", params={"actor": "cli"}, headers=admin).json()
            assert {e["action"] for e in audit["items"]} == {"key.import"}

            # The format removed by a reload: foreign keys are refused (own ones
            # are not); back, they work again.
            write_doc(cfg, _doc(data, upstream, []))
            assert c.post("/config/reload", headers=admin).status_code == 200
            assert _status(proxy, alien) == 401 and _status(proxy, own) == 200
            write_doc(cfg, _doc(data, upstream, [FORMAT, "(?<=x)"]))
            r = c.post("/config/reload", headers=admin)
            assert r.status_code == 400, r.text
            assert "keys.import_formats[1]" in [e["path"] for e in r.json()["errors"]]
            write_doc(cfg, _doc(data, upstream, [FORMAT]))
            assert c.post("/config/reload", headers=admin).status_code == 200
            assert _status(proxy, alien) == 200

        missing = run_cli("keys", "import", "-c", str(cfg), str(tmp_path / "nope.json"))
        assert missing.returncode == 1 and "cannot read" in missing.stderr


def test_a_data_dir_from_before_the_import_tables(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = write_doc(tmp_path / "gw.toml", _doc(data, "http://127.0.0.1:9", [FORMAT]))
    made = run_cli("keys", "create", "-c", str(cfg), "--name", "n", "--owner", "o")
    assert made.returncode == 0, made.stderr
    env = lmdb.open(str(data / "lmdb"), max_dbs=64)
    with env.begin(write=True) as txn:
        for name in (b"key_sha256", b"key_imports"):
            txn.drop(env.open_db(name, txn=txn), delete=True)
    env.close()
    doctor = run_cli("doctor", "--data-dir", str(data))
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "key_sha256" in doctor.stdout and "table missing" in doctor.stdout
    items = tmp_path / "keys.json"
    items.write_text(json.dumps([{"sha256": sha(foreign()), "name": "h", "owner": "o"}]))
    done = _cli_import(cfg, str(items))
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["migrated"]) == 1
    doctor = run_cli("doctor", "--data-dir", str(data))
    assert "0 error(s), 0 warning(s)" in doctor.stdout, doctor.stdout
