"""Process-level tests: the real ``triogate`` executable, real signals, real
LMDB on disk. Plain sync tests (subprocess + httpx's sync client)."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import signal
import stat
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers_process import (
    run_cli,
    serving,
    start_serve,
    write_config,
)

KEY_RE = re.compile(r"\btg_[A-Za-z0-9]+\b")
UNKNOWN_KEY_ID = "key_" + "0" * 26
CREATE = ["keys", "create", "--name", "n", "--owner", "o"]


# ---- small helpers ----------------------------------------------------------


def _setup(client: httpx.Client, email: str = "root@example.com") -> dict[str, str]:
    r = client.post("/setup", json={"name": "root", "email": email})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


def _create_key(
    client: httpx.Client, headers: dict[str, str], *, name: str, owner: str, scopes: list[str]
) -> dict[str, Any]:
    r = client.post("/keys", json={"name": name, "owner": owner, "scopes": scopes}, headers=headers)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def _validate(client: httpx.Client, headers: dict[str, str], key: str) -> dict[str, Any]:
    r = client.post("/keys/validate", json={"key": key}, headers=headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _all_pages(client: httpx.Client, headers: dict[str, str], path: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(1000):
        params: dict[str, Any] = {"limit": 100}
        if cursor:
            params["cursor"] = cursor
        r = client.get(path, params=params, headers=headers)
        assert r.status_code == 200, r.text
        page = r.json()
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            return items
    raise AssertionError(f"{path}: paging did not end")


def _cli_ok(*args: str, env: dict[str, str] | None = None) -> str:
    res = run_cli(*args, env=env)
    assert res.returncode == 0, f"{args}: rc={res.returncode}\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    return res.stdout


def _cli_json(*args: str, env: dict[str, str] | None = None) -> Any:
    return json.loads(_cli_ok(*args, "--json", env=env))


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# ---- crash durability -------------------------------------------------------


def test_sigkill_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "c.toml", data)
    created: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    with serving(cfg) as sp:
        with sp.client() as c:
            admin = _setup(c)
            for i in range(20):
                k = _create_key(c, admin, name=f"seq-{i}", owner=f"owner-{i}", scopes=[f"s:{i}"])
                created[k["id"]] = k

            errors: list[BaseException] = []

            def worker(t: int) -> None:
                try:
                    with sp.client() as tc:
                        for j in range(5):
                            k = _create_key(
                                tc, admin, name=f"t{t}-{j}", owner=f"towner-{t}-{j}", scopes=[]
                            )
                            with lock:
                                created[k["id"]] = k
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert not errors, errors
            assert len(created) == 40

            revoked = sorted(created)[::8]  # 5 keys, from both batches
            for kid in revoked:
                r = c.delete(f"/keys/{kid}", headers=admin)
                assert r.status_code == 200, r.text
                assert r.json()["status"] == "revoked"
        # No graceful path: no signal handler, no drain, no close.
        assert sp.kill() == -signal.SIGKILL

    with serving(cfg) as sp, sp.client() as c:
        for kid, k in created.items():
            r = c.get(f"/keys/{kid}", headers=admin)
            assert r.status_code == 200, (kid, r.text)
            rec = r.json()
            assert rec["owner"] == k["owner"]
            assert rec["name"] == k["name"]
            assert rec["scopes"] == k["scopes"]
            expected = "revoked" if kid in revoked else "active"
            assert rec["status"] == expected, (kid, rec)
            v = _validate(c, admin, k["key"])
            assert v["key_id"] == kid
            if kid in revoked:
                assert v["valid"] is False and v["code"] == "KEY_REVOKED", v
            else:
                assert v["valid"] is True, v
                assert v["owner"] == k["owner"]

        listed = {item["id"] for item in _all_pages(c, admin, "/keys")}
        assert listed == set(created)

        audit = _all_pages(c, admin, "/audit")
        entries = {(e["action"], e["target_id"]) for e in audit}
        assert sum(e["action"] == "setup" for e in audit) == 1
        for kid in created:
            assert ("key.create", kid) in entries, kid
        for kid in revoked:
            assert ("key.revoke", kid) in entries, kid
        assert sum(e["action"] == "key.create" for e in audit) == len(created)
        assert sum(e["action"] == "key.revoke" for e in audit) == len(revoked)
        c.close()  # an idle keep-alive connection would hold up shutdown
        assert sp.stop() == 0


def test_sigkill_while_keys_are_being_created(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "c.toml", data)
    acked: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    stop = threading.Event()
    writers = 2

    with serving(cfg) as sp:
        with sp.client() as c:
            admin = _setup(c)

        def writer(t: int) -> None:
            with sp.client(timeout=5.0) as wc:
                n = 0
                while not stop.is_set():
                    try:
                        r = wc.post(
                            "/keys",
                            json={"name": f"w{t}-{n}", "owner": f"wowner-{t}-{n}"},
                            headers=admin,
                        )
                    except httpx.HTTPError:
                        return  # the server is gone
                    if r.status_code != 201:
                        return
                    body = r.json()
                    with lock:
                        acked[body["id"]] = body
                    n += 1

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(writers)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while len(acked) < 25 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(t.is_alive() for t in threads)  # writers are still going
        assert sp.kill() == -signal.SIGKILL
        stop.set()
        for t in threads:
            t.join(10)
    # Every 201 was sent after its commit, including one read just after the kill.
    assert len(acked) >= 25, len(acked)

    with serving(cfg) as sp, sp.client() as c:
        assert c.get("/health").status_code == 200
        for kid, k in acked.items():
            r = c.get(f"/keys/{kid}", headers=admin)
            assert r.status_code == 200, (kid, r.text)
            assert r.json()["owner"] == k["owner"]
            v = _validate(c, admin, k["key"])
            assert v["valid"] is True and v["key_id"] == kid, v
        listed = {item["id"] for item in _all_pages(c, admin, "/keys")}
        assert set(acked) <= listed
        # At most one unacknowledged (committed, reply lost) write per writer.
        assert len(listed - set(acked)) <= writers
        # Key and audit entry are one transaction: neither exists without the other.
        creates = {
            e["target_id"] for e in _all_pages(c, admin, "/audit") if e["action"] == "key.create"
        }
        assert creates == listed
        # The store is writable and consistent after the crash.
        k = _create_key(c, admin, name="after", owner="after-crash", scopes=["a:b"])
        assert _validate(c, admin, k["key"])["valid"] is True
        c.close()  # an idle keep-alive connection would hold up shutdown
        assert sp.stop() == 0


# ---- signals ---------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_zero(tmp_path: Path, sig: signal.Signals) -> None:
    cfg = write_config(tmp_path / "c.toml", tmp_path / "data")
    with serving(cfg) as sp:
        with sp.client() as c:
            assert c.get("/health").json()["status"] == "ok"
        started = time.monotonic()
        rc = sp.stop(sig, timeout=15)
        elapsed = time.monotonic() - started
    assert rc == 0, sp.stderr()
    assert elapsed < 5, elapsed
    assert "Traceback" not in sp.stderr()


def test_sigterm_does_not_wait_for_idle_keepalive_connections(tmp_path: Path) -> None:
    """An idle keep-alive connection has no request in flight: the grace
    period is for in-flight requests, so shutdown must not sit it out."""
    cfg = write_config(tmp_path / "c.toml", tmp_path / "data", shutdown_grace_seconds=8)
    with serving(cfg) as sp, sp.client() as c:
        assert c.get("/health").status_code == 200  # connection stays open, idle
        started = time.monotonic()
        rc = sp.stop(signal.SIGTERM, timeout=15)
        elapsed = time.monotonic() - started
    assert rc == 0, sp.stderr()
    assert elapsed < 4, f"shutdown took {elapsed:.1f}s with one idle keep-alive connection"


# ---- no plaintext at rest ------------------------------------------------------


def test_data_dir_never_holds_plaintext(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "c.toml", data)
    tag = secrets.token_hex(6)
    root_email = f"root-{tag}@secret-mail.example"
    needles: list[str] = [root_email]

    with serving(cfg) as sp, sp.client() as c:
        r = c.post("/setup", json={"name": "root", "email": root_email})
        assert r.status_code == 201, r.text
        admin_key = r.json()["key"]
        admin = {"Authorization": f"Bearer {admin_key}"}
        needles.append(admin_key)
        for i in range(5):
            owner = f"http-owner-{tag}-{i}"
            r = c.post(
                "/keys",
                json={"name": f"k{i}", "owner": owner, "scopes": ["x:y"]},
                headers=admin,
            )
            assert r.status_code == 201, r.text
            needles += [owner, r.json()["key"]]
        email2 = f"viewer-{tag}@secret-mail.example"
        r = c.post(
            "/admins", json={"name": "v", "email": email2, "role": "key_viewer"}, headers=admin
        )
        assert r.status_code == 201, r.text
        needles += [email2, r.json()["key"]]
        c.close()  # an idle keep-alive connection would hold up shutdown
        assert sp.stop() == 0

    d = str(data)
    for i in range(3):
        owner = f"cli-owner-{tag}-{i}"
        k = _cli_json("keys", "create", "--data-dir", d, "--name", f"c{i}", "--owner", owner)
        needles += [owner, k["key"]]
    rot = _cli_json("keys", "rotate", k["id"], "--data-dir", d, "--grace-seconds", "60")
    needles.append(rot["new"]["key"])
    cli_email = f"cli-admin-{tag}@secret-mail.example"
    a = _cli_json(
        "admin", "create", "--data-dir", d, "--name", "cli", "--email", cli_email,
        "--role", "auditor",
    )  # fmt: skip
    needles += [cli_email, a["key"]]

    # The random body of a key (without prefix) must not be there either.
    needles += [n.split("_", 1)[1] for n in needles if n.startswith(("tg_", "tgadm_"))]
    files = [p for p in data.rglob("*") if p.is_file()]
    assert any(p.name == "data.mdb" for p in files), files
    for path in files:
        blob = path.read_bytes()
        for needle in needles:
            for enc in (needle.encode(), needle.encode("utf-16-le")):
                assert enc not in blob, f"{needle!r} found in {path}"
    mode = stat.S_IMODE((data / "secrets").stat().st_mode)
    assert mode == 0o600, oct(mode)


# ---- CLI ------------------------------------------------------------------------


def test_cli_key_lifecycle(tmp_path: Path) -> None:
    d = str(tmp_path / "data")

    out = _cli_ok(
        "keys", "create", "--data-dir", d, "--name", "human", "--owner", "alice",
        "--scope", "users:read",
    )  # fmt: skip
    m = re.search(r"^key: (tg_[A-Za-z0-9]+)$", out, re.M)
    assert m, out
    human_key = m.group(1)
    assert len(human_key) > 30
    assert "alice" in out

    ids: list[str] = []
    owners = ["alice", "bob", "alice", "bob"]
    for i, owner in enumerate(owners):
        k = _cli_json(
            "keys", "create", "--data-dir", d, "--name", f"k{i}", "--owner", owner,
            "--scope", "users:read", "--scope", "users:write", "--rate-limit", "burst=10/1",
        )  # fmt: skip
        assert k["key"].startswith("tg_") and k["id"].startswith("key_")
        assert k["owner"] == owner and k["status"] == "active"
        assert k["scopes"] == ["users:read", "users:write"]
        assert k["rate_limits"] == [
            {"name": "burst", "limit": 10, "period_seconds": 1.0, "algorithm": "gcra", "routes": []}
        ]
        ids.append(k["id"])

    page = _cli_json("keys", "list", "--data-dir", d)
    listed = [item["id"] for item in page["items"]]
    assert len(listed) == 5
    assert listed[:4] == ids[::-1]  # newest first
    assert all("key" not in item for item in page["items"])
    assert human_key not in json.dumps(page)

    bob = _cli_json("keys", "list", "--data-dir", d, "--owner", "bob")
    assert [i["id"] for i in bob["items"]] == [ids[3], ids[1]]
    assert _cli_json("keys", "list", "--data-dir", d, "--owner", "nobody")["items"] == []

    small = _cli_json("keys", "list", "--data-dir", d, "--limit", "2")
    assert [i["id"] for i in small["items"]] == [ids[3], ids[2]]
    assert small["next_cursor"]
    cursor = small["next_cursor"]
    rest = _cli_json("keys", "list", "--data-dir", d, "--limit", "2", "--cursor", cursor)
    assert [i["id"] for i in rest["items"]] == [ids[1], ids[0]]

    got_out = _cli_ok("keys", "get", ids[0], "--data-dir", d, "--json")
    got = json.loads(got_out)
    assert got["id"] == ids[0] and got["owner"] == "alice"
    assert "key" not in got and "digest" not in got
    assert not KEY_RE.search(got_out.replace(got["start"], "")), got_out

    _cli_ok("keys", "revoke", ids[1], "--data-dir", d)

    revoked = _cli_json("keys", "list", "--data-dir", d, "--status", "revoked")
    assert [i["id"] for i in revoked["items"]] == [ids[1]]
    active = _cli_json("keys", "list", "--data-dir", d, "--status", "active")
    assert ids[1] not in {i["id"] for i in active["items"]}
    assert len(active["items"]) == 4

    before = datetime.now(UTC)
    rot = _cli_json("keys", "rotate", ids[2], "--data-dir", d, "--grace-seconds", "60")
    assert rot["old"]["id"] == ids[2] and rot["old"]["status"] == "rotated"
    grace = _parse_time(rot["old"]["grace_ends_at"])
    assert before + timedelta(seconds=55) < grace < before + timedelta(seconds=70)
    new = rot["new"]
    assert new["key"].startswith("tg_") and new["id"] != ids[2]
    assert new["rotated_from"] == ids[2]
    assert new["owner"] == "alice" and new["scopes"] == ["users:read", "users:write"]
    assert new["rate_limits"] == [
        {"name": "burst", "limit": 10, "period_seconds": 1.0, "algorithm": "gcra", "routes": []}
    ]
    old = _cli_json("keys", "get", ids[2], "--data-dir", d)
    assert old["status"] == "rotated" and old["rotated_to"] == new["id"]

    adm = _cli_json(
        "admin", "create", "--data-dir", d, "--name", "n", "--email", "e@x.io",
        "--role", "key_viewer",
    )  # fmt: skip
    assert adm["role"] == "key_viewer"
    assert adm["email"] == "e@x.io" and adm["name"] == "n"
    assert adm["key"].startswith("tgadm_")
    assert "admin:keys:read" in adm["permissions"]
    assert "admin:keys:create" not in adm["permissions"]

    # revoking a revoked key: CONFLICT on stderr, exit 1, no traceback
    again = run_cli("keys", "revoke", ids[1], "--data-dir", d)
    assert again.returncode == 1, again
    assert "Traceback" not in again.stderr, again.stderr
    assert again.stderr.startswith("CONFLICT"), again.stderr
    # rotating a rotated key is a conflict too
    again = run_cli("keys", "rotate", ids[2], "--data-dir", d, "--grace-seconds", "60")
    assert again.returncode == 1, again
    assert "Traceback" not in again.stderr, again.stderr
    assert again.stderr.startswith("CONFLICT"), again.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["keys", "create", "--name", "", "--owner", "o"], "name"),
        ([*CREATE, *(a for i in range(51) for a in ("--scope", f"s{i}"))], "scopes"),
        ([*CREATE, "--rate-limit", "lots"], "rate-limit"),
        ([*CREATE, "--rate-limit", "a=1/x"], "rate-limit"),
        ([*CREATE, "--expires-at", "2001-01-01T00:00:00Z"], "expires_at"),
        ([*CREATE, "--credits", "-1"], "credits"),
        (["keys", "get", UNKNOWN_KEY_ID], "NOT_FOUND"),
        (["keys", "get", "not-an-id"], "id"),
        (["keys", "revoke", UNKNOWN_KEY_ID], "NOT_FOUND"),
        (["keys", "rotate", UNKNOWN_KEY_ID, "--grace-seconds", "60"], "NOT_FOUND"),
        (["keys", "rotate", UNKNOWN_KEY_ID, "--grace-seconds", "-5"], "grace_seconds"),
        (["keys", "list", "--limit", "0"], "limit"),
        (["keys", "list", "--cursor", "garbage"], "cursor"),
        (["admin", "create", "--name", "n", "--email", "not-an-email"], "email"),
        (
            ["admin", "create", "--name", "n", "--email", "e@x.io", "--permission", "admin:x:y"],
            "permissions",
        ),
    ],
    ids=[
        "empty-name",
        "51-scopes",
        "rate-limit-syntax",
        "rate-limit-period",
        "expires-in-past",
        "negative-credits",
        "get-unknown",
        "get-malformed-id",
        "revoke-unknown",
        "rotate-unknown",
        "rotate-negative-grace",
        "list-limit-0",
        "list-bad-cursor",
        "admin-bad-email",
        "admin-unknown-permission",
    ],
)
def test_cli_bad_input_is_a_clear_error(tmp_path: Path, args: list[str], fragment: str) -> None:
    res = run_cli(*args, "--data-dir", str(tmp_path / "data"))
    assert res.returncode != 0, res
    assert "Traceback" not in res.stderr, res.stderr
    assert "ExceptionGroup" not in res.stderr, res.stderr
    assert fragment in res.stderr, res.stderr
    assert len(res.stderr.splitlines()) <= 12, res.stderr
    assert not KEY_RE.search(res.stdout), res.stdout  # nothing was created


def test_cli_against_a_running_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    d = str(data)
    cfg = write_config(tmp_path / "c.toml", data)
    with serving(cfg) as sp, sp.client() as c:
        admin = _setup(c)
        k = _cli_json(
            "keys", "create", "--data-dir", d, "--name", "from-cli", "--owner", "carol",
            "--scope", "orders:*",
        )  # fmt: skip
        r = c.get(f"/keys/{k['id']}", headers=admin)
        assert r.status_code == 200, r.text
        assert r.json()["owner"] == "carol" and r.json()["status"] == "active"
        v = _validate(c, admin, k["key"])
        assert v["valid"] is True and v["key_id"] == k["id"] and v["owner"] == "carol"
        r = c.post(
            "/keys/validate", json={"key": k["key"], "scopes": ["orders:read"]}, headers=admin
        )
        assert r.json()["valid"] is True

        # the other way round: created over HTTP, seen and revoked by the CLI
        hk = _create_key(c, admin, name="from-http", owner="dave", scopes=[])
        assert _cli_json("keys", "get", hk["id"], "--data-dir", d)["owner"] == "dave"

        _cli_ok("keys", "revoke", k["id"], "--data-dir", d)
        v = _validate(c, admin, k["key"])
        assert v["valid"] is False and v["code"] == "KEY_REVOKED", v
        assert c.get(f"/keys/{k['id']}", headers=admin).json()["status"] == "revoked"

        # audit entries written by the CLI are visible to the server
        audit = _all_pages(c, admin, "/audit")
        cli_entries = {(e["action"], e["target_id"]) for e in audit if e["actor_id"] == "cli"}
        assert ("key.create", k["id"]) in cli_entries
        assert ("key.revoke", k["id"]) in cli_entries
        c.close()  # an idle keep-alive connection would hold up shutdown
        assert sp.stop() == 0


# ---- check-config ---------------------------------------------------------------


VALID_CONFIG = """
[server]
admin_listen = "127.0.0.1:0"
data_dir = "./somewhere"

