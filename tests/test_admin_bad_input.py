"""Bad input to the admin API (CONTRACT §4, §5), through the real server.

Every admin endpoint must refuse bad input with ``400 VALIDATION_ERROR`` as
``application/problem+json`` carrying ``errors: [{path, message}]`` and a
``request_id`` -- naming *every* failing field, never answering 500. Bad ids,
unknown paths, wrong methods and oversized bodies get their own codes.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import Admin, Running
from tests.helpers_gateway import assert_problem as gateway_problem
from triogate.admin.app import MAX_ADMIN_BODY_BYTES
from triogate.control.ids import new_id
from triogate.control.models import MAX_GRACE_SECONDS, MAX_METADATA_BYTES

MAX_NAME = 255
MAX_SCOPES = 50
MAX_SCOPE_LEN = 100
MAX_RATE_LIMITS = 10


# ---- helpers ----------------------------------------------------------------


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The gateway's problem (``helpers_gateway``), never a 500, and its
    ``request_id`` also in ``X-Request-Id``."""
    assert r.status_code != 500, f"500 for a client error: {r.text}"
    body = gateway_problem(r, status, code)
    assert r.headers["x-request-id"] == body["request_id"]
    return body


def assert_validation_error(r: httpx.Response, *paths: str) -> list[dict[str, str]]:
    """400 VALIDATION_ERROR whose ``errors`` name (at least) each of ``paths``."""
    body = assert_problem(r, 400, "VALIDATION_ERROR")
    errors = body["errors"]
    assert isinstance(errors, list) and errors, body
    for e in errors:
        assert set(e) >= {"path", "message"}, e
        assert isinstance(e["path"], str) and e["path"]
        assert isinstance(e["message"], str) and e["message"]
    reported = {e["path"] for e in errors}
    missing = [p for p in paths if p not in reported]
    assert not missing, f"paths {missing} not reported; got {errors}"
    return list(errors)


def future(days: float = 30) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).isoformat().replace("+00:00", "Z")


def scope(n: int) -> list[str]:
    return [f"s{i}:read" for i in range(n)]


def limits(n: int) -> list[dict[str, Any]]:
    return [{"name": f"l{i}", "limit": 10, "period_seconds": 60} for i in range(n)]


async def do_setup(client: httpx.AsyncClient) -> Admin:
    r = await client.post("/setup", json={"name": "root", "email": "root@example.com"})
    assert r.status_code == 201, r.text
    return Admin(r.json()["id"], r.json()["key"])


async def make_key(client: httpx.AsyncClient, admin: Admin, **extra: Any) -> dict[str, Any]:
    body = {"name": "k", "owner": "owner@example.com", "scopes": ["users:read"], **extra}
    r = await client.post("/keys", json=body, headers=admin.headers)
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


@dataclass
class Target:
    """One endpoint with a body, ready to be called: a valid body to spoil."""

    method: str
    path: str
    headers: dict[str, str]
    valid: dict[str, Any]
    ok_status: int


BODY_ENDPOINTS = (
    "POST /setup",
    "POST /keys",
    "PATCH /keys/{id}",
    "POST /keys/{id}/rotate",
    "POST /keys/validate",
    "POST /admins",
)


async def target(running: Running, endpoint: str) -> Target:
    """Prepare the server for ``endpoint`` (setup, a key to act on) and say how
    to call it. ``POST /setup`` is left on a server without admins."""
    client = running.client
    if endpoint == "POST /setup":
        return Target("POST", "/setup", {}, {"name": "root", "email": "root@example.com"}, 201)
    admin = await do_setup(client)
    h = admin.headers
    if endpoint == "POST /keys":
        return Target("POST", "/keys", h, {"name": "k", "owner": "o@example.com"}, 201)
    if endpoint == "POST /keys/validate":
        key = await make_key(client, admin)
        return Target("POST", "/keys/validate", h, {"key": key["key"]}, 200)
    if endpoint == "POST /admins":
        valid = {"name": "a", "email": "a@example.com", "role": "auditor"}
        return Target("POST", "/admins", h, valid, 201)
    key = await make_key(client, admin)
    if endpoint == "PATCH /keys/{id}":
        return Target("PATCH", f"/keys/{key['id']}", h, {"name": "renamed"}, 200)
    assert endpoint == "POST /keys/{id}/rotate"
    return Target("POST", f"/keys/{key['id']}/rotate", h, {"grace_seconds": 60}, 200)


