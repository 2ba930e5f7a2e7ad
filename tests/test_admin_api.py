"""The admin API end to end (CONTRACT §4, §5): the real server in-process
(hypercorn + quart-trio + LMDB in a temp dir), driven over HTTP.

Time is moved, where a test needs expiry or the end of a grace period, by
swapping the key service's ``clock`` (services take a clock callable), never
by sleeping.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
import trio.lowlevel

from tests.conftest import Admin, Running
from tests.helpers_gateway import assert_problem
from tests.helpers_webhooks import stored_delivery
from triogate.admin.endpoints import ENDPOINTS, Endpoint
from triogate.control.ids import new_id
from triogate.control.keyformat import KeyFormat
from triogate.control.permissions import ROLES, grants

KEY_RECORD_FIELDS = {
    "id",
    "name",
    "owner",
    "scopes",
    "status",
    "created_at",
    "expires_at",
    "revoked_at",
    "rotated_to",
    "rotated_from",
    "grace_ends_at",
    "last_used_at",
    "metadata",
    "rate_limits",
    "credits",
}
SECRET_FIELDS = {"key", "digest", "digest_version", "sealed", "owner_tag", "plaintext", "hash"}


# ---- helpers ----------------------------------------------------------------


def rfc3339_utc(value: Any) -> datetime:
    """An RFC 3339 timestamp in UTC."""
    assert isinstance(value, str), value
    assert value.endswith("Z") or value.endswith("+00:00"), value
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.utcoffset() == timedelta(0)
    return parsed


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def future(seconds: float) -> str:
    return iso(datetime.now(UTC) + timedelta(seconds=seconds))


def assert_no_secrets(record: dict[str, Any], *plaintexts: str) -> None:
    assert not SECRET_FIELDS & set(record), record
    text = repr(record)
    for p in plaintexts:
        assert p not in text


def without_updated_at(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "updated_at"}


def set_clock(running: Running, monkeypatch: pytest.MonkeyPatch, offset: float) -> None:
    """Move the key service's idea of "now" by ``offset`` seconds."""
    monkeypatch.setattr(running.gateway.keys, "_clock", lambda: time.time() + offset)


async def create_key(client: httpx.AsyncClient, admin: Admin, **body: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"name": "k", "owner": "owner@example.com", "scopes": [], **body}
    r = await client.post("/keys", json=payload, headers=admin.headers)
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


async def validate(
    client: httpx.AsyncClient, admin: Admin, key: str, scopes: list[str] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"key": key}
    if scopes is not None:
        body["scopes"] = scopes
    r = await client.post("/keys/validate", json=body, headers=admin.headers)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


async def create_admin(client: httpx.AsyncClient, by: Admin, **body: Any) -> Admin:
    payload = {"name": "someone", "email": f"{new_id('adm').lower()}@example.com", **body}
    r = await client.post("/admins", json=payload, headers=by.headers)
    assert r.status_code == 201, r.text
    return Admin(r.json()["id"], r.json()["key"])


