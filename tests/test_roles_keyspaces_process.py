"""Roles and keyspaces through the real ``triogate serve`` (and the CLI):
the admin API's ``/roles``, keys made in a second keyspace, keyspaces
added and removed by SIGHUP, and config errors for bad keyspaces."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from tests.helpers_process import run_cli, serving, threaded_upstream
from tests.test_reload import config_doc, route, write_doc
from triogate.control.keyformat import KeyFormat

JSON = dict[str, Any]


def _setup(c: httpx.Client) -> dict[str, str]:
    r = c.post("/setup", json={"name": "root", "email": "root@example.com"})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


def _doc(data: Path, upstream: str, keyspaces: dict[str, str]) -> JSON:
    return config_doc(
        data,
        {"a": upstream},
        [route("open", "/open", "a", plugins={"key-auth": {}})],
        keyspaces={name: {"prefix": prefix} for name, prefix in keyspaces.items()},
    )


def _problem(r: httpx.Response, status: int, code: str) -> JSON:
    assert r.status_code == status, r.text
    body: JSON = r.json()
    assert body["code"] == code, body
    return body


def test_roles_crud_conflicts_and_in_use(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = write_doc(tmp_path / "gw.toml", _doc(data, "http://127.0.0.1:9", {}))
    with serving(cfg) as sp, sp.client() as c:
        admin = _setup(c)
        r = c.post(
            "/roles",
            json={"name": "reader", "scopes": ["users:read"], "description": "reads"},
            headers=admin,
        )
        assert r.status_code == 201, r.text
        role = r.json()
        assert role["id"].startswith("rol_") and role["scopes"] == ["users:read"]
        assert c.get(f"/roles/{role['id']}", headers=admin).json() == role
        assert [x["id"] for x in c.get("/roles", headers=admin).json()["items"]] == [role["id"]]

        # Duplicate name, bad input: 409 and 400s with the field, never a 500.
        _problem(c.post("/roles", json={"name": "reader"}, headers=admin), 409, "CONFLICT")
        for body, path in (
            ({"name": "a b"}, "name"),
            ({"name": "ok", "scopes": ["s"] * 101}, "scopes"),
            ({"name": "ok", "scopes": "users:read"}, "scopes"),
            ({"scopes": []}, "name"),
        ):
            problem = _problem(c.post("/roles", json=body, headers=admin), 400, "VALIDATION_ERROR")
            assert path in [e["path"] for e in problem["errors"]], problem
        _problem(c.get("/roles/rol_nope", headers=admin), 400, "VALIDATION_ERROR")
        _problem(c.get("/roles/rol_01J000000000000000000000AA", headers=admin), 404, "NOT_FOUND")
        _problem(c.get("/roles", params={"cursor": "x"}, headers=admin), 400, "VALIDATION_ERROR")

        # A key naming the role: the role cannot be deleted or renamed.
        r = c.post("/keys", json={"name": "k", "owner": "o", "roles": ["reader"]}, headers=admin)
        assert r.status_code == 201, r.text
        key = r.json()
        _problem(c.delete(f"/roles/{role['id']}", headers=admin), 409, "ROLE_IN_USE")
        _problem(
            c.patch(f"/roles/{role['id']}", json={"name": "other"}, headers=admin),
            409,
            "ROLE_IN_USE",
        )
        r = c.patch(f"/roles/{role['id']}", json={"scopes": ["users:write"]}, headers=admin)
        assert r.status_code == 200 and r.json()["scopes"] == ["users:write"], r.text
        # An unknown role on a key: 400 on roles[i].
        problem = _problem(
            c.post("/keys", json={"name": "k", "owner": "o", "roles": ["nope"]}, headers=admin),
            400,
            "VALIDATION_ERROR",
        )
        assert [e["path"] for e in problem["errors"]] == ["roles[0]"]

        # Off the key, the role goes.
        r = c.patch(f"/keys/{key['id']}", json={"roles": []}, headers=admin)
        assert r.status_code == 200, r.text
        r = c.delete(f"/roles/{role['id']}", headers=admin)
        assert r.status_code == 200 and r.json() == {
            "id": role["id"],
            "name": "reader",
            "deleted": True,
        }, r.text
        _problem(c.get(f"/roles/{role['id']}", headers=admin), 404, "NOT_FOUND")

        actions = [
            e["action"]
            for e in c.get("/audit", params={"limit": 100}, headers=admin).json()["items"]
            if e["action"].startswith("role.")
        ]
        assert actions == ["role.delete", "role.update", "role.create"]

        # Described in /openapi.json with their permissions.
        paths = c.get("/openapi.json").json()["paths"]
        assert paths["/roles"]["post"]["x-required-permission"] == "admin:roles:write"
        assert paths["/roles/{id}"]["get"]["x-required-permission"] == "admin:roles:read"
        assert set(paths["/roles/{id}"]) == {"get", "patch", "delete"}

        # A key_viewer reads roles, and may not write them.
        r = c.post(
            "/admins",
            json={"name": "v", "email": "v@example.com", "role": "key_viewer"},
            headers=admin,
        )
        viewer = {"Authorization": f"Bearer {r.json()['key']}"}
        assert c.get("/roles", headers=viewer).status_code == 200
        problem = _problem(c.post("/roles", json={"name": "x"}, headers=viewer), 403, "FORBIDDEN")
        assert problem["required_permission"] == "admin:roles:write"


def test_a_key_of_a_second_keyspace_validates_and_reloads_add_and_remove_keyspaces(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    with threaded_upstream() as upstream:
        cfg = write_doc(tmp_path / "gw.toml", _doc(data, upstream, {"test": "test_"}))
        with serving(cfg) as sp, sp.client() as c, httpx.Client(base_url=sp.proxy_url) as proxy:
            admin = _setup(c)

            def create(keyspace: str | None) -> httpx.Response:
                body: JSON = {"name": "k", "owner": "o"}
                if keyspace is not None:
                    body["keyspace"] = keyspace
                return c.post("/keys", json=body, headers=admin)

            def through(key: str) -> int:
                return proxy.get("/open", headers={"Authorization": f"Bearer {key}"}).status_code

            default = create(None).json()
            assert default["key"].startswith("tg_") and default["keyspace"] == "default"
            r = create("test")
            assert r.status_code == 201, r.text
            test = r.json()
            assert test["key"].startswith("test_") and test["start"].startswith("test_")
            assert test["keyspace"] == "test"
            assert c.get(f"/keys/{test['id']}", headers=admin).json()["keyspace"] == "test"
            for made in (default, test):
                assert through(made["key"]) == 200
                r = c.post("/keys/validate", json={"key": made["key"]}, headers=admin)
                assert r.json()["valid"] is True, r.text
            # Well formed in a keyspace this gateway does not have: 401, like garbage.
            assert through(KeyFormat("live_").generate()) == 401

            problem = _problem(create("live"), 400, "VALIDATION_ERROR")
            assert [e["path"] for e in problem["errors"]] == ["keyspace"]
            for bad in ("", "a b", "x" * 65, 7):
                _problem(create(bad), 400, "VALIDATION_ERROR")  # type: ignore[arg-type]

            # Rotation keeps the keyspace.
            r = c.post(f"/keys/{test['id']}/rotate", json={"grace_seconds": 60}, headers=admin)
            assert r.status_code == 200, r.text
            assert r.json()["new"]["key"].startswith("test_")

            # SIGHUP: a keyspace added works at once; a removed one's keys are 401.
            v1 = c.get("/config", headers=admin).json()["version"]
            write_doc(cfg, _doc(data, upstream, {"live": "live_"}))
            sp.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while c.get("/config", headers=admin).json()["version"] == v1:
                assert time.monotonic() < deadline, sp.stderr()
                time.sleep(0.05)
            r = create("live")
            assert r.status_code == 201 and r.json()["key"].startswith("live_"), r.text
            assert through(r.json()["key"]) == 200
            assert through(test["key"]) == 401
            r = c.post("/keys/validate", json={"key": test["key"]}, headers=admin)
            assert r.json() == {**r.json(), "valid": False, "code": "INVALID_KEY"}
            _problem(create("test"), 400, "VALIDATION_ERROR")
            assert through(default["key"]) == 200
            # The record is still there, and still says its keyspace.
            assert c.get(f"/keys/{test['id']}", headers=admin).json()["keyspace"] == "test"


def test_bad_keyspaces_are_config_errors_for_serve_and_check_config(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cases = {
        "default.toml": ({"default": "dflt_"}, "keyspaces.default"),
        "same.toml": ({"a": "tg_"}, "keyspaces.a.prefix"),
        "twice.toml": ({"a": "x_", "b": "x_"}, "keyspaces.b.prefix"),
        "shape.toml": ({"a": "Not A Prefix"}, "keyspaces.a.prefix"),
    }
    for name, (keyspaces, path) in cases.items():
        cfg = write_doc(tmp_path / name, _doc(data, "http://127.0.0.1:9", keyspaces))
        checked = run_cli("check-config", str(cfg))
        assert checked.returncode == 1 and path in checked.stderr, (name, checked.stderr)
        served = run_cli("serve", "-c", str(cfg), timeout=20)
        assert served.returncode != 0 and path in served.stderr, (name, served.stderr)


def _cli(*args: str) -> JSON:
    res = run_cli(*args, "--json")
    assert res.returncode == 0, f"{args}: {res.stdout}\n{res.stderr}"
    body: JSON = json.loads(res.stdout)
    return body


def test_roles_through_the_cli(tmp_path: Path) -> None:
    d = ("--data-dir", str(tmp_path / "data"))
    made = _cli("roles", "create", *d, "--name", "ops", "--scope", "a:b", "--scope", "c")
    assert made["name"] == "ops" and made["scopes"] == ["a:b", "c"]
    assert _cli("roles", "get", *d, "ops") == made
    assert _cli("roles", "get", *d, made["id"]) == made
    patched = _cli("roles", "patch", *d, "ops", "--clear-scopes", "--description", "labels")
    assert patched["scopes"] == [] and patched["description"] == "labels"
    assert [r["id"] for r in _cli("roles", "list", *d)["items"]] == [made["id"]]

    twice = run_cli("roles", "create", *d, "--name", "ops")
    assert twice.returncode == 1 and "CONFLICT" in twice.stderr
    bad = run_cli("roles", "create", *d, "--name", "no good")
    assert bad.returncode == 1 and "VALIDATION_ERROR: name" in bad.stderr
    missing = run_cli("roles", "delete", *d, "nope")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr

    assert _cli("roles", "delete", *d, "ops") == {"id": made["id"], "name": "ops", "deleted": True}
    human = run_cli("roles", "list", *d)
    assert human.returncode == 0 and human.stdout.strip() == "no roles"


def test_keys_create_in_a_keyspace_through_the_cli(tmp_path: Path) -> None:
    cfg = write_doc(
        tmp_path / "gw.toml", _doc(tmp_path / "data", "http://127.0.0.1:9", {"test": "test_"})
    )
    made = _cli(
        "keys", "create", "-c", str(cfg), "--name", "k", "--owner", "o", "--keyspace", "test"
    )
    assert made["key"].startswith("test_") and made["keyspace"] == "test"
    plain = _cli("keys", "create", "-c", str(cfg), "--name", "k", "--owner", "o")
    assert plain["key"].startswith("tg_") and plain["keyspace"] == "default"
    res = run_cli(
        "keys", "create", "-c", str(cfg), "--name", "k", "--owner", "o", "--keyspace", "live"
    )
    assert res.returncode == 1 and "VALIDATION_ERROR: keyspace" in res.stderr, res.stderr