async def call(
    running: Running, t: Target, body: Any = None, *, raw: bytes | None = None
) -> httpx.Response:
    headers = dict(t.headers)
    if raw is not None:
        headers["content-type"] = "application/json"
        return await running.client.request(t.method, t.path, content=raw, headers=headers)
    return await running.client.request(t.method, t.path, json=body, headers=headers)


# ---- bodies: shapes that are not a JSON object --------------------------------


NOT_AN_OBJECT: list[bytes] = [
    b'{"name": ',  # truncated
    b"{name: 'x'}",  # not JSON
    b'{"name": "a",}',  # trailing comma
    b"\xff\xfe{}",  # not UTF-8
    b"[]",
    b'[{"name": "x", "email": "x@example.com"}]',  # an array of the right object
    b'"just a string"',
    b"42",
    b"null",
    b"true",
]


@pytest.mark.parametrize("endpoint", BODY_ENDPOINTS)
@pytest.mark.parametrize("raw", NOT_AN_OBJECT, ids=lambda b: repr(b)[:24])
async def test_body_that_is_not_a_json_object(running: Running, endpoint: str, raw: bytes) -> None:
    t = await target(running, endpoint)
    r = await call(running, t, raw=raw)
    errors = assert_validation_error(r, "$")
    assert len(errors) == 1


@pytest.mark.parametrize("endpoint", BODY_ENDPOINTS)
async def test_deeply_nested_json_is_400_not_500(running: Running, endpoint: str) -> None:
    """A nesting bomb is bad JSON, not an internal error (msgspec raises
    RecursionError past its depth limit)."""
    t = await target(running, endpoint)
    depth = 100_000
    r = await call(running, t, raw=b"[" * depth + b"]" * depth)
    assert_validation_error(r, "$")
    # Nested inside an otherwise valid object too.
    nested = b'{"a":' * depth + b"1" + b"}" * depth
    r = await call(running, t, raw=b'{"name": "x", "nested": ' + nested + b"}")
    assert_validation_error(r)
    # And the server is still fine afterwards.
    r = await running.client.get("/health")
    assert r.status_code == 200


@pytest.mark.parametrize("endpoint", BODY_ENDPOINTS)
async def test_unknown_field(running: Running, endpoint: str) -> None:
    t = await target(running, endpoint)
    r = await call(running, t, {**t.valid, "surprise": True})
    errors = assert_validation_error(r, "surprise")
    assert [e["path"] for e in errors] == ["surprise"]
    # The same body without the stranger is accepted: only the field was wrong.
    r = await call(running, t, t.valid)
    assert r.status_code == t.ok_status, r.text


WRONG_TYPES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "POST /setup": ({"name": 5, "email": ["a@b.c"]}, ("name", "email")),
    "POST /keys": (
        {"name": 5, "owner": None, "scopes": "users:read", "credits": [], "rate_limits": {}},
        ("name", "owner", "scopes", "credits", "rate_limits"),
    ),
    "PATCH /keys/{id}": (
        {"name": 5, "scopes": "x", "metadata": [1], "credits": "lots", "expires_at": 12},
        ("name", "scopes", "metadata", "credits", "expires_at"),
    ),
    "POST /keys/{id}/rotate": ({"grace_seconds": "60"}, ("grace_seconds",)),
    "POST /keys/validate": ({"key": 5, "scopes": [1]}, ("key", "scopes[0]")),
    "POST /admins": ({"name": 5, "email": 5, "role": 1}, ("name", "email", "role")),
}


@pytest.mark.parametrize("endpoint", BODY_ENDPOINTS)
async def test_wrong_types_each_reported(running: Running, endpoint: str) -> None:
    t = await target(running, endpoint)
    body, paths = WRONG_TYPES[endpoint]
    assert_validation_error(await call(running, t, body), *paths)