async def get_all(
    client: httpx.AsyncClient, admin: Admin, path: str, **params: str
) -> list[list[dict[str, Any]]]:
    """Every page of a cursor-paged list."""
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    for _ in range(1000):
        q = dict(params)
        if cursor is not None:
            q["cursor"] = cursor
        r = await client.get(path, params=q, headers=admin.headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"items", "next_cursor"}
        pages.append(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
    raise AssertionError("paging never ended")


def flat(pages: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [item for page in pages for item in page]


# ---- key lifecycle ----------------------------------------------------------------


async def test_create_returns_plaintext_once_and_reads_never_do(
    running: Running, root: Admin
) -> None:
    c = running.client
    body = {
        "name": "billing",
        "owner": "alice@example.com",
        "scopes": ["users:read", "orders:*"],
        "expires_at": future(86400),
        "metadata": {"team": "billing", "tier": 2, "nested": {"ok": True}},
        "rate_limits": [{"name": "burst", "limit": 10, "period_seconds": 1}],
        "credits": {"remaining": 1000, "refill_amount": 100, "refill_interval_seconds": 3600},
    }
    r = await c.post("/keys", json=body, headers=root.headers)
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith("application/json")
    created = r.json()
    plaintext = created["key"]
    assert isinstance(plaintext, str) and plaintext.startswith("tg_")
    assert KeyFormat("tg_").is_well_formed(plaintext)
    assert set(created) >= KEY_RECORD_FIELDS
    assert created["id"].startswith("key_")
    assert created["name"] == "billing"
    assert created["owner"] == "alice@example.com"
    assert created["scopes"] == ["users:read", "orders:*"]
    assert created["status"] == "active"
    assert created["metadata"] == body["metadata"]
    assert created["rate_limits"] == [
        {**r, "algorithm": "gcra", "routes": []} for r in body["rate_limits"]
    ]
    # Credits' later fields (issue 13: calendar refills, credits.low levels) default to null.
    credits_defaults = {"refill_interval": None, "refill_day": None, "low_at_percent": None}
    assert created["credits"] == {**body["credits"], **credits_defaults}
    assert created["revoked_at"] is None
    assert created["rotated_to"] is None and created["rotated_from"] is None
    assert created["grace_ends_at"] is None and created["last_used_at"] is None
    created_at = rfc3339_utc(created["created_at"])
    assert abs((created_at - datetime.now(UTC)).total_seconds()) < 60
    expires_at = rfc3339_utc(created["expires_at"])
    assert abs((expires_at - rfc3339_utc(body["expires_at"])).total_seconds()) < 0.01
    assert not {"digest", "sealed", "owner_tag"} & set(created)

    r = await c.get(f"/keys/{created['id']}", headers=root.headers)
    assert r.status_code == 200
    got = r.json()
    assert set(got) >= KEY_RECORD_FIELDS
    assert_no_secrets(got, plaintext)
    assert plaintext not in r.text
    assert {k: v for k, v in created.items() if k != "key"} == got

    r = await c.get("/keys", headers=root.headers)
    assert r.status_code == 200
    assert plaintext not in r.text
    (item,) = r.json()["items"]
    assert_no_secrets(item, plaintext)
    assert item == got
    assert r.json()["next_cursor"] is None

    # The plaintext is shown once: a second read of anything never has it.
    r = await c.get(f"/keys/{created['id']}/usage", headers=root.headers)
    assert plaintext not in r.text


async def test_create_defaults(running: Running, root: Admin) -> None:
    r = await running.client.post(
        "/keys", json={"name": "min", "owner": "bob"}, headers=root.headers
    )
    assert r.status_code == 201, r.text
    k = r.json()
    assert k["scopes"] == []
    assert k["expires_at"] is None and k["metadata"] is None and k["credits"] is None
    assert k["rate_limits"] == []
    # Two creates, two different keys.
    other = await create_key(running.client, root, name="min", owner="bob")
    assert other["key"] != k["key"] and other["id"] != k["id"]


async def test_patch_changes_only_given_fields_and_null_clears(
    running: Running, root: Admin
) -> None:
    c = running.client
    k = await create_key(
        c,
        root,
        name="before",
        owner="carol",
        scopes=["a:read"],
        expires_at=future(3600),
        metadata={"v": 1},
        rate_limits=[{"name": "m", "limit": 5, "period_seconds": 60}],
        credits={"remaining": 10},
    )
    url = f"/keys/{k['id']}"

    async def patch(body: dict[str, Any]) -> dict[str, Any]:
        r = await c.patch(url, json=body, headers=root.headers)
        assert r.status_code == 200, r.text
        patched: dict[str, Any] = r.json()
        assert_no_secrets(patched, k["key"])
        r = await c.get(url, headers=root.headers)
        assert r.json() == patched  # what PATCH answered is what is stored
        return patched

    new_expiry = future(7200)
    new_limits = [
        {"name": "burst", "limit": 2, "period_seconds": 1.0},
        {"name": "daily", "limit": 1000, "period_seconds": 86400.0},
    ]
    p = await patch(
        {
            "name": "after",
            "scopes": ["b:write", "users:*"],
            "metadata": {"v": 2, "tags": ["x"]},
            "expires_at": new_expiry,
            "rate_limits": new_limits,
            "credits": {"remaining": 50, "refill_amount": 5, "refill_interval_seconds": 60},
        }
    )
    assert p["name"] == "after"
    assert p["scopes"] == ["b:write", "users:*"]
    assert p["metadata"] == {"v": 2, "tags": ["x"]}
    assert abs(rfc3339_utc(p["expires_at"]) - rfc3339_utc(new_expiry)) < timedelta(milliseconds=1)
    assert p["rate_limits"] == [{**r, "algorithm": "gcra", "routes": []} for r in new_limits]
    assert p["credits"] == {
        "remaining": 50,
        "refill_amount": 5,
        "refill_interval_seconds": 60,
        "refill_interval": None,
        "refill_day": None,
        "low_at_percent": None,
    }
    # Untouchable fields stay.
    assert p["owner"] == "carol" and p["id"] == k["id"] and p["status"] == "active"
    assert p["created_at"] == k["created_at"]
    assert rfc3339_utc(p["updated_at"]) >= rfc3339_utc(k["updated_at"])

    # Absent fields are untouched.
    q = await patch({"name": "only-name"})
    assert without_updated_at(q) == without_updated_at({**p, "name": "only-name"})
    q2 = await patch({})
    assert without_updated_at(q2) == without_updated_at(q)

    # null clears the nullable ones, one at a time.
    q = await patch({"expires_at": None})
    assert q["expires_at"] is None and q["metadata"] == {"v": 2, "tags": ["x"]}
    q = await patch({"metadata": None})
    assert q["metadata"] is None and q["credits"] is not None
    q = await patch({"credits": None})
    assert q["credits"] is None
    assert q["rate_limits"] == [{**r, "algorithm": "gcra", "routes": []} for r in new_limits]
    assert q["scopes"] == ["b:write", "users:*"]
    q = await patch({"rate_limits": [], "scopes": []})
    assert q["rate_limits"] == [] and q["scopes"] == []

    # The key itself still works after all that.
    v = await validate(c, root, k["key"])
    assert v["valid"] is True and v["key_id"] == k["id"] and v["owner"] == "carol"


async def test_revoke_then_revoke_again_is_409(running: Running, root: Admin) -> None:
    c = running.client
    k = await create_key(c, root)
    r = await c.delete(f"/keys/{k['id']}", headers=root.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == k["id"] and body["status"] == "revoked"
    revoked_at = rfc3339_utc(body["revoked_at"])
    assert abs((revoked_at - datetime.now(UTC)).total_seconds()) < 60

    r = await c.get(f"/keys/{k['id']}", headers=root.headers)
    assert r.json()["status"] == "revoked"
    assert rfc3339_utc(r.json()["revoked_at"]) == revoked_at

    r = await c.delete(f"/keys/{k['id']}", headers=root.headers)
    assert_problem(r, 409, "CONFLICT")
    # The second DELETE changed nothing.
    r = await c.get(f"/keys/{k['id']}", headers=root.headers)
    assert rfc3339_utc(r.json()["revoked_at"]) == revoked_at

    v = await validate(c, root, k["key"])
    assert v["valid"] is False and v["code"] == "KEY_REVOKED" and v["key_id"] == k["id"]


async def test_rotate_with_grace(
    running: Running, root: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = running.client
    old = await create_key(
        c,
        root,
        name="svc",
        owner="dave@example.com",
        scopes=["users:read", "orders:*"],
        metadata={"env": "prod"},
        rate_limits=[{"name": "burst", "limit": 3, "period_seconds": 1}],
        credits={"remaining": 77, "refill_amount": 7, "refill_interval_seconds": 60},
        expires_at=future(30 * 86400),
    )
    r = await c.post(
        f"/keys/{old['id']}/rotate", json={"grace_seconds": 3600}, headers=root.headers
    )
    assert r.status_code in (200, 201), r.text
    body = r.json()
    assert set(body) == {"old", "new"}
    assert body["old"]["id"] == old["id"]
    assert body["old"]["status"] == "rotated"
    grace_ends = rfc3339_utc(body["old"]["grace_ends_at"])
    assert 3500 < (grace_ends - datetime.now(UTC)).total_seconds() <= 3600

    new = body["new"]
    assert new["key"].startswith("tg_") and new["key"] != old["key"]
    assert new["id"] != old["id"]
    assert new["status"] == "active"
    assert new["rotated_from"] == old["id"]
    for f in ("name", "owner", "scopes", "metadata", "rate_limits", "credits", "expires_at"):
        assert new[f] == old[f], f

    r = await c.get(f"/keys/{old['id']}", headers=root.headers)
    o = r.json()
    assert o["status"] == "rotated" and o["rotated_to"] == new["id"]
    assert rfc3339_utc(o["grace_ends_at"]) == grace_ends
    assert_no_secrets(o, old["key"], new["key"])
    r = await c.get(f"/keys/{new['id']}", headers=root.headers)
    assert_no_secrets(r.json(), old["key"], new["key"])

    # During the grace period the old key still validates, and says until when.
    v = await validate(c, root, old["key"], ["users:read"])
    assert v["valid"] is True and "code" not in v
    assert v["key_id"] == old["id"]
    assert rfc3339_utc(v["grace_ends_at"]) == grace_ends
    v = await validate(c, root, new["key"], ["orders:write"])
    assert v["valid"] is True and v["key_id"] == new["id"] and v["owner"] == "dave@example.com"

    # Only an active key can be rotated.
    r = await c.post(f"/keys/{old['id']}/rotate", json={}, headers=root.headers)
    assert_problem(r, 409, "CONFLICT")
    revoked = await create_key(c, root)
    assert (await c.delete(f"/keys/{revoked['id']}", headers=root.headers)).status_code == 200
    r = await c.post(f"/keys/{revoked['id']}/rotate", json={}, headers=root.headers)
    assert_problem(r, 409, "CONFLICT")

    # After the grace period: KEY_ROTATED for the old one, the new one is fine.
    set_clock(running, monkeypatch, 3601)
    v = await validate(c, root, old["key"])
    assert v["valid"] is False and v["code"] == "KEY_ROTATED" and v["key_id"] == old["id"]
    v = await validate(c, root, new["key"])
    assert v["valid"] is True


async def test_rotate_default_body_and_zero_grace(running: Running, root: Admin) -> None:
    c = running.client
    k = await create_key(c, root)
    # No body at all: the default grace (one day).
    r = await c.post(f"/keys/{k['id']}/rotate", headers=root.headers)
    assert r.status_code in (200, 201), r.text
    grace = rfc3339_utc(r.json()["old"]["grace_ends_at"]) - datetime.now(UTC)
    assert timedelta(hours=23) < grace <= timedelta(days=1)
    # Zero grace: the old key is refused at once.
    k2 = await create_key(c, root)
    r = await c.post(f"/keys/{k2['id']}/rotate", json={"grace_seconds": 0}, headers=root.headers)
    assert r.status_code in (200, 201), r.text
    v = await validate(c, root, k2["key"])
    assert v["valid"] is False and v["code"] == "KEY_ROTATED"


async def test_validate_codes(
    running: Running, root: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = running.client
    k = await create_key(
        c, root, owner="erin", scopes=["users:*", "orders:read"], expires_at=future(3600)
    )
    plaintext = k["key"]

    v = await validate(c, root, plaintext)
    assert v["valid"] is True and "code" not in v
    assert v["key_id"] == k["id"] and v["owner"] == "erin"
    assert v["scopes"] == ["users:*", "orders:read"]
    assert rfc3339_utc(v["expires_at"]) == rfc3339_utc(k["expires_at"])

    # INVALID_KEY: malformed, wrong checksum, well-formed but unknown, wrong kind.
    last = plaintext[-1]
    wrong_checksum = plaintext[:-1] + ("A" if last != "A" else "B")
    for bad in (
        "hello",
        "tg_",
        plaintext[:-1],
        plaintext + "x",
        plaintext.upper(),
        wrong_checksum,
        KeyFormat("tg_").generate(),
        root.key,
    ):
        v = await validate(c, root, bad)
        assert v == {"valid": False, "code": "INVALID_KEY"}, bad

    # Scopes: exact, case-sensitive; "users:*" grants everything under "users:".
    assert (await validate(c, root, plaintext, ["users:read"]))["valid"] is True
    assert (await validate(c, root, plaintext, ["users:write", "users:admin:x"]))["valid"] is True
    assert (await validate(c, root, plaintext, ["orders:read", "users:read"]))["valid"] is True
    v = await validate(c, root, plaintext, ["orders:write", "users:read", "Users:read", "users"])
    assert v["valid"] is False and v["code"] == "INSUFFICIENT_SCOPE"
    assert sorted(v["required_scopes"]) == ["Users:read", "orders:write", "users"]
    assert v["key_id"] == k["id"]

    # KEY_EXPIRED once the clock passes expires_at; PATCH expires_at null revives it.
    set_clock(running, monkeypatch, 7200)
    v = await validate(c, root, plaintext)
    assert v["valid"] is False and v["code"] == "KEY_EXPIRED" and v["key_id"] == k["id"]
    r = await c.get(f"/keys/{k['id']}", headers=root.headers)
    assert r.json()["status"] == "expired"
    r = await c.patch(f"/keys/{k['id']}", json={"expires_at": None}, headers=root.headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "active"
    assert (await validate(c, root, plaintext))["valid"] is True

    # Precedence: revoked beats expired and scopes.
    k2 = await create_key(c, root, expires_at=future(7300))
    monkeypatch.undo()
    assert (await c.delete(f"/keys/{k2['id']}", headers=root.headers)).status_code == 200
    set_clock(running, monkeypatch, 10 * 86400)
    v = await validate(c, root, k2["key"], ["nope:read"])
    assert v["code"] == "KEY_REVOKED"


async def test_usage_shape(running: Running, root: Admin) -> None:
    c = running.client
    limits = [{"name": "burst", "limit": 5, "period_seconds": 1.0}]
    k = await create_key(c, root, rate_limits=limits, credits={"remaining": 42})
    r = await c.get(f"/keys/{k['id']}/usage", headers=root.headers)
    assert r.status_code == 200, r.text
    u = r.json()
    assert {"key_id", "requests", "last_used_at", "credits_remaining", "rate_limits"} <= set(u)
    assert u["key_id"] == k["id"]
    assert u["requests"] == 0
    assert u["last_used_at"] is None
    assert u["credits_remaining"] == 42
    assert u["rate_limits"] == [{**r, "algorithm": "gcra", "routes": []} for r in limits]
    assert_no_secrets(u, k["key"])

    # A PATCH of credits sets the balance.
    r = await c.patch(f"/keys/{k['id']}", json={"credits": {"remaining": 7}}, headers=root.headers)
    assert r.status_code == 200
    u = (await c.get(f"/keys/{k['id']}/usage", headers=root.headers)).json()
    assert u["credits_remaining"] == 7
    # No credits: no balance.
    k2 = await create_key(c, root)
    u = (await c.get(f"/keys/{k2['id']}/usage", headers=root.headers)).json()
    assert u["credits_remaining"] is None and u["rate_limits"] == []


async def test_cleanup_counts(
    running: Running, root: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = running.client
    expiring = [await create_key(c, root, name=f"exp{i}", expires_at=future(600)) for i in range(3)]
    forever = await create_key(c, root, name="forever")
    revoked = await create_key(c, root, name="revoked", expires_at=future(600))
    assert (await c.delete(f"/keys/{revoked['id']}", headers=root.headers)).status_code == 200
    short = await create_key(c, root, name="short-grace")
    long = await create_key(c, root, name="long-grace")
    r = await c.post(
        f"/keys/{short['id']}/rotate", json={"grace_seconds": 60}, headers=root.headers
    )
    short_new = r.json()["new"]
    r = await c.post(
        f"/keys/{long['id']}/rotate", json={"grace_seconds": 86400}, headers=root.headers
    )
    assert r.status_code in (200, 201)

    # Nothing is due yet.
    r = await c.post("/maintenance/cleanup", headers=root.headers)
    assert r.status_code == 200, r.text
    assert r.json() == {"expired": 0, "purged": 0}

    set_clock(running, monkeypatch, 3600)
    r = await c.post("/maintenance/cleanup", headers=root.headers)
    assert r.status_code == 200, r.text
    assert r.json() == {"expired": 3, "purged": 1}

    for k in expiring:
        got = (await c.get(f"/keys/{k['id']}", headers=root.headers)).json()
        assert got["status"] == "expired"
    assert (await c.get(f"/keys/{forever['id']}", headers=root.headers)).json()[
        "status"
    ] == "active"
    assert (await c.get(f"/keys/{revoked['id']}", headers=root.headers)).json()[
        "status"
    ] == "revoked"
    r = await c.get(f"/keys/{short['id']}", headers=root.headers)
    assert_problem(r, 404, "NOT_FOUND")
    assert (await validate(c, root, short["key"]))["code"] in ("INVALID_KEY", "KEY_ROTATED")
    assert (await validate(c, root, short_new["key"]))["valid"] is True
    assert (await c.get(f"/keys/{long['id']}", headers=root.headers)).json()["status"] == "rotated"

    listed = flat(await get_all(c, root, "/keys", status="expired"))
    assert {k["id"] for k in listed} == {k["id"] for k in expiring}

    # Idempotent: a second run finds nothing more to do.
    r = await c.post("/maintenance/cleanup", headers=root.headers)
    assert r.json() == {"expired": 0, "purged": 0}

    entries = flat(await get_all(c, root, "/audit", action="maintenance.cleanup"))
    assert len(entries) == 3
    assert all(e["actor_id"] == root.id for e in entries)


# ---- audit --------------------------------------------------------------------------


async def test_audit_records_every_action(running: Running, root: Admin) -> None:
    c = running.client
    k = await create_key(c, root)
    assert (
        await c.patch(f"/keys/{k['id']}", json={"name": "n"}, headers=root.headers)
    ).status_code == 200
    r = await c.post(f"/keys/{k['id']}/rotate", json={"grace_seconds": 10}, headers=root.headers)
    new_id_ = r.json()["new"]["id"]
    assert (await c.delete(f"/keys/{new_id_}", headers=root.headers)).status_code == 200
    ka = await create_admin(c, root, role="key_admin")
    k2 = await create_key(c, ka)
    victim = await create_admin(c, root, role="auditor")
    assert (await c.delete(f"/admins/{victim.id}", headers=root.headers)).status_code == 200
    assert (await c.post("/maintenance/cleanup", headers=root.headers)).status_code == 200
    # Reads are not audited.
    await c.get("/keys", headers=root.headers)
    await validate(c, root, k["key"])

    expected = [  # newest first
        ("maintenance.cleanup", root.id, None),
        ("admin.revoke", root.id, victim.id),
        ("admin.create", root.id, victim.id),
        ("key.create", ka.id, k2["id"]),
        ("admin.create", root.id, ka.id),
        ("key.revoke", root.id, new_id_),
        ("key.rotate", root.id, k["id"]),
        ("key.update", root.id, k["id"]),
        ("key.create", root.id, k["id"]),
        ("setup", root.id, root.id),
    ]
    pages = await get_all(c, root, "/audit", limit="3")
    assert [len(p) for p in pages] == [3, 3, 3, 1]
    entries = flat(pages)
    assert [(e["action"], e["actor_id"], e["target_id"]) for e in entries] == expected
    ids = [e["id"] for e in entries]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids, reverse=True)
    for e in entries:
        assert set(e) >= {"id", "at", "actor_id", "action", "target_id", "source_ip", "details"}
        assert e["source_ip"] == "127.0.0.1"
        assert isinstance(e["details"], dict)
        at = rfc3339_utc(e["at"])
        assert abs((at - datetime.now(UTC)).total_seconds()) < 60
        assert k["key"] not in repr(e) and ka.key not in repr(e)
    rotate = next(e for e in entries if e["action"] == "key.rotate")
    assert rotate["details"].get("new_id") == new_id_
    update = next(e for e in entries if e["action"] == "key.update")
    assert "name" in repr(update["details"])

    # Filters, with paging.
    by_ka = flat(await get_all(c, root, "/audit", actor=ka.id, limit="1"))
    assert [(e["action"], e["target_id"]) for e in by_ka] == [("key.create", k2["id"])]
    creates = await get_all(c, root, "/audit", action="key.create", limit="1")
    assert [[e["target_id"] for e in p] for p in creates] == [[k2["id"]], [k["id"]]]
    both = flat(await get_all(c, root, "/audit", actor=root.id, action="admin.create", limit="1"))
    assert [e["target_id"] for e in both] == [victim.id, ka.id]
    none = await get_all(c, root, "/audit", actor=new_id("adm"))
    assert none == [[]]


# ---- config and OpenAPI ---------------------------------------------------------------


async def test_get_config(running: Running, root: Admin) -> None:
    r = await running.client.get("/config", headers=root.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["version"], str) and body["version"]
    loaded = rfc3339_utc(body["loaded_at"])
    assert abs((loaded - datetime.now(UTC)).total_seconds()) < 300
    # Stable between calls.
    again = (await running.client.get("/config", headers=root.headers)).json()
    assert again["version"] == body["version"] and again["loaded_at"] == body["loaded_at"]


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    assert ref.startswith("#/components/schemas/"), ref
    resolved: dict[str, Any] = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return resolved


async def test_openapi_describes_every_endpoint(running: Running) -> None:
    r = await running.client.get("/openapi.json")  # no key needed
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["title"] and doc["info"]["version"]
    paths = doc["paths"]
    documented = {(m.upper(), p) for p, ops in paths.items() for m in ops}
    for ep in ENDPOINTS:
        assert (ep.method, ep.path) in documented, (ep.method, ep.path)
        op = paths[ep.path][ep.method.lower()]
        assert op.get("operationId")
        assert str(ep.status) in op["responses"]
        if ep.permission is not None:
            assert op.get("x-required-permission") == ep.permission
            assert op.get("security"), ep.path
            for code in ("401", "403"):
                assert code in op["responses"], (ep.path, code)
        if "{id}" in ep.path:
            assert any(p["name"] == "id" and p["in"] == "path" for p in op["parameters"])
        if ep.query is not None:
            names = {p["name"] for p in op["parameters"] if p["in"] == "query"}
            # Their names as sent (a field may be renamed: ``from``).
            assert names == {f.encode_name for f in msgspec.structs.fields(ep.query)}
        if ep.request is not None:
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            resolved = _resolve(doc, schema)
            assert resolved.get("type") == "object"
            assert resolved.get("additionalProperties") is False, ep.request.__name__
            assert set(resolved["properties"]) == set(ep.request.__struct_fields__)
    # Nested request objects forbid unknown fields too.
    for name in ("RateLimit", "Credits"):
        assert doc["components"]["schemas"][name]["additionalProperties"] is False
    # Every $ref points somewhere.

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            out = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
            return out + [x for v in node.values() for x in refs(v)]
        if isinstance(node, list):
            return [x for v in node for x in refs(v)]
        return []

    for ref in refs(doc):
        assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"], ref


# ---- /setup under concurrency ------------------------------------------------------------


async def test_concurrent_setup_exactly_one_wins(running: Running) -> None:
    c = running.client
    results: list[httpx.Response] = []

    async def attempt(i: int) -> None:
        r = await c.post("/setup", json={"name": f"root{i}", "email": f"root{i}@example.com"})
        results.append(r)

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(attempt, i)

    assert len(results) == 10
    winners = [r for r in results if r.status_code == 201]
    losers = [r for r in results if r.status_code != 201]
    assert len(winners) == 1, [r.status_code for r in results]
    assert len(losers) == 9
    for r in losers:
        assert_problem(r, 409, "CONFLICT")
    won = winners[0].json()
    assert won["role"] == "super_admin" and won["key"].startswith("tgadm_")
    admin = Admin(won["id"], won["key"])
    r = await c.get("/admins", headers=admin.headers)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert len(items) == 1
    assert items[0]["id"] == won["id"] and items[0]["role"] == "super_admin"
    assert items[0]["email"] == won["email"]
    assert "key" not in items[0]
    assert won["key"] not in r.text
    setups = flat(await get_all(c, admin, "/audit", action="setup"))
    assert len(setups) == 1 and setups[0]["target_id"] == won["id"]
    # And later, still 409.
    r = await c.post("/setup", json={"name": "late", "email": "late@example.com"})
    assert_problem(r, 409, "CONFLICT")


# ---- paging ------------------------------------------------------------------------------


async def test_paging_is_stable_under_concurrent_inserts(running: Running, root: Admin) -> None:
    c = running.client
    originals = [(await create_key(c, root, name=f"orig{i}"))["id"] for i in range(60)]
    inserted: list[str] = []
    start_inserting = trio.Event()
    fifteen_inserted = trio.Event()
    pages: list[list[dict[str, Any]]] = []
    inserted_by_page: list[int] = []  # how many late keys existed at each page

    async def inserter() -> None:
        await start_inserting.wait()
        for i in range(40):
            inserted.append((await create_key(c, root, name=f"late{i}"))["id"])
            if len(inserted) == 15:
                fifteen_inserted.set()
            await trio.lowlevel.checkpoint()

    async def pager() -> None:
        cursor: str | None = None
        while True:
            params = {"limit": "7"} if cursor is None else {"limit": "7", "cursor": cursor}
            r = await c.get("/keys", params=params, headers=root.headers)
            assert r.status_code == 200, r.text
            body = r.json()
            pages.append(body["items"])
            inserted_by_page.append(len(inserted))
            cursor = body["next_cursor"]
            if len(pages) == 1:
                start_inserting.set()
                # Let the inserts really happen between pages.
                await fifteen_inserted.wait()
            if cursor is None:
                return
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(inserter)
        nursery.start_soon(pager)

    assert len(inserted) == 40
    # The inserts really did interleave with the paging.
    assert inserted_by_page[0] == 0
    assert any(0 < n < 40 for n in inserted_by_page[1:]), inserted_by_page
    seen = [item["id"] for page in pages for item in page]
    assert len(seen) == len(set(seen)), "an id showed up twice"
    for key_id in originals:
        assert seen.count(key_id) == 1, key_id
    assert set(seen) == set(originals), "only keys that existed when paging began"
    assert all(len(p) == 7 for p in pages[:-1])
    assert seen == sorted(seen, reverse=True), "newest first"
    created = [rfc3339_utc(item["created_at"]) for page in pages for item in page]
    assert created == sorted(created, reverse=True)
    # A fresh walk now sees all 100, newest first.
    everything = [k["id"] for k in flat(await get_all(c, root, "/keys", limit="100"))]
    assert everything == list(reversed(originals + inserted))


async def test_paging_with_owner_and_status_filters(running: Running, root: Admin) -> None:
    c = running.client
    alice: list[str] = []
    bob: list[str] = []
    for i in range(36):
        owner, bucket = ("alice@example.com", alice) if i % 3 else ("bob@example.com", bob)
        bucket.append((await create_key(c, root, name=f"k{i}", owner=owner))["id"])
    revoked = set(alice[::4]) | {bob[0]}
    for key_id in revoked:
        assert (await c.delete(f"/keys/{key_id}", headers=root.headers)).status_code == 200

    def check(pages: list[list[dict[str, Any]]], expected: list[str], limit: int) -> None:
        ids = [k["id"] for k in flat(pages)]
        assert ids == sorted(expected, reverse=True)
        assert all(len(p) == limit for p in pages[:-1])
        assert len(pages[-1]) <= limit

    pages = await get_all(c, root, "/keys", owner="alice@example.com", limit="5")
    check(pages, alice, 5)
    assert all(k["owner"] == "alice@example.com" for k in flat(pages))
    check(await get_all(c, root, "/keys", owner="bob@example.com", limit="3"), bob, 3)
    check(
        await get_all(c, root, "/keys", owner="alice@example.com", status="revoked", limit="2"),
        [k for k in alice if k in revoked],
        2,
    )
    check(
        await get_all(c, root, "/keys", status="active", limit="6"),
        [k for k in alice + bob if k not in revoked],
        6,
    )
    check(await get_all(c, root, "/keys", status="revoked", limit="100"), list(revoked), 100)
    check(await get_all(c, root, "/keys", status="rotated"), [], 50)
    # Owner matching is exact.
    assert await get_all(c, root, "/keys", owner="ALICE@example.com") == [[]]
    assert await get_all(c, root, "/keys", owner="alice") == [[]]


# ---- permissions ----------------------------------------------------------------------------


@dataclass
class Caller:
    label: str
    admin: Admin
    permissions: tuple[str, ...]
    allowed: list[str] = field(default_factory=list)


ADMIN_SPECS: list[tuple[str, dict[str, Any]]] = [
    ("super_admin", {"role": "super_admin"}),
    ("key_admin", {"role": "key_admin"}),
    ("key_viewer", {"role": "key_viewer"}),
    ("auditor", {"role": "auditor"}),
    ("keys_star", {"permissions": ["admin:keys:*"]}),
    ("audit_and_key_read", {"permissions": ["admin:audit:read", "admin:keys:read"]}),
]

Request = tuple[str, str, dict[str, Any] | None]
Builder = Callable[[], Awaitable[Request]]


async def test_permission_matrix(running: Running, root: Admin) -> None:
    c = running.client
    callers = [Caller("root", root, ("*",))]
    for label, spec in ADMIN_SPECS:
        admin = await create_admin(c, root, name=label, **spec)
        perms = ROLES[spec["role"]] if "role" in spec else tuple(spec["permissions"])
        callers.append(Caller(label, admin, perms))

    async def fresh_key() -> dict[str, Any]:
        return await create_key(c, root, name="target", scopes=["users:read"])

    async def b_create() -> Request:
        return "POST", "/keys", {"name": "n", "owner": "o", "scopes": ["x:read"]}

    async def b_list() -> Request:
        return "GET", "/keys", None

    async def b_import() -> Request:
        return "POST", "/keys/import", {"keys": [{"sha256": "ab" * 32, "name": "n", "owner": "o"}]}

    async def b_validate() -> Request:
        return "POST", "/keys/validate", {"key": (await fresh_key())["key"]}

    async def b_get() -> Request:
        return "GET", f"/keys/{(await fresh_key())['id']}", None

    async def b_patch() -> Request:
        return "PATCH", f"/keys/{(await fresh_key())['id']}", {"name": "patched"}

    async def b_revoke() -> Request:
        return "DELETE", f"/keys/{(await fresh_key())['id']}", None

    async def b_rotate() -> Request:
        return "POST", f"/keys/{(await fresh_key())['id']}/rotate", {"grace_seconds": 60}

    async def b_usage() -> Request:
        return "GET", f"/keys/{(await fresh_key())['id']}/usage", None

    async def b_create_admin() -> Request:
        return "POST", "/admins", {"name": "n", "email": "n@example.com", "role": "auditor"}

    async def b_list_admins() -> Request:
        return "GET", "/admins", None

    async def b_revoke_admin() -> Request:
        victim = await create_admin(c, root, role="key_viewer")
        return "DELETE", f"/admins/{victim.id}", None

    async def b_audit() -> Request:
        return "GET", "/audit", None

    async def b_cleanup() -> Request:
        return "POST", "/maintenance/cleanup", None

    async def b_config() -> Request:
        return "GET", "/config", None

    async def b_routes() -> Request:
        return "GET", "/routes", None

    async def b_upstreams() -> Request:
        return "GET", "/upstreams", None

    async def b_cluster() -> Request:
        return "GET", "/cluster", None

    async def b_reload() -> Request:
        return "POST", "/config/reload", None

    made = iter(range(10_000))

    async def fresh(path: str, body: dict[str, Any]) -> str:
        r = await c.post(path, json=body, headers=root.headers)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    async def fresh_identity() -> str:
        return await fresh("/identities", {"external_id": f"cus_{next(made)}"})

    async def fresh_plan() -> str:
        return await fresh("/plans", {"name": f"plan{next(made)}"})

    async def fresh_role() -> str:
        return await fresh("/roles", {"name": f"role{next(made)}", "scopes": ["a:read"]})

    def customer_builders(
        path: str, make: Callable[[], Awaitable[str]], create: Callable[[], dict[str, Any]]
    ) -> dict[tuple[str, str], Builder]:
        async def b_create() -> Request:
            return "POST", path, create()

        async def b_list() -> Request:
            return "GET", path, None

        async def b_get() -> Request:
            return "GET", f"{path}/{await make()}", None

        async def b_patch() -> Request:
            return "PATCH", f"{path}/{await make()}", {"name": f"n{next(made)}"}

        async def b_delete() -> Request:
            return "DELETE", f"{path}/{await make()}", None

        return {
            ("POST", path): b_create,
            ("GET", path): b_list,
            ("GET", f"{path}/{{id}}"): b_get,
            ("PATCH", f"{path}/{{id}}"): b_patch,
            ("DELETE", f"{path}/{{id}}"): b_delete,
        }

    async def b_identity_usage() -> Request:
        return "GET", f"/identities/{await fresh_identity()}/usage", None

    async def b_key_history() -> Request:
        return "GET", f"/keys/{(await fresh_key())['id']}/usage/history", None

    async def b_identity_history() -> Request:
        return "GET", f"/identities/{await fresh_identity()}/usage/history", None

    async def b_key_credits() -> Request:
        key = await create_key(c, root, name="target", credits={"remaining": 5})
        return "POST", f"/keys/{key['id']}/credits", {"op": "increment", "amount": 1}

    async def b_identity_credits() -> Request:
        body = {"external_id": f"cus_{next(made)}", "credits": {"remaining": 5}}
        made_id = await fresh("/identities", body)
        return "POST", f"/identities/{made_id}/credits", {"op": "decrement", "amount": 1}

    async def b_deliveries() -> Request:
        return "GET", "/events/deliveries", None

    async def b_delivery() -> Request:
        return "GET", f"/events/deliveries/{await stored_delivery(running.gateway.store)}", None

    async def b_retry() -> Request:
        made_id = await stored_delivery(running.gateway.store)
        return "POST", f"/events/deliveries/{made_id}/retry", None

    builders: dict[tuple[str, str], Builder] = {
        ("GET", "/events/deliveries"): b_deliveries,
        ("GET", "/events/deliveries/{id}"): b_delivery,
        ("POST", "/events/deliveries/{id}/retry"): b_retry,
        **customer_builders(
            "/identities", fresh_identity, lambda: {"external_id": f"cus_{next(made)}"}
        ),
        ("GET", "/identities/{id}/usage"): b_identity_usage,
        ("GET", "/identities/{id}/usage/history"): b_identity_history,
        ("GET", "/keys/{id}/usage/history"): b_key_history,
        ("POST", "/keys/{id}/credits"): b_key_credits,
        ("POST", "/identities/{id}/credits"): b_identity_credits,
        **customer_builders("/plans", fresh_plan, lambda: {"name": f"plan{next(made)}"}),
        **customer_builders(
            "/roles", fresh_role, lambda: {"name": f"role{next(made)}", "scopes": ["a:read"]}
        ),
        ("POST", "/keys"): b_create,
        ("GET", "/keys"): b_list,
        ("POST", "/keys/validate"): b_validate,
        ("POST", "/keys/import"): b_import,
        ("GET", "/keys/{id}"): b_get,
        ("PATCH", "/keys/{id}"): b_patch,
        ("DELETE", "/keys/{id}"): b_revoke,
        ("POST", "/keys/{id}/rotate"): b_rotate,
        ("GET", "/keys/{id}/usage"): b_usage,
        ("POST", "/admins"): b_create_admin,
        ("GET", "/admins"): b_list_admins,
        ("DELETE", "/admins/{id}"): b_revoke_admin,
        ("GET", "/audit"): b_audit,
        ("POST", "/maintenance/cleanup"): b_cleanup,
        ("GET", "/config"): b_config,
        ("GET", "/routes"): b_routes,
        ("GET", "/upstreams"): b_upstreams,
        ("GET", "/cluster"): b_cluster,
        ("POST", "/config/reload"): b_reload,
    }
    guarded: list[Endpoint] = [ep for ep in ENDPOINTS if ep.permission is not None]
    missing = [(ep.method, ep.path) for ep in guarded if (ep.method, ep.path) not in builders]
    assert not missing, f"the matrix has no request for {missing}"

    outcome: dict[tuple[str, str, str], int] = {}
    for ep in guarded:
        assert ep.permission is not None
        for caller in callers:
            method, path, body = await builders[(ep.method, ep.path)]()
            r = await c.request(method, path, json=body, headers=caller.admin.headers)
            outcome[(caller.label, ep.method, ep.path)] = r.status_code
            if grants(caller.permissions, ep.permission):
                # This server runs without a config file: a permitted reload
                # is refused for that (409), not for the permission.
                allowed = 409 if ep.path == "/config/reload" else ep.status
                assert r.status_code == allowed, (caller.label, ep.method, ep.path, r.text)
                caller.allowed.append(f"{ep.method} {ep.path}")
            else:
                problem = assert_problem(r, 403, "FORBIDDEN")
                assert problem["required_permission"] == ep.permission, problem
                # A refused call changed nothing.
                if ep.path.startswith("/keys/{id}") and method != "GET":
                    key_id = path.split("/")[2]
                    got = (await c.get(f"/keys/{key_id}", headers=root.headers)).json()
                    assert got["status"] == "active" and got["name"] == "target"

    # Spelled out, independent of grants(): a few rows of the matrix.
    expect = {
        ("key_viewer", "POST", "/identities"): 403,
        ("key_viewer", "GET", "/plans"): 200,
        ("auditor", "GET", "/identities"): 403,
        ("key_admin", "DELETE", "/plans/{id}"): 200,
        ("key_admin", "GET", "/identities/{id}/usage"): 200,
        ("key_viewer", "POST", "/keys"): 403,
        ("key_viewer", "GET", "/keys"): 200,
        ("key_viewer", "GET", "/keys/{id}/usage"): 200,
        ("key_viewer", "POST", "/keys/validate"): 200,
        ("key_viewer", "DELETE", "/keys/{id}"): 403,
        ("auditor", "GET", "/audit"): 200,
        ("auditor", "GET", "/keys"): 403,
        ("auditor", "GET", "/admins"): 403,
        ("key_admin", "POST", "/keys"): 201,
        ("key_admin", "POST", "/keys/{id}/rotate"): 200,
        ("key_admin", "GET", "/audit"): 403,
        ("key_admin", "POST", "/admins"): 403,
        ("key_admin", "POST", "/maintenance/cleanup"): 403,
        ("keys_star", "DELETE", "/keys/{id}"): 200,
        ("keys_star", "PATCH", "/keys/{id}"): 200,
        ("keys_star", "GET", "/audit"): 403,
        ("keys_star", "GET", "/config"): 403,
        ("audit_and_key_read", "GET", "/audit"): 200,
        ("audit_and_key_read", "GET", "/keys/{id}"): 200,
        ("audit_and_key_read", "PATCH", "/keys/{id}"): 403,
        ("audit_and_key_read", "POST", "/keys"): 403,
        ("super_admin", "DELETE", "/admins/{id}"): 200,
        ("super_admin", "GET", "/config"): 200,
        ("root", "POST", "/admins"): 201,
    }
    for (label, method, path), status in expect.items():
        got_status = outcome[(label, method, path)]
        assert got_status == status, (label, method, path)
    # The matrix is not degenerate.
    statuses = list(outcome.values())
    assert statuses.count(403) >= 30 and len(statuses) - statuses.count(403) >= 30
    by_label = {c_.label: c_ for c_ in callers}
    assert len(by_label["root"].allowed) == len(guarded)
    assert len(by_label["super_admin"].allowed) == len(guarded)
    assert sorted(by_label["auditor"].allowed) == ["GET /audit"]


async def test_authentication_failures(running: Running, root: Admin) -> None:
    c = running.client
    guarded = [ep for ep in ENDPOINTS if ep.permission is not None]
    some_id = new_id("key")
    api_key = (await create_key(c, root))["key"]
    cases: list[tuple[dict[str, str], str]] = [
        ({}, "MISSING_KEY"),
        ({"Authorization": "Bearer"}, "MISSING_KEY"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "MISSING_KEY"),
        ({"Authorization": "Bearer not-a-key"}, "INVALID_KEY"),
        ({"Authorization": f"Bearer {root.key[:-1]}"}, "INVALID_KEY"),
        ({"Authorization": f"Bearer {KeyFormat('tgadm_').generate()}"}, "INVALID_KEY"),
        ({"Authorization": f"Bearer {api_key}"}, "INVALID_KEY"),
    ]
    for ep in guarded:
        path = ep.path.replace("{id}", some_id if ep.path.startswith("/keys") else new_id("adm"))
        for headers, code in cases:
            r = await c.request(ep.method, path, json={}, headers=headers)
            assert_problem(r, 401, code)

    # A revoked admin's key.
    viewer = await create_admin(c, root, role="key_viewer")
    assert (await c.get("/keys", headers=viewer.headers)).status_code == 200
    r = await c.delete(f"/admins/{viewer.id}", headers=root.headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "revoked"
    assert viewer.key not in r.text
    for ep in guarded:
        path = ep.path.replace("{id}", some_id)
        r = await c.request(ep.method, path, json={}, headers=viewer.headers)
        assert_problem(r, 401, "KEY_REVOKED")
    r = await c.delete(f"/admins/{viewer.id}", headers=root.headers)
    assert_problem(r, 409, "CONFLICT")

    # An admin cannot revoke itself, even as super_admin.
    r = await c.delete(f"/admins/{root.id}", headers=root.headers)
    assert_problem(r, 409, "CONFLICT")
    other = await create_admin(c, root, role="super_admin")
    r = await c.delete(f"/admins/{other.id}", headers=other.headers)
    assert_problem(r, 409, "CONFLICT")
    assert (await c.get("/keys", headers=root.headers)).status_code == 200
    assert (await c.get("/keys", headers=other.headers)).status_code == 200

    # GET /admins never shows keys.
    r = await c.get("/admins", headers=root.headers)
    for item in r.json()["items"]:
        assert "key" not in item and "digest" not in item
    for secret in (root.key, other.key, viewer.key):
        assert secret not in r.text

    # Open endpoints need no key.
    assert (await c.get("/health")).status_code == 200
    assert (await c.get("/openapi.json")).status_code == 200


# ---- encryption at rest -----------------------------------------------------------------


async def test_plaintext_keys_owners_and_emails_never_reach_disk(
    running: Running, root: Admin
) -> None:
    c = running.client
    tag = new_id("key")[-10:].lower()
    owners = [f"owner-{i}-{tag}@example.com" for i in range(4)]
    keys = [
        await create_key(c, root, name=f"visible-name-{tag}-{i}", owner=o, metadata={"o": o})
        for i, o in enumerate(owners)
    ]
    r = await c.post(
        f"/keys/{keys[0]['id']}/rotate", json={"grace_seconds": 60}, headers=root.headers
    )
    rotated = r.json()["new"]
    admin_emails = [f"admin-{tag}@example.org", "root@example.com"]
    extra_admin = await create_admin(c, root, name="extra", email=admin_emails[0], role="auditor")
    await c.patch(
        f"/keys/{keys[1]['id']}", json={"metadata": {"o": owners[1]}}, headers=root.headers
    )

    data_dir = Path(running.info.data_dir)
    blobs: dict[Path, bytes] = {}
    for dirpath, _dirs, files in os.walk(data_dir):
        for name in files:
            p = Path(dirpath) / name
            blobs[p] = p.read_bytes()
    assert any(b for b in blobs.values()), "no data written at all?"
    # Positive control: what is not secret (key names) is on disk, so the
    # search below looks at the right bytes.
    assert any(f"visible-name-{tag}-2".encode() in b for b in blobs.values())

    secrets = [k["key"] for k in keys] + [rotated["key"], root.key, extra_admin.key]
    bodies = [s.split("_", 1)[1] for s in secrets]  # without the prefix
    sensitive = secrets + bodies + owners + admin_emails
    for path, blob in blobs.items():
        for needle in sensitive:
            assert needle.encode() not in blob, f"{needle!r} in plaintext in {path}"