[upstreams.users]
targets = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]

[[routes]]
name = "users-read"
methods = ["GET"]
path = "/users/{id:int}"
upstream = "users"
"""


def test_check_config_valid(tmp_path: Path) -> None:
    f = tmp_path / "ok.toml"
    f.write_text(VALID_CONFIG)
    res = run_cli("check-config", str(f))
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout
    assert res.stderr.strip() == ""
    assert not (tmp_path / "somewhere").exists()  # checking creates nothing


def test_check_config_lists_every_error(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(
        """
[server]
bogus = 1
shutdown_grace_seconds = "ten"

[upstreams.users]
targets = ["http://127.0.0.1:9001"]

[[routes]]
name = "r0"
path = "users"
upstream = "users"
"""
    )
    res = run_cli("check-config", str(f))
    assert res.returncode == 1, res
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert any("server.bogus: unknown field" in ln for ln in lines), lines
    assert any("server.shutdown_grace_seconds:" in ln for ln in lines), lines
    assert any("routes[0].path:" in ln for ln in lines), lines
    assert len(lines) == 3, lines
    assert all(ln.startswith(str(f)) for ln in lines), lines


def test_check_config_unknown_upstream(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(VALID_CONFIG.replace('upstream = "users"', 'upstream = "nope"'))
    res = run_cli("check-config", str(f))
    assert res.returncode == 1, res
    assert "Traceback" not in res.stderr
    assert "routes[0].upstream:" in res.stderr, res.stderr
    assert "nope" in res.stderr


def test_check_config_invalid_toml(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[server\nadmin_listen = \n")
    res = run_cli("check-config", str(f))
    assert res.returncode == 1, res
    assert "Traceback" not in res.stderr
    assert "invalid TOML" in res.stderr, res.stderr
    missing = run_cli("check-config", str(tmp_path / "missing.toml"))
    assert missing.returncode == 1
    assert "Traceback" not in missing.stderr
    assert "missing.toml" in missing.stderr


# ---- serve without -c ------------------------------------------------------------


def test_serve_without_config_uses_defaults_and_env_override(tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {
        "TRIOGATE_SERVER__ADMIN_LISTEN": "127.0.0.1:0",
        "TRIOGATE_SERVER__PROXY_LISTEN": "127.0.0.1:0",
    }
    with serving(None, env=env, cwd=cwd, stderr_path=tmp_path / "stderr.log") as sp:
        assert not sp.url.endswith(":8001")  # the override won over the default
        with sp.client() as c:
            r = c.get("/health")
            assert r.status_code == 200
            assert r.json()["status"] == "ok"
            _setup(c)
        assert sp.stop() == 0
    data = cwd / "triogate-data"
    assert data.is_dir()
    assert (data / "secrets").is_file()
    assert any(p.name == "data.mdb" for p in data.rglob("*"))


# ---- secrets from the environment -------------------------------------------------


def _env_secrets(hmac_secret: str, enc_key: bytes) -> dict[str, str]:
    return {
        "TRIOGATE_HMAC_SECRET": hmac_secret,
        "TRIOGATE_ENCRYPTION_KEYS": "1:" + base64.b64encode(enc_key).decode(),
    }


def test_environment_secrets_write_no_file_and_survive_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "c.toml", data)
    env = _env_secrets(secrets.token_urlsafe(32), os.urandom(32))

    with serving(cfg, env=env) as sp, sp.client() as c:
        admin = _setup(c)
        k = _create_key(c, admin, name="e", owner="env-owner", scopes=["a:b"])
        assert _validate(c, admin, k["key"])["valid"] is True
        c.close()  # an idle keep-alive connection would hold up shutdown
        assert sp.stop() == 0
    assert not (data / "secrets").exists()
    assert not list(data.glob(".secrets*"))

    with serving(cfg, env=env) as sp, sp.client() as c:
        rec = c.get(f"/keys/{k['id']}", headers=admin)
        assert rec.status_code == 200, rec.text
        assert rec.json()["owner"] == "env-owner"  # decrypts with the same key
        v = _validate(c, admin, k["key"])
        assert v["valid"] is True and v["owner"] == "env-owner"
        k2 = _create_key(c, admin, name="e2", owner="env-owner-2", scopes=[])
        assert _validate(c, admin, k2["key"])["valid"] is True
        c.close()  # an idle keep-alive connection would hold up shutdown
        assert sp.stop() == 0
    assert not (data / "secrets").exists()

    # the CLI reads the same environment secrets
    got = _cli_json("keys", "get", k["id"], "--data-dir", str(data), env=env)
    assert got["owner"] == "env-owner"
    assert not (data / "secrets").exists()


def test_hmac_secret_rotation_via_environment(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "c.toml", data)
    old, new = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    enc = os.urandom(32)

    with serving(cfg, env=_env_secrets(old, enc)) as sp, sp.client() as c:
        admin = _setup(c)
        a = _create_key(c, admin, name="a", owner="oa", scopes=[])
        b = _create_key(c, admin, name="b", owner="ob", scopes=[])
        c.close()  # an idle keep-alive connection would hold up shutdown
        assert sp.stop() == 0

    with serving(cfg, env=_env_secrets(f"1:{old},2:{new}", enc)) as sp, sp.client() as c:
        v = _validate(c, admin, a["key"])  # found under v1, re-indexed under v2
        assert v["valid"] is True and v["key_id"] == a["id"], v
        ck = _create_key(c, admin, name="c", owner="oc", scopes=[])
        assert _validate(c, admin, ck["key"])["valid"] is True
        r = c.post("/admins", json={"name": "a2", "email": "a2@x.io", "role": "key_viewer"},
                   headers=admin)  # fmt: skip
        assert r.status_code == 201, r.text
        viewer = {"Authorization": f"Bearer {r.json()['key']}"}
        c.close()  # an idle keep-alive connection would hold up shutdown
        assert sp.stop() == 0

    # Only v2 left: a was re-indexed by its validation, c was made under v2;
    # b was never used after the rotation, so it is only known under v1.
    with serving(cfg, env=_env_secrets(f"2:{new}", enc)) as sp, sp.client() as c:
        va = _validate(c, viewer, a["key"])
        assert va["valid"] is True and va["key_id"] == a["id"], va
        assert _validate(c, viewer, ck["key"])["valid"] is True
        assert _validate(c, viewer, b["key"]) == {"valid": False, "code": "INVALID_KEY"}
        c.close()  # an idle keep-alive connection would hold up shutdown
        assert sp.stop() == 0


def test_serve_failure_is_reported(tmp_path: Path) -> None:
    """A config error at start: exit 1 with the path, no traceback, no ready line."""
    f = tmp_path / "bad.toml"
    f.write_text('[server]\nadmin_listen = "nowhere"\n')
    with pytest.raises(AssertionError, match="exited with status 1"):
        start_serve(f, timeout=15)
    res = run_cli("serve", "-c", str(f))
    assert res.returncode == 1
    assert "server.admin_listen" in res.stderr
    assert "Traceback" not in res.stderr