@pytest.mark.parametrize(
    "endpoint", ["POST /setup", "POST /keys", "POST /keys/validate", "POST /admins"]
)
async def test_missing_required_fields(running: Running, endpoint: str) -> None:
    t = await target(running, endpoint)
    required = {
        "POST /setup": ("name", "email"),
        "POST /keys": ("name", "owner"),
        "POST /keys/validate": ("key",),
        "POST /admins": ("name", "email"),
    }[endpoint]
    assert_validation_error(await call(running, t, {}), *required)
    # An empty body counts as {} and is refused the same way.
    assert_validation_error(await call(running, t, raw=b""), *required)


@pytest.mark.parametrize("endpoint", ["POST /setup", "POST /admins"])
async def test_bad_email(running: Running, endpoint: str) -> None:
    t = await target(running, endpoint)
    for email in ("no-at-sign", "two@@example.com", "with space@example.com", ""):
        assert_validation_error(await call(running, t, {**t.valid, "email": email}), "email")


# ---- field limits ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "field"),
    [
        ("POST /setup", "name"),
        ("POST /keys", "name"),
        ("POST /keys", "owner"),
        ("PATCH /keys/{id}", "name"),
        ("POST /admins", "name"),
    ],
)
async def test_name_and_owner_length(running: Running, endpoint: str, field: str) -> None:
    t = await target(running, endpoint)
    for empty in ("", "x" * (MAX_NAME + 1), "é" * (MAX_NAME + 1)):
        errors = assert_validation_error(await call(running, t, {**t.valid, field: empty}), field)
        assert [e["path"] for e in errors] == [field]
    r = await call(running, t, {**t.valid, field: "x" * MAX_NAME})
    assert r.status_code == t.ok_status, r.text
    assert r.json()[field] == "x" * MAX_NAME


SCOPE_ENDPOINTS = ["POST /keys", "PATCH /keys/{id}", "POST /keys/validate"]


@pytest.mark.parametrize("endpoint", SCOPE_ENDPOINTS)
async def test_scope_count(running: Running, endpoint: str) -> None:
    t = await target(running, endpoint)
    assert_validation_error(
        await call(running, t, {**t.valid, "scopes": scope(MAX_SCOPES + 1)}), "scopes"
    )
    r = await call(running, t, {**t.valid, "scopes": scope(MAX_SCOPES)})
    assert r.status_code == t.ok_status, r.text


@pytest.mark.parametrize("endpoint", SCOPE_ENDPOINTS)
async def test_scope_length(running: Running, endpoint: str) -> None:
    t = await target(running, endpoint)
    long = "a" * (MAX_SCOPE_LEN + 1)
    assert_validation_error(
        await call(running, t, {**t.valid, "scopes": ["ok:read", long]}), "scopes[1]"
    )
    r = await call(running, t, {**t.valid, "scopes": ["a" * MAX_SCOPE_LEN]})
    assert r.status_code == t.ok_status, r.text


@pytest.mark.parametrize("endpoint", SCOPE_ENDPOINTS)
@pytest.mark.parametrize("bad", ["users read", " users:read", "users:read\t", "users:\nread", ""])
async def test_scope_with_whitespace_or_empty(running: Running, endpoint: str, bad: str) -> None:
    t = await target(running, endpoint)
    assert_validation_error(await call(running, t, {**t.valid, "scopes": [bad]}), "scopes[0]")


@pytest.mark.parametrize("endpoint", ["POST /keys", "PATCH /keys/{id}"])
async def test_metadata_size(running: Running, endpoint: str) -> None:
    t = await target(running, endpoint)
    overhead = len(b'{"a":""}')
    too_big = {"a": "x" * (MAX_METADATA_BYTES - overhead + 1)}  # 8193 bytes encoded
    errors = assert_validation_error(await call(running, t, {**t.valid, "metadata": too_big}))
    # The error names the field, like every other field error does.
    assert [e["path"] for e in errors] == ["metadata"], errors
    just_fits = {"a": "x" * (MAX_METADATA_BYTES - overhead)}  # exactly 8192 bytes
    r = await call(running, t, {**t.valid, "metadata": just_fits})
    assert r.status_code == t.ok_status, r.text
    assert r.json()["metadata"] == just_fits


