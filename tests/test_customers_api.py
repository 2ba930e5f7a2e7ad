"""Identities, plans and the customer fields of keys through the real admin
API of a real ``triogate serve`` (a subprocess, real LMDB in tmp_path), and
through the real CLI on the same data directory while it serves."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers_process import ServeProcess, run_cli, serving, write_config

MINUTE = {"name": "minute", "limit": 10, "period_seconds": 60}
UNKNOWN_IDN = "idn_01ARZ3NDEKTSV4RRFFQ69G5FAV"
UNKNOWN_PLN = "pln_01ARZ3NDEKTSV4RRFFQ69G5FAV"


class Api:
    def __init__(self, client: httpx.Client, key: str) -> None:
        self.c = client
        self.h = {"Authorization": f"Bearer {key}"}

    def call(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        r = self.c.request(method, path, json=body, headers=self.h)
        assert r.status_code == status, (method, path, r.status_code, r.text)
        return r.json()

    def problem(self, method: str, path: str, body: Any, status: int, code: str) -> Any:
        r = self.c.request(method, path, json=body, headers=self.h)
        assert r.status_code == status, (method, path, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json"), r.headers
        doc = r.json()
        assert doc["code"] == code, doc
        return doc


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ServeProcess, Api, Path]]:
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "c.toml", data)
    with serving(cfg) as sp, sp.client() as c:
        r = c.post("/setup", json={"name": "root", "email": "root@example.com"})
        assert r.status_code == 201, r.text
        yield sp, Api(c, r.json()["key"]), data


def audit(api: Api, action: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = api.call("GET", f"/audit?action={action}&limit=100")["items"]
    return items


def cli(*args: str) -> Any:
    res = run_cli(*args, "--json")
    assert res.returncode == 0, f"{args}: rc={res.returncode}\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    return json.loads(res.stdout)


def cli_fails(*args: str) -> str:
    res = run_cli(*args)
    assert res.returncode == 1, (args, res)
    assert "Traceback" not in res.stderr, res.stderr
    return res.stderr


def test_plans_identities_and_keys_end_to_end(served: tuple[ServeProcess, Api, Path]) -> None:
    _, api, _ = served
    plan = api.call(
        "POST",
        "/plans",
        {"name": "pro", "scopes": ["orders:read"], "rate_limits": [MINUTE]},
        status=201,
    )
    assert plan["id"].startswith("pln_") and plan["version"] == 1
    api.problem("POST", "/plans", {"name": "pro"}, 409, "CONFLICT")
    identity = api.call(
        "POST",
        "/identities",
        {"external_id": "cus_1", "name": "Acme", "credits": {"remaining": 100}},
        status=201,
    )
    assert identity["id"].startswith("idn_") and identity["enabled"] is True
    assert identity["effective"]["credits"]["remaining"] == 100
    api.problem("POST", "/identities", {"external_id": "cus_1"}, 409, "CONFLICT")
    api.problem("POST", "/identities", {"external_id": ""}, 400, "VALIDATION_ERROR")
    api.problem("POST", "/identities", {"external_id": "x" * 257}, 400, "VALIDATION_ERROR")

    # Unknown references: 400 with every field path at once.
    doc = api.problem(
        "POST",
        "/keys",
        {
            "name": "k",
            "owner": "o",
            "identity_id": UNKNOWN_IDN,
            "plan_id": UNKNOWN_PLN,
            "roles": ["ghost"],
            "keyspace": "default",
        },
        400,
        "VALIDATION_ERROR",
    )
    assert [e["path"] for e in doc["errors"]] == ["identity_id", "plan_id", "roles[0]"]
    doc = api.problem(
        "POST", "/keys", {"name": "k", "owner": "o", "keyspace": "nope"}, 400, "VALIDATION_ERROR"
    )
    assert [e["path"] for e in doc["errors"]] == ["keyspace"]

    key = api.call(
        "POST",
        "/keys",
        {"name": "k", "owner": "o", "identity_id": identity["id"], "plan_id": plan["id"]},
        status=201,
    )
    got = api.call("GET", f"/keys/{key['id']}")
    for field, value in (
        ("identity_id", identity["id"]),
        ("plan_id", plan["id"]),
        ("enabled", True),
        ("roles", []),
        ("keyspace", "default"),
    ):
        assert got[field] == value, (field, got)
    eff = got["effective"]
    assert eff["scopes"] == ["orders:read"] and eff["scopes_from"] == "plan"
    assert eff["rate_limits"][0]["limit"] == 10 and eff["rate_limits_from"] == "plan"
    assert eff["credits"] is None and eff["credits_from"] == "key"

    # A plan change is seen on the next read, version bumped.
    patched = api.call("PATCH", f"/plans/{plan['id']}", {"scopes": ["orders:*"]})
    assert patched["version"] == 2
    assert api.call("GET", f"/keys/{key['id']}")["effective"]["scopes"] == ["orders:*"]
    v = api.call("POST", "/keys/validate", {"key": key["key"], "scopes": ["orders:write"]})
    assert v["valid"] is True and v["scopes"] == ["orders:*"]

    # Disable and enable, audited.
    off = api.call("PATCH", f"/keys/{key['id']}", {"enabled": False})
    assert off["enabled"] is False
    v = api.call("POST", "/keys/validate", {"key": key["key"]})
    assert v == {**v, "valid": False, "code": "KEY_DISABLED"}
    api.call("PATCH", f"/keys/{key['id']}", {"enabled": True})
    assert api.call("POST", "/keys/validate", {"key": key["key"]})["valid"] is True
    assert [e["target_id"] for e in audit(api, "key.disable")] == [key["id"]]
    assert [e["target_id"] for e in audit(api, "key.enable")] == [key["id"]]
    api.call("PATCH", f"/identities/{identity['id']}", {"enabled": False})
    v = api.call("POST", "/keys/validate", {"key": key["key"]})
    assert v["valid"] is False and v["code"] == "KEY_DISABLED"
    api.call("PATCH", f"/identities/{identity['id']}", {"enabled": True})
    assert [e["target_id"] for e in audit(api, "identity.disable")] == [identity["id"]]
    doc = api.problem(
        "PATCH", f"/keys/{key['id']}", {"keyspace": "default"}, 400, "VALIDATION_ERROR"
    )
    assert doc["errors"][0]["path"] == "keyspace"

    # Listing and filtering identities.
    page = api.call("GET", "/identities?external_id=cus_1")
    assert [i["id"] for i in page["items"]] == [identity["id"]]
    assert api.call("GET", "/identities?external_id=nobody")["items"] == []
    api.problem("GET", "/identities?cursor=bogus", None, 400, "VALIDATION_ERROR")
    api.problem("GET", "/identities/key_nope", None, 400, "VALIDATION_ERROR")
    api.problem("GET", f"/identities/{UNKNOWN_IDN}", None, 404, "NOT_FOUND")
    usage = api.call("GET", f"/identities/{identity['id']}/usage")
    assert usage["keys"] == 1 and usage["credits_remaining"] == 100

    # Deletes refused while in use, then allowed.
    api.problem("DELETE", f"/plans/{plan['id']}", None, 409, "PLAN_IN_USE")
    api.problem("DELETE", f"/identities/{identity['id']}", None, 409, "IDENTITY_HAS_KEYS")
    api.problem(
        "DELETE", f"/identities/{identity['id']}?revoke_keys=maybe", None, 400, "VALIDATION_ERROR"
    )
    gone = api.call("DELETE", f"/identities/{identity['id']}?revoke_keys=true")
    assert gone == {"id": identity["id"], "deleted": True, "revoked_keys": [key["id"]]}
    after = api.call("GET", f"/keys/{key['id']}")
    assert after["status"] == "revoked" and after["identity_id"] is None
    # The revoked key left its plan: nothing is on it any more.
    assert api.call("DELETE", f"/plans/{plan['id']}") == {"id": plan["id"], "deleted": True}
    assert [e["target_id"] for e in audit(api, "identity.delete")] == [identity["id"]]
    revokes = audit(api, "key.revoke")
    assert revokes[0]["details"] == {"reason": "identity.delete", "identity_id": identity["id"]}


def test_openapi_describes_identities_and_plans(served: tuple[ServeProcess, Api, Path]) -> None:
    _, api, _ = served
    doc = api.c.get("/openapi.json").json()
    paths = doc["paths"]
    for path, methods in (
        ("/identities", {"get", "post"}),
        ("/identities/{id}", {"get", "patch", "delete"}),
        ("/identities/{id}/usage", {"get"}),
        ("/plans", {"get", "post"}),
        ("/plans/{id}", {"get", "patch", "delete"}),
    ):
        assert methods <= set(paths[path]), (path, paths.get(path))
    text = json.dumps(doc)
    for field in ("identity_id", "plan_id", "enabled", "keyspace", "revoke_keys", "external_id"):
        assert f'"{field}"' in text, field


def test_cli_on_the_served_data_directory(served: tuple[ServeProcess, Api, Path]) -> None:
    _, api, data = served
    d = ("--data-dir", str(data))
    plan = cli("plans", "create", *d, "--name", "basic", "--scope", "a:read",
               "--rate-limit", "minute=10/60")  # fmt: skip
    assert plan["name"] == "basic" and plan["rate_limits"][0]["limit"] == 10
    assert cli("plans", "get", *d, plan["id"])["id"] == plan["id"]
    assert cli("plans", "patch", *d, plan["id"], "--clear-scopes")["version"] == 2
    assert [p["id"] for p in cli("plans", "list", *d)["items"]] == [plan["id"]]

    ident = cli("identities", "create", *d, "--external-id", "cus_cli", "--name", "Acme",
                "--metadata", '{"tier": "gold"}', "--credits", "50",
                "--plan", plan["id"])  # fmt: skip
    assert ident["metadata"] == {"tier": "gold"} and ident["plan_id"] == plan["id"]
    assert cli_fails("identities", "create", *d, "--external-id", "cus_cli").startswith("CONFLICT")
    listed = cli("identities", "list", *d, "--external-id", "cus_cli")
    assert [i["id"] for i in listed["items"]] == [ident["id"]]

    key = cli("keys", "create", *d, "--name", "k", "--owner", "o", "--identity", ident["id"],
              "--plan", plan["id"], "--disable")  # fmt: skip
    assert key["enabled"] is False and key["identity_id"] == ident["id"]
    err = cli_fails("keys", "create", *d, "--name", "k", "--owner", "o", "--role", "ghost")
    assert "VALIDATION_ERROR: roles[0]" in err, err
    on = cli("keys", "patch", *d, key["id"], "--enable", "--no-plan")
    assert on["enabled"] is True and on["plan_id"] is None
    assert cli_fails("keys", "patch", *d, key["id"]).startswith("VALIDATION_ERROR")

    # The running server sees what the CLI wrote, at once.
    got = api.call("GET", f"/keys/{key['id']}")
    assert got["enabled"] is True and got["identity_id"] == ident["id"]
    assert api.call("POST", "/keys/validate", {"key": key["key"]})["valid"] is True
    assert [e["actor_id"] for e in audit(api, "key.enable")] == ["cli"]

    usage = cli("identities", "usage", *d, ident["id"])
    assert usage["keys"] == 1 and usage["credits_remaining"] == 50
    off = cli("identities", "patch", *d, ident["id"], "--disable", "--no-plan")
    assert off["enabled"] is False and off["plan_id"] is None
    v = api.call("POST", "/keys/validate", {"key": key["key"]})
    assert v["code"] == "KEY_DISABLED"
    assert cli_fails("identities", "delete", *d, ident["id"]).startswith("IDENTITY_HAS_KEYS")
    gone = cli("identities", "delete", *d, ident["id"], "--revoke-keys")
    assert gone["revoked_keys"] == [key["id"]]
    assert cli_fails("identities", "get", *d, ident["id"]).startswith("NOT_FOUND")
    assert cli("plans", "delete", *d, plan["id"])["deleted"] is True
    # Human output works too.
    res = run_cli("plans", "list", *d)
    assert res.returncode == 0 and res.stdout.strip() == "no plans", res


def test_identity_deleted_while_keys_are_created_on_it(
    served: tuple[ServeProcess, Api, Path],
) -> None:
    """Key creations racing the identity's deletion: each key either made it
    before (and is revoked with the others) or is refused with a 400 on
    identity_id; no key is left naming the deleted identity."""
    sp, api, _ = served
    ident = api.call("POST", "/identities", {"external_id": "race"}, status=201)
    results: list[tuple[int, dict[str, Any]]] = []
    lock = threading.Lock()

    def create(n: int) -> None:
        with sp.client() as c:
            for i in range(n):
                r = c.post(
                    "/keys",
                    json={"name": f"k{i}", "owner": "o", "identity_id": ident["id"]},
                    headers=api.h,
                )
                with lock:
                    results.append((r.status_code, r.json()))

    threads = [threading.Thread(target=create, args=(15,)) for _ in range(3)]
    for t in threads:
        t.start()
    deleted = None
    for _ in range(200):  # delete as soon as at least one key made it in
        with lock:
            made = any(s == 201 for s, _ in results)
        if made:
            deleted = api.call("DELETE", f"/identities/{ident['id']}?revoke_keys=true")
            break
        threading.Event().wait(0.01)
    for t in threads:
        t.join(30)
    assert deleted is not None and all(not t.is_alive() for t in threads)
    created = [body["id"] for status, body in results if status == 201]
    refused = [body for status, body in results if status != 201]
    assert len(created) + len(refused) == 45
    assert set(deleted["revoked_keys"]) == set(created)
    for body in refused:
        assert body["code"] == "VALIDATION_ERROR" and body["errors"][0]["path"] == "identity_id"
    for key_id in created:
        got = api.call("GET", f"/keys/{key_id}")
        assert got["status"] == "revoked" and got["identity_id"] is None