@pytest.mark.parametrize("endpoint", ["POST /keys", "PATCH /keys/{id}"])
async def test_metadata_not_an_object(running: Running, endpoint: str) -> None:
    t = await target(running, endpoint)
    for bad in ([1, 2], "text", 5):
        assert_validation_error(await call(running, t, {**t.valid, "metadata": bad}), "metadata")


@pytest.mark.parametrize("endpoint", ["POST /keys", "PATCH /keys/{id}"])
async def test_expires_at_in_the_past_or_naive(running: Running, endpoint: str) -> None:
    t = await target(running, endpoint)
    for bad in (
        "2020-01-01T00:00:00Z",
        (datetime.now(UTC) - timedelta(seconds=5)).isoformat(),
        "2099-01-01T00:00:00",  # no timezone
        "next tuesday",
        "2099-13-01T00:00:00Z",
    ):
        assert_validation_error(
            await call(running, t, {**t.valid, "expires_at": bad}), "expires_at"
        )
    r = await call(running, t, {**t.valid, "expires_at": future()})
    assert r.status_code == t.ok_status, r.text


@pytest.mark.parametrize("endpoint", ["POST /keys", "PATCH /keys/{id}"])
async def test_expires_at_beyond_year_9999_is_refused_not_stored(
    running: Running, endpoint: str
) -> None:
    """``9999-12-31T23:59:59-05:00`` is a valid RFC 3339 time whose UTC form lies
    in year 10000, which no RFC 3339 timestamp (and no ``datetime``) can show.
    It must be refused with 400, not stored to break every later read."""
    t = await target(running, endpoint)
    r = await call(running, t, {**t.valid, "expires_at": "9999-12-31T23:59:59-05:00"})
    assert_validation_error(r, "expires_at")
    # Whatever happened, listing keys must still work.
    r = await running.client.get("/keys", headers=t.headers)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("endpoint", ["POST /keys", "PATCH /keys/{id}"])
async def test_rate_limits(running: Running, endpoint: str) -> None:
    t = await target(running, endpoint)
    zero = [{"name": "burst", "limit": 0, "period_seconds": 1}]
    assert_validation_error(
        await call(running, t, {**t.valid, "rate_limits": zero}), "rate_limits[0].limit"
    )
    bad_period = [{"name": "burst", "limit": 1, "period_seconds": 0}]
    assert_validation_error(
        await call(running, t, {**t.valid, "rate_limits": bad_period}),
        "rate_limits[0].period_seconds",
    )
    unknown = [{"name": "burst", "limit": 1, "period_seconds": 1, "by": "ip"}]
    assert_validation_error(
        await call(running, t, {**t.valid, "rate_limits": unknown}), "rate_limits[0].by"
    )
    assert_validation_error(
        await call(running, t, {**t.valid, "rate_limits": limits(MAX_RATE_LIMITS + 1)}),
        "rate_limits",
    )
    r = await call(running, t, {**t.valid, "rate_limits": limits(MAX_RATE_LIMITS)})
    assert r.status_code == t.ok_status, r.text
    assert len(r.json()["rate_limits"]) == MAX_RATE_LIMITS


@pytest.mark.parametrize("endpoint", ["POST /keys", "PATCH /keys/{id}"])
async def test_rate_limit_names_must_be_unique(running: Running, endpoint: str) -> None:
    t = await target(running, endpoint)
    dup = [
        {"name": "burst", "limit": 1, "period_seconds": 1},
        {"name": "burst", "limit": 100, "period_seconds": 60},
    ]
    errors = assert_validation_error(await call(running, t, {**t.valid, "rate_limits": dup}))
    assert [e["path"] for e in errors] == ["rate_limits"], errors


@pytest.mark.parametrize("endpoint", ["POST /keys", "PATCH /keys/{id}"])
async def test_credits(running: Running, endpoint: str) -> None:
    t = await target(running, endpoint)
    assert_validation_error(
        await call(running, t, {**t.valid, "credits": {"remaining": -1}}), "credits.remaining"
    )
    assert_validation_error(
        await call(running, t, {**t.valid, "credits": {"remaining": 5, "refill_amount": -1}}),
        "credits.refill_amount",
    )
    assert_validation_error(
        await call(running, t, {**t.valid, "credits": {"remaining": 5, "unlimited": True}}),
        "credits.unlimited",
    )
    assert_validation_error(await call(running, t, {**t.valid, "credits": {}}), "credits.remaining")
    r = await call(running, t, {**t.valid, "credits": {"remaining": 0}})
    assert r.status_code == t.ok_status, r.text


async def test_grace_seconds(running: Running) -> None:
    t = await target(running, "POST /keys/{id}/rotate")
    for bad in (-1, MAX_GRACE_SECONDS + 1, 1.5, True, None):
        assert_validation_error(await call(running, t, {"grace_seconds": bad}), "grace_seconds")
    r = await call(running, t, {"grace_seconds": MAX_GRACE_SECONDS})
    assert r.status_code == 200, r.text
    assert r.json()["old"]["status"] == "rotated"


async def test_validate_key_length(running: Running) -> None:
    t = await target(running, "POST /keys/validate")
    assert_validation_error(await call(running, t, {"key": ""}), "key")
    assert_validation_error(await call(running, t, {"key": "x" * 513}), "key")


async def test_admin_role_and_permissions(running: Running) -> None:
    t = await target(running, "POST /admins")
    base = {"name": "a", "email": "a@example.com"}
    assert_validation_error(await call(running, t, {**base, "role": "root"}), "role")
    assert_validation_error(await call(running, t, {**base, "role": "Super_Admin"}), "role")
    # Exactly one of role and permissions.
    for body in ({**base, "role": "auditor", "permissions": ["admin:audit:read"]}, base):
        errors = assert_validation_error(await call(running, t, body))
        assert {e["path"] for e in errors} <= {"$", "role", "permissions"}, errors
    # Not a permission at all, and well-shaped but granting nothing that exists.
    assert_validation_error(
        await call(running, t, {**base, "permissions": ["bogus"]}), "permissions[0]"
    )
    for unknown in ("admin:keys:fly", "admin:nothing:*", "admin:users:delete"):
        errors = assert_validation_error(await call(running, t, {**base, "permissions": [unknown]}))
        assert any(
            e["path"].startswith("permissions") and unknown in e["message"] for e in errors
        ), errors
    # Nothing of that was created.
    r = await running.client.get("/admins", headers=t.headers)
    assert len(r.json()["items"]) == 1


# ---- several bad fields: every one is named -----------------------------------


MULTI: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    (
        "POST /keys",
        {"name": "x" * 256, "owner": "o", "scopes": ["ok:read", "bad scope"], "colour": "red"},
        ("name", "scopes[1]", "colour"),
    ),
    (
        "PATCH /keys/{id}",
        {"name": "x" * 256, "scopes": ["bad scope"], "owner": "someone else"},
        ("name", "scopes[0]", "owner"),
    ),
    (
        "POST /admins",
        {"name": "", "email": "nope", "role": "god", "team": "ops"},
        ("name", "email", "role", "team"),
    ),
    (
        "POST /setup",
        {"name": "x" * 256, "email": "nope", "role": "super_admin"},
        ("name", "email", "role"),
    ),
    (
        "POST /keys/validate",
        {"key": "", "scopes": scope(MAX_SCOPES + 1), "strict": True},
        ("key", "scopes", "strict"),
    ),
    (
        "POST /keys",
        {
            "name": "k",
            "owner": "o",
            "rate_limits": [
                {"name": "a", "limit": 0, "period_seconds": 1},
                {"name": "b", "limit": 1, "period_seconds": -1},
            ],
            "credits": {"remaining": -1, "refill_amount": -2},
        },
        (
            "rate_limits[0].limit",
            "rate_limits[1].period_seconds",
            "credits.remaining",
            "credits.refill_amount",
        ),
    ),
    (
        "PATCH /keys/{id}",
        {
            "rate_limits": [
                {"name": "a", "limit": 0, "period_seconds": 1},
                {"name": "b", "limit": 1, "period_seconds": -1},
            ],
            "credits": {"remaining": -1},
        },
        ("rate_limits[0].limit", "rate_limits[1].period_seconds", "credits.remaining"),
    ),
    # Rules beyond a single field's type (size, uniqueness, "in the future")
    # are failures of that field too, and are reported along with the others.
    (
        "POST /keys",
        {
            "name": "x" * 256,
            "owner": "o",
            "metadata": {"a": "x" * MAX_METADATA_BYTES},
            "rate_limits": [
                {"name": "a", "limit": 1, "period_seconds": 1},
                {"name": "a", "limit": 2, "period_seconds": 1},
            ],
            "expires_at": "2020-01-01T00:00:00Z",
        },
        ("name", "metadata", "rate_limits", "expires_at"),
    ),
]


@pytest.mark.parametrize(
    ("endpoint", "body", "paths"), MULTI, ids=[f"{m[0]}-{i}" for i, m in enumerate(MULTI)]
)
async def test_several_bad_fields_are_each_reported(
    running: Running, endpoint: str, body: dict[str, Any], paths: tuple[str, ...]
) -> None:
    t = await target(running, endpoint)
    errors = assert_validation_error(await call(running, t, body), *paths)
    assert len(errors) >= len(paths)
    r = await running.client.get("/health")
    assert r.status_code == 200


async def test_refused_create_changes_nothing(running: Running) -> None:
    t = await target(running, "POST /keys")
    r = await call(running, t, {"name": "x" * 256, "owner": "o"})
    assert_validation_error(r, "name")
    r = await running.client.get("/keys", headers=t.headers)
    assert r.json()["items"] == []
    r = await running.client.get("/audit", params={"action": "key.create"}, headers=t.headers)
    assert r.json()["items"] == []


# ---- query parameters -----------------------------------------------------------


def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


BAD_QUERIES: list[tuple[str, dict[str, str], tuple[str, ...]]] = [
    ("/keys", {"limit": "0"}, ("limit",)),
    ("/keys", {"limit": "101"}, ("limit",)),
    ("/keys", {"limit": "-1"}, ("limit",)),
    ("/keys", {"limit": "abc"}, ("limit",)),
    ("/keys", {"limit": "1.5"}, ("limit",)),
    ("/keys", {"cursor": "garbage"}, ("cursor",)),
    ("/keys", {"cursor": ""}, ("cursor",)),
    ("/keys", {"cursor": "A" * 300}, ("cursor",)),
    ("/keys", {"cursor": b64("key_not-a-real-id")}, ("cursor",)),
    ("/keys", {"status": "bogus"}, ("status",)),
    ("/keys", {"status": "ACTIVE"}, ("status",)),
    ("/keys", {"owner": ""}, ("owner",)),
    ("/keys", {"owner": "x" * 256}, ("owner",)),
    ("/keys", {"sort": "name"}, ("sort",)),
    ("/keys", {"limit": "0", "status": "bogus", "extra": "1"}, ("limit", "status", "extra")),
    ("/audit", {"cursor": "garbage"}, ("cursor",)),
    ("/audit", {"limit": "0"}, ("limit",)),
    ("/audit", {"limit": "101"}, ("limit",)),
    ("/audit", {"actor": ""}, ("actor",)),
    ("/audit", {"action": "x" * 65}, ("action",)),
    ("/audit", {"target": "x"}, ("target",)),
]


@pytest.mark.parametrize(
    ("path", "params", "paths"), BAD_QUERIES, ids=[f"{q[0]}?{q[1]}"[:40] for q in BAD_QUERIES]
)
async def test_bad_query_parameters(
    running: Running, path: str, params: dict[str, str], paths: tuple[str, ...]
) -> None:
    admin = await do_setup(running.client)
    r = await running.client.get(path, params=params, headers=admin.headers)
    assert_validation_error(r, *paths)


async def test_cursor_of_the_other_kind_is_refused(running: Running) -> None:
    """A well-formed cursor for audit entries is not a cursor for keys, and the
    reverse."""
    admin = await do_setup(running.client)
    await make_key(running.client, admin)
    await make_key(running.client, admin)
    r = await running.client.get("/audit", params={"limit": "1"}, headers=admin.headers)
    audit_cursor = r.json()["next_cursor"]
    assert audit_cursor
    r = await running.client.get("/keys", params={"limit": "1"}, headers=admin.headers)
    key_cursor = r.json()["next_cursor"]
    assert key_cursor
    r = await running.client.get("/keys", params={"cursor": audit_cursor}, headers=admin.headers)
    assert_validation_error(r, "cursor")
    r = await running.client.get("/audit", params={"cursor": key_cursor}, headers=admin.headers)
    assert_validation_error(r, "cursor")
    # Freshly made ids of the wrong kind too.
    r = await running.client.get(
        "/keys", params={"cursor": b64(new_id("aud"))}, headers=admin.headers
    )
    assert_validation_error(r, "cursor")
    # The right kind works.
    r = await running.client.get("/keys", params={"cursor": key_cursor}, headers=admin.headers)
    assert r.status_code == 200


# ---- ids in the path ------------------------------------------------------------


KEY_ID_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/keys/{id}", None),
    ("PATCH", "/keys/{id}", {"name": "n"}),
    ("DELETE", "/keys/{id}", None),
    ("POST", "/keys/{id}/rotate", {}),
    ("GET", "/keys/{id}/usage", None),
]


@pytest.mark.parametrize(("method", "template", "body"), KEY_ID_ROUTES)
async def test_malformed_key_id_is_400(
    running: Running, method: str, template: str, body: dict[str, Any] | None
) -> None:
    admin = await do_setup(running.client)
    for bad in ("not-an-id", new_id("adm"), "key_" + "0" * 25, "key_" + "U" * 26):
        r = await running.client.request(
            method, template.format(id=bad), json=body, headers=admin.headers
        )
        assert_validation_error(r, "id")


@pytest.mark.parametrize(("method", "template", "body"), KEY_ID_ROUTES)
async def test_unknown_key_id_is_404(
    running: Running, method: str, template: str, body: dict[str, Any] | None
) -> None:
    admin = await do_setup(running.client)
    await make_key(running.client, admin)
    r = await running.client.request(
        method, template.format(id=new_id("key")), json=body, headers=admin.headers
    )
    assert_problem(r, 404, "NOT_FOUND")


async def test_admin_ids(running: Running) -> None:
    admin = await do_setup(running.client)
    for bad in ("bogus", new_id("key")):
        r = await running.client.delete(f"/admins/{bad}", headers=admin.headers)
        assert_validation_error(r, "id")
    r = await running.client.delete(f"/admins/{new_id('adm')}", headers=admin.headers)
    assert_problem(r, 404, "NOT_FOUND")


# ---- paths, methods, sizes, request ids ---------------------------------------


@pytest.mark.parametrize("path", ["/nope", "/keys/", "/keys/a/b/c", "/admin/keys", "/v1/keys"])
async def test_unknown_path_is_404_problem(running: Running, path: str) -> None:
    admin = await do_setup(running.client)
    for headers in ({}, admin.headers):
        r = await running.client.get(path, headers=headers)
        assert_problem(r, 404, "NOT_FOUND")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/keys", {"GET", "POST"}),
        ("DELETE", "/keys", {"GET", "POST"}),
        ("PUT", "/keys/{id}", {"GET", "PATCH", "DELETE"}),
        ("GET", "/keys/{id}/rotate", {"POST"}),
        ("POST", "/health", {"GET"}),
        ("PATCH", "/setup", {"POST"}),
        ("DELETE", "/audit", {"GET"}),
    ],
)
async def test_wrong_method_is_405_with_allow(
    running: Running, method: str, path: str, allowed: set[str]
) -> None:
    admin = await do_setup(running.client)
    path = path.format(id=new_id("key"))
    r = await running.client.request(method, path, headers=admin.headers)
    assert_problem(r, 405, "METHOD_NOT_ALLOWED")
    allow = {m.strip() for m in r.headers["allow"].split(",")}
    assert allowed <= allow
    assert method not in allow


@pytest.fixture
async def own_client(running: Running) -> AsyncIterator[httpx.AsyncClient]:
    """A client of its own, so a wedged connection cannot hang other tests."""
    async with httpx.AsyncClient(base_url=running.info.admin_url, timeout=5) as client:
        yield client


async def test_body_over_one_mib_is_413(running: Running, own_client: httpx.AsyncClient) -> None:
    admin = await do_setup(running.client)
    headers = {**admin.headers, "content-type": "application/json"}
    for size in (MAX_ADMIN_BODY_BYTES + 1, 2 * MAX_ADMIN_BODY_BYTES):
        async with httpx.AsyncClient(base_url=running.info.admin_url, timeout=5) as client:
            r = await client.post("/keys", content=b" " * size, headers=headers)
            assert_problem(r, 413, "PAYLOAD_TOO_LARGE")
    # Chunked, with no Content-Length to refuse up front.

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * 100_000

    r = await own_client.post("/keys", content=chunks(), headers=headers)
    assert_problem(r, 413, "PAYLOAD_TOO_LARGE")
    # Just under the cap is read (and refused for what it says, not its size).
    padded = b'{"name": "k", "owner": "o"}'.ljust(MAX_ADMIN_BODY_BYTES, b" ")
    r = await running.client.post("/keys", content=padded, headers=headers)
    assert r.status_code == 201, r.text


async def test_connection_still_usable_after_413(running: Running) -> None:
    """After refusing an oversized body, the server must either read and
    discard it or close the connection; a keep-alive client's next request on
    the same connection must be answered, not hang.

    Whether the server wedges depends on how much of the body it had queued
    for the app when it answered, so the scenario is tried several times."""
    admin = await do_setup(running.client)
    headers = {**admin.headers, "content-type": "application/json"}
    for attempt in range(6):
        size = (MAX_ADMIN_BODY_BYTES + 1) * (1 + attempt % 2)
        async with httpx.AsyncClient(base_url=running.info.admin_url, timeout=5) as client:
            r = await client.post("/keys", content=b" " * size, headers=headers)
            assert_problem(r, 413, "PAYLOAD_TOO_LARGE")
            try:
                with trio.fail_after(3):
                    r = await client.get("/health")
            except (trio.TooSlowError, httpx.TimeoutException):
                pytest.fail(
                    f"attempt {attempt}: after a 413 for a {size}-byte body, the next "
                    "request on the same connection got no answer"
                )
            assert r.status_code == 200


async def test_request_id_echoed_or_replaced(running: Running) -> None:
    admin = await do_setup(running.client)
    good = "req-123.abc:XYZ_9"
    r = await running.client.get(
        "/keys", params={"limit": "0"}, headers={**admin.headers, "X-Request-ID": good}
    )
    body = assert_problem(r, 400, "VALIDATION_ERROR")
    assert r.headers["x-request-id"] == good
    assert body["request_id"] == good
    # On success too, the header comes back.
    r = await running.client.get("/keys", headers={**admin.headers, "X-Request-ID": good})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == good
    for bad in ("has spaces in it", "x" * 129, "semi;colon", "<script>"):
        r = await running.client.get(
            "/keys", params={"limit": "0"}, headers={**admin.headers, "X-Request-ID": bad}
        )
        body = assert_problem(r, 400, "VALIDATION_ERROR")
        assert body["request_id"] != bad
        assert r.headers["x-request-id"] == body["request_id"]
        assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", body["request_id"])
    # Without one, every response gets a fresh id.
    ids = set()
    for _ in range(3):
        r = await running.client.get("/nope")
        ids.add(assert_problem(r, 404, "NOT_FOUND")["request_id"])
    assert len(ids) == 3
